"""Driver side of a fit: data preparation, Ray start-up, Tune + TorchTrainer, post-fit.

    fit(cfg) -> FitResult          one trial (a plain run, optionally early-stopped)
    run_trials(cfg, param_space)   many trials (raydetr.fit.search builds on it)

Layout of a run (``<run.output_dir>/<run.name>/``)::

    train/epoch_NNNN/   Ray Train storage of a plain run (trials/<trial_id>/... in a search)
    tune/               Tune experiment state
    winner/             model.safetensors + meta.json (the stripped winner)
    history.json, config.json, fit.json
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from raydetr.artifacts import RunDir, atomic_write_json
from raydetr.config import Config, with_overrides
from raydetr.config.presets import is_segmentation
from raydetr.data.parquet import (
    has_info,
    has_masks,
    is_prepared,
    is_uri,
    load_info,
    prepare_dataset,
    verify_shards,
)
from raydetr.data.synthetic import make_synthetic
from raydetr.ema.schedules import is_import_path, resolve_schedule
from raydetr.fit.cluster import FitError, check_placeable, init_ray, max_concurrent
from raydetr.fit.console import EpochLines, configure_console, header
from raydetr.fit.postfit import FitResult, finalize
from raydetr.fit.teacher import TeacherError, resolve_teachers
from raydetr.registry.live import LiveRuns
from raydetr.stopping.decisions import board_name, start_board, stop_board
from raydetr.stopping.scheduler import EarlyStoppingScheduler
from raydetr.train.checkpoint import best_cache_dir, checkpoint_dirs
from raydetr.train.pretrained import PretrainedError, resolve_pretrained
from raydetr.train.worker import train_loop_per_worker

log = logging.getLogger("raydetr.driver")

TRIAL_MEMORY_BYTES = 64 * 1024 * 1024  # lets the Tune trial actor take no CPU (see ARCHITECTURE)


def run_dir_of(cfg: Config) -> Path:
    return Path(cfg.run.output_dir).resolve() / cfg.run.name


# --------------------------------------------------------------------------- data
def ensure_prepared(cfg: Config) -> Path | str:
    """Prepared dataset for the run: as given, prepared from raw once, or the synthetic demo set.

    Raw datasets and the synthetic set are prepared under ``<output_dir>/datasets/`` keyed by a
    hash of their source, so repeated runs reuse them.
    """

    datasets = Path(cfg.run.output_dir).resolve() / "datasets"
    if cfg.data.path is None:
        d = cfg.data
        key = f"synthetic-m-{d.synthetic_train_images}-{d.synthetic_val_images}-{d.synthetic_image_size}-{cfg.run.seed}"
        out = datasets / key / "prepared"
        if not is_prepared(out):

            raw = make_synthetic(
                datasets / key / "raw", train_images=d.synthetic_train_images,
                val_images=d.synthetic_val_images, image_size=d.synthetic_image_size,
                seed=cfg.run.seed,
            )
            prepare_dataset(raw, out, shard_size=cfg.data.shard_size, overwrite=True,
                            row_group_size=cfg.data.row_group_size)
        return out
    if is_uri(cfg.data.path):
        if not has_info(cfg.data.path):
            raise FitError(f"data.path {cfg.data.path} is not a prepared dataset (no complete "
                           "dataset.json + shards there): run `raydetr prepare SRC OUT` locally "
                           "and upload OUT there; raw datasets are prepared from local paths only")
        return cfg.data.path
    src = Path(cfg.data.path).expanduser().resolve()
    if not src.exists():
        raise FitError(f"data.path {src} does not exist")
    if has_info(src):  # a damaged one (a shard missing) is reported by dataset_info
        return src
    digest = hashlib.sha1(str(src).encode()).hexdigest()[:10]
    out = datasets / f"{src.name}-{digest}"
    if not is_prepared(out):
        log.info("preparing %s into %s", src, out)
        prepare_dataset(src, out, shard_size=cfg.data.shard_size, overwrite=True,
                        row_group_size=cfg.data.row_group_size)
    return out


def dataset_info(prepared: Path | str, cfg: Config) -> dict[str, Any]:
    """dataset.json of the run's dataset, after checking the shards of the splits it uses
    (a missing/truncated shard fails here, before Ray starts, naming the shard)."""

    info = load_info(prepared)
    if is_segmentation(cfg.model.preset) and not has_masks(info):
        raise FitError(f"model.preset {cfg.model.preset} segments, but the dataset {prepared} "
                       "has no instance masks (boxes only); use a dataset with polygons or RLE "
                       "(COCO segmentation, YOLO segments) prepared by this raydetr, or a "
                       "detection preset")
    for split in (cfg.data.train_split, cfg.data.val_split):
        if split not in info["splits"]:
            raise FitError(
                f"prepared dataset {prepared} has no '{split}' split (it has "
                f"{sorted(info['splits'])}); set data.train_split / data.val_split"
            )
    verify_shards(prepared, list(dict.fromkeys([cfg.data.train_split, cfg.data.val_split])),
                  checksums=cfg.data.verify_checksums)
    return info


# --------------------------------------------------------------------------- tune + train
def train_name(single: bool, trial_id: str) -> str:
    """The Train run's folder under the run dir: ``train`` (plain fit) or ``trials/<id>``."""
    return RunDir.train_name(single, trial_id)


