"""A real MLflow server for integration tests, on 127.0.0.1 only: one for the session, started
by the first test that asks and stopped (its whole process group) at the end; modules keep
apart by model and experiment names. Ray clusters: test_multinode.py (two nodes, `ray job
submit`) and each module's local Ray."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from tests_support import free_port, stop_group, wait_http

VENV_BIN = Path(sys.executable).parent


@dataclass
class MlflowServer:
    uri: str
    root: Path


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> MlflowServer:
    """A real `mlflow server` (sqlite backend, local artifacts) on 127.0.0.1."""
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(
        [str(VENV_BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
         "--artifacts-destination", str(root / "artifacts"), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}"},
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{uri}/health", timeout_s=120)
        yield MlflowServer(uri=uri, root=root)
    finally:
        stop_group(proc)
        log.close()
