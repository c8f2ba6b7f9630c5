"""A tiny published winner (random rtdetr-r18 weights at 64 px) for registry/predict tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

CLASSES = ["circle", "square"]


def write_winner(out: Path, classes: list[str] = CLASSES, seed: int = 0) -> Path:
    """<out>/model.safetensors + meta.json as the lead's post-fit writes them (random weights)."""
    import torch
    from safetensors.torch import save_file

    from raydetr.config import LossConfig, ModelConfig
    from raydetr.model.build import build

    cfg = ModelConfig(preset="rtdetr-r18", resolution=64, num_queries=20, num_denoising=0)
    torch.manual_seed(seed)
    model, _, _ = build(cfg, LossConfig(), len(classes))
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out / "model.safetensors")
    meta = {"classes": classes, "num_classes": len(classes), "model": cfg.model_dump(mode="json"),
            "resolution": 64, "variant": "ema", "ema_decay": 0.993,
            "metrics": {"map": 0.25, "map50": 0.5, "map75": 0.2, "mar": 0.3}, "epoch": 3,
            "dataset": "synthetic", "raydetr_version": "0.1.0"}
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    return out


@pytest.fixture(scope="session")
def winner_dir(tmp_path_factory) -> Path:
    return write_winner(tmp_path_factory.mktemp("winner") / "winner")


@pytest.fixture(scope="session")
def rgb_images() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((40, 60), (72, 48))]
