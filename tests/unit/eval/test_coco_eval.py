"""COCO evaluation: the reference numbers, perfect/empty detections, a hand-checked case."""

from __future__ import annotations

import json

import numpy as np
import pytest

import raydetr.eval.coco as coco


def _rec(image_id, gt, gt_labels, dets=(), labels=(), scores=(), size=(640, 480)):
    return {
        "image_id": image_id,
        "width": size[0],
        "height": size[1],
        "gt_boxes": np.asarray(gt, np.float32).reshape(-1, 4),
        "gt_labels": np.asarray(gt_labels, np.int64),
        "boxes": np.asarray(dets, np.float32).reshape(-1, 4),
        "labels": np.asarray(labels, np.int64),
        "scores": np.asarray(scores, np.float32),
    }


def test_reference_files_reproduce_pycocotools(coco_reference_dir, monkeypatch):
    calls = []
    real = coco.run_cocoeval
    monkeypatch.setattr(coco, "run_cocoeval", lambda g, d, **kw: calls.append(1) or real(g, d, **kw))
    stats = coco.evaluate_coco_files(
        coco_reference_dir / "instances_val2014_100.json",
        coco_reference_dir / "instances_val2014_fakebbox100_results.json",
    )
    expected = json.loads((coco_reference_dir / "expected_bbox_stats.json").read_text())
    assert list(stats) == list(coco.STAT_NAMES)
    for name, value in expected.items():
        assert stats[name] == pytest.approx(value, abs=1e-9), name
    # coco_metrics goes through the same COCOeval call
    coco.coco_metrics([_rec(1, [[10, 10, 60, 60]], [0], [[10, 10, 60, 60]], [0], [0.9])], ["a"])
    assert len(calls) == 2


def test_perfect_detections_give_one():
    boxes = [[10, 10, 60, 80], [100, 120, 300, 400], [5, 5, 20, 20]]
    recs = [_rec(i, boxes, [0, 1, 1], boxes, [0, 1, 1], [0.9, 0.8, 0.7]) for i in (1, 2)]
    m = coco.coco_metrics(recs, ["cat", "dog"])
    for key in ("map", "map50", "map75", "map_small", "map_medium", "map_large", "mar", "mar10"):
        assert m[key] == pytest.approx(1.0), key
    assert m["per_class"] == {"cat": pytest.approx(1.0), "dog": pytest.approx(1.0)}


def test_empty_detections_and_empty_images_give_zeros():
    recs = [_rec(1, [[10, 10, 60, 80]], [0]), _rec(2, [], []), _rec(3, [[0, 0, 200, 200]], [1])]
    m = coco.coco_metrics(recs, ["cat", "dog", "bird"])
    assert {k: v for k, v in m.items() if k != "per_class"} == dict.fromkeys(coco._METRIC_KEYS, 0.0)
    assert m["per_class"] == {"cat": 0.0, "dog": 0.0, "bird": 0.0}
    assert coco.coco_metrics([], ["cat"])["map"] == 0.0
    assert coco.coco_metrics([_rec(1, [], [], [[0, 0, 9, 9]], [0], [0.5])], ["cat"])["map"] == 0.0


def test_hand_checked_case():
    """Image 1: two 50x50 'cat' GT boxes, detections = one exact hit (0.9) then one false
    positive (0.8): precision 1 up to recall 0.5 -> 51 of 101 recall points -> AP 51/101 at
    every IoU. Image 2: one exact 'dog'. Image 3: nothing at all."""
    recs = [
        _rec(1, [[0, 0, 50, 50], [100, 100, 150, 150]], [0, 0],
             [[0, 0, 50, 50], [300, 300, 350, 350]], [0, 0], [0.9, 0.8]),
        _rec(2, [[0, 0, 50, 50]], [1], [[0, 0, 50, 50]], [1], [0.7]),
        _rec(3, [], []),
    ]  # fmt: skip
    m = coco.coco_metrics(recs, ["cat", "dog"])
    cat = 51 / 101
    assert m["per_class"]["cat"] == pytest.approx(cat)
    assert m["per_class"]["dog"] == pytest.approx(1.0)
    assert m["map"] == m["map50"] == m["map75"] == m["map_medium"] == pytest.approx((cat + 1) / 2)
    assert m["map_small"] == m["map_large"] == 0.0  # no GT in those ranges (-1 -> 0)
    assert m["mar"] == m["mar1"] == pytest.approx((0.5 + 1.0) / 2)


def test_xyxy_to_xywh_and_category_ids():
    gt, results = coco.records_to_coco(
        [_rec(7, [[10, 20, 40, 60]], [1], [[1, 2, 3, 4]], [0], [0.5])], ["a", "b"]
    )
    ann = gt["annotations"][0]
    assert ann["bbox"] == [10, 20, 30, 40] and ann["area"] == 1200 and ann["iscrowd"] == 0
    assert ann["category_id"] == 2 and ann["image_id"] == 7
    assert results == [{"image_id": 7, "category_id": 1, "bbox": [1, 2, 2, 2], "score": 0.5}]
    assert gt["categories"] == [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]


def test_bad_records_name_the_image():
    with pytest.raises(ValueError, match="image_id 5 .*outside 0..1"):
        coco.coco_metrics([_rec(5, [[0, 0, 9, 9]], [2])], ["a", "b"])
    with pytest.raises(ValueError, match="image_id 3 appears more than once"):
        coco.coco_metrics([_rec(3, [], []), _rec(3, [], [])], ["a"])


def test_pycocotools_output_is_quiet(capsys):
    coco.coco_metrics([_rec(1, [[0, 0, 50, 50]], [0], [[0, 0, 50, 50]], [0], [0.9])], ["a"])
    assert capsys.readouterr().out == ""
