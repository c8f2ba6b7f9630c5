"""Small published models (random weights) and their ONNX exports, made once per session."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from raydetr.config import LossConfig, ModelConfig
from raydetr.serve.detector import Detector
from raydetr.serve.export import export_detector

CLASSES = ["rectangle", "ellipse", "triangle"]  # make_synthetic's classes


def write_model_dir(out: Path, cfg: ModelConfig, resolution: int, seed: int = 0,
                    variant: str = "ema") -> Path:
    """model.safetensors + meta.json of a random-init model, as post-fit writes them."""
    from raydetr.model.build import build

    torch.manual_seed(seed)
    model, _, _ = build(cfg, LossConfig(), len(CLASSES))
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out / "model.safetensors")
    meta = {"classes": CLASSES, "num_classes": len(CLASSES), "model": cfg.model_dump(mode="json"),
            "resolution": resolution, "variant": variant, "ema_decay": 0.993,
            "metrics": {"map": 0.25}, "epoch": 3, "dataset": "synthetic"}
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    return out


@pytest.fixture(scope="session")
def rtdetr_dir(tmp_path_factory) -> Path:
    cfg = ModelConfig(preset="rtdetr-r18", resolution=64, num_queries=20, num_denoising=0)
    return write_model_dir(tmp_path_factory.mktemp("rtdetr") / "model", cfg, 64)


@pytest.fixture(scope="session")
def rtdetr_onnx(rtdetr_dir) -> Path:
    """Dynamic batch, raw outputs (what `raydetr export DIR --format onnx` writes)."""
    report = export_detector(Detector.from_dir(rtdetr_dir, device="cpu"), rtdetr_dir / "model.onnx")
    return Path(report["path"])


@pytest.fixture(scope="session")
def rgb_images() -> list[np.ndarray]:
    """Synthetic shapes at three sizes and aspect ratios (not the model's input size)."""
    from raydetr.data.synthetic import draw_image

    rng = np.random.default_rng(3)
    out = []
    for size, (h, w) in zip((96, 80, 64), ((96, 120), (80, 56), (64, 64))):
        out.append(np.asarray(draw_image(rng, size, 3)[0].resize((w, h))))
    return out
