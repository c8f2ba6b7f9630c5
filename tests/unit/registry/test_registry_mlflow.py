"""Tracking-URI resolution, reachability check, metric names, the mAP plot, model URIs."""

from __future__ import annotations

import http.server
import math
import socket
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from raydetr.artifacts import ModelDirError
from raydetr.config import MlflowConfig
from raydetr.registry.errors import ModelLoadError, RegistryUnavailable
from raydetr.registry.fetch import load_detector, parse_models_uri
from raydetr.registry.plots import history_metrics, map_curves_figure, metric_key, plot_map_curves
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


def _drawn(history: list[dict]) -> dict[str, tuple[list, list]]:
    """label -> (x, y) of every line on the figure; the legend must name the same lines."""
    ax = map_curves_figure(history).axes[0]
    lines = {ln.get_label(): (list(ln.get_xdata()), list(ln.get_ydata())) for ln in ax.get_lines()}
    assert len(lines) == len(ax.get_lines()), "two lines with one label"
    legend = ax.get_legend()
    if lines:
        assert sorted(t.get_text() for t in legend.get_texts()) == sorted(lines)
    else:
        assert legend is None
    return lines


def test_map_curves_one_decay_draws_each_series_once():
    # One shadow: map_ema is that shadow's mAP, so the figure has two lines, not three.
    history = [{"epoch": 1, "map": 0.1, "map_ema": 0.2, "map_ema@0.993": 0.2},
               {"epoch": 2, "map": 0.3, "map_ema": 0.25, "map_ema@0.993": 0.25}]
    assert _drawn(history) == {"regular": ([1, 2], [0.1, 0.3]),
                               "EMA decay 0.993": ([1, 2], [0.2, 0.25])}


def test_map_curves_several_decays_one_line_each():
    history = [{"epoch": 1, "map": 0.1, "map_ema": 0.3, "map_ema@0.999": 0.1, "map_ema@0.99": 0.3},
               {"epoch": 2, "map": 0.2, "map_ema": 0.4, "map_ema@0.999": 0.4, "map_ema@0.99": 0.35}]
    assert _drawn(history) == {"regular": ([1, 2], [0.1, 0.2]),
                               "EMA decay 0.99": ([1, 2], [0.3, 0.35]),
                               "EMA decay 0.999": ([1, 2], [0.1, 0.4])}


def test_map_curves_gaps_and_edges(tmp_path):
    # NaN / missing values leave a gap; a history without epochs numbers rows from 1.
    history = [{"map": 0.1, "map_ema": math.nan}, {"map": 0.2, "map_ema": 0.3}]
    assert _drawn(history) == {"regular": ([1, 2], [0.1, 0.2]), "EMA": ([2], [0.3])}
    assert _drawn([{"epoch": 1, "map": 0.1}]) == {"regular": ([1], [0.1])}  # EMA off
    assert _drawn([]) == {}
    out = plot_map_curves([{"epoch": 1, "map": 0.1}], tmp_path / "plots" / "map.png")
    assert Image.open(out).size == (600, 400)


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
