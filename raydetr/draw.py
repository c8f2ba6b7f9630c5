"""Draw detections (xyxy absolute pixels) with class and score labels onto an image.
"""

from __future__ import annotations

from collections.abc import Iterable

import pandas as pd
from PIL import Image, ImageDraw, ImageFont

_PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
            (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212)]


def draw_detections(image: Image.Image, detections: pd.DataFrame | Iterable[dict]) -> Image.Image:
    """Boxes (xyxy absolute pixels) with ``class_name score`` labels, default PIL font."""
    out = image.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default()
    rows = detections.to_dict("records") if isinstance(detections, pd.DataFrame) else detections
    for d in rows:
        colour = _PALETTE[int(d["class_id"]) % len(_PALETTE)]
        box = [float(d["x1"]), float(d["y1"]), float(d["x2"]), float(d["y2"])]
        draw.rectangle(box, outline=colour, width=2)
        label = f"{d['class_name']} {float(d['score']):.2f}"
        left, top, right, bottom = draw.textbbox((box[0], box[1]), label, font=font)
        height = bottom - top
        y = box[1] - height - 2 if box[1] - height - 2 >= 0 else box[1]
        draw.rectangle([box[0], y, box[0] + (right - left) + 4, y + height + 2], fill=colour)
        draw.text((box[0] + 2, y), label, fill=(0, 0, 0), font=font)
    return out
