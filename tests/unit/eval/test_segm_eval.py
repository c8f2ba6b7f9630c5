"""COCO mask (segm) evaluation: the record contract, known answers, and the per-rank path
(pycocotools' evaluate() per part, merged and accumulated on one) equal to pycocotools on one
process, to 1e-9, on synthetic records and on the COCO reference ground truth (polygons and
crowd RLEs)."""

from __future__ import annotations

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

import raydetr.eval.coco as coco
import raydetr.eval.distributed as dist_eval
import raydetr.eval.matching as matching


def _box_mask(h, w, x1, y1, x2, y2, half=None):
    m = np.zeros((h, w), bool)
    m[y1:y2, x1:x2] = True
    if half == "left":
        m[:, (x1 + x2) // 2:] = False
    elif half == "right":
        m[:, :(x1 + x2) // 2] = False
    return m


def _rec(image_id, h, w, gt_masks, gt_labels, det_masks=(), labels=(), scores=()):
    """A record whose boxes are its masks' bounding boxes (xyxy)."""
    def boxes(masks):
        out = []
        for m in masks:
            ys, xs = np.nonzero(m)
            out.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] if len(xs) else [0, 0, 0, 0])
        return np.asarray(out, np.float32).reshape(-1, 4)

    gt_masks, det_masks = list(gt_masks), list(det_masks)
    return {"image_id": image_id, "width": w, "height": h,
            "gt_boxes": boxes(gt_masks), "gt_labels": np.asarray(gt_labels, np.int64),
            "boxes": boxes(det_masks), "labels": np.asarray(labels, np.int64),
            "scores": np.asarray(scores, np.float32),
            "gt_masks": coco.encode_rle(np.asarray(gt_masks, bool).reshape(-1, h, w)),
            "masks": coco.encode_rle(np.asarray(det_masks, bool).reshape(-1, h, w))}


def test_rle_round_trip_and_area():
    rng = np.random.default_rng(0)
    masks = rng.random((5, 37, 53)) > 0.6
    rles = coco.encode_rle(masks)
    assert [r["size"] for r in rles] == [[37, 53]] * 5
    np.testing.assert_array_equal(coco.decode_rle(rles), masks)
    assert [int(mask_utils.area(r)) for r in rles] == masks.sum(axis=(1, 2)).tolist()
    as_text = [{"size": r["size"], "counts": r["counts"].decode()} for r in rles]  # JSON form
    np.testing.assert_array_equal(coco.decode_rle(as_text), masks)
    assert coco.encode_rle(np.zeros((0, 4, 4), bool)) == []
    # masks handed over transposed ([n, W, H], C-contiguous): the same RLEs
    assert coco.encode_rle(np.ascontiguousarray(masks.transpose(0, 2, 1)), transposed=True) == rles


def test_masks_decide_segm_boxes_decide_bbox():
    """Each detection has the exact box but the other half of the object as its mask: bbox AP
    1, segm AP 0. With the right halves, both 1."""
    h, w = 120, 160
    gts = [_box_mask(h, w, 10, 10, 60, 80, "left"), _box_mask(h, w, 80, 20, 150, 110, "left")]
    wrong = [_box_mask(h, w, 10, 10, 60, 80, "right"), _box_mask(h, w, 80, 20, 150, 110, "right")]
    rec = _rec(1, h, w, gts, [0, 1], wrong, [0, 1], [0.9, 0.8])
    rec["boxes"] = rec["gt_boxes"].copy()
    both = coco.coco_metrics_all([rec], ["a", "b"])
    assert both["map"] == pytest.approx(1.0) and both["map_segm"] == pytest.approx(0.0)
    assert both["per_class_segm"] == {"a": 0.0, "b": 0.0}
    right = _rec(1, h, w, gts, [0, 1], gts, [0, 1], [0.9, 0.8])
    m = coco.coco_metrics_all([right], ["a", "b"])
    assert m["map"] == pytest.approx(1.0) and m["map_segm"] == pytest.approx(1.0)
    # no masks in the records: bbox only
    plain = {k: v for k, v in right.items() if k not in ("masks", "gt_masks")}
    assert "map_segm" not in coco.coco_metrics_all([plain], ["a", "b"])


