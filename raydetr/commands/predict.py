"""``raydetr predict``: images (files or folders) -> detections.json and drawn images (a
segmentation model's masks filled, translucent, and stored as COCO RLE in detections.json).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from raydetr.artifacts import ModelDirError
from raydetr.registry.errors import RegistryError
from raydetr.registry.fetch import load_detector
from raydetr.serve.detector import DETECTION_COLUMNS, MASK_COLUMN
from raydetr.serve.draw import draw_detections
from raydetr.serve.images import IMAGE_SUFFIXES, ImageInputError, load_image


def expand_image_paths(inputs: Sequence[str | Path]) -> list[Path]:
    """Files as given; directories -> every image file inside (recursive, sorted)."""
    paths: list[Path] = []
    for raw in inputs:
        p = Path(raw)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise ImageInputError(f"{p}: directory holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
            paths.extend(found)
        elif p.is_file():
            paths.append(p)
        else:
            raise ImageInputError(f"{p}: no such file or directory")
    return paths


def _check_images(paths: list[Path]) -> None:
    """Cheap header check of every file before any model is loaded or output written."""
    bad = []
    for p in paths:
        try:
            with Image.open(p) as im:
                im.verify()
        except (UnidentifiedImageError, OSError, SyntaxError) as exc:
            bad.append(f"  {p}: not an image ({exc.__class__.__name__})")
    if bad:
        raise ImageInputError("cannot read these inputs:\n" + "\n".join(bad))


def _output_names(paths: list[Path]) -> list[str]:
    used: set[str] = set()
    names = []
    for p in paths:
        name, n = f"{p.stem}.jpg", 1
        while name in used:
            name, n = f"{p.stem}_{n}.jpg", n + 1
        used.add(name)
        names.append(name)
    return names


def run(args: argparse.Namespace) -> int:
    return predict_command(args.model, args.images, args.out, args.threshold)


def predict_command(model: str, images: Sequence[str | Path], out: str | Path,
                    threshold: float = 0.5, *, batch_size: int = 8) -> int:
    """``raydetr predict``: detections.json + one drawn ``<name>.jpg`` per image in ``out``.

    Everything is written to a staging dir beside ``out`` and moved in at the end, with
    ``detections.json`` last, so a failed run never leaves output that looks complete.
    Returns 0, or 2 on a user error (bad input, unknown model) after printing it.
    """
    out = Path(out)
    try:
        paths = expand_image_paths(images)
        if not paths:
            raise ImageInputError("no input images given")
        _check_images(paths)
        det = load_detector(model)
    except (ImageInputError, RegistryError, ModelDirError) as exc:
        print(f"raydetr predict: error: {exc}", file=sys.stderr)
        return 2
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    records = []
    try:
        names = _output_names(paths)
        bar = tqdm(total=len(paths), desc="predict", unit="img", disable=len(paths) < 16 or None)
        for start in range(0, len(paths), batch_size):
            chunk = paths[start:start + batch_size]
            arrays = [load_image(p, start + i) for i, p in enumerate(chunk)]
            for i, (p, arr, raw) in enumerate(zip(chunk, arrays, det.detect_arrays(arrays))):
                dets = det._rows(start + i, raw, threshold)
                draw_detections(Image.fromarray(arr), dets).save(staging / names[start + i], quality=90)
                records.append({
                    "file": str(p), "width": int(arr.shape[1]), "height": int(arr.shape[0]),
                    "output": names[start + i],
                    # + "mask" (COCO RLE, counts as text) for a segmentation model
                    "detections": [{k: d[k] for k in (*DETECTION_COLUMNS[1:], MASK_COLUMN)
                                    if k in d} for d in dets],
                })
            bar.update(len(chunk))
        bar.close()
        summary = {"model": det.source, "threshold": threshold, "classes": det.classes,
                   "images": records}
        (staging / "detections.json").write_text(json.dumps(summary, indent=2))
        out.mkdir(parents=True, exist_ok=True)
        (out / "detections.json").unlink(missing_ok=True)  # stale result must not look current
        for name in names + ["detections.json"]:
            os.replace(staging / name, out / name)
    except ImageInputError as exc:
        print(f"raydetr predict: error: {exc}", file=sys.stderr)
        return 2
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    n = sum(len(r["detections"]) for r in records)
    print(f"{n} detections in {len(records)} images (threshold {threshold}) -> {out}/detections.json")
    return 0
