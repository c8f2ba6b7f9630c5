"""Instance masks: COCO polygons / RLE and YOLO-seg polygons -> one compact stored form.

Stored form (chosen for the Parquet shards): one COCO **compressed RLE** ``counts`` string per
instance, as bytes, at the **original image size** (the record's height x width, which the shard
stores beside it). Measured on ../shared/data/brain-tumor-seg's train split (481 masks,
640x640 images): median 373 bytes per mask, largest 1283 (a bool mask is 409,600 bytes), and one
``decode`` took about 1 ms (pycocotools writes the pixels; shared 2-core machine, loaded), which
the loader pays per instance of a segmentation batch, beside the image's own decode. Polygons are rasterised once, at ``prepare``, the way COCO does it
(``pycocotools.mask.frPyObjects``, the parts of one instance OR-ed together).

    rle = polygon_rle([[10, 10, 50, 10, 50, 40]], height=100, width=80)   # -> bytes
    masks = decode([rle], height=100, width=80)                          # bool[1, 100, 80]

Geometry is checked where it is read (``instance_rle``), and every problem names its place
(file, annotation id or label line), following ``formats``: a fix is counted in the split's
ValidationReport, a problem the user must fix is added to ``Problems``.

* polygon part with fewer than 3 points (or an odd number of coordinates): that part is dropped,
  counted (``dropped_mask_parts``); when no part is left the instance is dropped (box, label and
  mask), counted (``dropped_instances``).
* polygon points outside the image: clipped to it (rasterising clips), counted
  (``clipped_masks``), as boxes sticking out are clipped today.
* RLE whose ``size`` is not the image's (height, width), or whose counts do not cover it:
  an error (the annotation belongs to another image size: re-export it).
* a mask with no pixels (degenerate polygon, empty RLE): the instance is dropped, counted.
* ``iscrowd`` regions are skipped from the targets, as COCO and RF-DETR do (already counted as
  ``skipped_crowd``); they are not stored.

A dataset "has masks" when any non-crowd instance of any split carries a segmentation. Then every
instance gets one: an instance without a segmentation is given its box as a filled rectangle,
counted (``box_masks``) with a warning naming it (``finish_masks``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pycocotools.mask as mask_utils

from raydetr.data.formats import CLIP_TOLERANCE_PX, Problems, ValidationReport


@dataclass(frozen=True)
class MissingMask:
    """Placeholder for an instance without a segmentation in a dataset that has masks; ``where``
    names it (file and annotation id / label line) for the warning ``fill_missing`` writes."""

    where: str


InstanceMask = bytes | MissingMask


def _rle(counts: bytes, height: int, width: int) -> dict[str, Any]:
    return {"size": [int(height), int(width)], "counts": counts}


def polygon_rle(parts: Sequence[Sequence[float]], height: int, width: int) -> bytes:
    """Polygon parts [[x0, y0, x1, y1, ...], ...] in absolute pixels -> compressed RLE counts
    of their union (COCO's rasterisation, pycocotools)."""
    rles = mask_utils.frPyObjects([list(map(float, p)) for p in parts], int(height), int(width))
    return mask_utils.merge(rles)["counts"]


def box_rle(box_xyxy: Sequence[float], height: int, width: int) -> bytes:
    """A filled rectangle (the box) as a mask."""
    x1, y1, x2, y2 = (float(v) for v in box_xyxy)
    return polygon_rle([[x1, y1, x2, y1, x2, y2, x1, y2]], height, width)


def area(counts: bytes, height: int, width: int) -> int:
    """Pixels of one stored mask."""
    return int(mask_utils.area(_rle(counts, height, width)))


def bbox_xyxy(counts: bytes, height: int, width: int) -> np.ndarray:
    """Tight pixel box of one stored mask, float32[4] xyxy (COCO's ``toBbox``)."""
    x, y, w, h = mask_utils.toBbox(_rle(counts, height, width))
    return np.array([x, y, x + w, y + h], dtype=np.float32)


def decode(rles: Sequence[bytes], height: int, width: int) -> np.ndarray:
    """Stored masks of one image -> bool[N, height, width]."""
    if len(rles) == 0:
        return np.zeros((0, height, width), dtype=bool)
    objs = [_rle(bytes(c), height, width) for c in rles]
    return np.ascontiguousarray(mask_utils.decode(objs).transpose(2, 0, 1)).view(bool)


def encode(masks: np.ndarray) -> list[bytes]:
    """bool[N, H, W] -> compressed RLE counts per mask (the inverse of ``decode``)."""
    arr = np.asfortranarray(np.asarray(masks, dtype=np.uint8).transpose(1, 2, 0))
    return [r["counts"] for r in mask_utils.encode(arr)] if arr.shape[2] else []


def polygon_area(points: Sequence[float]) -> float:
    """Shoelace area of one polygon part [x0, y0, x1, y1, ...] (for checks)."""
    x, y = np.asarray(points[0::2], np.float64), np.asarray(points[1::2], np.float64)
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2)


