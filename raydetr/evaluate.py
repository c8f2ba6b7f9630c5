"""``raydetr evaluate``: COCO metrics of a published model on a dataset split.

    raydetr evaluate --model models:/raydetr@champion --data data/thermal --split val --mlflow

``--data`` is a prepared dataset (``raydetr prepare``) or a raw COCO/YOLO/VOC dataset (prepared
into a temporary dir first). With ``log_to_mlflow`` the metrics go to an MLflow run tagged with
the model URI/version and, when the model came from the registry, are also linked to the logged
model (``mlflow.log_metrics(model_id=...)``) and summarised as model-version tags.
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from raydetr.registry.errors import RegistryError
from raydetr.registry.plots import metric_key

# max_dets: the COCO maxDets the AP / mar figures used (100, or RF-DETR's 500)
SCALAR_KEYS = ("map", "map50", "map75", "map_small", "map_medium", "map_large", "mar", "mar1",
               "mar10", "max_dets")
BATCH_SIZE = 8


class EvaluateError(ValueError):
    """A dataset/model mismatch a user can fix."""


def format_table(metrics: dict[str, Any], title: str) -> str:
    """Overall metrics, then AP per class, as an aligned text table."""
    lines = [title, f"{'metric':<14}{'value':>8}"]
    lines += [f"{k:<14}{metrics[k]:>8.4f}" for k in SCALAR_KEYS if k in metrics]
    per_class = metrics.get("per_class", {})
    if per_class:
        width = max(14, max(len(c) for c in per_class) + 2)
        lines += ["", f"{'class':<{width}}{'AP':>8}"]
        lines += [f"{c:<{width}}{ap:>8.4f}" for c, ap in per_class.items()]
    return "\n".join(lines)


def run_evaluation(detector: Any, prepared: Path, split: str) -> dict[str, Any]:
    """coco_metrics of ``detector`` over ``split`` of a prepared dataset (batch 8, no threshold;
    the family's detections per image and COCO maxDets: 100 / 100, RF-DETR's 300 / 500)."""
    from tqdm import tqdm

    from raydetr.config import DataConfig
    from raydetr.data.loader import iter_local_batches
    from raydetr.data.parquet import load_info, verify_shards
    from raydetr.eval.coco import coco_metrics
    from raydetr.presets import eval_settings
    from raydetr.train.engine import predict_records

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
    with torch.no_grad():
        num_select, max_dets = eval_settings(str(detector.meta.get("model", {}).get("preset", "")))
        records = predict_records({"model": detector.model}, detector.postprocessor, bar,
                                  detector.device, top_k=num_select)["model"]
    if remap is not None:
        for rec in records:
            labels = remap[rec["labels"]]
            keep = labels >= 0
            rec.update(labels=labels[keep], scores=rec["scores"][keep], boxes=rec["boxes"][keep])
    metrics = coco_metrics(records, classes, max_dets=max_dets)
    metrics["max_dets"] = max_dets
    metrics["images"] = len(records)
    return metrics


def _prepared(data: Path, tmp: str) -> Path:
    from raydetr.data.parquet import has_info, prepare_dataset

    if has_info(data):  # damaged shards are reported by run_evaluation's verify_shards
        return data
    if not data.exists():
        raise EvaluateError(f"dataset not found: {data}")
    out = Path(tmp) / "prepared"
    prepare_dataset(data, out, progress=True)
    return out


def log_evaluation(detector: Any, metrics: dict[str, Any], *, data: str, split: str,
                   tracking_uri: str | None = None, experiment: str | None = None) -> str:
    """An MLflow run holding the metrics, tagged (and linked) to the evaluated model; run id."""
    import os

    import mlflow
    from mlflow import MlflowClient

    from raydetr.config import MlflowConfig
    from raydetr.registry.tracking import (
        check_reachable,
        default_tracking_uri,
        ensure_experiment,
        mlflow_session,
    )

    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()
    check_reachable(uri)
    version = detector.model_version
    scalars = {k: float(metrics[k]) for k in SCALAR_KEYS if k in metrics}
    per_class = {metric_key(f"ap/{c}"): float(v) for c, v in metrics.get("per_class", {}).items()}
    tags = {"raydetr.kind": "evaluation", "raydetr.model_uri": detector.source,
            "raydetr.dataset": str(data), "raydetr.split": split}
    if version is not None:
        tags.update({"raydetr.model_name": version.name, "raydetr.model_version": str(version.version)})
    with mlflow_session(uri):
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        output_dir = Path(uri[len("sqlite:///"):]).parent if uri.startswith("sqlite:///") else "."
        exp_id = ensure_experiment(client, experiment or MlflowConfig().experiment, uri, output_dir)
        label = f"{version.name}-v{version.version}" if version is not None else Path(detector.source).name
        with mlflow.start_run(experiment_id=exp_id, run_name=f"evaluate-{label}-{split}", tags=tags) as run:
            mlflow.log_metrics({**scalars, **per_class})
            mlflow.log_dict(metrics, f"evaluation_{split}.json")
            model_id = getattr(version, "model_id", None)
            if model_id:  # MLflow 3: metrics show on the logged model's page too
                mlflow.log_metrics({f"{split}_{k}": v for k, v in scalars.items()}, model_id=model_id)
        if version is not None:
            client.set_model_version_tag(version.name, str(version.version), f"eval_{split}_map",
                                         f"{scalars['map']:.4f}")
            client.set_model_version_tag(version.name, str(version.version), f"eval_{split}_run",
                                         run.info.run_id)
    return run.info.run_id


def evaluate_command(model: str, data: str | Path, split: str = "val", log_to_mlflow: bool = False,
                     *, out: str | Path | None = None, tracking_uri: str | None = None) -> int:
    """Print overall + per-class COCO metrics; ``out``: also write them as JSON. 0, or 2 on a
    user error (unknown model, missing dataset/split, class mismatch)."""
    from raydetr.data.formats import DatasetError
    from raydetr.detector import Detector

    try:
        detector = Detector.from_uri(model, tracking_uri=tracking_uri)
        with tempfile.TemporaryDirectory(prefix="raydetr-eval-") as tmp:
            metrics = run_evaluation(detector, _prepared(Path(data), tmp), split)
        print(format_table(metrics, f"{detector.source} on {data} [{split}], "
                                    f"{metrics['images']} images"))
        if out is not None:
            out = Path(out)
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp_out = out.with_name(out.name + ".tmp")
            tmp_out.write_text(json.dumps({"model": detector.source, "data": str(data),
                                           "split": split, "metrics": metrics}, indent=2))
            tmp_out.replace(out)
            print(f"metrics written to {out}")
        if log_to_mlflow:
            run_id = log_evaluation(detector, metrics, data=str(data), split=split,
                                    tracking_uri=tracking_uri)
            print(f"logged to MLflow run {run_id}")
    except (RegistryError, EvaluateError, DatasetError) as exc:
        print(f"raydetr evaluate: error: {exc}", file=sys.stderr)
        return 2
    return 0
