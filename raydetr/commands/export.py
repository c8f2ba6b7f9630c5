"""``raydetr export MODEL --format onnx [OUT]``: a checked ONNX file of a published detector.

    raydetr export runs/demo --format onnx                        # -> runs/demo/winner/model.onnx
    raydetr export models:/raydetr@champion --format onnx det.onnx --batch 4 --postprocess
    raydetr predict --model det.onnx images/ --out preds          # the same detections, onnxruntime

MODEL: a model dir (``model.safetensors`` + ``meta.json``), a run dir (its winner; ``--variant``
picks the other variant's best weights from its last checkpoint) or ``models:/NAME@ALIAS``.
OUT defaults to ``model.onnx`` inside a local MODEL (``model-<variant>.onnx`` for a non-winner
variant of a run), else in the current directory.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from raydetr.artifacts import ModelDirError, RunDir
from raydetr.registry.errors import RegistryError
from raydetr.registry.fetch import load_detector
from raydetr.serve.detector import Detector
from raydetr.serve.export import export_detector, is_run_dir, require_variant, run_detector
from raydetr.serve.onnx import DEFAULT_OPSET, OnnxExportError


def run(args: argparse.Namespace) -> int:
    return export_command(args.model, args.out, fmt=args.format, batch=args.batch,
                          resolution=args.resolution, opset=args.opset,
                          postprocess=args.postprocess, half=args.half, variant=args.variant)


def parse_batch(text: str) -> int | None:
    """``dynamic`` -> None, else a positive int."""
    if text == "dynamic":
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"--batch must be 'dynamic' or a positive integer, got '{text}'")
    return value


def default_out(model: str, variant: str | None) -> Path:
    """``model.onnx`` beside the weights (a run's winner/), ``model-<variant>.onnx`` for the
    variant a run's winner is not; the current directory for a registry URI."""
    path = Path(model)
    if not path.is_dir():
        return Path("model.onnx")
    if not is_run_dir(path):
        return path / "model.onnx"
    winner = RunDir(path).winner
    held = winner.read_meta().variant
    return winner.path / ("model.onnx" if variant in (None, held) else f"model-{variant}.onnx")


def detector_to_export(model: str, variant: str | None) -> Detector:
    """A run dir (its winner, or its other ``variant``), a model dir or a registry URI."""
    if model.endswith(".onnx"):
        raise ModelDirError(f"{model} is already an ONNX file; export takes a model dir, a run "
                            "dir or models:/NAME@ALIAS")
    path = Path(model)
    if path.is_dir() and is_run_dir(path):
        return run_detector(path, variant)  # type: ignore[arg-type]
    return require_variant(load_detector(model, device="cpu"), model, variant)  # type: ignore[arg-type]


def export_command(model: str, out: str | None = None, *, fmt: str = "onnx",
                   batch: str = "dynamic", resolution: int | None = None,
                   opset: int = DEFAULT_OPSET, postprocess: bool = False, half: bool = False,
                   variant: str | None = None) -> int:
    """Print what was written and how close it is to torch; 0, or 2 on a user error."""
    try:
        if fmt != "onnx":
            raise ValueError(f"--format {fmt}: only onnx is supported")
        fixed = parse_batch(batch)
        det = detector_to_export(model, variant)
        target = Path(out) if out else default_out(model, variant)
        report = export_detector(det, target, batch=fixed, resolution=resolution, opset=opset,
                                 postprocess=postprocess, half=half)
    except (RegistryError, ModelDirError, OnnxExportError, ValueError) as exc:
        print(f"raydetr export: error: {exc}", file=sys.stderr)
        return 2
    preset = det.meta["model"].get("preset")
    print(f"{preset} ({report['variant']} weights, {report['resolution']} px, batch "
          f"{report['batch']}, opset {report['opset']}{', float16' if half else ''}) -> "
          f"{report['path']} ({report['bytes'] / 1e6:.1f} MB)")
    b = "B" if fixed is None else fixed
    print(f"  input images float32[{b},3,{report['resolution']},{report['resolution']}]; outputs "
          + ", ".join(report["outputs"]))
    check = report["check"]
    if half:
        print(f"  float16 check: top-{check['top_n']} detections of {check['images']} images all "
              f"matched (same class, IoU > {check['min_iou']}); max score difference "
              f"{check['max_score_diff']:.2e}")
    else:
        for b, diffs in check["batches"].items():
            print(f"  onnxruntime vs torch, batch {b}: max abs difference "
                  + ", ".join(f"{n} {d:.2e}" for n, d in diffs.items()))
    return 0
