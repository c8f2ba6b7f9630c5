"""Fetch a published model back: ``models:/name@alias`` or ``models:/name/N`` -> a local dir,
or straight to a ``Detector`` (``load_detector``, which also takes a local model dir).
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from raydetr.registry.errors import ModelLoadError
from raydetr.registry.tracking import (
    check_reachable,
    default_tracking_uri,
    mlflow_session,
    quiet_mlflow,
)
from raydetr.serve.detector import Detector

log = logging.getLogger("raydetr.registry")


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
        what = f"{uri} (version {version.version})" if version is not None else uri
        try:
            with quiet_mlflow():
                local = mlflow.artifacts.download_artifacts(
                    artifact_uri=artifact_uri, dst_path=str(dst), tracking_uri=tracking,
                    registry_uri=tracking)
        except MlflowException as exc:
            raise ModelLoadError(f"cannot download {uri} from {tracking}: {exc.message}") from None
    files = [f for f in Path(local).rglob("*") if f.is_file()]
    log.info("downloaded %s from %s: %d files, %.1f MB", what, tracking, len(files),
             sum(f.stat().st_size for f in files) / 1e6)
    return Path(local), version


def load_detector(uri: str | Path, *, tracking_uri: str | None = None,
                  device: str | None = None) -> Detector:
    """``models:/name@alias``, ``models:/name/3``, ``runs:/<id>/model``, a local model dir or a
    ``raydetr export`` ``.onnx`` file (run by onnxruntime on the CPU)."""
    text = str(uri)
    if text.endswith(".onnx"):
        return Detector.from_onnx(text)
    if not text.startswith(("models:/", "runs:/", "mlflow-artifacts:/")) or Path(text).exists():
        return Detector.from_dir(text, device=device)
    with tempfile.TemporaryDirectory(prefix="raydetr-model-") as tmp:
        local, version = download_model(text, tmp, tracking_uri=tracking_uri)
        det = Detector.from_dir(local, device=device)
    det.source, det.model_version = text, version
    return det
