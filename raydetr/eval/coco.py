"""COCO evaluation with pycocotools, boxes (``bbox``) and masks (``segm``): eval records ->
COCO GT / results -> COCOeval.

Eval records are plain numpy dicts (picklable, gathered from Ray workers to rank 0)::

    {"image_id": int, "width": int, "height": int,
     "gt_boxes": f32[N,4] xyxy absolute pixels, "gt_labels": i64[N] class index 0..C-1,
     "scores": f32[K], "labels": i64[K], "boxes": f32[K,4] xyxy absolute pixels,
     # segmentation models only (both or neither):
     "masks": [K COCO RLEs], "gt_masks": [N COCO RLEs]}

A mask is a COCO RLE in pycocotools' compressed form, ``{"size": [height, width], "counts":
bytes}`` (:func:`encode_rle`), at the ORIGINAL image size (``size`` must be the record's
height, width); ``masks[k]`` belongs to detection k and ``gt_masks[n]`` to ground-truth box n.
Predicted masks are the model's mask logits resized bilinearly to the original size, then > 0
(raydetr.model.postprocess.masks_rle, a few detections at a time: never a batch of full-size
float masks); ground-truth masks are binary.

The ground truth is built in memory (no temp files): boxes xyxy -> xywh, area = w*h (bbox) or
the mask's pixel count (segm, as COCO's annotation area), iscrowd=0, COCO category id = class
index + 1; segm results carry no box (pycocotools' loadRes would replace a result's mask by its
box). ``coco_metrics`` and ``evaluate_coco_files`` go through the same ``run_cocoeval`` call,
and the latter reproduces pycocotools' published numbers on the cocoapi reference files
(tests/unit/eval).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

log = logging.getLogger(__name__)

IOU_TYPES = ("bbox", "segm")
SEGM_SUFFIX = "_segm"  # coco_metrics keys of the mask evaluation: map_segm, per_class_segm, ...

# Order of COCOeval.stats for iouType="bbox".
STAT_NAMES = (
    "AP",
    "AP50",
    "AP75",
    "APs",
    "APm",
    "APl",
    "AR1",
    "AR10",
    "AR100",
    "ARs",
    "ARm",
    "ARl",
)
# coco_metrics keys for the same stats (ARs/ARm/ARl are not reported there).
_METRIC_KEYS = {
    "map": 0, "map50": 1, "map75": 2, "map_small": 3, "map_medium": 4, "map_large": 5,
    "mar1": 6, "mar10": 7, "mar": 8,
}  # fmt: skip


@contextlib.contextmanager
def _quiet(what: str):
    """pycocotools prints progress to stdout; send it to this module's logger (debug)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        yield
    text = buf.getvalue().strip()
    if text:
        log.debug("pycocotools %s:\n%s", what, text)


def coco_from_dataset(dataset: dict[str, Any]) -> COCO:
    """A pycocotools COCO object from an in-memory COCO dict (images/annotations/categories)."""
    coco = COCO()
    coco.dataset = dataset
    with _quiet("createIndex"):
        coco.createIndex()
    return coco


def load_results(coco_gt: COCO, results: list[dict[str, Any]]) -> COCO:
    """``coco_gt.loadRes(results)``, which also works for an empty list (pycocotools fails)."""
    if results:
        with _quiet("loadRes"):
            return coco_gt.loadRes(results)
    return coco_from_dataset(
        {
            "images": list(coco_gt.dataset.get("images", [])),
            "categories": list(coco_gt.dataset.get("categories", [])),
            "annotations": [],
        }
    )


def _iou_type(iou_type: str) -> str:
    if iou_type not in IOU_TYPES:
        raise ValueError(f"COCO evaluation: iou_type {iou_type!r} is not one of {IOU_TYPES}")
    return iou_type


