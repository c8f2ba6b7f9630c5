"""COCO maxDets per family: RF-DETR reports AP at 500 detections per image (its patched
summarize), COCO at 100. A true positive ranked 150th counts only at 500."""

import numpy as np
import pytest

from raydetr.config.presets import eval_settings
from raydetr.eval.coco import coco_metrics


def _records(n_dets=150, true_rank=149):
    gt = np.array([[10, 10, 60, 60]], np.float32)
    rng = np.random.default_rng(0)
    boxes = rng.uniform(100, 190, (n_dets, 2)).astype(np.float32)
    boxes = np.concatenate([boxes, boxes + 5], 1)  # small boxes far from the object
    boxes[true_rank] = gt[0]
    scores = np.linspace(0.9, 0.1, n_dets).astype(np.float32)  # descending: rank = index
    return [{"image_id": 1, "width": 200, "height": 200, "gt_boxes": gt,
             "gt_labels": np.array([0]), "scores": scores,
             "labels": np.zeros(n_dets, np.int64), "boxes": boxes}]


def test_true_positive_beyond_100_counts_only_at_500():
    at100 = coco_metrics(_records(), ["a"])
    at500 = coco_metrics(_records(), ["a"], max_dets=500)
    assert at100["map"] == 0.0 and at100["mar"] == 0.0
    # one object found at rank 150: recall 1, precision 1/150 at every recall point (every IoU)
    assert at500["mar"] == 1.0
    assert at500["map"] == pytest.approx(1 / 150) and at500["map50"] == pytest.approx(1 / 150)
    assert at500["per_class"]["a"] == at500["map"]


def test_same_figures_at_either_setting_when_fewer_than_100_detections():
    a, b = coco_metrics(_records(50, 3), ["a"]), coco_metrics(_records(50, 3), ["a"], max_dets=500)
    assert a["map"] > 0 and {k: a[k] for k in ("map", "map50", "mar")} == {
        k: b[k] for k in ("map", "map50", "mar")}


def test_family_settings():
    assert eval_settings("rfdetr-nano") == (300, 500)
    assert eval_settings("rtdetr-r18") == (100, 100)
