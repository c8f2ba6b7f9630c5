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

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray

from raydetr.artifacts import ModelDir, ModelMeta, RunDir, atomic_write_json
from raydetr.config import Config, build_config
from raydetr.config.presets import is_segmentation
from raydetr.ema.posthoc import Snapshot, list_snapshots, reconstruct_many, select_snapshots
from raydetr.errors import UserError
from raydetr.fit.cluster import init_ray
from raydetr.fit.driver import ensure_prepared
from raydetr.fit.postfit import publish_winner
from raydetr.model.build import resolve_model_config
from raydetr.record import deciding_metric, metric_keys
from raydetr.registry.posthoc import log_posthoc_runs
from raydetr.serve.detector import Detector
from raydetr.serve.evaluation import run_evaluation
from raydetr.train.checkpoint import latest_checkpoint, read_state

log = logging.getLogger("raydetr.posthoc")
SNAPSHOT_DIR = "posthoc"  # under a Train run's storage (<run_dir>/train/posthoc)


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
    def segmentation(self) -> bool:
        return is_segmentation(self.cfg.model.preset)

    @property
    def metric_keys(self) -> tuple[str, ...]:
        """The COCO metrics a profile is scored on: bbox, and segm for a segmentation run."""
        return metric_keys(self.segmentation)

    @property
    def decided_by(self) -> str:
        """What picks the best profile and compares it with the run's winner: ``map_segm``
        for a segmentation run (as during training), else ``map``."""
        return deciding_metric(self.segmentation)

    def best_of(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """The profile row with the highest ``decided_by`` metric."""
        return max(rows, key=lambda r: r[self.decided_by])

    @property
    def winner_meta(self) -> ModelMeta | None:
        winner = RunDir(self.run_dir).winner
        return winner.read_meta() if winner.meta_path.is_file() else None


def open_run(run: Path) -> PosthocRun:
    """A finished (or interrupted) run: ``run`` is ``<output_dir>/<name>`` (a plain run) or a
    Train storage dir with a ``posthoc/`` folder (e.g. ``<run>/trials/<trial_id>``)."""
    run = Path(run).expanduser().resolve()
    if (run / SNAPSHOT_DIR).is_dir() and any(run.glob("epoch_*")):
        train_dir = run
        run_dir = RunDir.of_train_dir(run).root
    elif RunDir(run).train.is_dir():
        run_dir, train_dir = run, RunDir(run).train
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


def profile_meta(run: PosthocRun, info: dict[str, Any]) -> ModelMeta:
    """meta.json of a reconstructed profile (what a loader reads, plus what made it)."""
    return ModelMeta(
        classes=run.classes, model=run.cfg.model.model_dump(mode="json"),
        resolution=int(resolve_model_config(run.cfg.model)["resolution"]),
        variant="posthoc_ema", dataset=str(run.cfg.data.path or "synthetic"),
        source={"posthoc": {k: v for k, v in info.items() if k != "coefficients"}},
    )


def profile_dir_name(sigma_rel: float, step: int) -> str:
    return f"sr{sigma_rel:.6g}_step{step:09d}"


def write_profiles(run: PosthocRun, sigma_rels: list[float], step: int | None,
                   out_root: Path) -> list[Path]:
    """Reconstruct every profile (one pass over the snapshots) into ``out_root/<name>/``;
    each dir is written under a temporary name and renamed when complete."""
    try:
        select_snapshots(run.snapshots, step)
        results = reconstruct_many(run.snapshots, sigma_rels, step)
    except ValueError as exc:
        raise PosthocError(f"{run.train_dir / SNAPSHOT_DIR}: {exc}") from None
    out = []
    for weights, info in results:
        final = Path(out_root) / profile_dir_name(info["sigma_rel"], info["step"])
        out.append(ModelDir.write(final, weights, profile_meta(run, info)).path)
    return out


def evaluate_profile(model_dir: Path, prepared: Path, split: str,
                     device: str | None = None) -> dict[str, Any]:
    """COCO metrics of a profile dir on ``split`` (same path as ``raydetr evaluate``)."""
    detector = Detector.from_dir(model_dir, device=device or "cpu")
    metrics = run_evaluation(detector, Path(prepared), split)
    info = ModelDir(model_dir).read_meta().source["posthoc"]
    keys = metric_keys("map_segm" in metrics)  # segm beside bbox for a segmentation model
    return {**{k: float(metrics[k]) for k in keys}, "images": metrics["images"],
            "sigma_rel": info["sigma_rel"], "gamma": info["gamma"], "step": info["step"],
            "profile_residual": info["profile_residual"], "snapshots": info["snapshots"],
            "model_dir": str(model_dir)}


@dataclass
class SweepResult:
    run: PosthocRun
    rows: list[dict[str, Any]]
    best: dict[str, Any]
    winner_map: float | None
    registered: dict[str, Any] | None
    seconds: float


def _eval_remote():
    @ray.remote(num_cpus=1)
    def evaluate_task(model_dir: str, prepared: str, split: str) -> dict[str, Any]:
        import torch

        torch.set_num_threads(1)  # one task per CPU; more threads only contend
        return evaluate_profile(Path(model_dir), Path(prepared), split)

    return evaluate_task


def sweep(run_path: Path, sigma_rels: list[float], *, step: int | None = None,
          register: bool = False, use_mlflow: bool = True) -> SweepResult:
    """Reconstruct + evaluate every sigma_rel; see the module docstring."""
    start = time.perf_counter()
    bad = [s for s in sigma_rels if not 0 < s < 0.28]
    if not sigma_rels or bad:
        raise PosthocError(f"--sigma-rel values must be in (0, 0.28); got {bad or 'none'}")
    run = open_run(run_path)
    out_root = RunDir(run.run_dir).posthoc
    dirs = write_profiles(run, sorted(set(sigma_rels)), step, out_root)
    init_ray(run.cfg)
    task = _eval_remote()
    rows = ray.get([task.remote(str(d), str(run.prepared), run.val_split) for d in dirs])
    rows.sort(key=lambda r: r["sigma_rel"])
    best = run.best_of(rows)
    winner = run.winner_meta
    winner_map = winner.metrics.get(run.decided_by) if winner else None
    atomic_write_json(out_root / "results.json", {"rows": rows, "best": best,
                                                  "decided_by": run.decided_by,
                                                  "winner_map": winner_map})
    print(format_table(rows, best, winner, run))
    registered = None
    if use_mlflow and run.cfg.mlflow.enabled:
        log_posthoc_runs(run.cfg, RunDir(run.run_dir), rows, run.metric_keys)
    if register:
        registered = _register_best(run, best, winner_map)
    return SweepResult(run=run, rows=rows, best=best, winner_map=winner_map,
                       registered=registered, seconds=time.perf_counter() - start)


def format_table(rows: list[dict[str, Any]], best: dict[str, Any], winner: ModelMeta | None,
                 run: PosthocRun) -> str:
    head = ["sigma_rel", "gamma", *run.metric_keys, "fit_resid", "snapshots"]
    lines = [f"post-hoc EMA of {run.run_dir.name} at step {rows[0]['step']} "
             f"({rows[0]['images']} {run.val_split} images)",
             "  ".join(f"{h:>10}" for h in head)]
    for r in rows:
        vals = [r["sigma_rel"], r["gamma"], *(r[k] for k in run.metric_keys),
                r["profile_residual"], r["snapshots"]]
        mark = "  <- best" if r is best else ""
        lines.append("  ".join(f"{v:>10.4f}" if isinstance(v, float) else f"{v:>10}"
                               for v in vals) + mark)
    if winner:
        m = winner.metrics.get(run.decided_by)
        lines.append(f"run winner: {winner.variant} weights, epoch {winner.epoch}, "
                     f"{winner.scores_text()}" if m is not None
                     else f"run winner: {run.decided_by} unknown")
    return "\n".join(lines)


def _register_best(run: PosthocRun, best: dict[str, Any], winner_map: float | None
                   ) -> dict[str, Any] | None:
    """Publish the best profile (stripped, registered with the alias) if it beats the winner."""
    key = run.decided_by
    if winner_map is not None and not best[key] > winner_map:
        print(f"not registered: best post-hoc {_label(key)} {best[key]:.4f} does not beat the "
              f"run's winner ({winner_map:.4f})")
        return None
    src = ModelDir(best["model_dir"])
    dst = RunDir(run.run_dir).posthoc / "winner"
    meta = src.read_meta()
    meta.metrics = {k: best[k] for k in run.metric_keys}
    meta.epoch = int(run.history[-1]["epoch"]) if run.history else -1
    meta.epochs_run = len(run.history)
    ModelDir.write(dst, src.weights_path, meta)
    reg = publish_winner(run.cfg, run.run_dir, dst, run.history, meta, register=True)
    if reg is None:
        raise PosthocError(f"registration failed (see the log); the profile is in {dst}")
    print(f"registered: {reg['model_uri']} (version {reg['version']}): post-hoc sigma_rel "
          f"{best['sigma_rel']:g}, {_label(key)} {best[key]:.4f}"
          + (f" > winner {winner_map:.4f}" if winner_map is not None else ""))
    return reg


def _label(key: str) -> str:
    """``mAP`` for box mAP (the console's word for it), the key itself otherwise."""
    return "mAP" if key == "map" else key
