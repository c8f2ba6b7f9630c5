"""Publish a run's winner to MLflow, and fetch published models back.

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

import contextlib
import json
import math
import os
import re
import shutil
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from raydetr.config import MlflowConfig

PYFUNC_FILE = Path(__file__).with_name("pyfunc.py")
PACKAGE_DIR = Path(__file__).resolve().parents[1]
META_KEYS = ("classes", "model", "resolution", "num_classes")
# Requirements of the served model (pinned to what is installed at publish time).
SERVING_REQUIREMENTS = ("torch", "safetensors", "numpy", "pandas", "pillow", "pydantic",
                        "pyyaml", "scipy", "mlflow")


class RegistryError(RuntimeError):
    """A registry/model problem a user can fix; the message says what and where."""


class RegistryUnavailable(RegistryError):
    """The tracking server does not answer."""


class ModelLoadError(RegistryError):
    """A model URI / directory / artifact that cannot be resolved or loaded."""


# ----------------------------------------------------------------------------- tracking URI

def resolve_tracking_uri(mlflow_cfg: MlflowConfig, output_dir: str | Path) -> str:
    """``mlflow_cfg.tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else
    ``sqlite:///<abs output_dir>/mlflow.db``."""
    if mlflow_cfg.tracking_uri:
        return mlflow_cfg.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path(output_dir).resolve() / 'mlflow.db'}"


def default_tracking_uri() -> str:
    """What a consumer uses when told nothing: the same URI a default training run writes to."""
    from raydetr.config import RunConfig

    return resolve_tracking_uri(MlflowConfig(), RunConfig().output_dir)


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Raise ``RegistryUnavailable`` quickly if an http(s) tracking server does not answer.

    One plain GET of ``<uri>/health`` (no MLflow retries). Other schemes are not checked here.
    """
    if not uri.startswith(("http://", "https://")):
        return
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            status = resp.status
    except urllib.error.HTTPError as exc:
        status = exc.code  # it answered; a 404 /health (e.g. behind a proxy) is still a server
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        reason = getattr(exc, "reason", exc)
        raise RegistryUnavailable(
            f"MLflow tracking server {uri} did not answer within {timeout_s:g}s ({reason}). "
            "Start it, or fix mlflow.tracking_uri / $MLFLOW_TRACKING_URI; a finished run can be "
            "registered later with `raydetr register RUN_DIR`."
        ) from None
    if status >= 500:
        raise RegistryUnavailable(f"MLflow tracking server {uri} answered HTTP {status} on /health")


@contextlib.contextmanager
def mlflow_session(uri: str, *, max_retries: int = 2, timeout_s: int = 120) -> Iterator[None]:
    """Use ``uri`` as MLflow's tracking+registry URI, with bounded HTTP retries, then restore.

    MLflow's defaults (7 retries, backoff factor 2) turn a dead server into minutes of waiting;
    values the user set in the environment win.
    """
    import mlflow

    saved = {k: os.environ.get(k) for k in (
        "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
        "MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR")}
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(max_retries))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(timeout_s))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved["MLFLOW_TRACKING_URI"])
        mlflow.set_registry_uri(saved["MLFLOW_REGISTRY_URI"])
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def ensure_experiment(client: Any, name: str, uri: str, output_dir: str | Path) -> str:
    """Experiment id; a new one on a sqlite/file store keeps its artifacts in
    ``<output_dir>/mlartifacts`` (not the current directory)."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if uri.startswith(("sqlite:", "file:")) or "://" not in uri:
        location = (Path(output_dir).resolve() / "mlartifacts").as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException:  # created meanwhile by a concurrent trial
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


# ----------------------------------------------------------------------------- metrics + plot

def metric_key(name: str) -> str:
    """MLflow-safe metric name: ``map_ema@0.999`` -> ``map_ema_at_0.999``."""
    return re.sub(r"[^\w./\- ]", "_", name.replace("@", "_at_"))


