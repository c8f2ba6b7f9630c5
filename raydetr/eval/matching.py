"""COCO's per-image matching (``COCOeval.evaluate``, bbox) as array code, and the compact record of
its result that accumulation needs.

pycocotools matches one (image, category, area range) at a time in Python: about 40 ms per image
at 300 detections per image here, most of an epoch's evaluation. :func:`match_flat` computes the
same thing for all of a worker's images at once, with the rules of ``evaluateImg``:

- detections of an (image, category) sorted by score, highest first (stable), the first
  ``maxDets[-1]`` kept; IoU as pycocotools' ``bbIou`` (same operations in the same order, so the
  same doubles; crowd ground truth divides by the detection's area);
- ground truth is ignored when crowd or outside the area range; for each IoU threshold t,
  detections in score order take the ground truth with the highest IoU >= t among those not yet
  taken (crowd ones can be taken again), the last of equal IoUs, non-ignored ones first and
  ignored ones only if no non-ignored one qualifies; a detection matched to an ignored ground
  truth is ignored, and so is an unmatched one whose area is outside the range.

Many (image, category) groups are processed together: one step per detection rank, vectorised
over groups, area ranges, thresholds and ground-truth boxes. :func:`match_pycocotools` packs
pycocotools' own ``evalImgs`` into the same :class:`Matches`; the tests check both agree.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from raydetr.eval.coco import _quiet, record_arrays

DEFAULT_MAX_DETS = (1, 10, 100)  # pycocotools' bbox default
_CHUNK = 400_000  # groups x ground-truth slots x area ranges x thresholds per vectorised step


@dataclass
class Matches:
    """Per-image COCO matching results of some images (picklable, numpy only): what
    ``COCOeval.accumulate()`` reads of each (image, category) entry of ``evalImgs``.

    ``cat_ids``: the evaluation's category ids (K, sorted); ``max_dets``: sorted;
    ``image_ids``: i64[I] the images matched; per kept detection (D): ``det_cat`` i32 index into
    cat_ids, ``det_image`` i64 image id, ``det_rank`` i32 rank among its image's detections of
    its category (score descending, 0 first), ``det_score`` f64, ``det_matched`` /
    ``det_ignored`` u8[D, ceil(A*T/8)] bits of the bool [A, T] (area range, IoU threshold)
    grids; ``gt_counted`` i64[K, A] ground-truth boxes not ignored per category and area range.
    """

    cat_ids: tuple[int, ...]
    max_dets: tuple[int, ...]
    num_areas: int
    num_ious: int
    image_ids: np.ndarray
    det_cat: np.ndarray
    det_image: np.ndarray
    det_rank: np.ndarray
    det_score: np.ndarray
    det_matched: np.ndarray
    det_ignored: np.ndarray
    gt_counted: np.ndarray

    def nbytes(self) -> int:
        """Bytes of the arrays (what a gather moves, less pickling overhead)."""
        return int(sum(v.nbytes for f in fields(self)
                       if isinstance(v := getattr(self, f.name), np.ndarray)))


def coco_params(cat_ids: Sequence[int], max_dets: Sequence[int]) -> Any:
    """pycocotools' bbox parameters with these categories and maxDets (sorted, as evaluate())."""
    p = COCOeval(iouType="bbox").params
    p.catIds = sorted(int(c) for c in cat_ids)
    p.maxDets = sorted(int(m) for m in max_dets)
    return p


def empty_matches(params: Any) -> Matches:
    a_n, t_n = len(params.areaRng), len(params.iouThrs)
    nbits = (a_n * t_n + 7) // 8
    return Matches(
        cat_ids=tuple(params.catIds), max_dets=tuple(params.maxDets), num_areas=a_n,
        num_ious=t_n, image_ids=np.zeros(0, np.int64), det_cat=np.zeros(0, np.int32),
        det_image=np.zeros(0, np.int64), det_rank=np.zeros(0, np.int32),
        det_score=np.zeros(0, np.float64), det_matched=np.zeros((0, nbits), np.uint8),
        det_ignored=np.zeros((0, nbits), np.uint8),
        gt_counted=np.zeros((len(params.catIds), a_n), np.int64))


