"""RF-DETR-format checkpoint files for tests: random (non-trivial) weights with the model's
exact keys, an ``argparse.Namespace`` under ``args`` as RF-DETR's trainer stores it, and
optionally ``ema_model`` (as in its ``checkpoint.pth``)."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch


def rfdetr_state_dict(preset: str, num_logits: int, seed: int) -> dict[str, torch.Tensor]:
    from raydetr.model.rfdetr import build_rfdetr

    torch.manual_seed(seed)
    model = build_rfdetr(preset, num_classes=num_logits)
    # fresh-init zeros (last box layer, refpoints, offsets) would hide most of the decoder
    return {k: v + 0.02 * torch.randn_like(v) for k, v in model.state_dict().items()}


def write_rfdetr_checkpoint(path: Path, *, preset: str = "rfdetr-nano", num_logits: int = 91,
                            ema: bool = True, class_names: list[str] | None = None,
                            resolution: int | None = None, seed: int = 0) -> Path:
    model = rfdetr_state_dict(preset, num_logits, seed)
    args = argparse.Namespace(num_classes=num_logits - 1, lr=1e-4, lr_encoder=1.5e-4,
                              encoder="dinov2_windowed_small", pretrain_weights="none",
                              resolution=resolution, epochs=12)
    if class_names is not None:
        args.class_names = class_names
    obj = {"model": model, "args": args, "epoch": 11}
    if ema:
        obj["ema_model"] = {k: v * 0.5 for k, v in model.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path)
    return path