def history_metrics(history: list[dict]) -> list[tuple[str, float, int]]:
    """(key, value, step=epoch) for every numeric, finite value of every history row."""
    out = []
    for i, row in enumerate(history):
        step = int(row.get("epoch", i))
        for key, value in row.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if math.isfinite(float(value)):
                out.append((metric_key(key), float(value), step))
    return out


def plot_map_curves(history: list[dict], path: str | Path) -> Path:
    """PNG of regular vs EMA mAP (and every ``map_ema@<decay>``) per epoch. Headless (Agg)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    keys = ["map", "map_ema"] + sorted({k for row in history for k in row if k.startswith("map_ema@")})
    labels = {"map": "regular", "map_ema": "EMA"}
    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for key in keys:
        pts = [(row.get("epoch", i), row[key]) for i, row in enumerate(history)
               if isinstance(row.get(key), (int, float)) and math.isfinite(row[key])]
        if pts:
            xs, ys = zip(*pts)
            label = labels.get(key) or f"EMA decay {key.split('@', 1)[1]}"
            ax.plot(xs, ys, marker="o", markersize=3, label=label)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("mAP@[.50:.95]")
    ax.set_title("validation mAP: regular vs EMA weights")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


# ----------------------------------------------------------------------------- model files

def read_meta(path: str | Path) -> dict:
    """meta.json of a published winner, checked for the keys a loader needs."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"meta file not found: {path}")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{path}: not valid JSON ({exc})") from None
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        raise ModelLoadError(f"{path}: missing keys {missing} (see 'Published winner directory')")
    if len(meta["classes"]) != int(meta["num_classes"]):
        raise ModelLoadError(f"{path}: {len(meta['classes'])} classes but num_classes="
                             f"{meta['num_classes']}")
    return meta


def model_dir_artifacts(model_dir: str | Path) -> tuple[Path, Path]:
    """(weights, meta) paths inside a downloaded MLflow model dir (read from its MLmodel)."""
    model_dir = Path(model_dir)
    conf = yaml.safe_load((model_dir / "MLmodel").read_text())
    arts = conf.get("flavors", {}).get("python_function", {}).get("artifacts", {})
    if "weights" not in arts or "meta" not in arts:
        raise ModelLoadError(f"{model_dir}: not a raydetr model (no 'weights'/'meta' artifacts)")
    return model_dir / arts["weights"]["path"], model_dir / arts["meta"]["path"]


def _serving_requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for dist in SERVING_REQUIREMENTS:
        try:
            reqs.append(f"{dist}=={version(dist).split('+')[0]}")
        except PackageNotFoundError:
            reqs.append(dist)
    return reqs


def model_signature() -> Any:
    """Input: one binary column (the encoded image; first/only column, any name, e.g. 'image').

    Unnamed on purpose: a *named* column makes pyfunc reject plain lists ``[path, bytes]``, and
    a binary type makes the scoring server base64-decode that column of JSON requests.
    Params: threshold, max_detections. Output: one row per detection.
    """
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    outputs = Schema([ColSpec("long", "image_index"), ColSpec("long", "class_id"),
                      ColSpec("string", "class_name"), ColSpec("double", "score")]
                     + [ColSpec("double", k) for k in ("x1", "y1", "x2", "y2")])
    params = ParamSchema([ParamSpec("threshold", "double", 0.5),
                          ParamSpec("max_detections", "long", 100)])
    return ModelSignature(inputs=Schema([ColSpec("binary")]), outputs=outputs, params=params)


def _input_example() -> Any:
    import numpy as np
    import pandas as pd

    from raydetr.predict import encode_png

    img = np.full((32, 48, 3), 127, np.uint8)
    img[8:24, 12:36] = (220, 40, 40)
    return pd.DataFrame({"image": [encode_png(img)]})


# ----------------------------------------------------------------------------- publish