def _polygon_parts(segmentation: list, width: int, height: int, where: str,
                   report: ValidationReport) -> list[list[float]] | None:
    """Valid parts of a COCO polygon segmentation; None (after a problem count) if none."""
    parts = segmentation if segmentation and isinstance(segmentation[0], (list, tuple)) \
        else [segmentation]
    kept, clipped = [], False
    for k, part in enumerate(parts):
        try:
            coords = [float(v) for v in part]
        except (TypeError, ValueError):
            coords = []
        if len(coords) < 6 or len(coords) % 2 or not all(math.isfinite(v) for v in coords):
            report.dropped_mask_parts += 1
            report.warnings.append(f"{where}: polygon part {k} dropped: needs at least 3 finite "
                                   f"(x, y) points, got {len(coords)} values")
            continue
        xs, ys = coords[0::2], coords[1::2]
        if (min(xs) < -CLIP_TOLERANCE_PX or min(ys) < -CLIP_TOLERANCE_PX
                or max(xs) > width + CLIP_TOLERANCE_PX or max(ys) > height + CLIP_TOLERANCE_PX):
            clipped = True
        kept.append(coords)
    if clipped:
        report.clipped_masks += 1
        report.warnings.append(f"{where}: polygon has points outside the {width}x{height} image; "
                               "clipped to it")
    return kept or None


def instance_rle(segmentation: Any, width: int, height: int, where: str,
                 report: ValidationReport, problems: Problems) -> InstanceMask | None:
    """One COCO ``segmentation`` (polygon parts, uncompressed or compressed RLE) -> stored mask.

    Returns the RLE counts; ``MissingMask`` for an empty/absent segmentation; None when the
    instance must be dropped (counted in ``report``, or a problem added)."""
    if segmentation is None or (isinstance(segmentation, (list, dict)) and not segmentation):
        return MissingMask(where)
    if isinstance(segmentation, list):
        parts = _polygon_parts(segmentation, width, height, where, report)
        if parts is None:
            return _drop(where, "no polygon part with 3 or more points", report)
        counts = polygon_rle(parts, height, width)
    elif isinstance(segmentation, dict):
        counts = _rle_counts(segmentation, width, height, where, problems)
        if counts is None:
            return None
    else:
        problems.add(f"{where}: 'segmentation' must be a list of polygons or an RLE dict, got "
                     f"{type(segmentation).__name__}")
        return None
    if area(counts, height, width) == 0:
        return _drop(where, "the mask has no pixels", report)
    return counts


def _rle_counts(seg: dict, width: int, height: int, where: str, problems: Problems
                ) -> bytes | None:
    size, counts = seg.get("size"), seg.get("counts")
    if not isinstance(size, (list, tuple)) or len(size) != 2:
        problems.add(f"{where}: RLE needs 'size': [height, width], got {size!r}")
        return None
    if [int(size[0]), int(size[1])] != [height, width]:
        problems.add(f"{where}: RLE size {list(size)} (height, width) is not the image's "
                     f"[{height}, {width}]; re-export the annotation for this image")
        return None
    if isinstance(counts, list):  # uncompressed (COCO crowd style): run lengths must cover it
        if not all(isinstance(c, int) and c >= 0 for c in counts) or sum(counts) != height * width:
            problems.add(f"{where}: uncompressed RLE counts must be non-negative integers summing "
                         f"to height x width = {height * width}")
            return None
        return mask_utils.frPyObjects({"size": [height, width], "counts": counts},
                                      height, width)["counts"]
    if isinstance(counts, str):
        counts = counts.encode()
    if not isinstance(counts, bytes):
        problems.add(f"{where}: RLE 'counts' must be a list or a string, got {type(counts).__name__}")
        return None
    # a truncated/garbled string decodes to a different pixel total: re-encode and compare
    try:
        decoded = mask_utils.decode(_rle(counts, height, width))
    except ValueError:  # pycocotools: "Invalid RLE mask representation"
        decoded = None
    if decoded is None or decoded.shape[:2] != (height, width) \
            or mask_utils.encode(decoded)["counts"] != counts:
        problems.add(f"{where}: compressed RLE 'counts' is not valid for a {width}x{height} image")
        return None
    return counts


def _drop(where: str, why: str, report: ValidationReport) -> None:
    report.dropped_instances += 1
    report.warnings.append(f"{where}: instance dropped: {why}")
    return None


def yolo_polygon(values: Sequence[float], width: int, height: int, where: str,
                 report: ValidationReport) -> bytes | None:
    """A YOLO-seg line's normalised x y pairs -> stored mask at the image size; None when the
    instance is dropped (counted). Its box comes from the polygon, as before (the reader)."""
    coords = [float(v) * (width if k % 2 == 0 else height) for k, v in enumerate(values)]
    parts = _polygon_parts([coords], width, height, where, report)
    if parts is None:
        return _drop(where, "no polygon with 3 or more points", report)
    counts = polygon_rle(parts, height, width)
    if area(counts, height, width) == 0:
        return _drop(where, "the mask has no pixels", report)
    return counts


def finish_masks(masks: list[InstanceMask], boxes_xyxy: Sequence[Sequence[float]],
                 width: int, height: int, report: ValidationReport) -> list[bytes]:
    """One image's masks as stored: every ``MissingMask`` becomes its box as a rectangle
    (counted in ``box_masks``, warned); all are counted in ``masks``."""
    out = []
    for m, box in zip(masks, boxes_xyxy, strict=True):
        if isinstance(m, MissingMask):
            report.box_masks += 1
            report.warnings.append(f"{m.where}: no segmentation in a dataset with masks; "
                                   "its box is used as its mask")
            m = box_rle(box, height, width)
        out.append(m)
    report.masks += len(out)
    return out


def has_segmentation(annotations: Sequence[dict]) -> bool:
    """True if any non-crowd COCO annotation carries a non-empty ``segmentation``."""
    return any(a.get("segmentation") and not a.get("iscrowd") for a in annotations)
