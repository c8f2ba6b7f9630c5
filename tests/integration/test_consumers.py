"""Consumers of a published model against a REAL `mlflow server` on 127.0.0.1.

publish -> mlflow.pyfunc.load_model("models:/<name>@champion") with pickle disabled ->
predict (paths, bytes, arrays) -> `raydetr predict` -> `raydetr evaluate --mlflow` ->
`raydetr register RUN_DIR` -> `mlflow models serve` + HTTP POST /invocations.
The model is a random-init rtdetr-r18 detector at 64 px: these tests check formats, not accuracy.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from raydetr.commands.predict import predict_command
from raydetr.config import Config, MlflowConfig
from raydetr.serve.detector import DETECTION_COLUMNS
from raydetr.serve.images import encode_png

pytestmark = pytest.mark.slow

NAME = "raydetr-consumers"
VENV_BIN = Path(sys.executable).parent
CLASSES = ["rectangle", "ellipse", "triangle"]  # make_synthetic's classes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_winner(out: Path) -> Path:
    import torch
    from safetensors.torch import save_file

    from raydetr.config import LossConfig, ModelConfig
    from raydetr.model.build import build

    cfg = ModelConfig(preset="rtdetr-r18", resolution=64, num_queries=20, num_denoising=0)
    torch.manual_seed(0)
    model, _, _ = build(cfg, LossConfig(), len(CLASSES))
    out.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out / "model.safetensors")
    meta = {"classes": CLASSES, "num_classes": len(CLASSES), "model": cfg.model_dump(mode="json"),
            "resolution": 64, "variant": "ema", "ema_decay": 0.993,
            "metrics": {"map": 0.25, "map50": 0.5, "map75": 0.2, "mar": 0.3}, "epoch": 2,
            "dataset": "synthetic", "raydetr_version": "0.1.0"}
    (out / "meta.json").write_text(json.dumps(meta))
    return out


HISTORY = [{"epoch": e, "map": 0.1 * e, "map_ema": 0.12 * e, "map_ema@0.999": 0.11 * e,
            "train_loss": 2.0 - e, "lr": 1e-4, "ema_decay": 0.993} for e in range(3)]


@pytest.fixture(scope="module", autouse=True)
def _no_telemetry():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        yield


@pytest.fixture(scope="module")
def published(mlflow_server, module_tmp):
    from raydetr.registry.publish import publish

    root = module_tmp / "published"
    winner = _write_winner(root / "run" / "winner")
    cfg = MlflowConfig(tracking_uri=mlflow_server.uri, model_name=NAME)
    start = time.monotonic()
    info = publish(winner, history=HISTORY, params=Config().flat(), mlflow_cfg=cfg,
                   output_dir=root, run_name="consumers", tags={"test": "consumers"},
                   dataset="synthetic")
    info["publish_s"] = time.monotonic() - start
    return {"info": info, "winner": winner, "root": root, "uri": mlflow_server.uri}


@pytest.fixture
def registry_env(published, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", published["uri"])
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    return published


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    d = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(1)
    paths = []
    for i, (h, w) in enumerate(((48, 64), (80, 40), (64, 64))):
        paths.append(d / f"img{i}.png")
        paths[-1].write_bytes(encode_png(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)))
    return paths


def test_publish_logs_run_metrics_plot_and_version(published):
    from mlflow import MlflowClient

    info = published["info"]
    assert info["model_uri"] == f"models:/{NAME}@champion" and info["version"] == 1
    client = MlflowClient(tracking_uri=published["uri"], registry_uri=published["uri"])
    run = client.get_run(info["run_id"])
    assert run.data.params["ema.decay"] == "[0.993]" and run.data.tags["test"] == "consumers"
    for key in ("map", "map_ema", "map_ema_at_0.999", "train_loss"):
        assert [m.step for m in client.get_metric_history(info["run_id"], key)] == [0, 1, 2]
    files = {a.path for a in client.list_artifacts(info["run_id"])}
    assert {"map_curves.png", "meta.json", "history.json"} <= files
    mv = client.get_model_version_by_alias(NAME, "champion")
    assert mv.version == "1" and mv.run_id == info["run_id"]
    assert {k: mv.tags[k] for k in ("variant", "map", "epoch", "dataset")} == {
        "variant": "ema", "map": "0.25", "epoch": "2", "dataset": "synthetic"}
    # nothing of the sqlite default leaked: the server holds everything
    assert not (published["root"] / "mlflow.db").exists()


def test_pyfunc_load_without_pickle_and_predict(registry_env, images):
    import mlflow

    model = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    params = {"threshold": 0.0, "max_detections": 4}
    arrays = [np.asarray(__import__("PIL.Image").Image.open(p).convert("RGB")) for p in images]
    by_path = model.predict([str(p) for p in images], params=params)
    by_bytes = model.predict([p.read_bytes() for p in images], params=params)
    by_array = model.predict(pd.DataFrame({"image": arrays}), params=params)
    for df in (by_path, by_bytes, by_array):
        assert list(df.columns) == DETECTION_COLUMNS
        assert df.groupby("image_index").size().tolist() == [4, 4, 4]
        pd.testing.assert_frame_equal(df, by_path)
    assert set(by_path.class_name) <= set(CLASSES)
    assert (model.predict([str(images[0])], params={"threshold": 1.01}).columns
            == DETECTION_COLUMNS).all()


def test_predict_command_from_registry(registry_env, images, tmp_path, capsys, caplog):
    out = tmp_path / "out"
    with caplog.at_level("INFO", logger="raydetr.registry"):
        assert predict_command(f"models:/{NAME}@champion", [str(images[0].parent)], out, 0.0) == 0
    # one line for the download, not MLflow's bar per artifact file
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("downloaded ")]
    assert len(lines) == 1 and f"models:/{NAME}@champion (version 1)" in lines[0], lines
    assert "Downloading artifacts" not in capsys.readouterr().err
    summary = json.loads((out / "detections.json").read_text())
    assert summary["model"] == f"models:/{NAME}@champion"
    assert [r["output"] for r in summary["images"]] == ["img0.jpg", "img1.jpg", "img2.jpg"]
    assert all((out / r["output"]).is_file() for r in summary["images"])
    assert summary["images"][1]["width"] == 40 and summary["images"][1]["height"] == 80


@pytest.mark.parametrize("model, inputs, expect", [
    (f"models:/{NAME}@champion", ["missing.jpg"], "missing.jpg: no such file"),
    (f"models:/{NAME}@champion", ["NOT_IMAGE"], "NOT_IMAGE: not an image"),
    ("models:/no-such-model@champion", [], f"no registered model 'no-such-model'.*{NAME}"),
    (f"models:/{NAME}@staging", [], f"model '{NAME}' has no alias 'staging'; its aliases: @champion"),
    (f"models:/{NAME}/99", [], f"model '{NAME}' has no version 99; versions: \\[1"),
])
def test_predict_command_errors(registry_env, images, tmp_path, capsys, model, inputs, expect):
    import re

    fake = tmp_path / "fake.jpg"
    fake.write_text("text")
    inputs = [str(fake) if x == "NOT_IMAGE" else str(tmp_path / x) for x in inputs] or [str(images[0])]
    expect = expect.replace("NOT_IMAGE", re.escape(str(fake)))
    out = tmp_path / "out"
    assert predict_command(model, inputs, out, 0.5) == 2
    assert re.search(expect, capsys.readouterr().err)
    assert not out.exists()


def test_evaluate_logs_to_mlflow(registry_env, tmp_path, capsys):
    from mlflow import MlflowClient

    from raydetr.commands.evaluate import evaluate_command
    from raydetr.data.synthetic import make_synthetic

    data = make_synthetic(tmp_path / "synthetic", train_images=2, val_images=6, image_size=64)
    out = tmp_path / "metrics.json"
    assert evaluate_command(f"models:/{NAME}@champion", data, "val", True, out=out) == 0
    printed = capsys.readouterr().out
    assert "map50" in printed and "triangle" in printed and "logged to MLflow run" in printed
    metrics = json.loads(out.read_text())["metrics"]
    assert metrics["images"] == 6 and set(metrics["per_class"]) == set(CLASSES)
    client = MlflowClient(tracking_uri=registry_env["uri"], registry_uri=registry_env["uri"])
    mv = client.get_model_version(NAME, "1")
    run = client.get_run(mv.tags["eval_val_run"])
    assert run.data.tags["raydetr.model_version"] == "1"
    assert run.data.tags["raydetr.model_uri"] == f"models:/{NAME}@champion"
    assert run.data.metrics["map"] == pytest.approx(metrics["map"])
    assert evaluate_command(f"models:/{NAME}@champion", data, "test", False) == 2
    assert "no split 'test'" in capsys.readouterr().err


def test_register_run_dir_moves_the_alias(registry_env):
    from raydetr.registry.publish import register_run_dir

    run_dir = registry_env["winner"].parent
    cfg = Config()
    cfg.run.output_dir = str(run_dir.parent)
    cfg.mlflow.model_name = NAME
    cfg.mlflow.tracking_uri = registry_env["uri"]
    (run_dir / "config.json").write_text(json.dumps(cfg.to_dict()))
    (run_dir / "history.json").write_text(json.dumps(HISTORY))
    info = register_run_dir(run_dir)
    assert info["version"] == 2 and info["model_uri"] == f"models:/{NAME}@champion"
    assert json.loads((run_dir / "registered.json").read_text())["version"] == 2
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=registry_env["uri"], registry_uri=registry_env["uri"])
    assert client.get_model_version_by_alias(NAME, "champion").version == "2"


@pytest.fixture(scope="module")
def served(published, tmp_path_factory):
    """`mlflow models serve` of the registered alias on 127.0.0.1, stopped after the module."""
    port = _free_port()
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    env = {**os.environ, "MLFLOW_TRACKING_URI": published["uri"],
           "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false", "OMP_NUM_THREADS": "1",
           "MLFLOW_DISABLE_TELEMETRY": "true",
           "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}"}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [str(VENV_BIN / "mlflow"), "models", "serve", "-m", f"models:/{NAME}@champion",
             "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            cwd=log_path.parent,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"model server did not start:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        import signal

        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


def test_http_invocations(served, images):
    """The documented HTTP format: dataframe_split, one base64-encoded image per row."""
    body = {"dataframe_split": {"columns": ["image"],
                                "data": [[base64.b64encode(p.read_bytes()).decode()] for p in images]},
            "params": {"threshold": 0.0, "max_detections": 3}}
    req = urllib.request.Request(f"{served}/invocations", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        predictions = json.loads(resp.read())["predictions"]
    assert len(predictions) == 9 and list(predictions[0]) == DETECTION_COLUMNS
    assert sorted({p["image_index"] for p in predictions}) == [0, 1, 2]
    assert all(p["class_name"] in CLASSES and 0 <= p["x1"] <= p["x2"] for p in predictions)
