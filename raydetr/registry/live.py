"""Live MLflow runs: every epoch's metrics reach MLflow while the fit runs.

A Ray Tune callback on the driver (it sees each trial's per-epoch report, whatever happens to the
Train workers), so a worker restart (``FailureConfig``) keeps logging into the same run, and
``--resume`` finds the run again through ``<run_dir>/mlflow_runs.json``. One run per trial:

    plain fit   one run named ``run.name``
    search      a parent run ``<run.name>-search`` and one nested run per trial

The run is RUNNING while it trains; post-fit publishes the winner into the same run
(``publish(run_id=...)``) and ``end()`` marks it FINISHED, FAILED or KILLED. If MLflow cannot be
reached, training goes on and this says so once.

    live = LiveRuns(cfg, run_dir, search=False)   # tune.RunConfig(callbacks=[live, ...])
    live.run_id("train")                          # after the fit: the trial's run
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

from ray.tune import Callback

from raydetr.artifacts import RunDir, atomic_write_json
from raydetr.config import Config, with_overrides
from raydetr.config.presets import is_segmentation
from raydetr.record import deciding_metric
from raydetr.registry.plots import metric_key
from raydetr.registry.tracking import (
    check_reachable,
    ensure_experiment,
    quiet_mlflow,
    resolve_tracking_uri,
)

log = logging.getLogger("raydetr.mlflow")

PLAIN_KEY = "train"
PARENT_KEY = "parent"
# Keys Tune adds to every result; everything else numeric in a report is ours (EpochResult).
TUNE_KEYS = frozenset({
    "training_iteration", "time_this_iter_s", "time_total_s", "timestamp", "time_since_restore",
    "iterations_since_restore", "pid", "done", "trial_id", "date", "hostname", "node_ip",
    "config", "warmup_time", "should_checkpoint", "experiment_tag", "checkpoint_dir_name",
    "epoch",
})


def report_metrics(result: dict[str, Any]) -> dict[str, float]:
    """The loggable metrics of a Tune result: our numeric report keys, MLflow-safe names."""
    out = {}
    for key, value in result.items():
        if key in TUNE_KEYS or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(float(value)):
            out[metric_key(key)] = float(value)
    return out


class LiveRuns(Callback):
    def __init__(self, cfg: Config, run_dir: Path, *, search: bool) -> None:

        self.cfg, self.run_dir, self.search = cfg, Path(run_dir), search
        self.tracking_uri = resolve_tracking_uri(cfg.mlflow, Path(cfg.run.output_dir).resolve())
        self.client: Any = None
        self.exp_id: str | None = None
        self.ids: dict[str, str] = {}
        self.logged: dict[str, set[int]] = {}
        self.failed = False

    # ------------------------------------------------------------------ plumbing
    def _ids_path(self) -> Path:
        return RunDir(self.run_dir).mlflow_ids

    def _save_ids(self) -> None:
        atomic_write_json(self._ids_path(), self.ids)

    def _guard(self, what: str, fn, *args) -> Any:
        """Run an MLflow call; on the first failure say so once and stop trying."""
        if self.failed or not self.cfg.mlflow.enabled:
            return None
        try:
            return fn(*args)
        except Exception as exc:  # noqa: BLE001 - training must go on without MLflow
            self.failed = True
            log.warning("MLflow unreachable while %s (%s: %s): training goes on; the metrics "
                        "stay in the checkpoints, and `raydetr register %s` publishes later",
                        what, type(exc).__name__, str(exc).splitlines()[0][:200], self.run_dir)
            return None

    def _connect(self) -> None:
        from mlflow import MlflowClient


        output_dir = Path(self.cfg.run.output_dir).resolve()
        uri = self.tracking_uri
        check_reachable(uri)
        if uri.startswith("sqlite:///"):
            Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        self.exp_id = ensure_experiment(self.client, self.cfg.mlflow.experiment, uri, output_dir)
        if self._ids_path().is_file():
            self.ids = json.loads(self._ids_path().read_text())
        if self.search and PARENT_KEY not in self.ids:
            run = self.client.create_run(self.exp_id, run_name=f"{self.cfg.run.name}-search",
                                         tags={"raydetr.kind": "search"})
            self.ids[PARENT_KEY] = run.info.run_id
            self._save_ids()
        elif self.search:
            self.client.update_run(self.ids[PARENT_KEY], status="RUNNING")

    def _start(self, key: str, config: dict[str, Any]) -> None:
        from mlflow.entities import Param

        run_id = self.ids.get(key)
        if run_id is None:
            cfg = with_overrides(self.cfg, config, "trial config") if config else self.cfg
            tags = {"raydetr.kind": "trial" if self.search else "fit",
                    # what the bests, the winner and early stopping go by (raydetr.record)
                    "raydetr.decided_by": deciding_metric(is_segmentation(cfg.model.preset))}
            name = self.cfg.run.name
            if self.search:
                tags["mlflow.parentRunId"] = self.ids[PARENT_KEY]
                name = f"{name}-{key}"
            run_id = self.client.create_run(self.exp_id, run_name=name, tags=tags).info.run_id
            params = [Param(str(k), str(v)[:6000]) for k, v in cfg.flat().items()]
            for i in range(0, len(params), 100):
                self.client.log_batch(run_id, params=params[i:i + 100])
            self.ids[key] = run_id
            self._save_ids()
            self.logged[key] = set()
        else:  # --resume: the same run, RUNNING again; epochs it already has are not re-logged
            self.client.update_run(run_id, status="RUNNING")
            self.logged[key] = {int(m.step) for m in self.client.get_metric_history(run_id, "map")}

    def _log(self, key: str, result: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        epoch = int(result["epoch"])
        if epoch in self.logged.setdefault(key, set()):
            return  # a report repeated after a restart: every epoch once
        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, epoch) for k, v in report_metrics(result).items()]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.ids[key], metrics=metrics[i:i + 1000])
        self.logged[key].add(epoch)

    def _key(self, trial: Any) -> str:
        return trial.trial_id if self.search else PLAIN_KEY

    # ------------------------------------------------------------------ Tune hooks
    def setup(self, **info: Any) -> None:
        self._guard("connecting", self._connect)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if self.client is not None:
            config = dict(trial.config) if self.search else {}
            self._guard("starting the run", self._start, self._key(trial), config)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict,
                        **info: Any) -> None:
        if self.client is not None and "epoch" in result and self._key(trial) in self.ids:
            self._guard("logging an epoch", self._log, self._key(trial), result)

    # ------------------------------------------------------------------ after the fit
    # Read from the ids file: Tuner.restore (--resume) runs its own unpickled copy of this
    # callback, so the driver's object may not be the one that logged.
    def run_id(self, key: str = PLAIN_KEY) -> str | None:
        if self.failed or not self._ids_path().is_file():
            return None
        return json.loads(self._ids_path().read_text()).get(key)

    def end(self, status: str) -> None:
        """Mark every run this fit touched (and the search's parent) FINISHED / FAILED /
        KILLED. Runs post-fit already ended stay as they are."""
        if self.failed or not self.cfg.mlflow.enabled or not self._ids_path().is_file():
            return
        if self.client is None:
            self._guard("connecting", self._connect)
        for run_id in json.loads(self._ids_path().read_text()).values():
            self._guard("ending the run", self._end_one, run_id, status)

    def _end_one(self, run_id: str, status: str) -> None:

        if self.client.get_run(run_id).info.status == "RUNNING":
            with quiet_mlflow():  # no "View run" URL lines on the console
                self.client.set_terminated(run_id, status=status)

    def __getstate__(self) -> dict[str, Any]:  # Tune pickles its callbacks with the experiment
        return {**self.__dict__, "client": None}