# ----------------------------------------------------------------------------- inputs
@dataclass
class Flat:
    """Boxes of some images as flat arrays, in annotation / result order (xywh float64).
    ``*_cat`` index into the evaluation's sorted category ids."""

    image_ids: np.ndarray
    gt_image: np.ndarray
    gt_cat: np.ndarray
    gt_xywh: np.ndarray
    gt_area: np.ndarray
    gt_crowd: np.ndarray
    dt_image: np.ndarray
    dt_cat: np.ndarray
    dt_xywh: np.ndarray
    dt_area: np.ndarray
    dt_score: np.ndarray


def flat_from_records(records: Sequence[dict[str, Any]], num_classes: int) -> Flat:
    """Eval records (raydetr.eval.coco's contract, checked there) as :class:`Flat`: category
    index = class index, GT area = w*h, no crowd, as ``records_to_coco`` + ``loadRes`` make."""
    recs = [record_arrays(r, num_classes) for r in records]
    ids = np.array([r["image_id"] for r in recs], np.int64)
    uniq, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        raise ValueError(f"eval records: image_id {int(uniq[counts > 1][0])} appears more "
                         "than once")

    def cat(key: str, dtype: Any, shape: tuple[int, ...] = ()) -> np.ndarray:
        parts = [r[key] for r in recs]
        return np.concatenate(parts).astype(dtype) if parts else np.zeros((0, *shape), dtype)

    def owner(key: str) -> np.ndarray:
        return np.repeat(ids, [len(r[key]) for r in recs]) if recs else np.zeros(0, np.int64)

    gt_xywh, dt_xywh = cat("gt_xywh", np.float64, (4,)), cat("det_xywh", np.float64, (4,))
    return Flat(image_ids=np.sort(ids), gt_image=owner("gt_labels"),
                gt_cat=cat("gt_labels", np.int32), gt_xywh=gt_xywh,
                gt_area=gt_xywh[:, 2] * gt_xywh[:, 3], gt_crowd=np.zeros(len(gt_xywh), bool),
                dt_image=owner("det_labels"), dt_cat=cat("det_labels", np.int32),
                dt_xywh=dt_xywh, dt_area=dt_xywh[:, 2] * dt_xywh[:, 3],
                dt_score=cat("scores", np.float64))


def flat_from_coco(coco_gt: COCO, coco_dt: COCO, img_ids: Sequence[int]) -> Flat:
    """The ground truth and detections of ``img_ids`` in two pycocotools COCO objects (GT area
    and iscrowd from the annotations; detection area = w*h as ``loadRes`` sets it)."""
    cat_ids = sorted(coco_gt.getCatIds())
    index = {c: i for i, c in enumerate(cat_ids)}
    img_ids = sorted(int(i) for i in img_ids)
    gts = coco_gt.loadAnns(coco_gt.getAnnIds(imgIds=img_ids, catIds=cat_ids))
    dts = coco_dt.loadAnns(coco_dt.getAnnIds(imgIds=img_ids, catIds=cat_ids))

    def boxes(anns: list[dict]) -> np.ndarray:
        return np.array([a["bbox"] for a in anns], np.float64).reshape(-1, 4)

    return Flat(
        image_ids=np.array(img_ids, np.int64),
        gt_image=np.array([a["image_id"] for a in gts], np.int64),
        gt_cat=np.array([index[a["category_id"]] for a in gts], np.int32),
        gt_xywh=boxes(gts), gt_area=np.array([a["area"] for a in gts], np.float64),
        gt_crowd=np.array([bool(a.get("iscrowd", 0)) for a in gts], bool),
        dt_image=np.array([a["image_id"] for a in dts], np.int64),
        dt_cat=np.array([index[a["category_id"]] for a in dts], np.int32),
        dt_xywh=boxes(dts), dt_area=np.array([a["area"] for a in dts], np.float64),
        dt_score=np.array([a["score"] for a in dts], np.float64))


