"""Evaluate a loaded detector on a split of a prepared dataset: the one offline evaluation path
(``raydetr evaluate``, post-hoc EMA profiles, ONNX models) behind the same decode as training.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from raydetr.config import DataConfig
from raydetr.config.presets import eval_settings
from raydetr.data.loader import iter_local_batches
from raydetr.data.parquet import has_info, load_info, prepare_dataset, verify_shards
from raydetr.errors import UserError
from raydetr.eval.coco import SEGM_SUFFIX, coco_metrics, with_segm
from raydetr.eval.distributed import coco_metrics_of_matches
from raydetr.serve.detector import Detector
from raydetr.train.engine import predict_records
from raydetr.train.evaluation import MaskMatcher

SCALAR_KEYS = ("map", "map50", "map75", "map_small", "map_medium", "map_large", "mar", "mar1",
               "mar10")
BATCH_SIZE = 8


class EvaluateError(UserError, ValueError):
    """A dataset/model mismatch a user can fix."""


def scalar_keys(metrics: dict[str, Any]) -> list[str]:
    """The scalar metric keys present: bbox's, then segm's (``map_segm``, ...) when evaluated."""
    return [k for k in (*SCALAR_KEYS, *(f"{k}{SEGM_SUFFIX}" for k in SCALAR_KEYS))
            if k in metrics]


def format_table(metrics: dict[str, Any], title: str) -> str:
    """Overall metrics, then AP per class, as an aligned text table; with masks evaluated, a
    bbox and a segm column side by side."""
    if int(metrics.get("max_dets", 100)) != 100:  # COCO's usual goes unsaid
        title += f" (AP and mar at maxDets {int(metrics['max_dets'])})"
    segm = f"map{SEGM_SUFFIX}" in metrics
    if segm:
        lines = [title, f"{'metric':<14}{'bbox':>8}{'segm':>8}"]
        lines += [f"{k:<14}{metrics[k]:>8.4f}{metrics[k + SEGM_SUFFIX]:>8.4f}"
                  for k in SCALAR_KEYS if k in metrics and k + SEGM_SUFFIX in metrics]
    else:
        lines = [title, f"{'metric':<14}{'value':>8}"]
        lines += [f"{k:<14}{metrics[k]:>8.4f}" for k in SCALAR_KEYS if k in metrics]
    per_class = metrics.get("per_class", {})
    if per_class:
        width = max(14, max(len(c) for c in per_class) + 2)
        if segm:
            seg_ap = metrics[f"per_class{SEGM_SUFFIX}"]
            lines += ["", f"{'class':<{width}}{'AP bbox':>8}{'AP segm':>8}"]
            lines += [f"{c:<{width}}{ap:>8.4f}{seg_ap.get(c, 0.0):>8.4f}"
                      for c, ap in per_class.items()]
        else:
            lines += ["", f"{'class':<{width}}{'AP':>8}"]
            lines += [f"{c:<{width}}{ap:>8.4f}" for c, ap in per_class.items()]
    return "\n".join(lines)


def run_evaluation(detector: Detector, prepared: Path, split: str) -> dict[str, Any]:
    """coco_metrics of ``detector`` over ``split`` of a prepared dataset (batch 8, no threshold;
    the family's detections per image and COCO maxDets: 100 / 100, RF-DETR's 300 / 500), with
    ``max_dets`` and ``images`` added. A segmentation model on a dataset with masks: segm too
    (``map_segm``, ..., ``per_class_segm``; raydetr.eval.coco.with_segm)."""
    info = load_info(prepared)
    if split not in info["splits"]:
        raise EvaluateError(f"{prepared}: no split '{split}' (has: {sorted(info['splits'])})")
    verify_shards(prepared, [split])  # a missing/truncated shard: named, with the fix
    classes = list(info["classes"])
    model_index = {name: i for i, name in enumerate(detector.classes)}
    # model logit -> dataset class index (-1: not a dataset class), when the model has more
    # logits than the dataset has classes but names them all, e.g. a converted RF-DETR COCO
    # model (91 logits indexed by COCO category id) on a COCO dataset (80 classes)
    remap: np.ndarray | None = None
    if len(classes) != len(detector.classes):
        if not all(c in model_index for c in classes):
            raise EvaluateError(
                f"the dataset has {len(classes)} classes {classes} but the model was trained on "
                f"{len(detector.classes)} {detector.classes}: class ids would not line up"
            )
        remap = np.full(len(detector.classes), -1, dtype=np.int64)
        remap[[model_index[c] for c in classes]] = np.arange(len(classes))
        print(f"the model has {len(detector.classes)} classes; evaluating the dataset's "
              f"{len(classes)} by name (detections of other classes are not scored)",
              file=sys.stderr)
    elif classes != detector.classes:
        print(f"warning: class names differ (dataset {classes}, model {detector.classes}); "
              "evaluating by class index", file=sys.stderr)
    n_images = int(info["splits"][split]["images"])
    batches = iter_local_batches(prepared, split, batch_size=BATCH_SIZE, train=False,
                                 resolution=detector.resolution, data_cfg=DataConfig(),
                                 shuffle=False)
    bar = tqdm(batches, total=math.ceil(n_images / BATCH_SIZE), desc=f"evaluate {split}",
               unit="batch", disable=n_images < 4 * BATCH_SIZE or None)
    num_select, max_dets = eval_settings(str(detector.meta.get("model", {}).get("preset", "")))
    remapped: set[int] = set()

    def remap_classes(rec: dict[str, Any]) -> None:
        if remap is None or id(rec) in remapped:
            return
        remapped.add(id(rec))
        labels = remap[rec["labels"]]
        keep = labels >= 0
        rec.update(labels=labels[keep], scores=rec["scores"][keep], boxes=rec["boxes"][keep])
        if "masks" in rec:
            rec["masks"] = [m for m, k in zip(rec["masks"], keep) if k]

    # a seg model's masks are matched batch by batch and dropped (one batch of RLEs held)
    matcher = MaskMatcher(classes, (1, 10, max_dets))

    def match_masks(name: str, recs: list[dict]) -> None:
        for rec in recs:
            remap_classes(rec)
        matcher(name, recs)

    with torch.no_grad():
        records = predict_records({"model": detector.model}, detector.postprocessor, bar,
                                  detector.device, top_k=num_select,
                                  on_masks=match_masks)["model"]
    for rec in records:
        remap_classes(rec)
    if detector.segmentation and "model" not in matcher.batches:
        print("the model predicts masks but the dataset has none: bbox metrics only",
              file=sys.stderr)
    # bbox, and segm (map_segm, ..., per_class_segm) when masks were matched
    metrics = with_segm(coco_metrics(records, classes, max_dets=max_dets),
                        coco_metrics_of_matches([matcher.part("model")], classes)
                        if "model" in matcher.batches else None)
    metrics["max_dets"] = max_dets
    metrics["images"] = len(records)
    return metrics


def prepared_split_source(data: Path, tmp: str) -> Path:
    if has_info(data):  # damaged shards are reported by run_evaluation's verify_shards
        return data
    if not data.exists():
        raise EvaluateError(f"dataset not found: {data}")
    out = Path(tmp) / "prepared"
    prepare_dataset(data, out, progress=True)
    return out


