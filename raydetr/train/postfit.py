"""Post-fit, on the driver, from what is already in storage.

A Tune scheduler's STOP kills the trial (no ``finally``, no last checkpoint), and a crash can end
a run anywhere, so the winner is always picked from the latest complete checkpoint: it carries
the best-so-far weights of both variants.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import raydetr
from raydetr.config import Config
from raydetr.train.checkpoint import BEST_FILES, latest_checkpoint, read_bests, read_state

log = logging.getLogger("raydetr.postfit")


@dataclass
class FitResult:
    run_dir: Path
    train_dir: Path
    winner_dir: Path
    meta: dict[str, Any]
    registered: dict[str, Any] | None
    stopped_early: bool


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def strip_winner(checkpoint_dir: Path, winner_dir: Path, *, dataset: str,
                 state: dict[str, Any] | None = None, cfg: Config | None = None
                 ) -> dict[str, Any]:
    """Write ``winner_dir/{model.safetensors, meta.json}`` from a checkpoint; returns meta.

    Written into a temporary sibling and renamed, so a half-written winner never looks complete.
    ``state``: the checkpoint's state.pt when the caller has already read it; ``cfg``: the
    run's Config when the caller has it (else the checkpoint's copy is read).
    """
    from raydetr.model.build import resolve_model_config

    checkpoint_dir = Path(checkpoint_dir)
    state = state if state is not None else read_state(checkpoint_dir)
    bests = read_bests(checkpoint_dir)
    variant = bests.winner()
    best = bests.best(variant)
    cfg = cfg if cfg is not None else Config.model_validate(state["config"])
    history: list[dict[str, Any]] = list(state["history"])
    row = next((h for h in history if int(h["epoch"]) == best.epoch), {})
    suffix = "_ema" if variant == "ema" else ""
    metrics = {k: row.get(f"{k}{suffix}") for k in ("map", "map50", "map75", "mar")}
    resolved = resolve_model_config(cfg.model)
    meta = {
        "classes": list(state["classes"]),
        "num_classes": len(state["classes"]),
        "model": cfg.model.model_dump(mode="json"),
        "resolution": int(resolved["resolution"]),
        "variant": variant,
        "ema_decay": best.decay if variant == "ema" else None,
        "metrics": metrics,
        "best_map": bests.regular.map,
        "best_map_ema": bests.map_ema,
        "epoch": best.epoch,
        "epochs_run": len(history),
        "dataset": dataset,
        "raydetr_version": raydetr.__version__,
    }
    src = checkpoint_dir / BEST_FILES[variant]
    if not src.is_file():
        raise FileNotFoundError(f"{src} missing: the checkpoint has no best {variant} weights")
    tmp = winner_dir.with_name(winner_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shutil.copyfile(src, tmp / "model.safetensors")
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    if winner_dir.exists():
        shutil.rmtree(winner_dir)
    os.replace(tmp, winner_dir)
    full = _dir_bytes(checkpoint_dir)
    stripped = _dir_bytes(winner_dir)
    meta["checkpoint_bytes"], meta["winner_bytes"] = full, stripped
    return meta


def finalize(cfg: Config, run_dir: Path, train_dir: Path, info: dict[str, Any], *,
             stopped_early: bool = False, publish: bool = True, parent_run_id: str | None = None,
             register: bool = True, live_run_id: str | None = None):
    """Strip the winner of a Train run, write config/history/fit.json (so ``raydetr register
    RUN_DIR`` works on every run dir this writes), and publish it to MLflow."""
    ckpt = latest_checkpoint(train_dir)
    log.info("post-fit: stripping the winner from %s", ckpt)
    state = read_state(ckpt)
    history = list(state["history"])
    dataset = str(cfg.data.path or "synthetic")
    winner_dir = run_dir / "winner"
    meta = strip_winner(ckpt, winner_dir, dataset=dataset, state=state, cfg=cfg)
    teacher = teacher_record(state)
    if teacher is not None:  # the published student references its teacher, never holds it
        meta["distill"] = teacher
        (winner_dir / "meta.json").write_text(json.dumps(meta, indent=2))
    (run_dir / "history.json").write_text(json.dumps(history, indent=2))
    (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    ratio = meta["checkpoint_bytes"] / max(meta["winner_bytes"], 1)
    log.info(
        "post-fit: winner %s weights from epoch %d (mAP %.4f); regular best %.4f, EMA best %s. "
        "Stripped checkpoint %.1f MB -> %.1f MB (%.1fx smaller): %s",
        meta["variant"], meta["epoch"], meta["metrics"]["map"] or 0.0, meta["best_map"],
        f"{meta['best_map_ema']:.4f}" if meta["best_map_ema"] is not None else "-",
        meta["checkpoint_bytes"] / 1e6, meta["winner_bytes"] / 1e6, ratio, winner_dir,
    )
    registered = None
    if publish and cfg.mlflow.enabled:
        registered = publish_winner(cfg, run_dir, winner_dir, history, meta,
                                    parent_run_id=parent_run_id, stopped_early=stopped_early,
                                    register=register, run_id=live_run_id)
    fit_info = {"winner": meta, "registered": registered, "stopped_early": stopped_early,
                "checkpoint": str(ckpt)}
    (run_dir / "fit.json").write_text(json.dumps(fit_info, indent=2, default=str))
    return FitResult(run_dir=run_dir, train_dir=train_dir, winner_dir=winner_dir, meta=meta,
                     registered=registered, stopped_early=stopped_early)


def teacher_record(state: dict[str, Any]) -> dict[str, Any] | None:
    """The distillation teacher of a checkpoint (URI, sha256, classes, its own val mAP)."""
    if not state.get("teacher"):
        return None
    record = dict(state["teacher"])
    maps = [h["teacher_map"] for h in state["history"] if "teacher_map" in h]
    record["map"] = maps[-1] if maps else None
    return record


def distill_tags(meta: dict[str, Any]) -> dict[str, str]:
    t = meta.get("distill")
    if not t:
        return {}
    return {"distill.teacher": str(t["uri"]), "distill.teacher_sha256": str(t["sha256"] or ""),
            "distill.teacher_map": "" if t.get("map") is None else f"{t['map']:.4f}"}


def publish_winner(cfg: Config, run_dir: Path, winner_dir: Path, history: list[dict[str, Any]],
                   meta: dict[str, Any], *, parent_run_id: str | None = None,
                   stopped_early: bool = False, register: bool = True,
                   run_id: str | None = None) -> dict[str, Any] | None:
    """Log + register (into the fit's live MLflow run ``run_id`` when there is one); if MLflow is
    unreachable the fit still succeeds and says how to retry."""
    from raydetr.registry.publish import publish

    tags = {"variant": meta["variant"], "map": f"{meta['metrics']['map'] or 0:.4f}",
            "epoch": str(meta["epoch"]), "dataset": meta["dataset"],
            "stopped_early": str(stopped_early).lower(), **distill_tags(meta)}
    try:
        return publish(
            winner_dir, history=history, params=cfg.flat(), mlflow_cfg=cfg.mlflow,
            output_dir=Path(cfg.run.output_dir).resolve(), run_name=cfg.run.name, tags=tags,
            dataset=meta["dataset"], parent_run_id=parent_run_id,
            nested=parent_run_id is not None, register=register, run_id=run_id,
        )
    except Exception as exc:  # noqa: BLE001 - the fit's result must survive a registry outage
        log.error(
            "MLflow registration failed (%s: %s). The stripped winner is safe in %s; "
            "register it later with: raydetr register %s", type(exc).__name__, exc,
            winner_dir, run_dir,
        )
        return None
