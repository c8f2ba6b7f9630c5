"""Publish a run's winner to MLflow (``publish``), now or later (``register_run_dir``).

``publish`` makes one MLflow run (params, per-epoch metrics of both variants, the mAP plot,
``meta.json``) and logs the stripped winner as a pyfunc *model from code*
(``raydetr/registry/pyfunc.py`` + artifacts ``weights``/``meta``: nothing is pickled), registers
it under ``mlflow.model_name`` and points ``mlflow.alias`` at the new version:

    info = publish("runs/demo/winner", history=history, params=cfg.flat(), mlflow_cfg=cfg.mlflow,
                   output_dir=cfg.run.output_dir, run_name="demo", tags={}, dataset="synthetic")
    mlflow.pyfunc.load_model(info["model_uri"])        # models:/raydetr@champion

``register_run_dir`` does the same later from ``<run_dir>/{winner/, history.json, config.json}``
(``raydetr register RUN_DIR``) when the tracking server was down during the fit.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from raydetr.artifacts import ModelDir, RunDir, atomic_write_json
from raydetr.config import MlflowConfig, build_config
from raydetr.ema.shadow import shadow_tags
from raydetr.registry.errors import ModelLoadError
from raydetr.registry.modelfiles import (
    PACKAGE_DIR,
    PYFUNC_FILE,
    input_example,
    model_signature,
    serving_requirements,
)
from raydetr.registry.plots import history_metrics, plot_map_curves
from raydetr.registry.tracking import (
    check_reachable,
    ensure_experiment,
    mlflow_session,
    quiet_mlflow,
    resolve_tracking_uri,
)
from raydetr.serve.export import export_for_registry

log = logging.getLogger("raydetr.publish")


def distill_tags(teacher: dict[str, Any] | None) -> dict[str, str]:
    """Model-version tags of a distilled student: its teacher's URI, sha256 and val mAP."""
    if not teacher:
        return {}
    return {"distill.teacher": str(teacher["uri"]),
            "distill.teacher_sha256": str(teacher.get("sha256") or ""),
            "distill.teacher_map": "" if teacher.get("map") is None else f"{teacher['map']:.4f}"}