def encode_rle(masks: np.ndarray, transposed: bool = False) -> list[dict[str, Any]]:
    """bool (or 0/1) masks [n, H, W] -> n COCO RLEs ``{"size": [H, W], "counts": bytes}``
    (pycocotools' compressed form). ``transposed``: the masks come as [n, W, H], each mask
    transposed and the array C-contiguous, which is the column-major layout pycocotools reads:
    encoded without a copy. A few masks at a time keeps any copy small."""
    masks = np.asarray(masks)
    if masks.ndim != 3:
        raise ValueError(f"encode_rle: masks must be [n, H, W], got shape {masks.shape}")
    if len(masks) == 0:
        return []
    hwn = masks.transpose(2, 1, 0) if transposed else masks.transpose(1, 2, 0)
    if hwn.dtype == bool:
        hwn = hwn.view(np.uint8)  # same bytes, no copy
    return mask_utils.encode(np.asfortranarray(hwn, dtype=np.uint8))


def decode_rle(rles: Sequence[dict[str, Any]]) -> np.ndarray:
    """COCO RLEs (compressed, ``counts`` bytes or str) of one size -> bool [n, H, W]."""
    if not rles:
        return np.zeros((0, 0, 0), bool)
    rles = [{"size": list(r["size"]), "counts": (r["counts"].encode() if isinstance(r["counts"], str)
                                                 else r["counts"])} for r in rles]
    return mask_utils.decode(rles).transpose(2, 0, 1).astype(bool)


def has_masks(records: Sequence[dict[str, Any]]) -> bool:
    """Whether eval records carry masks (then ``segm`` can be evaluated as well as ``bbox``)."""
    return any("masks" in r for r in records)


def _record_rles(rec: dict[str, Any], key: str, n: int) -> list[dict[str, Any]]:
    """``rec[key]``: n RLEs at the record's size, or an error naming the image and the key."""
    image_id = int(rec["image_id"])
    rles = rec.get(key)
    if rles is None:
        raise ValueError(f"eval records: image_id {image_id} has no '{key}'; segm evaluation "
                         "needs predicted masks ('masks') and ground-truth masks ('gt_masks') "
                         "in every record (a segmentation preset on a dataset with masks)")
    if len(rles) != n:
        raise ValueError(f"eval records: image_id {image_id}: {len(rles)} {key} for {n} boxes")
    want = [int(rec["height"]), int(rec["width"])]
    for i, r in enumerate(rles):
        if [int(v) for v in r["size"]] != want:
            raise ValueError(f"eval records: image_id {image_id}: {key}[{i}] has size "
                             f"{list(r['size'])}, not the image's [height, width] {want}")
    return list(rles)


def run_cocoeval(coco_gt: COCO, coco_dt: COCO, max_dets: int = 100,
                 iou_type: str = "bbox") -> COCOeval:
    """The one COCOeval call of this project: ``iou_type`` bbox or segm, maxDets [1, 10, ``max_dets``]; evaluate,
    accumulate, summarize. ``.stats`` holds the 12 numbers in :data:`STAT_NAMES` order (-1:
    undefined, i.e. no ground truth in that area range); ``.eval["precision"]`` is
    [T, R, K, A, M]. Every AP and the last AR are at ``max_dets`` detections per image:
    pycocotools' default 100, or e.g. RF-DETR's 500 (see :func:`summarize`)."""
    ev = COCOeval(coco_gt, coco_dt, iouType=_iou_type(iou_type))
    ev.params.maxDets = [1, 10, int(max_dets)]
    with _quiet("COCOeval"):
        ev.evaluate()
        ev.accumulate()
    summarize(ev)
    return ev


def summarize(ev: COCOeval) -> None:
    """``ev.summarize()``, with the first AP at ``maxDets[2]`` as the other APs: pycocotools
    hard-codes 100 there (-1 when 100 is not among the maxDets); RF-DETR's patched summarize
    reads maxDets[2], so at its 500 the first AP is redone."""
    with _quiet("COCOeval.summarize"):
        ev.summarize()
    if ev.params.maxDets[2] != 100:
        p = ev.eval["precision"][:, :, :, 0, 2]  # area all, maxDets[2]
        ev.stats[0] = float(p[p > -1].mean()) if (p > -1).any() else -1.0


