"""COCO box (and mask) evaluation split over workers: each matches its own images, rank 0 accumulates once,
and the numbers are those pycocotools computes on the whole split.

pycocotools' ``COCOeval`` has two phases. ``evaluate()`` matches detections to ground truth one
(image, category, area range) at a time; nothing in it looks at another image, and it is where
the time goes. ``accumulate()`` merges every image's matches into precision/recall curves per
(IoU threshold, category, area range, maxDets). So:

    part = match_records(records, classes)          # every rank, its own images
    parts = gather(part)                            # compact numpy arrays, not detections
    metrics = coco_metrics_of_matches(parts, classes)   # rank 0: accumulate + summarize

The matching is raydetr.eval.matching (array code with pycocotools' rules). :func:`accumulate`
is ``accumulate()`` vectorised: the same order of detections (score descending, then image id,
then rank in image: what pycocotools' concatenation in image order and stable sort give), the
same cumulative sums and divisions, the running maximum from the right, the same recall-threshold
look-up; pycocotools' own ``summarize()`` turns the arrays into the 12 stats. tests/unit/eval
checks all of it against pycocotools to 1e-9 (the COCO reference files, random splits).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from pycocotools.cocoeval import COCOeval

from raydetr.eval.coco import (
    coco_from_dataset,
    load_results,
    metrics_of_cocoeval,
    records_to_coco,
    summarize,
)
from raydetr.eval.matching import (
    DEFAULT_MAX_DETS,
    Matches,
    coco_params,
    empty_matches,
    flat_from_records,
    match_flat,
    match_pycocotools,
)


def match_records(records: Sequence[dict[str, Any]], classes: Sequence[str],
                  max_dets: Sequence[int] = DEFAULT_MAX_DETS, iou_type: str = "bbox") -> Matches:
    """The per-image matching of eval records (raydetr.eval.coco's contract; category id =
    class index + 1, every class counted): what each rank does for its own images.

    bbox: the array matching (raydetr.eval.matching). segm: pycocotools' own ``evaluate()``
    on this rank's images (mask IoU on RLEs), packed into the same :class:`Matches`, so the
    merge and accumulation below serve both."""
    if not classes:
        raise ValueError("match_records: classes is empty")
    if iou_type == "segm":
        gt, results = records_to_coco(records, classes, "segm")
        coco_gt = coco_from_dataset(gt)
        return match_pycocotools(coco_gt, load_results(coco_gt, results), max_dets=max_dets,
                                 iou_type="segm")
    if iou_type != "bbox":
        raise ValueError(f"match_records: iou_type {iou_type!r} is not 'bbox' or 'segm'")
    return match_flat(flat_from_records(records, len(classes)),
                      coco_params(range(1, len(classes) + 1), max_dets))


def merge(parts: Sequence[Matches]) -> Matches:
    """The matches of several disjoint image sets as one (rank 0, after the gather)."""
    if not parts:
        raise ValueError("merge: no parts")
    head = parts[0]
    for n, part in enumerate(parts[1:], start=1):
        if (part.cat_ids, part.max_dets, part.num_areas, part.num_ious) != (
                head.cat_ids, head.max_dets, head.num_areas, head.num_ious):
            raise ValueError(f"merge: part {n} was matched with other parameters (categories "
                             f"{len(part.cat_ids)} vs {len(head.cat_ids)}, maxDets "
                             f"{part.max_dets} vs {head.max_dets}); match every part alike")
    image_ids = np.concatenate([p.image_ids for p in parts])
    uniq, counts = np.unique(image_ids, return_counts=True)
    if (counts > 1).any():
        raise ValueError(f"merge: image_id {int(uniq[counts > 1][0])} was matched in more than "
                         "one part; every image must be evaluated by exactly one worker")
    out = empty_matches(coco_params(head.cat_ids, head.max_dets))
    out.image_ids = image_ids
    for f in ("det_cat", "det_image", "det_rank", "det_score", "det_matched", "det_ignored"):
        setattr(out, f, np.concatenate([getattr(p, f) for p in parts]))
    out.gt_counted = np.sum([p.gt_counted for p in parts], axis=0)
    return out


def accumulate(matches: Matches) -> COCOeval:
    """``COCOeval.accumulate()`` + ``summarize()`` of merged matches. Returns a COCOeval whose
    ``.eval`` (precision [T,R,K,A,M], recall [T,K,A,M], scores [T,R,K,A,M]) and ``.stats`` (12
    numbers, raydetr.eval.coco.STAT_NAMES order) are pycocotools' for the same images."""
    ev = COCOeval(iouType="bbox")
    p = ev.params = coco_params(matches.cat_ids, matches.max_dets)
    t_n, r_n, k_n = len(p.iouThrs), len(p.recThrs), len(p.catIds)
    a_n, m_n = len(p.areaRng), len(p.maxDets)
    if (a_n, t_n) != (matches.num_areas, matches.num_ious):
        raise ValueError("accumulate: the matches use other area ranges / IoU thresholds than "
                         "pycocotools' bbox defaults")
    precision = -np.ones((t_n, r_n, k_n, a_n, m_n))
    recall = -np.ones((t_n, k_n, a_n, m_n))
    scores = -np.ones((t_n, r_n, k_n, a_n, m_n))
    rec_thrs = np.asarray(p.recThrs)
    by_cat = np.argsort(matches.det_cat, kind="stable")
    bounds = np.searchsorted(matches.det_cat[by_cat], np.arange(k_n + 1))
    cols = a_n * t_n  # one column per (area range, IoU threshold), area-major
    for k in range(k_n):
        npig = matches.gt_counted[k]  # [A]
        if not (npig > 0).any():
            continue  # pycocotools leaves -1 where no ground truth counts
        idx = by_cat[bounds[k]:bounds[k + 1]]
        order = idx[np.lexsort((matches.det_rank[idx], matches.det_image[idx],
                                -matches.det_score[idx]))]
        rank, score = matches.det_rank[order], matches.det_score[order]
        # [A*T, D]: each (area range, IoU threshold) row contiguous, like pycocotools' [T, D]
        dtm = np.ascontiguousarray(
            np.unpackbits(matches.det_matched[order], axis=1, count=cols).view(bool).T)
        dti = np.ascontiguousarray(
            np.unpackbits(matches.det_ignored[order], axis=1, count=cols).view(bool).T)
        npig_col = np.repeat(npig, t_n)[:, None]  # [A*T, 1]
        for m, max_det in enumerate(p.maxDets):
            keep = rank < max_det
            nd = int(keep.sum())
            if nd == 0:
                for a in np.flatnonzero(npig > 0):
                    recall[:, k, a, m] = 0
                    precision[:, :, k, a, m] = scores[:, :, k, a, m] = 0
                continue
            m_cd, i_cd = dtm[:, keep], dti[:, keep]  # [A*T, nd]
            # the counts pycocotools forms (bool cumsum -> float), exact integers; int32 is the
            # fast cumsum here
            tp_sum = np.cumsum(m_cd & ~i_cd, axis=1, dtype=np.int32).astype(np.float64)
            fp_sum = np.cumsum(~m_cd & ~i_cd, axis=1, dtype=np.int32).astype(np.float64)
            with np.errstate(divide="ignore", invalid="ignore"):
                rc = tp_sum / npig_col
            pr = tp_sum / (fp_sum + tp_sum + np.spacing(1))
            sorted_scores = score[keep]
            for a in range(a_n):
                if npig[a] == 0:
                    continue
                for t in range(t_n):
                    c = a * t_n + t
                    recall[t, k, a, m] = rc[c, -1]
                    inds = np.searchsorted(rc[c], rec_thrs, side="left")
                    at = inds[inds < nd]  # pycocotools leaves 0 beyond the last detection
                    q, ss = np.zeros(r_n), np.zeros(r_n)
                    if len(at):
                        # precision made monotone from the right, read at ``at``: the max of
                        # pr[at[j]:] = suffix max over the segments [at[j], at[j+1])
                        seg = np.maximum.reduceat(pr[c], at)
                        q[:len(at)] = np.maximum.accumulate(seg[::-1])[::-1]
                        ss[:len(at)] = sorted_scores[at]
                    precision[t, :, k, a, m], scores[t, :, k, a, m] = q, ss
    ev.eval = {"params": p, "counts": [t_n, r_n, k_n, a_n, m_n], "precision": precision,
               "recall": recall, "scores": scores}
    summarize(ev)
    return ev


def coco_metrics_of_matches(parts: Sequence[Matches], classes: Sequence[str]) -> dict[str, Any]:
    """The ``coco_metrics`` dict (map, map50, ..., per_class) of every rank's matches."""
    return metrics_of_cocoeval(accumulate(merge(parts)), classes)