def publish(winner_dir: str | Path, *, history: list[dict], params: dict[str, Any],
            mlflow_cfg: MlflowConfig, output_dir: str | Path, run_name: str,
            tags: dict[str, Any] | None, dataset: str, parent_run_id: str | None = None,
            nested: bool = False, register: bool = True, run_id: str | None = None,
            onnx: tuple[Path, int] | None = None) -> dict[str, Any]:
    """Log + register the winner. Returns dict(run_id, model_uri, version, alias, model_name,
    tracking_uri); ``model_uri`` is ``models:/<name>@<alias>``.

    ``run_id``: the fit's live run (raydetr.registry.live), which already has the params and
    every epoch's metrics; the plot, meta.json and the model are added to it and it ends
    FINISHED. None: a new run with everything (``raydetr register`` after an outage).

    ``register=False`` (a search's other trials): the run gets params, metrics, the plot and
    meta.json, but no model is logged or registered (``version``/``model_uri`` are None).

    ``onnx``: (path, opset) of the winner's checked ONNX export; the file becomes the model's
    ``onnx`` artifact (``<model>/artifacts/model.onnx``) and the version is tagged ``onnx_opset``.
    """
    import mlflow
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    winner = ModelDir(winner_dir)
    weights, meta_path = winner.weights_path, winner.meta_path
    if not weights.is_file():
        raise ModelLoadError(f"{weights} not found: publish needs a stripped winner dir")
    meta = winner.read_meta()
    uri = resolve_tracking_uri(mlflow_cfg, output_dir)
    check_reachable(uri)
    # One line per step: logging the model uploads its code and can take a while.
    log.info("post-fit: logging run '%s' to MLflow at %s (params, metrics, plot)", run_name, uri)
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    name, alias = mlflow_cfg.model_name, mlflow_cfg.alias
    with mlflow_session(uri), tempfile.TemporaryDirectory(prefix="raydetr-publish-") as tmp:
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        exp_id = ensure_experiment(client, mlflow_cfg.experiment, uri, output_dir)
        run_tags = {str(k): str(v) for k, v in (tags or {}).items()}
        run_tags.update({"raydetr.dataset": dataset, "raydetr.variant": meta.variant})
        live = run_id is not None
        start = (dict(run_id=run_id) if live else
                 dict(experiment_id=exp_id, run_name=run_name, nested=nested,
                      parent_run_id=parent_run_id, tags=run_tags))
        with quiet_mlflow(), mlflow.start_run(**start) as run:
            run_id = run.info.run_id
            if live:
                mlflow.set_tags(run_tags)
            else:
                plist = [Param(str(k), str(v)[:6000]) for k, v in params.items()]
                for i in range(0, len(plist), 100):
                    client.log_batch(run_id, params=plist[i:i + 100])
                mlist = [Metric(k, v, 0, s) for k, v, s in history_metrics(history)]
                for i in range(0, len(mlist), 1000):
                    client.log_batch(run_id, metrics=mlist[i:i + 1000])
            mlflow.log_artifact(str(plot_map_curves(history, Path(tmp) / "map_curves.png")))
            mlflow.log_artifact(str(meta_path))
            mlflow.log_dict(history, "history.json")
            if not register:
                return {"run_id": run_id, "model_uri": None, "version": None, "alias": None,
                        "model_name": name, "tracking_uri": uri}
            log.info("post-fit: logging the model (weights + code) and registering it as '%s'",
                     name)
            # code_paths: a clean copy of the package, so a server without raydetr can import it.
            code = Path(tmp) / "code" / "raydetr"
            shutil.copytree(PACKAGE_DIR, code, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            info = mlflow.pyfunc.log_model(
                name="model", python_model=str(PYFUNC_FILE),
                artifacts={"weights": str(weights), "meta": str(meta_path),
                           **({"onnx": str(onnx[0])} if onnx else {})},
                code_paths=[str(code)], signature=model_signature(),
                input_example=input_example(), pip_requirements=serving_requirements(),
                registered_model_name=name,
                metadata={"raydetr_variant": meta.variant, "classes": meta.classes},
            )
        version = str(info.registered_model_version)
        vtags = {"variant": meta.variant, "map": meta.metrics.get("map"), "epoch": meta.epoch,
                 "dataset": dataset, "resolution": meta.resolution,
                 "classes": json.dumps(meta.classes), **shadow_tags(meta.shadow),
                 **distill_tags(meta.source.get("distill"))}
        if onnx:
            vtags["onnx_opset"] = onnx[1]
        for key, value in vtags.items():
            client.set_model_version_tag(name, version, key, "" if value is None else str(value))
        client.set_registered_model_alias(name, alias, version)
    log.info("post-fit: registered %s version %s with alias @%s", name, version, alias)
    return {"run_id": run_id, "model_uri": f"models:/{name}@{alias}", "version": int(version),
            "alias": alias, "model_name": name, "tracking_uri": uri}


def register_run_dir(run_dir: str | Path, mlflow_cfg: MlflowConfig | None = None, *,
                     output_dir: str | Path | None = None) -> dict[str, Any]:
    """``raydetr register RUN_DIR``: publish ``<run_dir>/winner`` of a finished run.

    Reads ``config.json`` (Config.to_dict()) and ``history.json``; ``output_dir`` (for the default
    sqlite store) is the config's ``run.output_dir`` when ``run_dir`` lies inside it, else
    ``run_dir``'s parent. Writes ``<run_dir>/registered.json`` with the result.
    With ``mlflow.onnx=true`` the winner's checked ONNX export (``<winner>/model.onnx``) is
    attached to the registered version.
    """

    run = RunDir(run_dir)
    if not run.winner.weights_path.is_file():
        raise ModelLoadError(f"{run.winner.weights_path} not found: is this a finished raydetr "
                             "run directory?")
    if not run.config.is_file():
        raise ModelLoadError(f"{run.config} not found (written by the run's post-fit)")
    cfg = build_config(json.loads(run.config.read_text()), str(run.config))
    history: Any = json.loads(run.history.read_text()) if run.history.is_file() else []
    if isinstance(history, dict):
        history = history.get("history", [])
    if output_dir is None:
        configured = Path(cfg.run.output_dir).resolve()
        output_dir = configured if run.root.resolve().is_relative_to(configured) else run.root.parent
    meta = run.winner.read_meta()
    mlflow_cfg = mlflow_cfg or cfg.mlflow
    onnx = export_for_registry(run.winner.path) if mlflow_cfg.onnx else None
    result = publish(run.winner.path, history=history, params=cfg.flat(),
                     mlflow_cfg=mlflow_cfg, output_dir=output_dir, onnx=onnx,
                     run_name=cfg.run.name, tags={"raydetr.registered_from": str(run.root.resolve())},
                     dataset=meta.dataset or str(cfg.data.path or "synthetic"))
    atomic_write_json(run.registered, result)
    return result
