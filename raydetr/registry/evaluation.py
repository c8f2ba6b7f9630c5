"""Evaluation results into MLflow: a run holding the metrics, linked to the evaluated model."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from raydetr.config import MlflowConfig
from raydetr.registry.plots import metric_key
from raydetr.registry.tracking import (
    check_reachable,
    default_tracking_uri,
    ensure_experiment,
    mlflow_session,
)
from raydetr.serve.detector import Detector
from raydetr.serve.evaluation import scalar_keys


def log_evaluation(detector: Detector, metrics: dict[str, Any], *, data: str, split: str,
                   tracking_uri: str | None = None, experiment: str | None = None) -> str:
    """An MLflow run holding the metrics, tagged (and linked) to the evaluated model; run id."""
    import mlflow
    from mlflow import MlflowClient

    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()
    check_reachable(uri)
    version = detector.model_version
    scalars = {k: float(metrics[k]) for k in scalar_keys(metrics)}  # bbox (+ segm)
    per_class = {metric_key(f"ap/{c}"): float(v) for c, v in metrics.get("per_class", {}).items()}
    per_class |= {metric_key(f"ap_segm/{c}"): float(v)
                  for c, v in metrics.get("per_class_segm", {}).items()}
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
            if "map_segm" in scalars:
                client.set_model_version_tag(version.name, str(version.version),
                                             f"eval_{split}_map_segm", f"{scalars['map_segm']:.4f}")
            client.set_model_version_tag(version.name, str(version.version), f"eval_{split}_run",
                                         run.info.run_id)
    return run.info.run_id


