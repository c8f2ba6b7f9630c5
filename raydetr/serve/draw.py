"""Draw detections (xyxy absolute pixels) with class and score labels onto an image; a
detection with a ``mask`` (COCO RLE at the image size, or a bool [H, W] array) is also filled,
translucent, in its class colour (the best-scoring mask on top).

Labels always lie inside the image (a box at the right or top edge gets its label moved in, not
cut off) and never cover each other: when boxes overlap, a label that would collide with one
already placed moves below it, so every ``class score`` stays readable.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFont

from raydetr.eval.coco import decode_rle

_PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
            (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212)]
_PAD = 2  # pixels around the label text
MASK_ALPHA = 0.45  # opacity of a filled mask

Rect = tuple[int, int, int, int]  # x1, y1, x2, y2 (inclusive pixels)


def _overlaps(a: Rect, b: Rect) -> bool:
    return a[0] <= b[2] and b[0] <= a[2] and a[1] <= b[3] and b[1] <= a[3]


def place_label(box_xyxy: tuple[float, float, float, float], label_wh: tuple[int, int],
                image_wh: tuple[int, int], placed: list[Rect]) -> Rect:
    """Where a label of ``label_wh`` pixels goes for a box: above its top-left corner, inside the
    box when there is no room above, shifted left at the right edge, and moved down past every
    label in ``placed`` it would cover. The rectangle is clipped to the image."""
    img_w, img_h = image_wh
    w, h = min(label_wh[0], img_w), min(label_wh[1], img_h)
    x = int(min(max(box_xyxy[0], 0), img_w - w))
    y = int(box_xyxy[1]) - h
    if y < 0:
        y = int(max(box_xyxy[1], 0))
    y = min(y, img_h - h)
    rect = (x, y, x + w - 1, y + h - 1)
    for _ in range(len(placed) + 1):  # each move clears at least one label
        hit = next((p for p in placed if _overlaps(rect, p)), None)
        if hit is None:
            break
        y = hit[3] + 1
        if y + h > img_h:  # no room below: the last row of the image
            y = img_h - h
            rect = (x, y, x + w - 1, y + h - 1)
            break
        rect = (x, y, x + w - 1, y + h - 1)
    return rect


def mask_array(mask: dict | np.ndarray, size_wh: tuple[int, int]) -> np.ndarray:
    """bool [H, W] of a detection's ``mask`` (COCO RLE dict or array); it must be the image's
    size."""
    m = decode_rle([mask])[0] if isinstance(mask, dict) else np.asarray(mask, bool)
    if m.shape != (size_wh[1], size_wh[0]):
        raise ValueError(f"a detection's mask is {m.shape[1]}x{m.shape[0]} (w x h), the image "
                         f"{size_wh[0]}x{size_wh[1]}: masks are drawn at the original image size")
    return m


def fill_masks(image: Image.Image, rows: list[dict], alpha: float = MASK_ALPHA) -> Image.Image:
    """``image`` with each row's ``mask`` blended in its class colour, lowest score first so
    the best mask lies on top; rows without a mask are skipped."""
    rows = [d for d in rows if isinstance(d.get("mask"), (dict, np.ndarray))]
    if not rows:
        return image
    arr = np.asarray(image, np.float32).copy()
    for d in sorted(rows, key=lambda d: float(d["score"])):
        m = mask_array(d["mask"], image.size)
        colour = np.asarray(_PALETTE[int(d["class_id"]) % len(_PALETTE)], np.float32)
        arr[m] = arr[m] * (1 - alpha) + colour * alpha
    return Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8))


def draw_detections(image: Image.Image, detections: pd.DataFrame | Iterable[dict]) -> Image.Image:
    """Masks (filled, translucent), boxes (xyxy absolute pixels) with ``class_name score``
    labels, default PIL font; highest scores are labelled first, so they keep the position
    next to their box."""
    rows = detections.to_dict("records") if isinstance(detections, pd.DataFrame) else list(detections)
    out = fill_masks(image.convert("RGB").copy(), rows)
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default()
    rows = sorted(rows, key=lambda d: -float(d["score"]))
    placed: list[Rect] = []
    for d in rows:
        colour = _PALETTE[int(d["class_id"]) % len(_PALETTE)]
        box = (float(d["x1"]), float(d["y1"]), float(d["x2"]), float(d["y2"]))
        draw.rectangle(box, outline=colour, width=2)
        label = f"{d['class_name']} {float(d['score']):.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
        rect = place_label(box, (right - left + 2 * _PAD, bottom - top + 2 * _PAD), out.size, placed)
        placed.append(rect)
        draw.rectangle(rect, fill=colour)
        draw.text((rect[0] + _PAD - left, rect[1] + _PAD - top), label, fill=(0, 0, 0), font=font)
    return out