# ----------------------------------------------------------------------------- matching
def _box_iou(d: np.ndarray, g: np.ndarray, crowd: np.ndarray) -> np.ndarray:
    """pycocotools' bbIou over [..., D, 4] x [..., G, 4] xywh -> [..., D, G], the same
    operations in the same order (so the same doubles)."""
    dx, dy, dw, dh = (d[..., :, None, i] for i in range(4))
    gx, gy, gw, gh = (g[..., None, :, i] for i in range(4))
    w = np.minimum(dw + dx, gw + gx) - np.maximum(dx, gx)
    h = np.minimum(dh + dy, gh + gy) - np.maximum(dy, gy)
    inter = w * h
    da = dw * dh
    union = np.where(crowd[..., None, :], da, da + gw * gh - inter)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where((w > 0) & (h > 0), inter / union, 0.0)


def _last_argmax(cand: np.ndarray, iou: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Over the last axis: whether any candidate, and the LAST candidate with the highest IoU
    (pycocotools replaces its pick on an equal IoU)."""
    best = np.where(cand, iou, -np.inf).max(axis=-1, keepdims=True)
    is_max = cand & (iou == best)
    n = cand.shape[-1]
    return cand.any(axis=-1), n - 1 - np.argmax(is_max[..., ::-1], axis=-1)


def _match_groups(flat: Flat, d_idx: np.ndarray, g_idx: np.ndarray, thr: np.ndarray,
                  area_rng: np.ndarray, matched: np.ndarray, ignored: np.ndarray) -> None:
    """Greedy matching of a chunk of (image, category) groups: ``d_idx`` [n, Dm] kept
    detections in score order (-1 pad), ``g_idx``
    [n, Gm] ground truth in annotation order (-1 pad). Writes matched/ignored [D, A, T]."""
    n = len(d_idx)
    a_n, t_n = len(area_rng), len(thr)
    g_ok = g_idx >= 0
    g_safe = np.where(g_ok, g_idx, 0)
    crowd = flat.gt_crowd[g_safe] & g_ok
    area = flat.gt_area[g_safe]
    g_ign = (crowd[:, None, :] | (area[:, None, :] < area_rng[None, :, 0, None])
             | (area[:, None, :] > area_rng[None, :, 1, None]))  # [n, A, Gm]
    d_safe = np.where(d_idx >= 0, d_idx, 0)
    iou = _box_iou(flat.dt_xywh[d_safe], flat.gt_xywh[g_safe], crowd)  # [n, Dm, Gm]
    iou = np.where(g_ok[:, None, :], iou, -1.0)
    # Only detections with IoU >= the lowest threshold to some ground truth can match; the others
    # are unmatched at every threshold and change nothing for the rest: leave them out, keeping
    # the score order, and put the rows with the most candidates first.
    cand = (iou >= thr.min()).any(axis=2) & (d_idx >= 0)
    if not cand.any():
        return
    first = np.argsort(~cand, axis=1, kind="stable")
    d_idx = np.where(np.take_along_axis(cand, first, 1), np.take_along_axis(d_idx, first, 1), -1)
    iou = np.take_along_axis(iou, first[:, :, None], 1)
    counts = (d_idx >= 0).sum(axis=1)
    rows = np.argsort(-counts, kind="stable")
    dm = int(counts.max())
    d_idx, iou, crowd, g_ign = d_idx[rows, :dm], iou[rows, :dm], crowd[rows], g_ign[rows]
    taken = np.zeros((n, a_n, t_n, g_idx.shape[1]), bool)
    active = (d_idx >= 0).sum(axis=0)  # rows with a candidate at each step (a prefix)
    for r in range(dm):
        k = int(active[r])
        if k == 0:
            break
        iou_r = iou[:k, r, None, None, :]  # [k, 1, 1, Gm]
        free = ~taken[:k] | crowd[:k, None, None, :]
        ok = free & (iou_r >= thr[None, None, :, None])  # [k, A, T, Gm]
        ign = g_ign[:k, :, None, :]
        has_reg, pick_reg = _last_argmax(ok & ~ign, iou_r)
        has_ign, pick_ign = _last_argmax(ok & ign, iou_r)
        hit = has_reg | has_ign
        pick = np.where(has_reg, pick_reg, pick_ign)  # [k, A, T]
        rows, aa, tt = np.nonzero(hit)
        taken[rows, aa, tt, pick[rows, aa, tt]] = True
        det = d_idx[:k, r]
        matched[det] = hit
        ignored[det] = ~has_reg & has_ign


def _group_bounds(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(unique keys, start, count) of runs in a sorted key array."""
    if len(keys) == 0:
        z = np.zeros(0, np.int64)
        return z, z, z
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    counts = np.diff(np.r_[starts, len(keys)])
    return keys[starts], starts, counts


def _pad(starts: np.ndarray, counts: np.ndarray, order: np.ndarray) -> np.ndarray:
    """[n, max count] of order[start + j] (-1 beyond each count)."""
    width = int(counts.max()) if len(counts) else 0
    j = np.arange(width)
    pos = starts[:, None] + j[None, :]
    return np.where(j[None, :] < counts[:, None], order[np.minimum(pos, len(order) - 1)], -1)


def match_flat(flat: Flat, params: Any) -> Matches:
    """The per-image matching of ``flat``'s images with ``params`` (catIds sorted, maxDets,
    pycocotools' area ranges and IoU thresholds), as :class:`Matches`."""
    k_n = len(params.catIds)
    area_rng = np.asarray(params.areaRng, np.float64)
    thr = np.minimum(np.asarray(params.iouThrs, np.float64), 1 - 1e-10)
    a_n, t_n = len(area_rng), len(thr)
    out = empty_matches(params)
    out.image_ids = np.asarray(flat.image_ids, np.int64)
    img_index = np.searchsorted(out.image_ids, flat.gt_image)
    g_key = img_index.astype(np.int64) * k_n + flat.gt_cat
    g_order = np.argsort(g_key, kind="stable")
    g_keys, g_start, g_count = _group_bounds(g_key[g_order])
    g_ign_area = ((flat.gt_area[:, None] < area_rng[None, :, 0])
                  | (flat.gt_area[:, None] > area_rng[None, :, 1]) | flat.gt_crowd[:, None])
    np.add.at(out.gt_counted, flat.gt_cat, (~g_ign_area).astype(np.int64))

    d_key = np.searchsorted(out.image_ids, flat.dt_image).astype(np.int64) * k_n + flat.dt_cat
    d_order = np.lexsort((-flat.dt_score, d_key))
    d_keys, d_start, d_count = _group_bounds(d_key[d_order])
    rank = np.arange(len(d_order)) - np.repeat(d_start, d_count)
    keep = rank < params.maxDets[-1]
    kept = d_order[keep]  # grouped, score order, top maxDets[-1] of each group
    rank = rank[keep]
    d_keys, d_start, d_count = _group_bounds(d_key[kept])
    matched = np.zeros((len(flat.dt_score), a_n, t_n), bool)
    ignored = np.zeros((len(flat.dt_score), a_n, t_n), bool)

    both, d_pos, g_pos = np.intersect1d(d_keys, g_keys, assume_unique=True, return_indices=True)
    if len(both):
        gc = g_count[g_pos]
        by_size = np.argsort(gc, kind="stable")
        lo = 0
        while lo < len(by_size):  # chunks of groups with similar ground-truth counts
            hi = lo + 1
            while hi < len(by_size) and (hi - lo + 1) * gc[by_size[hi]] * a_n * t_n <= _CHUNK:
                hi += 1
            sel = by_size[lo:hi]
            _match_groups(flat, _pad(d_start[d_pos[sel]], d_count[d_pos[sel]], kept),
                          _pad(g_start[g_pos[sel]], g_count[g_pos[sel]], g_order), thr,
                          area_rng, matched, ignored)
            lo = hi
    d_out = ((flat.dt_area[:, None] < area_rng[None, :, 0])
             | (flat.dt_area[:, None] > area_rng[None, :, 1]))
    ignored |= ~matched & d_out[:, :, None]
    out.det_cat = flat.dt_cat[kept].astype(np.int32)
    out.det_image = flat.dt_image[kept].astype(np.int64)
    out.det_rank = rank.astype(np.int32)
    out.det_score = flat.dt_score[kept]
    out.det_matched = np.packbits(matched[kept].reshape(len(kept), a_n * t_n), axis=1)
    out.det_ignored = np.packbits(ignored[kept].reshape(len(kept), a_n * t_n), axis=1)
    return out


# ----------------------------------------------------------------------------- reference
def match_pycocotools(coco_gt: COCO, coco_dt: COCO, img_ids: Sequence[int] | None = None,
                      max_dets: Sequence[int] = DEFAULT_MAX_DETS,
                      iou_type: str = "bbox") -> Matches:
    """pycocotools' own ``COCOeval.evaluate()`` (``iou_type`` bbox or segm) of ``img_ids``
    (default: every image of ``coco_gt``), its ``evalImgs`` packed into :class:`Matches`: the
    reference for :func:`match_flat` (slow), and the per-rank matching of masks (segm differs
    from bbox only in the IoU, so accumulation is the same)."""
    ev = COCOeval(coco_gt, coco_dt, iouType=iou_type)
    if img_ids is not None:
        ev.params.imgIds = sorted(int(i) for i in img_ids)
    ev.params.maxDets = sorted(int(m) for m in max_dets)
    out = empty_matches(coco_params(ev.params.catIds, ev.params.maxDets))
    if not ev.params.imgIds:
        return out
    with _quiet("COCOeval.evaluate"):
        ev.evaluate()
    p = ev.params
    a_n, i_n = len(p.areaRng), len(p.imgIds)
    cats, images, ranks, scores, matched, ignored = [], [], [], [], [], []
    for k in range(len(p.catIds)):
        for i, image_id in enumerate(p.imgIds):
            first = ev.evalImgs[k * a_n * i_n + i]
            if first is None:  # no ground truth and no detection (for every area range)
                continue
            entries = [ev.evalImgs[(k * a_n + a) * i_n + i] for a in range(a_n)]
            for a, e in enumerate(entries):
                out.gt_counted[k, a] += int(np.count_nonzero(np.asarray(e["gtIgnore"]) == 0))
            n = len(first["dtScores"])
            if n == 0:
                continue
            # a detection matched to a GT with annotation id 0 counts as unmatched there too
            m = np.stack([np.asarray(e["dtMatches"]) != 0 for e in entries]).transpose(2, 0, 1)
            g = np.stack([np.asarray(e["dtIgnore"], bool) for e in entries]).transpose(2, 0, 1)
            cats.append(np.full(n, k, np.int32))
            images.append(np.full(n, int(image_id), np.int64))
            ranks.append(np.arange(n, dtype=np.int32))
            scores.append(np.asarray(first["dtScores"], np.float64))
            matched.append(np.packbits(m.reshape(n, -1), axis=1))
            ignored.append(np.packbits(g.reshape(n, -1), axis=1))
    out.image_ids = np.asarray(p.imgIds, np.int64)
    if scores:
        out.det_cat, out.det_image = np.concatenate(cats), np.concatenate(images)
        out.det_rank, out.det_score = np.concatenate(ranks), np.concatenate(scores)
        out.det_matched, out.det_ignored = np.concatenate(matched), np.concatenate(ignored)
    return out