def _trial_fn(base: Config, prepared: str, classes: list[str], train_images: int,
              run_dir: str, pretrain_weights: str | None, single: bool,
              fault_inject: str | None = None, decision_board: str | None = None,
              schedule_fn: Any = None, teachers: dict | None = None):
    """The Tune trainable: builds a TorchTrainer whose rank-0 reports reach Tune. ``base`` is
    the parsed Config object; a search's trial applies its parameters to it once."""

    def trial(params: dict[str, Any]) -> None:
        import ray.train
        from ray import tune
        from ray.train.torch import TorchTrainer
        from ray.tune.integration.ray_train import TuneReportCallback

        cfg = with_overrides(base, params, "trial config")
        trial_id = tune.get_context().get_trial_id()
        name = train_name(single, trial_id)
        trainer = TorchTrainer(
            train_loop_per_worker=_train_loop,
            train_loop_config={"cfg": cfg, "classes": classes, "train_images": train_images,
                               "prepared": prepared, "run_key": str(Path(run_dir) / name),
                               "pretrain_weights": pretrain_weights,
                               "fault_inject": fault_inject, "trial_id": trial_id,
                               "decision_board": decision_board,
                               "schedule_fn": schedule_fn,
                               "teacher": (teachers or {}).get(cfg.distill.teacher)},
            scaling_config=ray.train.ScalingConfig(
                num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                resources_per_worker={"CPU": cfg.scaling.cpus_per_worker,
                                      **({"GPU": 1} if cfg.scaling.use_gpu else {})},
                placement_strategy=cfg.scaling.placement_strategy,
            ),
            # No Ray Datasets: each worker reads its own rows from the files (data.loader).
            run_config=ray.train.RunConfig(
                name=name, storage_path=run_dir,
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints),
                failure_config=ray.train.FailureConfig(max_failures=cfg.scaling.max_failures),
                callbacks=[TuneReportCallback()],
                # Idle OpenMP threads spin by default: with 2 threads per worker a CPU step
                # cost ~6x the CPU time (measured in bench/convergence.py's notes).
                worker_runtime_env={"env_vars": {"OMP_WAIT_POLICY": "PASSIVE"}},
            ),
        )
        trainer.fit()

    return trial


def _train_loop(loop_config: dict[str, Any]):

    return train_loop_per_worker(loop_config)


def has_checkpoints(run_dir: Path) -> bool:
    """True once any epoch of the run (a plain fit or any trial of a search) was saved."""

    return any(checkpoint_dirs(d) for d in RunDir(run_dir).train_dirs())


def _clear_failed_start(run_dir: Path) -> None:
    """A start that never finished an epoch left only Tune/Train bookkeeping: nothing to resume,
    so it must not block the next attempt with the same run.name."""
    run = RunDir(run_dir)
    stale = [run.tune, run.train, run.trials, run.early_stopping]
    stale = [p for p in stale if p.exists()]
    log.info("run '%s' at %s never finished an epoch: starting it afresh (removing %s)",
             run_dir.name, run_dir, ", ".join(p.name for p in stale))
    for path in stale:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


