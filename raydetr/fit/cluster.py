"""The Ray cluster a fit runs on: connect or start one, and check the workers fit on it.

    init_ray(cfg)            $RAY_ADDRESS (``ray job submit``) or a local, loopback-only Ray
    check_placeable(cfg)     FitError now, instead of a worker group that waits forever
    max_concurrent(cfg)      trials that fit side by side (tune.max_concurrent_trials or the CPUs)
"""

from __future__ import annotations

import logging
import math
import os

import ray

from raydetr.config import Config
from raydetr.errors import UserError


class FitError(UserError, RuntimeError):
    """A fit could not start or did not finish; the message says what to do."""


LOCAL_POLL_ENV, LOCAL_POLL_S = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5"


def init_ray(cfg: Config) -> None:
    """Connect to $RAY_ADDRESS (``ray job submit`` sets it) or start a local Ray that listens on
    loopback only. Workers' output reaches this console only with ``run.verbose``."""
    if ray.is_initialized():
        return
    quiet = dict(log_to_driver=cfg.run.verbose,
                 logging_level=logging.INFO if cfg.run.verbose else logging.WARNING)
    if os.environ.get("RAY_ADDRESS"):
        ray.init(**quiet)
        return
    # Loopback only: Ray's local-only mode binds every server (GCS, raylet, workers, dashboard
    # agent) to 127.0.0.1. Ray reads the switch when it is first imported (ray_constants) and
    # its child processes read it from the environment, so both are set.
    from ray._private import ray_constants

    os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    # Ray Train's controller polls its workers every 2 s by default: each epoch's report (and
    # with early stopping the scheduler's decision the workers wait for), the end of the fit
    # and a dead worker are seen up to 2 s late. On a local Ray a 0.5 s poll costs nothing.
    # The controller inherits it from this environment.
    os.environ.setdefault(LOCAL_POLL_ENV, LOCAL_POLL_S)
    # A new local Ray turns token auth on and warns about it on every run unless RAY_AUTH_MODE
    # is set. Saying "token" is what it would do anyway, minus the warning; its config was read
    # when ray was imported, so it is re-read (as Ray itself does when it turns auth on).
    if "RAY_AUTH_MODE" not in os.environ:
        os.environ["RAY_AUTH_MODE"] = "token"
        ray._raylet.Config.initialize("")
    # Local: logical CPUs for the workers plus one to spare (each worker decodes in its own
    # loader threads; nothing else needs a CPU).
    need = cfg.scaling.num_workers * cfg.scaling.cpus_per_worker
    # The dashboard (loopback only) serves the State API, which Ray Train's placement-group
    # cleaner needs to notice a killed controller (early stop); without it PGs leak.
    # address="local": start a new Ray even when another cluster runs on this machine (ray.init
    # without an address would try to join it, and refuse num_cpus).
    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, math.ceil(need) + 1),
             include_dashboard=True, dashboard_host="127.0.0.1", **quiet)


def check_placeable(cfg: Config, trials: int = 1) -> None:
    """Fail fast with a clear message instead of letting a worker group wait forever."""
    total = ray.cluster_resources()
    need_cpu = cfg.scaling.num_workers * cfg.scaling.cpus_per_worker
    need_gpu = cfg.scaling.num_workers if cfg.scaling.use_gpu else 0
    have_cpu, have_gpu = total.get("CPU", 0.0), total.get("GPU", 0.0)
    if os.environ.get("RAYDETR_SKIP_PLACEMENT_CHECK") == "1":  # autoscaling clusters
        return
    problems = []
    if need_cpu > have_cpu:
        problems.append(f"{need_cpu:g} CPUs ({cfg.scaling.num_workers} workers x "
                        f"{cfg.scaling.cpus_per_worker:g}) but the cluster has {have_cpu:g}")
    if need_gpu > have_gpu:
        problems.append(f"{need_gpu} GPUs but the cluster has {have_gpu:g}")
    if problems:
        raise FitError(
            "the Train workers cannot be placed: need " + "; ".join(problems) + ". Lower "
            "scaling.num_workers / scaling.cpus_per_worker, set scaling.use_gpu=false, or add "
            "nodes (on an autoscaling cluster set RAYDETR_SKIP_PLACEMENT_CHECK=1)."
        )


def max_concurrent(cfg: Config) -> int:
    if cfg.tune.max_concurrent_trials:
        return cfg.tune.max_concurrent_trials
    total = ray.cluster_resources()
    per = cfg.scaling.num_workers * cfg.scaling.cpus_per_worker
    n = int(total.get("CPU", 1) // per)
    if cfg.scaling.use_gpu:
        n = min(n, int(total.get("GPU", 0) // cfg.scaling.num_workers))
    return max(1, n)
