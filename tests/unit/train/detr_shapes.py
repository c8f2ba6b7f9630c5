"""Tiny in-memory synthetic detection data (coloured rectangles / ellipses) for unit tests.

Independent of raydetr.data so the model and engine tests run on their own.
"""

from __future__ import annotations

import numpy as np
import torch

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
COLOURS = np.array([[230, 40, 40], [40, 200, 60], [50, 80, 230]], dtype=np.float32)


def make_images(n: int, size: int = 128, seed: int = 0, max_objects: int = 3,
                num_classes: int = 2) -> list[dict]:
    """n images: dict(image float32[3,S,S] normalised, labels int64[N], boxes cxcywh [N,4],
    image_id). Class 0 = rectangle, class 1 = ellipse; colour is random (not the class)."""
    rng = np.random.default_rng(seed)
    out = []
    yy, xx = np.mgrid[0:size, 0:size]
    for i in range(n):
        img = np.full((size, size, 3), 110.0, dtype=np.float32) + rng.normal(0, 8, (size, size, 3))
        labels, boxes = [], []
        for _ in range(int(rng.integers(1, max_objects + 1))):
            w, h = rng.uniform(0.15, 0.45, 2) * size
            x0, y0 = rng.uniform(0, size - w), rng.uniform(0, size - h)
            cls = int(rng.integers(0, num_classes))
            colour = COLOURS[rng.integers(0, len(COLOURS))]
            if cls == 0:
                mask = (xx >= x0) & (xx < x0 + w) & (yy >= y0) & (yy < y0 + h)
            else:
                cx, cy = x0 + w / 2, y0 + h / 2
                mask = ((xx + 0.5 - cx) / (w / 2)) ** 2 + ((yy + 0.5 - cy) / (h / 2)) ** 2 <= 1
            img[mask] = colour
            labels.append(cls)
            boxes.append([(x0 + w / 2) / size, (y0 + h / 2) / size, w / size, h / size])
        img = (np.clip(img, 0, 255) / 255.0 - MEAN) / STD
        out.append({"image": torch.from_numpy(img.transpose(2, 0, 1).copy()).float(),
                    "labels": torch.tensor(labels, dtype=torch.int64),
                    "boxes": torch.tensor(boxes, dtype=torch.float32),
                    "image_id": i})
    return out


def batches(items: list[dict], batch_size: int, size: int = 128, shuffle_seed: int | None = None):
    """Batch dicts as in the data contract (orig_size = (size, size))."""
    order = list(range(len(items)))
    if shuffle_seed is not None:
        np.random.default_rng(shuffle_seed).shuffle(order)
    for s in range(0, len(order), batch_size):
        chunk = [items[j] for j in order[s:s + batch_size]]
        yield {
            "images": torch.stack([c["image"] for c in chunk]),
            "targets": [{"labels": c["labels"], "boxes": c["boxes"],
                         "image_id": torch.tensor(c["image_id"]),
                         "orig_size": torch.tensor([size, size])} for c in chunk],
        }
