"""Fine-tuning the RF-DETR family from an RF-DETR checkpoint file on a real 2-worker
TorchTrainer, registering the winner in a real MLflow server.

The checkpoint is random (non-trivial) weights in RF-DETR's file layout; rfdetr-nano runs at
64 px on a handful of synthetic images: this checks the mechanics, not accuracy.
"""

from __future__ import annotations

import os

import pytest
import torch
from rfdetr_support import write_rfdetr_checkpoint

from raydetr.config import load_config
from raydetr.fit.driver import fit
from raydetr.registry.fetch import load_detector

pytestmark = pytest.mark.slow

VIT_POS = "backbone.0.encoder.encoder.embeddings.position_embeddings"


@pytest.fixture(scope="module")
def local_ray():
    import ray

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    # address="local": a cluster of our own, never another test session's running one. Ray
    # gives its raylet a fixed 30 s to register; on a saturated shared machine that can pass,
    # so the start is retried (a failed start leaves nothing running after ray.shutdown()).
    for attempt in range(3):
        try:
            ray.init(address="local", num_cpus=4, include_dashboard=True,
                     dashboard_host="127.0.0.1")
            break
        except Exception:
            ray.shutdown()
            if attempt == 2:
                raise
    yield
    ray.shutdown()


def test_finetune_from_rfdetr_checkpoint_registers_winner(tmp_path, local_ray, mlflow_server):
    import mlflow
    from safetensors.torch import load_file


    pth = write_rfdetr_checkpoint(tmp_path / "rf-detr-nano.pth", num_logits=91, ema=True)
    cfg = load_config(None, [
        f"run.output_dir={tmp_path}", "run.name=rf-ft", "run.seed=3",
        "model.preset=rfdetr-nano", "model.resolution=64",
        "data.synthetic_image_size=64", "data.synthetic_train_images=4",
        "data.synthetic_val_images=2", "data.multi_scale=false",
        "optim.batch_size=1", "optim.epochs=1",
        "scaling.num_workers=2", "scaling.torch_threads=1",
        f"mlflow.tracking_uri={mlflow_server.uri}", "mlflow.model_name=rfdetr-ft",
    ])
    assert cfg.optim.lr == 1e-4 and cfg.loss.cls_loss == "ia_bce"  # RF-DETR's recipe
    result = fit(cfg, pretrain_weights=str(pth))

    meta = result.meta
    assert meta.preset == "rfdetr-nano" and meta.num_classes == 3
    winner = load_file(result.winner_dir / "model.safetensors")
    # class heads tiled 91 -> 3 rows (the synthetic classes); the backbone started from the file's EMA weights (the
    # fixture's EMA = 0.5 x model) and moved by at most a few small AdamW steps
    assert winner["class_embed.weight"].shape == (3, 256)
    start = torch.load(pth, weights_only=False)["ema_model"][VIT_POS]
    assert (winner[VIT_POS] - start).abs().max() < 1e-2

    assert result.registered is not None
    client = mlflow.MlflowClient(tracking_uri=mlflow_server.uri)
    version = client.get_model_version_by_alias("rfdetr-ft", "champion")
    assert version.version == str(result.registered["version"])

    det = load_detector("models:/rfdetr-ft@champion", tracking_uri=mlflow_server.uri,
                            device="cpu")
    with torch.no_grad():
        out = det.model(torch.randn(1, 3, 64, 64))
    assert out["pred_logits"].shape == (1, 300, 3) and out["pred_boxes"].shape == (1, 300, 4)