def test_segm_area_ranges_use_the_mask_area():
    """A GT whose box is large (>96^2) but whose mask is small (<32^2) counts as small in segm,
    as COCO's annotation area does."""
    h, w = 200, 200
    thin = np.zeros((h, w), bool)
    thin[10:190, 10] = True  # 180 pixels, box 1 x 180
    thin[10, 10:190] = True  # an L: box 180 x 180, area 359
    m = coco.coco_metrics([_rec(1, h, w, [thin], [0], [thin], [0], [0.9])], ["a"], iou_type="segm")
    assert m["map_small"] == pytest.approx(1.0) and m["map_large"] == 0.0
    mb = coco.coco_metrics([_rec(1, h, w, [thin], [0], [thin], [0], [0.9])], ["a"])
    assert mb["map_large"] == pytest.approx(1.0) and mb["map_small"] == 0.0


def test_bad_mask_records_name_image_and_key():
    h, w = 20, 30
    good = _rec(7, h, w, [_box_mask(h, w, 2, 2, 9, 9)], [0], [_box_mask(h, w, 2, 2, 9, 9)], [0], [.5])
    missing = {k: v for k, v in good.items() if k != "gt_masks"}
    with pytest.raises(ValueError, match=r"image_id 7 has no 'gt_masks'"):
        coco.coco_metrics([missing], ["a"], iou_type="segm")
    short = {**good, "masks": []}
    with pytest.raises(ValueError, match=r"image_id 7: 0 masks for 1 boxes"):
        coco.coco_metrics([short], ["a"], iou_type="segm")
    other_size = {**good, "masks": coco.encode_rle(np.ones((1, w, h), bool))}
    with pytest.raises(ValueError, match=r"image_id 7: masks\[0\] has size \[30, 20\]"):
        dist_eval.match_records([other_size], ["a"], iou_type="segm")
    with pytest.raises(ValueError, match="iou_type 'keypoints'"):
        coco.coco_metrics([good], ["a"], iou_type="keypoints")


def _random_records(seed: int, n_images: int, classes: int, max_gt: int = 6, dets: int = 40):
    """Ellipses and rectangles of every size (small/medium/large), detections near them (some
    the same mask, tied scores) and pure noise; some images without ground truth."""
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n_images):
        h, w = int(rng.integers(40, 160)), int(rng.integers(40, 160))
        yy, xx = np.mgrid[:h, :w]

        def shape(h=h, w=w, yy=yy, xx=xx):
            cx, cy = rng.uniform(0, w), rng.uniform(0, h)
            rx, ry = rng.uniform(1, w / 2), rng.uniform(1, h / 2)
            if rng.random() < 0.5:
                m = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1
            else:
                m = (abs(xx - cx) <= rx) & (abs(yy - cy) <= ry)
            if not m.any():
                m[int(cy) % h, int(cx) % w] = True
            return m

        n_gt = int(rng.integers(0, max_gt + 1)) if i % 5 else 0
        gts = [shape() for _ in range(n_gt)]
        gt_labels = rng.integers(0, classes, n_gt)
        det_masks, labels = [], []
        for _ in range(int(rng.integers(0, dets + 1))):
            if gts and rng.random() < 0.6:
                j = int(rng.integers(0, n_gt))
                m = gts[j].copy()
                if rng.random() < 0.7:  # shift it a little
                    m = np.roll(m, (int(rng.integers(-4, 5)), int(rng.integers(-4, 5))), (0, 1))
                label = gt_labels[j] if rng.random() < 0.8 else rng.integers(0, classes)
            else:
                m, label = shape(), rng.integers(0, classes)
            if not m.any():
                m[0, 0] = True
            det_masks.append(m)
            labels.append(int(label))
        scores = np.round(rng.random(len(labels)), 1)  # ties on purpose
        records.append(_rec(1000 + i, h, w, gts, gt_labels, det_masks, labels, scores))
    return records


