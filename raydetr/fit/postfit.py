"""Post-fit, on the driver, from what is already in storage.

A Tune scheduler's STOP kills the trial (no ``finally``, no last checkpoint), and a crash can end
a run anywhere, so the winner is always picked from the latest complete checkpoint: it carries
the best-so-far weights of both variants.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raydetr.artifacts import METRIC_NAMES, ModelDir, ModelMeta, RunDir, atomic_write_json
from raydetr.config import Config
from raydetr.model.build import resolve_model_config
from raydetr.record import SEGM_METRIC_KEYS
from raydetr.registry.publish import publish
from raydetr.serve.export import export_for_registry
from raydetr.train.checkpoint import BEST_FILES, latest_checkpoint, read_bests, read_state

log = logging.getLogger("raydetr.postfit")


@dataclass
class FitResult:
    run_dir: Path
    train_dir: Path
    winner_dir: Path
    meta: ModelMeta
    registered: dict[str, Any] | None
    stopped_early: bool = False


@dataclass
class Stripped:
    """A winner written from a checkpoint, and how much smaller it is."""

    meta: ModelMeta
    checkpoint_bytes: int
    winner_bytes: int


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def strip_winner(checkpoint_dir: Path, winner_dir: Path, *, dataset: str,
                 state: dict[str, Any] | None = None, cfg: Config | None = None) -> Stripped:
    """Write ``winner_dir`` (a model dir) from a checkpoint's best weights of the winner.

    ``state``: the checkpoint's state.pt when the caller has already read it; ``cfg``: the
    run's Config when the caller has it (else the checkpoint's copy is read).
    """
    checkpoint_dir = Path(checkpoint_dir)
    state = state if state is not None else read_state(checkpoint_dir)
    bests = read_bests(checkpoint_dir)
    variant = bests.winner()
    best = bests.best(variant)
    cfg = cfg if cfg is not None else Config.model_validate(state["config"])
    history: list[dict[str, Any]] = list(state["history"])
    row = next((h for h in history if int(h["epoch"]) == best.epoch), {})
    suffix = "_ema" if variant == "ema" else ""
    meta = ModelMeta(
        classes=list(state["classes"]), model=cfg.model.model_dump(mode="json"),
        resolution=int(resolve_model_config(cfg.model)["resolution"]), variant=variant,
        dataset=dataset, metrics={k: row.get(f"{k}{suffix}") for k in METRIC_NAMES}
        | {k: row[f"{k}{suffix}"] for k in SEGM_METRIC_KEYS if f"{k}{suffix}" in row},
        ema_decay=best.decay if variant == "ema" else None,
        shadow=best.shadow if variant == "ema" else None,
        best_map=bests.regular.map, best_map_ema=bests.map_ema, epoch=best.epoch,
        epochs_run=len(history),
        # a distilled student references its teacher (URI, sha256, classes, mAP), never holds it
        source={"distill": teacher} if (teacher := teacher_record(state)) is not None else {},
    )
    src = checkpoint_dir / BEST_FILES[variant]
    if not src.is_file():
        raise FileNotFoundError(f"{src} missing: the checkpoint has no best {variant} weights")
    ModelDir.write(winner_dir, src, meta)
    return Stripped(meta, _dir_bytes(checkpoint_dir), _dir_bytes(winner_dir))


def finalize(cfg: Config, run_dir: Path, train_dir: Path, info: dict[str, Any], *,
             stopped_early: bool = False, publish: bool = True, parent_run_id: str | None = None,
             register: bool = True, live_run_id: str | None = None) -> FitResult:
    """Strip the winner of a Train run, write config/history/fit.json (so ``raydetr register
    RUN_DIR`` works on every run dir this writes), and publish it to MLflow."""
    run = RunDir(run_dir)
    ckpt = latest_checkpoint(train_dir)
    log.info("post-fit: stripping the winner from %s", ckpt)
    state = read_state(ckpt)
    history = list(state["history"])
    dataset = str(cfg.data.path or "synthetic")
    stripped = strip_winner(ckpt, run.winner.path, dataset=dataset, state=state, cfg=cfg)
    meta = stripped.meta
    atomic_write_json(run.history, history)
    atomic_write_json(run.config, cfg.to_dict())
    ratio = stripped.checkpoint_bytes / max(stripped.winner_bytes, 1)
    log.info(
        "post-fit: winner %s weights from epoch %d (%s); regular best %s %.4f, EMA best %s. "
        "Stripped checkpoint %.1f MB -> %.1f MB (%.1fx smaller): %s",
        meta.variant, meta.epoch, meta.scores_text(), meta.decided_by, meta.best_map,
        f"{meta.best_map_ema:.4f}" if meta.best_map_ema is not None else "-",
        stripped.checkpoint_bytes / 1e6, stripped.winner_bytes / 1e6, ratio, run.winner.path,
    )
    registered = None
    if publish and cfg.mlflow.enabled:
        registered = publish_winner(cfg, run.root, run.winner.path, history, meta,
                                    parent_run_id=parent_run_id, stopped_early=stopped_early,
                                    register=register, run_id=live_run_id)
    atomic_write_json(run.fit_info, {"winner": meta.to_dict(), "registered": registered,
                                     "stopped_early": stopped_early, "checkpoint": str(ckpt),
                                     "checkpoint_bytes": stripped.checkpoint_bytes,
                                     "winner_bytes": stripped.winner_bytes})
    return FitResult(run_dir=run.root, train_dir=train_dir, winner_dir=run.winner.path, meta=meta,
                     registered=registered, stopped_early=stopped_early)


def teacher_record(state: dict[str, Any]) -> dict[str, Any] | None:
    """The distillation teacher of a checkpoint (URI, sha256, classes, its own val mAP)."""
    if not state.get("teacher"):
        return None
    record = dict(state["teacher"])
    maps = [h["teacher_map"] for h in state["history"] if "teacher_map" in h]
    record["map"] = maps[-1] if maps else None
    return record


def publish_winner(cfg: Config, run_dir: Path, winner_dir: Path, history: list[dict[str, Any]],
                   meta: ModelMeta, *, parent_run_id: str | None = None,
                   stopped_early: bool = False, register: bool = True,
                   run_id: str | None = None) -> dict[str, Any] | None:
    """Log + register (into the fit's live MLflow run ``run_id`` when there is one); if MLflow is
    unreachable the fit still succeeds and says how to retry."""
    # run tags; publish adds raydetr.dataset and raydetr.variant (model-version tags: its own)
    tags = {"raydetr.map": f"{meta.metrics['map'] or 0:.4f}", "raydetr.epoch": str(meta.epoch),
            "raydetr.stopped_early": str(stopped_early).lower()}
    onnx = None
    if cfg.mlflow.onnx and register:
        try:
            onnx = export_for_registry(winner_dir)
        except Exception as exc:  # noqa: BLE001 - the winner is registered without it
            log.error("ONNX export failed (%s: %s); registering the model without model.onnx "
                      "(retry: raydetr export %s --format onnx)", type(exc).__name__, exc, run_dir)
    try:
        return publish(
            winner_dir, history=history, params=cfg.flat(), mlflow_cfg=cfg.mlflow,
            output_dir=Path(cfg.run.output_dir).resolve(), run_name=cfg.run.name, tags=tags,
            dataset=meta.dataset, parent_run_id=parent_run_id,
            nested=parent_run_id is not None, register=register, run_id=run_id, onnx=onnx,
        )
    except Exception as exc:  # noqa: BLE001 - the fit's result must survive a registry outage
        log.error(
            "MLflow registration failed (%s: %s). The stripped winner is safe in %s; "
            "register it later with: raydetr register %s", type(exc).__name__, exc,
            winner_dir, run_dir,
        )
        return None
