"""What a person watching a fit reads: a short header, one line per epoch, then the winner.

The epoch line is printed on the driver from each trial's per-epoch report (a Ray Tune callback),
so it appears once however many workers there are, and it can say how long the run has taken and
how long it still needs. Ray's, Tune's and COCOeval's own output stays hidden unless
``run.verbose`` (``--verbose``); Ray's warnings that matter (a worker or a node died) still show.

    header(cfg, info, run_dir, tracking_uri)        # -> lines
    EpochLines(cfg, search=False)                   # tune.RunConfig(callbacks=[...])
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from ray.tune import Callback

from raydetr.config import Config
from raydetr.record import EpochResult
from raydetr.registry.tracking import quiet_mlflow_loggers

log = logging.getLogger("raydetr.train")


def configure_console(verbose: bool) -> None:
    """raydetr's own lines at INFO; other libraries' INFO chatter (MLflow's database set-up,
    Ray's and Tune's progress, tensorboardX) only when ``verbose``."""
    quiet_mlflow_loggers()  # MLflow sets its loggers' levels when first imported; ours win
    logging.getLogger("raydetr").setLevel(logging.INFO)
    level = logging.INFO if verbose else logging.WARNING
    for name in ("mlflow", "ray", "alembic"):
        logging.getLogger(name).setLevel(level)
    logging.getLogger().setLevel(level)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def header(cfg: Config, info: dict[str, Any], run_dir: Path, tracking_uri: str | None) -> list[str]:
    """The lines printed once before training starts."""
    classes = list(info["classes"])
    splits = info["splits"]
    shown = ", ".join(classes[:8]) + (f", ... ({len(classes)})" if len(classes) > 8 else "")
    o, s, e = cfg.optim, cfg.scaling, cfg.ema
    device = "GPU" if s.use_gpu else "CPU"
    lines = [
        f"dataset   {info['prepared']}: {splits[cfg.data.train_split]['images']} train / "
        f"{splits[cfg.data.val_split]['images']} val images; {len(classes)} classes: {shown}",
        f"model     {cfg.model.preset} at {cfg.model.resolution or 'its default'} px; "
        f"{o.epochs} epochs",
        f"batch     effective {o.batch_size * o.grad_accum_steps * s.num_workers} = "
        f"{o.batch_size} per worker x {o.grad_accum_steps} accumulation x {s.num_workers} "
        f"workers ({s.num_workers} x {device})",
        "EMA       " + (f"decays {e.decay}, schedule {e.schedule}"
                        + (f", scaled to reference batch {e.reference_batch}"
                           if e.reference_batch else "")
                        + (", post-hoc snapshots on" if e.posthoc.enabled else "")
                        if e.enabled else "off"),
        f"run       {run_dir}",
        f"MLflow    {tracking_uri} (experiment {cfg.mlflow.experiment})" if tracking_uri
        else "MLflow    off",
    ]
    return lines


class EpochLines(Callback):
    """Prints each reported epoch as one line, with elapsed time and an ETA."""

    def __init__(self, cfg: Config, *, search: bool) -> None:
        self.epochs = cfg.optim.epochs
        self.patience = cfg.early_stopping.patience if cfg.early_stopping.enabled else None
        self.search = search
        self.started = time.monotonic()
        self.first_epoch: dict[str, tuple[int, float]] = {}

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict,
                        **info: Any) -> None:
        record = EpochResult.from_result(result)
        if record is None:
            return
        epoch = record.epoch
        now = time.monotonic()
        # ETA from the epochs this session has seen (a resumed run starts counting afresh)
        first = self.first_epoch.setdefault(trial.trial_id, (epoch, self.started))
        done = epoch - first[0] + 1
        per_epoch = (now - first[1]) / max(done, 1)
        eta = per_epoch * (self.epochs - epoch)  # epochs are numbered from 1
        line = record.format_line(self.epochs, self.patience)
        prefix = f"[{trial.trial_id}] " if self.search else ""
        log.info("%s%s  %s elapsed  ETA %s", prefix, line, _duration(now - self.started),
                 _duration(eta))
