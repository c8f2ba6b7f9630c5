"""Distributed COCO evaluation (raydetr.eval.matching / distributed) == pycocotools on one process:
the 12 stats and the precision/recall arrays, on the COCO reference files and on random records
built to hit the corner cases (tied scores, equal IoUs, boxes on area-range edges, more than
maxDets detections per image and category, images without boxes)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

import raydetr.eval.coco as coco
import raydetr.eval.distributed as dist_eval
import raydetr.eval.matching as matching


def _pycocotools(coco_gt: COCO, coco_dt: COCO, max_dets=(1, 10, 100)) -> COCOeval:
    """pycocotools' evaluate + accumulate; stats by raydetr.eval.coco.summarize (pycocotools'
    summarize, and where maxDets[2] is not 100 the first AP at maxDets[2], as RF-DETR's)."""
    ev = COCOeval(coco_gt, coco_dt, iouType="bbox")
    ev.params.maxDets = list(max_dets)
    with coco._quiet("test"):
        ev.evaluate()
        ev.accumulate()
    coco.summarize(ev)
    if max_dets[2] == 100:  # the summarize is pycocotools' own, untouched
        with coco._quiet("test"):
            plain = COCOeval(coco_gt, coco_dt, iouType="bbox")
            plain.evaluate()
            plain.accumulate()
            plain.summarize()
        np.testing.assert_array_equal(ev.stats, plain.stats)
    return ev


def _assert_same(ev: COCOeval, ref: COCOeval) -> None:
    for key in ("precision", "recall", "scores"):
        np.testing.assert_array_equal(ev.eval[key], ref.eval[key], err_msg=key)
    np.testing.assert_allclose(ev.stats, ref.stats, rtol=0, atol=1e-9)


def _sorted_dets(m: matching.Matches) -> dict[str, np.ndarray]:
    order = np.lexsort((m.det_rank, m.det_cat, m.det_image))
    out = {f: getattr(m, f)[order] for f in ("det_cat", "det_image", "det_rank", "det_score",
                                              "det_matched", "det_ignored")}
    return {**out, "image_ids": np.sort(m.image_ids), "gt_counted": m.gt_counted}


def _parts(ids, n: int, seed: int = 0) -> list[list[int]]:
    perm = np.random.default_rng(seed).permutation(sorted(ids))
    return [sorted(int(i) for i in perm[r::n]) for r in range(n)]


@pytest.fixture(scope="module")
def reference(coco_reference_dir):
    with coco._quiet("test"):
        coco_gt = COCO(str(coco_reference_dir / "instances_val2014_100.json"))
    results = json.loads(
        (coco_reference_dir / "instances_val2014_fakebbox100_results.json").read_text())
    expected = json.loads((coco_reference_dir / "expected_bbox_stats.json").read_text())
    return coco_gt, coco.load_results(coco_gt, results), expected


@pytest.mark.parametrize("workers", [1, 2, 3, 7])
def test_reference_files_split_over_workers_equal_pycocotools(reference, workers):
    """The shared COCO reference (100 val2014 images, crowd boxes, 80 categories): each part
    matched alone, merged in any order, gives pycocotools' arrays and the published stats."""
    coco_gt, coco_dt, expected = reference
    ref = _pycocotools(coco_gt, coco_dt)
    params = matching.coco_params(coco_gt.getCatIds(), (1, 10, 100))
    parts = [matching.match_flat(matching.flat_from_coco(coco_gt, coco_dt, ids), params)
             for ids in _parts(coco_gt.getImgIds(), workers)]
    ev = dist_eval.accumulate(dist_eval.merge(parts[::-1]))
    _assert_same(ev, ref)
    for name, stat in zip(coco.STAT_NAMES, ev.stats):
        assert stat == pytest.approx(expected[name], abs=1e-9), name


def test_array_matching_equals_pycocotools_evaluate_img(reference):
    """Per detection, the matched / ignored bits at every (area range, IoU threshold) and the
    counted ground truth are those of pycocotools' own evaluateImg."""
    coco_gt, coco_dt, _ = reference
    ids = _parts(coco_gt.getImgIds(), 2)[0]
    fast = matching.match_flat(matching.flat_from_coco(coco_gt, coco_dt, ids),
                               matching.coco_params(coco_gt.getCatIds(), (1, 10, 100)))
    slow = matching.match_pycocotools(coco_gt, coco_dt, ids)
    a, b = _sorted_dets(fast), _sorted_dets(slow)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert fast.det_matched.any() and fast.det_ignored.any()  # the case is not trivial


