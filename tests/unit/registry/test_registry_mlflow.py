"""Tracking-URI resolution, reachability check, metric names, the mAP plot, model URIs."""

from __future__ import annotations

import http.server
import socket
import threading
import time
from pathlib import Path

import pytest

from raydetr.artifacts import ModelDirError
from raydetr.config import MlflowConfig
from raydetr.registry.errors import ModelLoadError, RegistryUnavailable
from raydetr.registry.fetch import load_detector, parse_models_uri
from raydetr.registry.plots import history_metrics, metric_key, plot_map_curves
from raydetr.registry.tracking import check_reachable, resolve_tracking_uri


def test_tracking_uri_config_then_env_then_sqlite(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert resolve_tracking_uri(MlflowConfig(), "runs") == f"sqlite:///{tmp_path}/runs/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert resolve_tracking_uri(MlflowConfig(), "runs") == "http://127.0.0.1:5999"
    cfg = MlflowConfig(tracking_uri="http://mlflow.internal:5000")
    assert resolve_tracking_uri(cfg, "runs") == "http://mlflow.internal:5000"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_server_fails_fast_with_a_clear_message():
    uri = f"http://127.0.0.1:{_closed_port()}"
    start = time.monotonic()
    with pytest.raises(RegistryUnavailable, match=f"{uri} did not answer.*raydetr register"):
        check_reachable(uri, timeout_s=2)
    assert time.monotonic() - start < 3


def test_silent_server_times_out(tmp_path):
    with socket.socket() as s:  # accepts connections (backlog) but never answers
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        uri = f"http://127.0.0.1:{s.getsockname()[1]}"
        start = time.monotonic()
        with pytest.raises(RegistryUnavailable, match="did not answer within 0.5s"):
            check_reachable(uri, timeout_s=0.5)
        assert time.monotonic() - start < 3


@pytest.fixture
def health_server():
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server API
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()
            self.wfile.write(b"OK")

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_reachable_server_and_local_stores(health_server, tmp_path):
    check_reachable(health_server)
    check_reachable(health_server + "/")
    check_reachable(f"sqlite:///{tmp_path}/x.db")  # local stores are not probed
    assert not (tmp_path / "x.db").exists()


def test_metric_names_are_mlflow_safe():
    assert metric_key("map_ema@0.999") == "map_ema_at_0.999"
    assert metric_key("ap/dog (big)") == "ap/dog _big_"
    rows = [{"epoch": 1, "map": 0.1, "map_ema@0.99": 0.2, "ok": True, "note": "x",
             "lr": float("nan")}, {"epoch": 2, "map": 0.3}]
    assert history_metrics(rows) == [("epoch", 1.0, 1), ("map", 0.1, 1),
                                     ("map_ema_at_0.99", 0.2, 1), ("epoch", 2.0, 2),
                                     ("map", 0.3, 2)]
    # A row without ``epoch``: its step is its position, numbered from 1 like epochs.
    assert history_metrics([{"map": 0.5}]) == [("map", 0.5, 1)]


def test_plot_map_curves(tmp_path):
    history = [{"epoch": e, "map": 0.1 * e, "map_ema": 0.12 * e, "map_ema@0.99": 0.11 * e,
                "map_ema@0.999": 0.09 * e} for e in range(1, 5)]
    out = plot_map_curves(history, tmp_path / "plots" / "map.png")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    from PIL import Image

    assert Image.open(out).size == (600, 400)
    # EMA disabled / empty history: still a valid image, no crash
    assert plot_map_curves([{"epoch": 1, "map": 0.1}], tmp_path / "a.png").is_file()
    assert plot_map_curves([], tmp_path / "b.png").is_file()


def test_models_uri_parsing():
    assert parse_models_uri("models:/raydetr@champion") == ("raydetr", "champion", None)
    assert parse_models_uri("models:/raydetr/3") == ("raydetr", None, "3")
    with pytest.raises(ModelLoadError, match="models:/raydetr@champion or models:/raydetr/1"):
        parse_models_uri("models:/raydetr")


def test_consumer_errors_without_a_registry(tmp_path, monkeypatch):

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(ModelLoadError, match="no MLflow database at sqlite:///.*runs/mlflow.db"):
        load_detector("models:/raydetr@champion")
    assert not Path("runs").exists()  # nothing created by a failed lookup
    uri = f"http://127.0.0.1:{_closed_port()}"
    with pytest.raises(RegistryUnavailable, match=uri):
        load_detector("models:/raydetr@champion", tracking_uri=uri)
    with pytest.raises(ModelDirError, match="not a model directory"):
        load_detector(str(tmp_path))