def run_trials(cfg: Config, *, param_space: dict[str, Any] | None = None, scheduler=None,
               num_samples: int = 1, max_concurrent_trials: int | None = None,
               resume: bool = False, pretrain_weights: str | None = None,
               live: Any = None, callbacks: list[Any] | None = None):
    """Run a Tuner whose trials are TorchTrainer runs; returns (ResultGrid, run_dir, info).
    ``live``: the fit's raydetr.registry.live.LiveRuns (per-epoch MLflow logging), if any;
    ``callbacks``: more Tune callbacks on the driver (a search's per-trial progress lines)."""
    from ray import tune


    configure_console(cfg.run.verbose)

    run_dir = run_dir_of(cfg)
    single = not param_space
    tune_dir = RunDir(run_dir).tune
    if tune_dir.exists() and not resume and not has_checkpoints(run_dir):
        _clear_failed_start(run_dir)
    if tune_dir.exists() and not resume:
        raise FitError(
            f"run '{cfg.run.name}' already exists at {run_dir}: pass --resume to continue it, "
            "or choose another run.name"
        )
    if resume and not tune_dir.exists():
        raise FitError(f"--resume: no run '{cfg.run.name}' at {run_dir} to continue")
    if pretrain_weights:  # a bad path fails here, before Ray starts, not in every worker

        try:
            _, source = resolve_pretrained(pretrain_weights, cfg.model.preset)
        except PretrainedError as exc:
            raise FitError(str(exc)) from None
        log.info("pretrain weights: %s", source)
    prepared = ensure_prepared(cfg)
    info = dataset_info(prepared, cfg)
    try:  # a bad teacher or class mismatch fails here, before Ray starts
        teachers = resolve_teachers(cfg, info["classes"], run_dir, search=not single)
    except TeacherError as exc:
        raise FitError(str(exc)) from None
    init_ray(cfg)
    check_placeable(cfg)
    for line in header(cfg, {"prepared": prepared, **info}, run_dir,
                       live.tracking_uri if live is not None else None):
        log.info(line)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(RunDir(run_dir).config, cfg.to_dict())
    board = None
    if getattr(scheduler, "decision_board", None):

        board = start_board(run_dir)
        if board != scheduler.decision_board:
            raise RuntimeError(f"scheduler posts to {scheduler.decision_board}, run has {board}")
    trainable = tune.with_resources(
        _trial_fn(cfg, str(prepared), info["classes"],
                  info["splits"][cfg.data.train_split]["images"], str(run_dir),
                  pretrain_weights, single, os.environ.get("RAYDETR_FAULT_INJECT"),
                  decision_board=board, schedule_fn=_shipped_schedule(cfg), teachers=teachers),
        {"memory": TRIAL_MEMORY_BYTES},
    )
    tune_config = tune.TuneConfig(
        scheduler=scheduler, num_samples=num_samples,
        max_concurrent_trials=max_concurrent_trials or (max_concurrent(cfg) if param_space else 1),
        trial_dirname_creator=lambda t: t.trial_id,
    )
    callbacks = [EpochLines(cfg, search=not single), *([live] if live is not None else []),
                 *(callbacks or [])]
    run_config = tune.RunConfig(name="tune", storage_path=str(run_dir), verbose=0,
                                callbacks=callbacks)
    if resume and tune.Tuner.can_restore(str(tune_dir)):
        tuner = tune.Tuner.restore(str(tune_dir), trainable, resume_errored=True,
                                   resume_unfinished=True)
    else:
        tuner = tune.Tuner(trainable, param_space=param_space or {}, tune_config=tune_config,
                           run_config=run_config)
    try:
        # Tune prints its experiment table and result paths on stdout whatever its verbosity;
        # our lines go through logging (stderr), so only Tune's prints are held back.
        with contextlib.nullcontext() if cfg.run.verbose else contextlib.redirect_stdout(
                io.StringIO()):
            grid = tuner.fit()
    finally:
        _cleanup(run_dir, board)
    return grid, run_dir, {"prepared": prepared, **info}


def _shipped_schedule(cfg: Config):
    """An import-path EMA schedule (``mypkg.decay:linear``), resolved here and pickled by value
    so every Ray worker gets it, installed there or not. Registered names need nothing."""

    if not cfg.ema.enabled or not is_import_path(cfg.ema.schedule):
        return None
    import ray.cloudpickle

    fn = resolve_schedule(cfg.ema.schedule)
    ray.cloudpickle.register_pickle_by_value(sys.modules[fn.__module__])
    return fn


def _cleanup(run_dir: Path, board: str | None) -> None:
    """After the fit, however it ended: the best-weights caches of every Train run (a STOP
    kills the workers before their own cleanup) and the decision board."""
    for train_dir in RunDir(run_dir).train_dirs():
        shutil.rmtree(best_cache_dir(str(train_dir)), ignore_errors=True)
    if board is not None:

        stop_board(board)


def fit(cfg: Config, *, resume: bool = False, pretrain_weights: str | None = None) -> FitResult:
    """Train one model (one Tune trial) and publish the winner."""
    scheduler = None
    if cfg.early_stopping.enabled:

        # state_path: Tuner.restore (--resume) unpickles its own copy of the scheduler; both
        # copies share their counters through this file.
        scheduler = EarlyStoppingScheduler.from_config(
            cfg.early_stopping, cfg.ema.enabled,
            state_path=RunDir(run_dir_of(cfg)).early_stopping,
            decision_board=board_name(run_dir_of(cfg)))
    live = live_runs(cfg, search=False)
    try:
        grid, run_dir, info = run_trials(cfg, scheduler=scheduler, resume=resume,
                                         pretrain_weights=pretrain_weights, live=live)
        result = grid[0]
        train_dir = RunDir(run_dir).train
        stopped_early = bool(
            scheduler is not None and scheduler.state(Path(result.path).name).get("stopped"))
        if result.error is not None and not stopped_early:
            has_ckpt = any(train_dir.glob("epoch_*"))
            raise FitError(
                f"training failed: {result.error}\n"
                + (f"Checkpoints are in {train_dir}; `raydetr train --resume` continues the run."
                   if has_ckpt else "No epoch finished, nothing was saved.")
            )
        fitted = finalize(cfg, run_dir, train_dir, info, stopped_early=stopped_early,
                          live_run_id=live.run_id() if live is not None else None)
    except KeyboardInterrupt:
        if live is not None:
            live.end("KILLED")
        raise
    except BaseException:
        if live is not None:
            live.end("FAILED")
        raise
    if live is not None:
        live.end("FINISHED")
    return fitted


def live_runs(cfg: Config, *, search: bool):
    """The per-epoch MLflow logger of a fit or search (None when MLflow is off)."""
    if not cfg.mlflow.enabled:
        return None

    return LiveRuns(cfg, run_dir_of(cfg), search=search)