def _pycocotools_segm(records, classes, max_dets):
    gt, results = coco.records_to_coco(records, classes, "segm")
    coco_gt = coco.coco_from_dataset(gt)
    return coco.run_cocoeval(coco_gt, coco.load_results(coco_gt, results), max_dets=max_dets,
                             iou_type="segm")


def _assert_same(ev: COCOeval, ref: COCOeval) -> None:
    for key in ("precision", "recall", "scores"):
        np.testing.assert_array_equal(ev.eval[key], ref.eval[key], err_msg=key)
    np.testing.assert_allclose(ev.stats, ref.stats, rtol=0, atol=1e-9)


@pytest.mark.parametrize("workers,max_dets", [(1, 100), (2, 100), (3, 10), (5, 500)])
def test_segm_split_over_workers_equals_pycocotools(workers, max_dets):
    classes = ["a", "b", "c"]
    records = _random_records(workers, 30, len(classes), dets=60 if max_dets == 10 else 30)
    ref = _pycocotools_segm(records, classes, max_dets)
    assert ref.stats[0] > 0.05  # a real mix of hits and misses, not all zeros
    perm = np.random.default_rng(workers).permutation(len(records))
    parts = [dist_eval.match_records([records[i] for i in perm[r::workers]], classes,
                                     (1, 10, max_dets), iou_type="segm")
             for r in range(workers)]
    ev = dist_eval.accumulate(dist_eval.merge(parts[::-1]))
    _assert_same(ev, ref)
    metrics = dist_eval.coco_metrics_of_matches(parts, classes)
    single = coco.coco_metrics(records, classes, max_dets=max_dets, iou_type="segm")
    for key, value in single.items():
        if key != "per_class":
            assert metrics[key] == pytest.approx(value, abs=1e-9), key
    assert metrics["per_class"] == pytest.approx(single["per_class"], abs=1e-9)
    # the same records' bbox path is untouched by the masks
    bbox_parts = [dist_eval.match_records([records[i] for i in perm[r::workers]], classes,
                                          (1, 10, max_dets)) for r in range(workers)]
    bbox = dist_eval.coco_metrics_of_matches(bbox_parts, classes)
    assert bbox["map"] == pytest.approx(coco.coco_metrics(records, classes, max_dets)["map"],
                                        abs=1e-9)


def test_segm_reference_ground_truth_with_crowd_split_equals_pycocotools(coco_reference_dir):
    """COCO's own polygons and crowd RLEs (instances_val2014_100.json), detections made from
    them (shifted, relabelled, noise): per-part pycocotools matching == one COCOeval."""
    with coco._quiet("test"):
        coco_gt = COCO(str(coco_reference_dir / "instances_val2014_100.json"))
    rng = np.random.default_rng(3)
    cat_ids = coco_gt.getCatIds()
    results = []
    for ann in coco_gt.loadAnns(coco_gt.getAnnIds()):
        img = coco_gt.imgs[ann["image_id"]]
        m = coco_gt.annToMask(ann).astype(bool)
        for _ in range(2):
            d = np.roll(m, (int(rng.integers(-6, 7)), int(rng.integers(-6, 7))), (0, 1))
            cat = ann["category_id"] if rng.random() < 0.85 else int(rng.choice(cat_ids))
            rle = coco.encode_rle(d[None])[0]
            assert rle["size"] == [img["height"], img["width"]]
            results.append({"image_id": ann["image_id"], "category_id": cat,
                            "segmentation": rle, "score": float(np.round(rng.random(), 2))})
    coco_dt = coco.load_results(coco_gt, results)
    ref = coco.run_cocoeval(coco_gt, coco_dt, iou_type="segm")
    assert any(a.get("iscrowd") for a in coco_gt.dataset["annotations"])
    ids = sorted(coco_gt.getImgIds())
    perm = np.random.default_rng(0).permutation(ids)
    parts = [matching.match_pycocotools(coco_gt, coco_dt, sorted(int(i) for i in perm[r::3]),
                                        iou_type="segm") for r in range(3)]
    _assert_same(dist_eval.accumulate(dist_eval.merge(parts)), ref)
