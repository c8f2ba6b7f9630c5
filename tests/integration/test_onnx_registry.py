"""The registered model version holds the checked ONNX file (`mlflow.onnx=true`), from
`raydetr register` and from post-fit, against a REAL `mlflow server` on 127.0.0.1; its tags say
resolution, classes, variant and opset; the pyfunc model has a signature and an input example;
the downloaded ONNX file predicts what the torch model does. Random-init rtdetr-r18 at 64 px."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from raydetr.artifacts import read_meta
from raydetr.commands.cli import main
from raydetr.config import Config, LossConfig, ModelConfig
from raydetr.fit.postfit import publish_winner
from raydetr.serve.detector import Detector

pytestmark = pytest.mark.slow

NAME = "raydetr-onnx"
CLASSES = ["rectangle", "ellipse", "triangle"]
HISTORY = [{"epoch": e, "map": 0.1 * e, "map_ema": 0.12 * e} for e in (1, 2)]


def _run_dir(root: Path, uri: str) -> Path:
    """A finished run's dir as post-fit leaves it: winner/, config.json, history.json."""
    import torch
    from safetensors.torch import save_file

    from raydetr.model.build import build

    model_cfg = ModelConfig(preset="rtdetr-r18", resolution=64, num_queries=20, num_denoising=0)
    torch.manual_seed(0)
    model, _, _ = build(model_cfg, LossConfig(), len(CLASSES))
    winner = root / "run" / "winner"
    winner.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              winner / "model.safetensors")
    meta = {"classes": CLASSES, "num_classes": 3, "model": model_cfg.model_dump(mode="json"),
            "resolution": 64, "variant": "ema", "ema_decay": 0.993, "epoch": 2,
            "metrics": {"map": 0.24, "map50": 0.4, "map75": 0.2, "mar": 0.3},
            "dataset": "synthetic"}
    (winner / "meta.json").write_text(json.dumps(meta))
    cfg = Config()
    cfg.run.output_dir, cfg.run.name = str(root), "onnx-run"
    cfg.mlflow.model_name, cfg.mlflow.tracking_uri = NAME, uri
    cfg.model = model_cfg
    (root / "run" / "config.json").write_text(json.dumps(cfg.to_dict()))
    (root / "run" / "history.json").write_text(json.dumps(HISTORY))
    return root / "run"


@pytest.fixture(scope="module")
def client(mlflow_server):
    from mlflow import MlflowClient

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        mp.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
        yield MlflowClient(tracking_uri=mlflow_server.uri, registry_uri=mlflow_server.uri)


def _check_version(client, version: str, tmp: Path) -> Path:
    """Tags, signature, input example and the ONNX file of one version; the file's path."""
    import mlflow

    mv = client.get_model_version(NAME, version)
    assert mv.tags["onnx_opset"] == "17" and mv.tags["resolution"] == "64"
    assert json.loads(mv.tags["classes"]) == CLASSES and mv.tags["variant"] == "ema"
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{NAME}/{version}",
                                                     dst_path=str(tmp)))
    mlmodel = yaml.safe_load((local / "MLmodel").read_text())
    assert mlmodel["signature"]["inputs"] and mlmodel["signature"]["outputs"]
    assert mlmodel["saved_input_example_info"]["artifact_path"]
    assert (local / mlmodel["saved_input_example_info"]["artifact_path"]).is_file()
    onnx_rel = mlmodel["flavors"]["python_function"]["artifacts"]["onnx"]["path"]
    assert onnx_rel.endswith("model.onnx")
    return local / onnx_rel


def _same_predictions(torch_dir: Path, onnx_file: Path) -> None:
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (50, 70, 3), dtype=np.uint8) for _ in range(2)]
    a = Detector.from_dir(torch_dir, device="cpu").predict(images, threshold=0.0)
    b = Detector.from_onnx(str(onnx_file)).predict(images, threshold=0.0)
    assert len(a) == len(b) == 2 * 20 * 3
    key = ["image_index", "class_id"]
    a = a.sort_values([*key, "score"]).reset_index(drop=True)
    b = b.sort_values([*key, "score"]).reset_index(drop=True)
    assert (a[key].to_numpy() == b[key].to_numpy()).all()
    assert np.abs(a.score.to_numpy() - b.score.to_numpy()).max() <= 1e-4


def test_register_attaches_the_onnx_file(client, mlflow_server, tmp_path, capsys):
    run_dir = _run_dir(tmp_path, mlflow_server.uri)
    assert main(["register", str(run_dir), "mlflow.onnx=true",
                 f"mlflow.tracking_uri={mlflow_server.uri}", f"mlflow.model_name={NAME}"]) == 0
    version = str(json.loads(capsys.readouterr().out)["version"])
    assert (run_dir / "winner" / "model.onnx").is_file()
    onnx_file = _check_version(client, version, tmp_path / "download")
    _same_predictions(run_dir / "winner", onnx_file)

    # `raydetr export models:/NAME/VERSION`: the registered torch model, exported here
    out = tmp_path / "from-registry.onnx"
    assert main(["export", f"models:/{NAME}/{version}", str(out), "--format", "onnx"]) == 0
    _same_predictions(run_dir / "winner", out)


def test_post_fit_attaches_the_onnx_file(client, mlflow_server, tmp_path):
    run_dir = _run_dir(tmp_path, mlflow_server.uri)
    cfg = Config.model_validate(json.loads((run_dir / "config.json").read_text()))
    cfg.mlflow.onnx = True
    meta = read_meta(run_dir / "winner" / "meta.json")
    info = publish_winner(cfg, run_dir, run_dir / "winner", HISTORY, meta)
    assert info is not None and info["model_name"] == NAME
    onnx_file = _check_version(client, str(info["version"]), tmp_path / "download")
    _same_predictions(run_dir / "winner", onnx_file)