def publish(winner_dir: str | Path, *, history: list[dict], params: dict[str, Any],
            mlflow_cfg: MlflowConfig, output_dir: str | Path, run_name: str,
            tags: dict[str, Any] | None, dataset: str, parent_run_id: str | None = None,
            nested: bool = False, register: bool = True) -> dict[str, Any]:
    """Log + register the winner. Returns dict(run_id, model_uri, version, alias, model_name,
    tracking_uri); ``model_uri`` is ``models:/<name>@<alias>``.

    ``register=False`` (a search's other trials): the run gets params, metrics, the plot and
    meta.json, but no model is logged or registered (``version``/``model_uri`` are None).
    """
    import mlflow
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    winner_dir = Path(winner_dir)
    weights, meta_path = winner_dir / "model.safetensors", winner_dir / "meta.json"
    if not weights.is_file():
        raise ModelLoadError(f"{weights} not found: publish needs a stripped winner dir")
    meta = read_meta(meta_path)
    uri = resolve_tracking_uri(mlflow_cfg, output_dir)
    check_reachable(uri)
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    name, alias = mlflow_cfg.model_name, mlflow_cfg.alias
    with mlflow_session(uri), tempfile.TemporaryDirectory(prefix="raydetr-publish-") as tmp:
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        exp_id = ensure_experiment(client, mlflow_cfg.experiment, uri, output_dir)
        run_tags = {str(k): str(v) for k, v in (tags or {}).items()}
        run_tags.update({"raydetr.dataset": dataset, "raydetr.variant": str(meta.get("variant"))})
        with mlflow.start_run(experiment_id=exp_id, run_name=run_name, nested=nested,
                              parent_run_id=parent_run_id, tags=run_tags) as run:
            run_id = run.info.run_id
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
            # code_paths: a clean copy of the package, so a server without raydetr can import it.
            code = Path(tmp) / "code" / "raydetr"
            shutil.copytree(PACKAGE_DIR, code, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            info = mlflow.pyfunc.log_model(
                name="model", python_model=str(PYFUNC_FILE),
                artifacts={"weights": str(weights), "meta": str(meta_path)},
                code_paths=[str(code)], signature=model_signature(),
                input_example=_input_example(), pip_requirements=_serving_requirements(),
                registered_model_name=name,
                metadata={"raydetr_variant": meta.get("variant"), "classes": meta["classes"]},
            )
        version = str(info.registered_model_version)
        vtags = {"variant": meta.get("variant"), "map": (meta.get("metrics") or {}).get("map"),
                 "epoch": meta.get("epoch"), "dataset": dataset}
        for key, value in vtags.items():
            client.set_model_version_tag(name, version, key, "" if value is None else str(value))
        client.set_registered_model_alias(name, alias, version)
    return {"run_id": run_id, "model_uri": f"models:/{name}@{alias}", "version": int(version),
            "alias": alias, "model_name": name, "tracking_uri": uri}


def register_run_dir(run_dir: str | Path, mlflow_cfg: MlflowConfig | None = None, *,
                     output_dir: str | Path | None = None) -> dict[str, Any]:
    """``raydetr register RUN_DIR``: publish ``<run_dir>/winner`` of a finished run.

    Reads ``config.json`` (Config.to_dict()) and ``history.json``; ``output_dir`` (for the default
    sqlite store) is the config's ``run.output_dir`` when ``run_dir`` lies inside it, else
    ``run_dir``'s parent. Writes ``<run_dir>/registered.json`` with the result.
    """
    from raydetr.config import build_config

    run_dir = Path(run_dir)
    config_path, history_path = run_dir / "config.json", run_dir / "history.json"
    if not (run_dir / "winner" / "model.safetensors").is_file():
        raise ModelLoadError(f"{run_dir}/winner/model.safetensors not found: is this a finished "
                             "raydetr run directory?")
    if not config_path.is_file():
        raise ModelLoadError(f"{config_path} not found (written by the run's post-fit)")
    cfg = build_config(json.loads(config_path.read_text()), str(config_path))
    history: Any = json.loads(history_path.read_text()) if history_path.is_file() else []
    if isinstance(history, dict):
        history = history.get("history", [])
    if output_dir is None:
        configured = Path(cfg.run.output_dir).resolve()
        output_dir = configured if run_dir.resolve().is_relative_to(configured) else run_dir.parent
    meta = read_meta(run_dir / "winner" / "meta.json")
    result = publish(run_dir / "winner", history=history, params=cfg.flat(),
                     mlflow_cfg=mlflow_cfg or cfg.mlflow, output_dir=output_dir,
                     run_name=cfg.run.name, tags={"raydetr.registered_from": str(run_dir.resolve())},
                     dataset=str(meta.get("dataset", cfg.data.path or "synthetic")))
    tmp = run_dir / "registered.json.tmp"
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, run_dir / "registered.json")
    return result


