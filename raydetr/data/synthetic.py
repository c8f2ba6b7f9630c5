"""Synthetic shapes dataset (demo and fast tests), written in the Roboflow COCO layout.

    make_synthetic("data/shapes", train_images=256, val_images=64, image_size=128, seed=0)
    -> data/shapes/{train,valid}/_annotations.coco.json + JPEG images beside it

Each image has a textured random background and 1..max_objects filled shapes; the class is the
shape: 0 rectangle, 1 ellipse, 2 triangle (COCO category ids 1..3 under a Roboflow-style
superclass category 0 "shapes", which the reader skips). Colours and sizes vary, the smaller side
of a shape is at least ~10% of the image, boxes are tight to the drawn pixels (a later shape may
occlude part of an earlier one; its box is still the full shape). Each annotation also carries
the shape's mask as a COCO compressed RLE ``segmentation`` (the full shape, like its box), so the
set serves segmentation presets too; detection presets ignore it. Image k of a split is drawn
from its own Generator seeded by (seed, split, k): the output is a pure function of the
arguments.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from raydetr.data import masks as mk
from raydetr.data.formats import DatasetError

CLASSES = ("rectangle", "ellipse", "triangle")
MARKER = "synthetic.json"
MIN_SIDE = 0.10   # of the image size
MAX_SIDE = 0.45


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    """Smooth random colour field + a coarse pattern + pixel noise: not a flat colour."""
    coarse = rng.integers(40, 216, (4, 4, 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BILINEAR), np.int16)
    cells = rng.integers(2, 9)
    checker = (np.add.outer(np.arange(size) * cells // size, np.arange(size) * cells // size) % 2)
    img = img + (checker[..., None] * rng.integers(-25, 26, 3)).astype(np.int16)
    img = img + rng.integers(-18, 19, (size, size, 3), dtype=np.int16)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    c = rng.integers(0, 256, 3)
    c[rng.integers(3)] = rng.choice([rng.integers(0, 40), rng.integers(215, 256)])  # saturated
    return int(c[0]), int(c[1]), int(c[2])


def _iou(a: list[float], b: list[float]) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def draw_image(rng: np.random.Generator, size: int, max_objects: int
               ) -> tuple[Image.Image, list[list[float]], list[int]]:
    """One image: (RGB image, boxes xyxy pixels (exclusive right/bottom), class index per box)."""
    return draw_shapes(rng, size, max_objects)[:3]


def draw_shapes(rng: np.random.Generator, size: int, max_objects: int
                ) -> tuple[Image.Image, list[list[float]], list[int], list[np.ndarray]]:
    """``draw_image`` plus each shape's full mask, bool[size, size] (same draws)."""
    image = _background(rng, size)
    draw = ImageDraw.Draw(image)
    boxes: list[list[float]] = []
    labels: list[int] = []
    masks: list[np.ndarray] = []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        for _try in range(10):  # avoid near-total overlap so every box stays learnable
            bw, bh = (int(v) for v in rng.uniform(MIN_SIDE, MAX_SIDE, 2) * size)
            bw, bh = max(bw, 3), max(bh, 3)
            x0, y0 = int(rng.integers(0, size - bw + 1)), int(rng.integers(0, size - bh + 1))
            cls = int(rng.integers(len(CLASSES)))
            if all(_iou([x0, y0, x0 + bw, y0 + bh], b) < 0.3 for b in boxes):
                break
        mask = Image.new("L", (size, size))
        mdraw = ImageDraw.Draw(mask)
        xy = (x0, y0, x0 + bw - 1, y0 + bh - 1)
        if cls == 0:
            mdraw.rectangle(xy, fill=255)
        elif cls == 1:
            mdraw.ellipse(xy, fill=255)
        else:
            apex = x0 + int(rng.integers(0, bw))
            pts = [(apex, y0), (x0, y0 + bh - 1), (x0 + bw - 1, y0 + bh - 1)]
            if rng.random() < 0.5:  # upside down
                pts = [(apex, y0 + bh - 1), (x0, y0), (x0 + bw - 1, y0)]
            mdraw.polygon(pts, fill=255)
        bbox = mask.getbbox()  # tight (left, top, right+1, bottom+1) of the drawn pixels
        if bbox is None:
            continue
        draw.bitmap((0, 0), mask, fill=_colour(rng))
        boxes.append([float(v) for v in bbox])
        labels.append(cls)
        masks.append(np.asarray(mask) > 0)
    return image, boxes, labels, masks


