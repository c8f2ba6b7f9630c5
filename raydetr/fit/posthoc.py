"""Post-hoc EMA profiles of a finished run: locate its snapshots, reconstruct, evaluate.

Shared by ``raydetr posthoc`` (raydetr/commands/posthoc.py) and ``raydetr tune --posthoc``
(raydetr/fit/posthoc_search.py).

    run = open_run(Path("runs/myrun"))                  # the run dir, or a Train storage dir
    dirs = write_profiles(run, [0.05, 0.07], step=None, out_root=run.run_dir / "posthoc")
    metrics = evaluate_profile(dirs[0], run.prepared, run.val_split)

Each profile is written as a model dir (``model.safetensors`` + ``meta.json``, the layout of a
stripped winner), so it loads with pickle disabled (``Detector.from_files``) and can be
published by the post-fit path as is.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import raydetr
from raydetr.config import Config, build_config
from raydetr.ema.posthoc import Snapshot, list_snapshots, reconstruct_many, select_snapshots
from raydetr.errors import UserError

SNAPSHOT_DIR = "posthoc"  # under a Train run's storage (<run_dir>/train/posthoc)
METRIC_KEYS = ("map", "map50", "map75", "mar")


class PosthocError(UserError, ValueError):
    """The run cannot be post-processed as asked; the message says why and what to do."""


@dataclass
class PosthocRun:
    run_dir: Path  # <output_dir>/<run.name>
    train_dir: Path  # Ray Train storage holding epoch_NNNN/ and posthoc/
    cfg: Config
    classes: list[str]
    snapshots: list[Snapshot]
    history: list[dict[str, Any]]
    prepared: Path
    val_split: str

    @property
    def winner_meta(self) -> dict[str, Any] | None:
        path = self.run_dir / "winner" / "meta.json"
        return json.loads(path.read_text()) if path.is_file() else None


def open_run(run: Path) -> PosthocRun:
    """A finished (or interrupted) run: ``run`` is ``<output_dir>/<name>`` (a plain run) or a
    Train storage dir with a ``posthoc/`` folder (e.g. ``<run>/trials/<trial_id>``)."""
    from raydetr.train.checkpoint import latest_checkpoint, read_state
    from raydetr.fit.driver import ensure_prepared

    run = Path(run).expanduser().resolve()
    if (run / SNAPSHOT_DIR).is_dir() and any(run.glob("epoch_*")):
        train_dir = run
        run_dir = run.parent.parent if run.parent.name == "trials" else run.parent
    elif (run / "train").is_dir():
        run_dir, train_dir = run, run / "train"
    else:
        raise PosthocError(f"{run} is not a raydetr run directory (no train/ folder; pass "
                           "<run.output_dir>/<run.name>)")
    snap_dir = train_dir / SNAPSHOT_DIR
    if not snap_dir.is_dir():
        raise PosthocError(f"{run} has no post-hoc EMA snapshots ({snap_dir} missing): train "
                           "with ema.posthoc.enabled=true to record them")
    try:
        snaps = list_snapshots(snap_dir)
    except ValueError as exc:
        raise PosthocError(str(exc)) from None
    if not snaps:
        raise PosthocError(f"{snap_dir} holds no snapshots: the run stopped before its first")
    state = read_state(latest_checkpoint(train_dir))
    tree = dict(state["config"])
    # The synthetic / raw-dataset cache lives under run.output_dir, which is this run's parent
    # wherever the command is started from.
    tree["run"] = {**tree["run"], "output_dir": str(run_dir.parent)}
    cfg = build_config(tree, f"{train_dir} checkpoint config")
    return PosthocRun(run_dir=run_dir, train_dir=train_dir, cfg=cfg,
                      classes=list(state["classes"]), snapshots=snaps,
                      history=list(state["history"]), prepared=ensure_prepared(cfg),
                      val_split=cfg.data.val_split)


def sigma_rel_grid(lo: float, hi: float, n: int) -> list[float]:
    """``n`` sigma_rels spaced evenly in log between ``lo`` and ``hi`` (both included)."""
    if n < 1 or not 0 < lo <= hi < 0.28:
        raise PosthocError(f"--sigma-rel-range {lo} {hi} {n}: need 0 < LO <= HI < 0.28, N >= 1")
    if n == 1:
        return [float(lo)]
    return [float(f"{v:.6g}") for v in np.geomspace(lo, hi, n)]


def profile_meta(run: PosthocRun, info: dict[str, Any]) -> dict[str, Any]:
    """meta.json of a reconstructed profile (the fields ``Detector.from_files`` reads, plus
    what made it)."""
    from raydetr.model.build import resolve_model_config

    return {
        "classes": run.classes, "num_classes": len(run.classes),
        "model": run.cfg.model.model_dump(mode="json"),
        "resolution": int(resolve_model_config(run.cfg.model)["resolution"]),
        "variant": "posthoc_ema", "ema_decay": None,
        "posthoc": {k: v for k, v in info.items() if k != "coefficients"},
        "dataset": str(run.cfg.data.path or "synthetic"),
        "raydetr_version": raydetr.__version__,
    }


def profile_dir_name(sigma_rel: float, step: int) -> str:
    return f"sr{sigma_rel:.6g}_step{step:09d}"


def write_profiles(run: PosthocRun, sigma_rels: list[float], step: int | None,
                   out_root: Path) -> list[Path]:
    """Reconstruct every profile (one pass over the snapshots) into ``out_root/<name>/``;
    each dir is written under a temporary name and renamed when complete."""
    from raydetr.train.checkpoint import save_weights

    try:
        select_snapshots(run.snapshots, step)
        results = reconstruct_many(run.snapshots, sigma_rels, step)
    except ValueError as exc:
        raise PosthocError(f"{run.train_dir / SNAPSHOT_DIR}: {exc}") from None
    out = []
    for weights, info in results:
        final = Path(out_root) / profile_dir_name(info["sigma_rel"], info["step"])
        tmp = final.with_name(final.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_weights(weights, tmp / "model.safetensors")
        (tmp / "meta.json").write_text(json.dumps(profile_meta(run, info), indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        out.append(final)
    return out


def evaluate_profile(model_dir: Path, prepared: Path, split: str,
                     device: str | None = None) -> dict[str, Any]:
    """COCO metrics of a profile dir on ``split`` (same path as ``raydetr evaluate``)."""
    from raydetr.serve.detector import Detector
    from raydetr.commands.evaluate import run_evaluation

    detector = Detector.from_files(Path(model_dir) / "model.safetensors",
                                   Path(model_dir) / "meta.json", device=device or "cpu")
    metrics = run_evaluation(detector, Path(prepared), split)
    info = json.loads((Path(model_dir) / "meta.json").read_text())["posthoc"]
    return {**{k: float(metrics[k]) for k in METRIC_KEYS}, "images": metrics["images"],
            "sigma_rel": info["sigma_rel"], "gamma": info["gamma"], "step": info["step"],
            "profile_residual": info["profile_residual"], "snapshots": info["snapshots"],
            "model_dir": str(model_dir)}
