"""Presets and the one ``build`` a training loop needs: (model, criterion, postprocessor).

    model, criterion, postprocessor = build(cfg.model, cfg.loss, num_classes=len(classes))
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from raydetr.config import LossConfig, ModelConfig
from raydetr.loss.criterion import SetCriterion
from raydetr.loss.matcher import HungarianMatcher
from raydetr.model.backbone import freeze_batchnorm, load_resnet_state_dict
from raydetr.model.detr import DETR
from raydetr.postprocess import PostProcessor

# Per preset: every architecture knob. ModelConfig's None fields fall back to these.
PRESETS: dict[str, dict[str, Any]] = {
    "nano": dict(resolution=384, backbone="resnet18", hidden_dim=128, num_queries=100,
                 num_decoder_layers=3, nhead=8, encoder_ffn_dim=512, decoder_ffn_dim=512,
                 csp_blocks=1, num_points=4),
    "small": dict(resolution=512, backbone="resnet34", hidden_dim=256, num_queries=300,
                  num_decoder_layers=4, nhead=8, encoder_ffn_dim=1024, decoder_ffn_dim=1024,
                  csp_blocks=3, num_points=4),
    "medium": dict(resolution=640, backbone="resnet50", hidden_dim=256, num_queries=300,
                   num_decoder_layers=6, nhead=8, encoder_ffn_dim=1024, decoder_ffn_dim=1024,
                   csp_blocks=3, num_points=4),
}


def resolve_model_config(cfg: ModelConfig) -> dict[str, Any]:
    """Preset values with the config's explicit (non-None) fields on top; every key filled."""
    if cfg.preset not in PRESETS:
        raise ValueError(f"model.preset '{cfg.preset}' unknown; choose one of {sorted(PRESETS)}")
    out = dict(PRESETS[cfg.preset])
    for key in ("resolution", "num_queries", "backbone"):
        value = getattr(cfg, key)
        if value is not None:
            out[key] = value
    out.update(preset=cfg.preset, backbone_weights=cfg.backbone_weights,
               gradient_checkpointing=cfg.gradient_checkpointing,
               num_denoising=cfg.num_denoising)
    return out


def build_model(model_cfg: ModelConfig, num_classes: int) -> DETR:
    """The detector alone (e.g. to load published weights)."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1 (from the dataset's classes), got {num_classes}")
    r = resolve_model_config(model_cfg)
    model = DETR(
        num_classes, backbone=r["backbone"], hidden_dim=r["hidden_dim"],
        num_queries=r["num_queries"], num_decoder_layers=r["num_decoder_layers"],
        nhead=r["nhead"], encoder_ffn_dim=r["encoder_ffn_dim"],
        decoder_ffn_dim=r["decoder_ffn_dim"], csp_blocks=r["csp_blocks"],
        num_points=r["num_points"], num_denoising=r["num_denoising"],
        gradient_checkpointing=r["gradient_checkpointing"],
    )
    if r["backbone_weights"]:
        load_backbone_weights(model, r["backbone_weights"])
    return model


def load_backbone_weights(model: nn.Module, path: str | Path) -> None:
    """Load a local torchvision ResNet state_dict into ``model.backbone``, then freeze its BN."""
    backbone = model.backbone
    load_resnet_state_dict(backbone, path)
    freeze_batchnorm(backbone)


def build(model_cfg: ModelConfig, loss_cfg: LossConfig, num_classes: int
          ) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(model, criterion, postprocessor) for ``num_classes`` dataset classes."""
    model = build_model(model_cfg, num_classes)
    matcher = HungarianMatcher(loss_cfg.cost_class, loss_cfg.cost_bbox, loss_cfg.cost_giou,
                               loss_cfg.focal_alpha, loss_cfg.focal_gamma)
    criterion = SetCriterion(num_classes, matcher, loss_cfg)
    return model, criterion, PostProcessor()
