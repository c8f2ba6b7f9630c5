"""Real servers for integration tests: a Ray head and an MLflow server, loopback only.

Every server here binds to 127.0.0.1 and is stopped by the fixture that started it (its whole
process group, so no raylet or worker outlives the test).
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from tests_support import free_port, stop_group, wait_http

VENV_BIN = Path(sys.executable).parent


@dataclass
class RayHead:
    gcs_address: str
    dashboard_url: str
    env: dict[str, str]  # for clients: token auth + loopback-only mode
    temp_dir: Path


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory) -> RayHead:
    """`ray start --head --block` on 127.0.0.1 with token auth; stopped after the module."""
    temp_dir = Path("/tmp") / f"rdt{secrets.token_hex(3)}"  # short: Ray's socket paths are long
    token = secrets.token_hex(16)
    env = dict(os.environ)
    env.update(
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",  # local-only mode: every address is loopback
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=token,
        OMP_NUM_THREADS="1",
        RAY_USAGE_STATS_ENABLED="0",
        PATH=f"{VENV_BIN}:{env.get('PATH', '')}",
    )
    env.pop("RAY_ADDRESS", None)
    log_dir = tmp_path_factory.mktemp("ray")
    # A port picked free can be taken by the time Ray binds it (Ray starts many processes on
    # random ports): on failure, stop that head and retry with fresh ports.
    for attempt in range(3):
        gcs_port, dash_port = free_port(), free_port()
        log = open(log_dir / f"head{attempt}.log", "w")
        proc = subprocess.Popen(
            [str(VENV_BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
             f"--port={gcs_port}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash_port}",
             "--num-cpus=4", f"--temp-dir={temp_dir}", "--include-dashboard=true",
             # not Ray's default agent port 52365: a local Ray that an earlier test started in
             # this process may hold it, and then no agent could take submitted jobs
             f"--dashboard-agent-listen-port={free_port()}",
             "--disable-usage-stats"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        url = f"http://127.0.0.1:{dash_port}"
        try:
            wait_http(f"{url}/api/version", timeout_s=60, alive=proc)
            break
        except (TimeoutError, RuntimeError):
            stop_group(proc)
            log.close()
            if attempt == 2:
                raise
    try:
        yield RayHead(gcs_address=f"127.0.0.1:{gcs_port}", dashboard_url=url, env=env,
                      temp_dir=temp_dir)
    finally:
        stop_group(proc)
        log.close()


@dataclass
class MlflowServer:
    uri: str
    root: Path


@pytest.fixture(scope="module")
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
