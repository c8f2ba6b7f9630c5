"""Drawn labels stay inside the image and do not cover each other."""

from __future__ import annotations

import numpy as np
from PIL import Image

from raydetr.serve.draw import _overlaps, draw_detections, place_label


def _inside(rect, w, h):
    return 0 <= rect[0] <= rect[2] < w and 0 <= rect[1] <= rect[3] < h


def test_label_at_right_and_top_edges_stays_inside():
    rect = place_label((90, 0, 100, 20), (40, 12), (100, 80), [])
    assert _inside(rect, 100, 80)
    assert rect[2] == 99  # moved left, not cut off
    assert rect[1] == 0  # no room above the box: inside it


def test_overlapping_boxes_get_separate_labels():
    placed = []
    for _ in range(4):
        placed.append(place_label((10, 30, 50, 60), (40, 12), (100, 100), placed))
    for i, a in enumerate(placed):
        assert _inside(a, 100, 100)
        assert not any(_overlaps(a, b) for b in placed[i + 1:])


def test_drawn_label_pixels_inside_image_at_right_edge():
    image = Image.fromarray(np.zeros((64, 96, 3), np.uint8))
    det = [{"class_id": 0, "class_name": "a-long-class-name", "score": 0.9,
            "x1": 80.0, "y1": 20.0, "x2": 95.0, "y2": 40.0}]
    out = np.asarray(draw_detections(image, det))
    colour = np.array([230, 25, 75])
    filled = np.all(out == colour, axis=-1)
    cols = np.nonzero(filled.any(axis=0))[0]
    # the label background reaches left of the box: it was moved in from the right edge
    assert cols.min() < 80 - 20
