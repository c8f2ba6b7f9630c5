"""Which MLflow tracking server a run talks to, whether it answers, and a bounded session.

    uri = resolve_tracking_uri(cfg.mlflow, cfg.run.output_dir)   # config, env, else sqlite
    check_reachable(uri)                                          # fails fast on a dead server
    with mlflow_session(uri): ...                                 # bounded HTTP retries
"""

from __future__ import annotations

import contextlib
import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from raydetr.config import MlflowConfig, RunConfig
from raydetr.registry.errors import RegistryUnavailable


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


def quiet_mlflow_loggers() -> None:
    """Import MLflow once so that it sets its loggers' levels now, before the caller sets its
    own (MLflow configures them when first imported)."""
    import mlflow  # noqa: F401


@contextlib.contextmanager
def quiet_mlflow() -> Iterator[None]:
    """MLflow draws a tqdm bar per artifact file it downloads (a model from code has dozens of
    files, and logging a model downloads its input example) and prints a "View run" URL when a
    run ends; its only switches are environment variables, so they are set for the block alone.
    Callers print one line themselves."""
    switches = {"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
                "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}
    before = {k: os.environ.get(k) for k in switches}
    os.environ.update(switches)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