def evaluate_coco_files(gt_json: str | Path, results_json: str | Path,
                        max_dets: int = 100, iou_type: str = "bbox") -> dict[str, float]:
    """Standard COCO evaluation (``iou_type`` bbox or segm) of a results file against a GT
    annotation file.

    Returns the 12 stats named AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100, ARs, ARm,
    ARl, exactly as pycocotools computes them (-1 where undefined); with ``max_dets`` other
    than 100 the AP and AR100 entries are at that many detections per image.
    """
    gt_json, results_json = Path(gt_json), Path(results_json)
    for path in (gt_json, results_json):
        if not path.is_file():
            raise FileNotFoundError(f"COCO evaluation: file not found: {path}")
    try:
        results = json.loads(results_json.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{results_json}: not valid JSON: {exc}") from None
    if not isinstance(results, list):
        raise ValueError(f"{results_json}: expected a JSON list of detections")
    with _quiet("load annotations"):
        coco_gt = COCO(str(gt_json))
    ev = run_cocoeval(coco_gt, load_results(coco_gt, results), max_dets=max_dets,
                      iou_type=iou_type)
    return {name: float(v) for name, v in zip(STAT_NAMES, ev.stats)}


def _xyxy_to_xywh(boxes: np.ndarray, where: str) -> np.ndarray:
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if not np.isfinite(boxes).all():
        raise ValueError(f"{where}: boxes contain NaN/inf")
    out = boxes.copy()
    out[:, 2:] = boxes[:, 2:] - boxes[:, :2]
    return out


def record_arrays(rec: dict[str, Any], num_classes: int) -> dict[str, Any]:
    """One eval record, checked, as float64 xywh boxes: image_id, width, height, gt_xywh [N,4],
    gt_labels i64[N], det_xywh [K,4], det_labels i64[K], scores f64[K]. Errors name the image."""
    image_id = int(rec["image_id"])
    out: dict[str, Any] = {"image_id": image_id, "width": int(rec["width"]),
                           "height": int(rec["height"])}
    for kind, box_key, label_key in (("gt", "gt_boxes", "gt_labels"), ("det", "boxes", "labels")):
        labels = np.asarray(rec[label_key], dtype=np.int64).reshape(-1)
        if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(
                f"eval records: image_id {image_id} has {kind} label(s) "
                f"{sorted(set(labels[(labels < 0) | (labels >= num_classes)].tolist()))} "
                f"outside 0..{num_classes - 1} ({num_classes} classes)"
            )
        xywh = _xyxy_to_xywh(rec[box_key], f"eval records: image_id {image_id} {box_key}")
        if len(xywh) != len(labels):
            raise ValueError(
                f"eval records: image_id {image_id}: {len(xywh)} {box_key} but "
                f"{len(labels)} {label_key}"
            )
        out[f"{kind}_xywh"], out[f"{kind}_labels"] = xywh, labels
    scores = np.asarray(rec["scores"], dtype=np.float64).reshape(-1)
    if len(scores) != len(out["det_labels"]):
        raise ValueError(f"eval records: image_id {image_id}: {len(scores)} scores but "
                         f"{len(out['det_labels'])} labels")
    out["scores"] = scores
    return out


def records_to_coco(
    records: Sequence[dict[str, Any]], classes: Sequence[str], iou_type: str = "bbox"
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Eval records -> (COCO ground-truth dataset dict, COCO results list).

    Category id = class index + 1. Boxes become xywh absolute pixels; GT area = w*h. For
    ``iou_type="segm"``: every annotation also holds its RLE (area = its pixel count), and each
    result holds its RLE instead of a box.
    """
    segm = _iou_type(iou_type) == "segm"
    images, annotations, results = [], [], []
    seen: set[int] = set()
    for rec in records:
        r = record_arrays(rec, len(classes))
        image_id = r["image_id"]
        if image_id in seen:
            raise ValueError(f"eval records: image_id {image_id} appears more than once")
        seen.add(image_id)
        images.append({"id": image_id, "width": r["width"], "height": r["height"]})
        gt_rles = _record_rles(rec, "gt_masks", len(r["gt_labels"])) if segm else None
        for n, (box, label) in enumerate(zip(r["gt_xywh"].tolist(), r["gt_labels"].tolist())):
            ann = {"id": len(annotations) + 1, "image_id": image_id, "category_id": label + 1,
                   "bbox": box, "area": box[2] * box[3], "iscrowd": 0}
            if gt_rles is not None:
                ann.update(segmentation=gt_rles[n], area=float(mask_utils.area(gt_rles[n])))
            annotations.append(ann)
        rles = _record_rles(rec, "masks", len(r["det_labels"])) if segm else None
        for k, (box, label, score) in enumerate(zip(r["det_xywh"].tolist(),
                                                    r["det_labels"].tolist(),
                                                    r["scores"].tolist())):
            if rles is None:
                results.append({"image_id": image_id, "category_id": label + 1, "bbox": box,
                                "score": score})
            else:
                results.append({"image_id": image_id, "category_id": label + 1,
                                "segmentation": rles[k], "score": score})
    categories = [{"id": i + 1, "name": str(name)} for i, name in enumerate(classes)]
    return {"images": images, "annotations": annotations, "categories": categories}, results


def per_class_ap(ev: COCOeval) -> np.ndarray:
    """AP per category (IoU .50:.95, area all, the last maxDets): mean of precision > -1 over IoU
    thresholds and recall points; -1 for a category without ground truth. Order: params.catIds."""
    precision = ev.eval["precision"][:, :, :, 0, -1]  # [T, R, K]
    out = np.full(precision.shape[2], -1.0)
    for k in range(precision.shape[2]):
        p = precision[:, :, k]
        if (p > -1).any():
            out[k] = float(p[p > -1].mean())
    return out


def coco_metrics(records: Sequence[dict[str, Any]], classes: Sequence[str],
                 max_dets: int = 100, iou_type: str = "bbox") -> dict[str, Any]:
    """COCO ``iou_type`` (bbox or segm) metrics of eval records, at ``max_dets`` detections per
    image (COCO's 100; RF-DETR reports 500).

    Returns map (IoU .50:.95), map50, map75, map_small, map_medium, map_large, mar (AR at
    ``max_dets``), mar1, mar10, and per_class {class name: AP}.
    Values pycocotools leaves undefined (-1: no
    ground truth in that area range / for that class, or no ground truth at all) are reported
    as 0.0, so zero detections give zeros and every key is always a number.
    """
    if not classes:
        raise ValueError("coco_metrics: classes is empty")
    gt, results = records_to_coco(records, classes, iou_type)
    out: dict[str, Any] = {key: 0.0 for key in _METRIC_KEYS}
    out["per_class"] = {str(name): 0.0 for name in classes}
    if not gt["annotations"]:
        log.warning("coco_metrics: no ground-truth boxes in %d images; metrics are 0", len(records))
        return out
    coco_gt = coco_from_dataset(gt)
    return metrics_of_cocoeval(run_cocoeval(coco_gt, load_results(coco_gt, results),
                                            max_dets=max_dets, iou_type=iou_type), classes)


def with_segm(bbox: dict[str, Any], segm: dict[str, Any] | None) -> dict[str, Any]:
    """One metrics dict of both evaluations: bbox's keys as they are, segm's with
    :data:`SEGM_SUFFIX` (``map_segm``, ``map50_segm``, ..., ``per_class_segm``)."""
    if segm is None:
        return dict(bbox)
    return {**bbox, **{f"{k}{SEGM_SUFFIX}": v for k, v in segm.items()}}


def coco_metrics_all(records: Sequence[dict[str, Any]], classes: Sequence[str],
                     max_dets: int = 100) -> dict[str, Any]:
    """bbox metrics, plus the segm ones (:func:`with_segm`) when the records carry masks."""
    bbox = coco_metrics(records, classes, max_dets)
    segm = coco_metrics(records, classes, max_dets, "segm") if has_masks(records) else None
    return with_segm(bbox, segm)


def metrics_of_cocoeval(ev: COCOeval, classes: Sequence[str]) -> dict[str, Any]:
    """The :func:`coco_metrics` dict of an accumulated and summarized COCOeval (category id =
    class index + 1); -1 (undefined) becomes 0.0."""
    out: dict[str, Any] = {key: max(0.0, float(ev.stats[idx])) for key, idx in _METRIC_KEYS.items()}
    out["per_class"] = {str(name): 0.0 for name in classes}
    for cat_id, ap in zip(ev.params.catIds, per_class_ap(ev)):
        out["per_class"][str(classes[cat_id - 1])] = max(0.0, float(ap))
    return out
