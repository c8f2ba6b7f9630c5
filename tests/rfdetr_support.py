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


def _rfdetr111_description(preset: str, model_name: str | None, class_names: list[str] | None,
                           resolution: int | None) -> dict:
    """``args`` (a plain dict), ``model_name``, ``model_config``, ``rfdetr_version``: the keys
    RF-DETR 1.11's BestModelCallback._model_description adds to every file it writes."""
    args = {"num_classes": 90, "resolution": resolution, "epochs": 12, "lr": 1e-4,
            "class_names": class_names, "segmentation_head": preset.startswith("rfdetr-seg"),
            "dataset_dir": "/data/set", "output_dir": "/runs/out"}
    out = {"args": args, "model_config": {"resolution": resolution, "num_classes": 90},
           "rfdetr_version": "1.11.2"}
    if model_name is not None:
        out["model_name"] = model_name
    return out


def write_rfdetr111_checkpoint(path: Path, *, kind: str = "pth", preset: str = "rfdetr-nano",
                               model_name: str | None = "RFDETRNano", num_logits: int = 91,
                               class_names: list[str] | None = None,
                               resolution: int | None = None, ema: bool = True,
                               keypoint_mask: torch.Tensor | None = None, seed: int = 0) -> Path:
    """A file laid out as RF-DETR 1.11.2 writes it (rfdetr/training/callbacks/best_model.py,
    training/callbacks/ema.py, training/module_model.py), with random weights.

    kind "pth": the best-checkpoint payload (``model`` + ``state_dict`` with a ``model.`` prefix,
    callbacks with the EMA's averaged model, empty optimizer/scheduler lists).
    kind "ckpt": a Lightning ``last.ckpt`` (no ``model`` key; real optimizer/scheduler state).
    The 1.11 model's state dict carries a ``_kp_active_mask`` buffer ((0, 0) without keypoints).
    """
    model = rfdetr_state_dict(preset, num_logits, seed)
    model["_kp_active_mask"] = (keypoint_mask if keypoint_mask is not None
                                else torch.zeros(0, 0, dtype=torch.bool))
    callbacks: dict = {
        "BestModelCallback{'monitor': 'val/mAP_50_95', 'mode': 'max'}": {
            "monitor": "val/mAP_50_95", "best_model_score": torch.tensor(0.41),
            "best_model_path": "/runs/out/checkpoint_best_regular.pth", "dirpath": "/runs/out",
            "_best_ema": 0.43, "_smoothed_regular": 0.0, "_best_raw_regular": 0.41},
    }
    if ema:
        average = {f"module.model.{k}": v * 0.5 for k, v in model.items()}
        average["n_averaged"] = torch.tensor(120)
        callbacks["RFDETREMACallback"] = {"latest_update_step": 120,
                                          "average_model_state_dict": average}
    obj: dict = {
        "epoch": 11, "global_step": 120, "pytorch-lightning_version": "2.6.1",
        "state_dict": {f"model.{k}": v for k, v in model.items()},
        "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"current": {"completed": 11}}},
                  "validate_loop": {"state_dict": {}}, "test_loop": {"state_dict": {}}},
        "callbacks": callbacks,
    }
    if kind == "pth":
        obj.update(model=model, optimizer_states=[], lr_schedulers=[])
    elif kind == "ckpt":
        param = torch.nn.Parameter(torch.zeros(3))
        opt = torch.optim.AdamW([param], lr=1e-4)
        param.grad = torch.ones(3)
        opt.step()
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=100)
        obj.update(optimizer_states=[opt.state_dict()], lr_schedulers=[sched.state_dict()])
    else:
        raise ValueError(kind)
    obj.update(_rfdetr111_description(preset, model_name, class_names, resolution))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path)
    return path
