"""``raydetr evaluate``: COCO metrics of a published model on a dataset split.

    raydetr evaluate --model models:/raydetr@champion --data data/thermal --split val --mlflow

``--data`` is a prepared dataset (``raydetr prepare``) or a raw COCO/YOLO/VOC dataset (prepared
into a temporary dir first). With ``log_to_mlflow`` the metrics go to an MLflow run tagged with
the model URI/version and, when the model came from the registry, are also linked to the logged
model (``mlflow.log_metrics(model_id=...)``) and summarised as model-version tags.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from raydetr.artifacts import ModelDirError
from raydetr.data.formats import DatasetError
from raydetr.registry.errors import RegistryError
from raydetr.registry.evaluation import log_evaluation
from raydetr.registry.fetch import load_detector
from raydetr.serve.evaluation import (
    EvaluateError,
    format_table,
    prepared_split_source,
    run_evaluation,
)


def run(args: argparse.Namespace) -> int:
    return evaluate_command(args.model, args.data, args.split, args.mlflow)


def evaluate_command(model: str, data: str | Path, split: str = "val", log_to_mlflow: bool = False,
                     *, out: str | Path | None = None, tracking_uri: str | None = None) -> int:
    """Print overall + per-class COCO metrics; ``out``: also write them as JSON. 0, or 2 on a
    user error (unknown model, missing dataset/split, class mismatch)."""
    try:
        detector = load_detector(model, tracking_uri=tracking_uri)
        with tempfile.TemporaryDirectory(prefix="raydetr-eval-") as tmp:
            metrics = run_evaluation(detector, prepared_split_source(Path(data), tmp), split)
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
    except (RegistryError, ModelDirError, EvaluateError, DatasetError) as exc:
        print(f"raydetr evaluate: error: {exc}", file=sys.stderr)
        return 2
    return 0