def _write_split(folder: Path, n: int, split_idx: int, image_size: int, seed: int,
                 max_objects: int, bar: tqdm) -> None:
    folder.mkdir(parents=True)
    images, annotations = [], []
    for k in range(n):
        rng = np.random.default_rng([seed, split_idx, k])
        image, boxes, labels, masks = draw_shapes(rng, image_size, max_objects)
        rles = mk.encode(np.stack(masks)) if masks else []
        name = f"{k:06d}.jpg"
        image.save(folder / name, quality=92)
        images.append({"id": k, "file_name": name, "width": image_size, "height": image_size})
        for (x1, y1, x2, y2), cls, rle in zip(boxes, labels, rles):
            annotations.append({"id": len(annotations), "image_id": k, "category_id": cls + 1,
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1),
                                "iscrowd": 0, "segmentation": {"size": [image_size, image_size],
                                                               "counts": rle.decode()}})
        bar.update(1)
    categories = [{"id": 0, "name": "shapes", "supercategory": "none"}] + [
        {"id": i + 1, "name": c, "supercategory": "shapes"} for i, c in enumerate(CLASSES)]
    coco = {"info": {"description": "raydetr synthetic shapes"}, "images": images,
            "annotations": annotations, "categories": categories}
    (folder / "_annotations.coco.json").write_text(json.dumps(coco))


def make_synthetic(out: Path | str, train_images: int = 256, val_images: int = 64,
                   image_size: int = 128, seed: int = 0, max_objects: int = 4, *,
                   progress: bool = False, overwrite: bool = False) -> Path:
    """Write the synthetic dataset to ``out`` (atomically) and return ``out``.

    If ``out`` already holds a synthetic dataset made with the same arguments it is reused;
    with other arguments (or other content) DatasetError unless ``overwrite`` (which only
    replaces an earlier synthetic dataset). ``progress``: tqdm bar + one summary line.
    """
    if train_images <= 0 or val_images <= 0 or max_objects <= 0 or image_size < 16:
        raise DatasetError("make_synthetic needs train_images, val_images, max_objects > 0 and "
                           f"image_size >= 16 (got {train_images}, {val_images}, {max_objects}, "
                           f"{image_size})")
    out = Path(out).expanduser().resolve()
    params: dict[str, Any] = {"train_images": train_images, "val_images": val_images,
                              "image_size": image_size, "seed": seed, "max_objects": max_objects,
                              "masks": True}  # sets made before masks lack this: not reused
    if out.exists():
        marker = out / MARKER
        existing = json.loads(marker.read_text()) if marker.is_file() else None
        if existing == params:
            return out
        if existing is None and (not out.is_dir() or any(out.iterdir())):
            raise DatasetError(f"{out} exists and is not a raydetr synthetic dataset; choose "
                               "another folder")
        if existing is not None and not overwrite:
            raise DatasetError(f"{out} holds a synthetic dataset made with {existing}, not "
                               f"{params}; pass overwrite=True or choose another folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        with tqdm(total=train_images + val_images, desc="synthetic", unit="img",
                  disable=not progress) as bar:
            _write_split(tmp / "train", train_images, 0, image_size, seed, max_objects, bar)
            _write_split(tmp / "valid", val_images, 1, image_size, seed, max_objects, bar)
        (tmp / MARKER).write_text(json.dumps(params))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if progress:
        print(f"synthetic shapes dataset at {out}: train={train_images} valid={val_images} "
              f"images of {image_size}px, classes {', '.join(CLASSES)}")
    return out