def _random_records(seed: int, images: int, classes: int) -> list[dict]:
    """Records with corner cases: scores on a 0.1 grid (ties within and across images), exact
    duplicate detections (equal IoUs), GT boxes whose areas sit on 32**2 and 96**2, more than
    100 detections of one class in some images, some images with nothing."""
    rng = np.random.default_rng(seed)
    recs = []
    for i in range(images):
        w, h = int(rng.integers(200, 640)), int(rng.integers(200, 640))
        n_gt = int(rng.choice([0, 1, 3, 12]))
        side = rng.choice([8.0, 32.0, 50.0, 96.0, 150.0], n_gt)
        x0, y0 = rng.uniform(0, w - 150, n_gt), rng.uniform(0, h - 150, n_gt)
        gt = np.stack([x0, y0, x0 + side, y0 + side], 1) if n_gt else np.zeros((0, 4))
        gt_labels = rng.integers(0, classes, n_gt)
        near = np.repeat(gt, 4, 0) + rng.normal(0, 4, (4 * n_gt, 4)) if n_gt else np.zeros((0, 4))
        n_rand = int(rng.choice([0, 20, 130]))
        cx, cy = rng.uniform(0, w, n_rand), rng.uniform(0, h, n_rand)
        s = rng.uniform(6, 120, n_rand)
        rand = np.stack([cx - s, cy - s, cx + s, cy + s], 1)
        dets = np.concatenate([near, rand, near[:2]])  # exact duplicates of two detections
        labels = np.concatenate([np.repeat(gt_labels, 4),
                                 rng.integers(0, 2, n_rand) if i % 3 else
                                 rng.integers(0, classes, n_rand), np.repeat(gt_labels, 4)[:2]])
        scores = np.round(rng.uniform(0, 1, len(dets)), 1)
        recs.append({"image_id": int(rng.integers(1, 10**6)) * 10 + i % 10 if i % 5 else i + 1,
                     "width": w, "height": h,
                     "gt_boxes": gt.astype(np.float32), "gt_labels": gt_labels,
                     "boxes": dets.astype(np.float32), "labels": labels.astype(np.int64),
                     "scores": scores.astype(np.float32)})
    ids = [r["image_id"] for r in recs]
    assert len(set(ids)) == len(ids)
    return recs


@pytest.mark.parametrize("max_dets", [(1, 10, 100), (1, 5, 20)])
def test_random_records_split_over_workers_equal_pycocotools(max_dets):
    classes = [f"c{i}" for i in range(5)]
    recs = _random_records(3, 60, len(classes))
    gt, results = coco.records_to_coco(recs, classes)
    coco_gt = coco.coco_from_dataset(gt)
    ref = _pycocotools(coco_gt, coco.load_results(coco_gt, results), max_dets)
    for workers in (1, 2, 4):
        parts = [dist_eval.match_records(recs[r::workers], classes, max_dets)
                 for r in range(workers)]
        _assert_same(dist_eval.accumulate(dist_eval.merge(parts)), ref)
    # the coco_metrics dict, per class included, is the single-process one
    got = dist_eval.coco_metrics_of_matches(
        [dist_eval.match_records(recs[r::3], classes) for r in range(3)], classes)
    want = coco.coco_metrics(recs, classes)
    assert got.pop("per_class") == pytest.approx(want.pop("per_class"), abs=1e-12)
    assert got == pytest.approx(want, abs=1e-12) and want["map"] > 0.05


def test_empty_parts_no_ground_truth_and_bad_input():
    classes = ["a", "b"]
    box = {"gt_boxes": np.array([[0, 0, 50, 50]], np.float32), "gt_labels": np.array([0]),
           "boxes": np.array([[0, 0, 50, 50]], np.float32), "labels": np.array([0]),
           "scores": np.array([0.9], np.float32), "width": 64, "height": 64}
    recs = [{"image_id": 1, **box}]
    # a rank without images (more workers than val images) contributes nothing
    parts = [dist_eval.match_records(recs, classes), dist_eval.match_records([], classes)]
    assert dist_eval.coco_metrics_of_matches(parts, classes) == coco.coco_metrics(recs, classes)
    no_gt = [{**recs[0], "gt_boxes": np.zeros((0, 4), np.float32), "gt_labels": np.zeros(0)}]
    assert dist_eval.coco_metrics_of_matches(
        [dist_eval.match_records(no_gt, classes)], classes) == coco.coco_metrics(no_gt, classes)
    with pytest.raises(ValueError, match="image_id 1 was matched in more than one part"):
        dist_eval.merge([dist_eval.match_records(recs, classes)] * 2)
    with pytest.raises(ValueError, match="image_id 1 .*outside 0..1"):
        dist_eval.match_records([{**recs[0], "labels": np.array([5])}], classes)
    with pytest.raises(ValueError, match="image_id 1 appears more than once"):
        dist_eval.match_records(recs * 2, classes)
    with pytest.raises(ValueError, match="other parameters"):
        dist_eval.merge([dist_eval.match_records(recs, classes),
                         dist_eval.match_records([], classes, (1, 10, 300))])


@pytest.mark.parametrize("gt_order", [[0, 1], [1, 0]])
def test_equal_ious_take_the_last_ground_truth_as_pycocotools(gt_order):
    """Detection 1 overlaps two GT boxes with the same IoU (2/3); pycocotools takes the later
    one, so detection 2 (which only overlaps box A) is a hit only when A came first."""
    gt = np.array([[12, 0, 22, 10], [8, 0, 18, 10]], np.float32)[gt_order]  # A, B
    rec = {"image_id": 1, "width": 64, "height": 64, "gt_boxes": gt,
           "gt_labels": np.zeros(2, np.int64),
           "boxes": np.array([[10, 0, 20, 10], [13, 0, 23, 10]], np.float32),
           "labels": np.zeros(2, np.int64), "scores": np.array([0.9, 0.8], np.float32)}
    got = dist_eval.coco_metrics_of_matches([dist_eval.match_records([rec], ["a"])], ["a"])
    want = coco.coco_metrics([rec], ["a"])
    assert got == want
    assert want["map50"] == pytest.approx(1.0 if gt_order == [0, 1] else 0.5, abs=0.01)
