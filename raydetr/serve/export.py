"""Export a published detector to a checked ONNX file: what ``raydetr export`` and post-fit call.

    det = run_detector(Path("runs/demo"), variant=None)        # a run's winner (or its other variant)
    det = Detector.from_dir("runs/demo/winner")                # a model dir
    report = export_detector(det, "model.onnx", batch=None, postprocess=False)

``raydetr export`` (``raydetr.commands.export``) resolves ``models:/`` URIs through the registry
and hands the loaded detector here.

Every export is checked before it is kept: a float32 graph against the torch model on the same
images at batch 1 and 4 (max abs difference of every output <= 1e-4), a ``half`` graph against
the float32 model's top detections (``raydetr.serve.onnx.check_half``). A file that fails its
check is deleted and the error says by how much it missed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
from pathlib import Path
from typing import Any, Literal

from raydetr.artifacts import ModelDirError, ModelMeta, RunDir
from raydetr.serve.detector import Detector
from raydetr.serve.onnx import (
    DEFAULT_OPSET,
    DEFAULT_TOP_K,
    OnnxExportError,
    OnnxRuntimeModel,
    check_half,
    check_onnx,
    export_onnx,
)
from raydetr.train.checkpoint import BEST_FILES, CheckpointError, latest_checkpoint, read_bests

log = logging.getLogger("raydetr.export")
ONNX_FILE = "model.onnx"

Variant = Literal["ema", "regular"]


def is_run_dir(path: Path) -> bool:
    return RunDir(path).winner.exists()


def run_detector(run_dir: Path, variant: Variant | None = None) -> Detector:
    """The torch detector of a run dir: its winner, or with ``variant`` the other variant's best
    weights from the run's last checkpoint."""
    winner = run_dir / "winner"
    meta = ModelMeta.from_dict(json.loads((winner / "meta.json").read_text()),
                               where=str(winner / "meta.json"))
    if variant is None or variant == meta.variant:
        return Detector.from_dir(winner, device="cpu")
    return _run_variant(run_dir, meta, variant)


def require_variant(det: Detector, source: str, variant: Variant | None) -> Detector:
    """``det`` when it holds ``variant`` (or none was asked for); else an error that says where
    the other variant's weights are."""
    held = det.meta.get("variant")
    if variant is not None and held is not None and variant != held:
        raise ModelDirError(f"{source} holds the {held} weights only; for the {variant} weights "
                            "export the run dir it came from (raydetr export RUN_DIR --variant "
                            f"{variant})")
    return det


def _run_variant(run_dir: Path, meta: ModelMeta, variant: Variant) -> Detector:
    """The best ``variant`` weights of a run (not its winner), from its latest checkpoint."""
    try:
        ckpt = latest_checkpoint(run_dir / "train")
        best = read_bests(ckpt).best(variant)
    except CheckpointError as exc:
        raise ModelDirError(f"{run_dir}: no {variant} weights to export ({exc})") from None
    weights = ckpt / BEST_FILES[variant]
    if not weights.is_file() or best.epoch < 0:
        raise ModelDirError(f"{run_dir}: the run has no best {variant} weights ({weights})")
    variant_meta = dataclasses.replace(
        meta, variant=variant, epoch=best.epoch, metrics={"map": best.map},
        ema_decay=best.decay if variant == "ema" else None,
        shadow=best.shadow if variant == "ema" else None)
    with tempfile.TemporaryDirectory(prefix="raydetr-export-") as tmp:
        meta_path = Path(tmp) / "meta.json"
        meta_path.write_text(json.dumps(variant_meta.to_dict()))
        det = Detector.from_files(weights, meta_path, device="cpu", source=str(run_dir))
    return det


def export_detector(det: Detector, out: str | Path, *, batch: int | None = None,
                    resolution: int | None = None, opset: int = DEFAULT_OPSET,
                    postprocess: bool = False, half: bool = False,
                    top_k: int = DEFAULT_TOP_K) -> dict[str, Any]:
    """Export ``det`` to ``out`` and check it; returns a report (path, opset, outputs, checks).

    ``resolution`` None: the model's own (``meta.json``); another one is recorded in the file's
    metadata, so predict/evaluate through it resize to it."""
    out = Path(out)
    resolution = int(resolution or det.resolution)
    model = det.model.to("cpu").eval()
    meta = {**det.meta, "resolution": resolution}
    try:
        path, opset = export_onnx(model, out, resolution=resolution, meta=meta, batch=batch,
                                  opset=opset, postprocess=postprocess, top_k=top_k, half=half)
    except ValueError as exc:  # e.g. RF-DETR's check of the input size
        if isinstance(exc, OnnxExportError):
            raise
        raise OnnxExportError(f"cannot export at resolution {resolution}: {exc}") from None
    try:
        if half:
            check = check_half(model, path, resolution=resolution)
        else:
            check = check_onnx(model, path, resolution=resolution)
    except Exception:
        path.unlink(missing_ok=True)
        raise
    names = OnnxRuntimeModel(path).output_names
    return {"path": str(path), "opset": opset, "resolution": resolution,
            "batch": batch or "dynamic", "postprocess": postprocess, "half": half,
            "variant": det.meta.get("variant"), "outputs": names, "bytes": path.stat().st_size,
            "check": check}


def export_for_registry(winner_dir: Path, opset: int = DEFAULT_OPSET) -> tuple[Path, int]:
    """Post-fit / ``raydetr register`` hook: ``<winner_dir>/model.onnx`` (float32, dynamic
    batch, raw outputs), checked against torch; returns (path, opset)."""
    det = Detector.from_dir(winner_dir, device="cpu")
    report = export_detector(det, Path(winner_dir) / ONNX_FILE, opset=opset)
    worst = max(max(d.values()) for d in report["check"]["batches"].values())
    log.info("ONNX export for the registry: %s (opset %d, max |onnxruntime - torch| %.2e)",
             report["path"], opset, worst)
    return Path(report["path"]), opset