# ----------------------------------------------------------------------------- fetch

def parse_models_uri(uri: str) -> tuple[str, str | None, str | None]:
    """``models:/name@alias`` -> (name, alias, None); ``models:/name/3`` -> (name, None, "3")."""
    rest = uri[len("models:/"):].strip("/")
    if "@" in rest:
        name, alias = rest.split("@", 1)
        return name, alias, None
    if "/" in rest:
        name, version = rest.rsplit("/", 1)
        return name, None, version
    raise ModelLoadError(f"model URI '{uri}' needs an alias or a version: models:/{rest}@champion "
                         f"or models:/{rest}/1")


def resolve_model_version(client: Any, uri: str) -> Any:
    """The ModelVersion a ``models:/`` URI points at; errors list what does exist."""
    from mlflow.exceptions import MlflowException

    name, alias, version = parse_models_uri(uri)
    try:
        registered = client.get_registered_model(name)
    except MlflowException:
        names = [m.name for m in client.search_registered_models(max_results=50)]
        raise ModelLoadError(f"no registered model '{name}' in {client._registry_uri}; registered "
                             f"models: {', '.join(names) or 'none'}") from None
    aliases = dict(registered.aliases or {})
    if alias is not None:
        if alias not in aliases:
            listed = ", ".join(f"@{a} -> v{v}" for a, v in sorted(aliases.items())) or "none"
            raise ModelLoadError(f"model '{name}' has no alias '{alias}'; its aliases: {listed}")
        version = str(aliases[alias])
    try:
        return client.get_model_version(name, str(version))
    except MlflowException:
        versions = sorted(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
        raise ModelLoadError(f"model '{name}' has no version {version}; versions: {versions}") from None


def download_model(uri: str, dst: str | Path, *, tracking_uri: str | None = None
                   ) -> tuple[Path, Any]:
    """Download a ``models:/`` or ``runs:/`` model dir into ``dst``.

    Returns (local model dir, ModelVersion or None for ``runs:/``)."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    tracking = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()
    check_reachable(tracking)
    if tracking.startswith("sqlite:///") and not Path(tracking[len("sqlite:///"):]).is_file():
        raise ModelLoadError(f"no MLflow database at {tracking} (nothing published there yet); "
                             "set $MLFLOW_TRACKING_URI or pass a winner dir")
    with mlflow_session(tracking):
        client = MlflowClient(tracking_uri=tracking, registry_uri=tracking)
        version = None
        artifact_uri = uri
        if uri.startswith("models:/"):
            version = resolve_model_version(client, uri)
            artifact_uri = f"models:/{version.name}/{version.version}"
        try:
            local = mlflow.artifacts.download_artifacts(artifact_uri=artifact_uri, dst_path=str(dst),
                                                        tracking_uri=tracking, registry_uri=tracking)
        except MlflowException as exc:
            raise ModelLoadError(f"cannot download {uri} from {tracking}: {exc.message}") from None
    return Path(local), version
