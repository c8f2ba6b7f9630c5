"""Presets and the one ``build`` a training loop needs: (model, criterion, postprocessor).

    model, criterion, postprocessor = build(cfg.model, cfg.loss, num_classes=len(classes))

Two families, chosen by the preset's name: ``rtdetr-r18|r34|r50`` (ResNet + RT-DETR-style hybrid
encoder, ours; trains from scratch on a CPU) and ``rfdetr-nano|small|medium|base|large`` plus
the segmentation models ``rfdetr-seg-preview|nano|small|medium|large|xlarge|2xlarge`` (RF-DETR's
architecture, key for key; raydetr/model/rfdetr/, fine-tuned from RF-DETR's checkpoints).

Seg presets: the model adds ``pred_masks`` to its outputs (see LWDETR.forward) and the criterion
adds RF-DETR's mask losses and matcher costs; targets must then carry ``masks``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from raydetr.config import LossConfig, ModelConfig
from raydetr.config.presets import is_segmentation, preset_family
from raydetr.loss.criterion import SetCriterion
from raydetr.loss.matcher import HungarianMatcher
from raydetr.model.backbone import freeze_batchnorm, load_resnet_state_dict
from raydetr.model.detr import DETR
from raydetr.model.postprocess import PostProcessor
from raydetr.model.rfdetr import build_rfdetr
from raydetr.model.rfdetr.presets import RFDETR_PRESETS

# Per preset: every architecture knob. ModelConfig's None fields fall back to these.
# Named rtdetr-<backbone>: the ResNet backbone + hybrid encoder + deformable decoder with
# denoising is RT-DETR's design, and the backbone is what tells the three apart.
PRESETS: dict[str, dict[str, Any]] = {
    "rtdetr-r18": dict(resolution=384, backbone="resnet18", hidden_dim=128, num_queries=100,
                 num_decoder_layers=3, nhead=8, encoder_ffn_dim=512, decoder_ffn_dim=512,
                 csp_blocks=1, num_points=4),
    "rtdetr-r34": dict(resolution=512, backbone="resnet34", hidden_dim=256, num_queries=300,
                  num_decoder_layers=4, nhead=8, encoder_ffn_dim=1024, decoder_ffn_dim=1024,
                  csp_blocks=3, num_points=4),
    "rtdetr-r50": dict(resolution=640, backbone="resnet50", hidden_dim=256, num_queries=300,
                   num_decoder_layers=6, nhead=8, encoder_ffn_dim=1024, decoder_ffn_dim=1024,
                   csp_blocks=3, num_points=4),
}


def resolve_model_config(cfg: ModelConfig) -> dict[str, Any]:
    """Preset values with the config's explicit (non-None) fields on top; every key filled."""
    if preset_family(cfg.preset) == "rfdetr":
        arch = RFDETR_PRESETS[cfg.preset]
        return dict(preset=cfg.preset, family="rfdetr",
                    resolution=cfg.resolution or arch["resolution"],
                    num_queries=cfg.num_queries or arch["num_queries"],
                    gradient_checkpointing=cfg.gradient_checkpointing)
    if cfg.preset not in PRESETS:
        raise ValueError(f"model.preset '{cfg.preset}' unknown; choose one of {sorted(PRESETS)}")
    out = dict(PRESETS[cfg.preset])
    for key in ("resolution", "num_queries", "backbone"):
        value = getattr(cfg, key)
        if value is not None:
            out[key] = value
    out.update(preset=cfg.preset, family="rtdetr", backbone_weights=cfg.backbone_weights,
               gradient_checkpointing=cfg.gradient_checkpointing,
               num_denoising=cfg.num_denoising)
    return out


def build_model(model_cfg: ModelConfig, num_classes: int) -> nn.Module:
    """The detector alone (e.g. to load published weights)."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1 (from the dataset's classes), got {num_classes}")
    r = resolve_model_config(model_cfg)
    if r["family"] == "rfdetr":

        native = RFDETR_PRESETS[model_cfg.preset]["num_queries"]
        if r["num_queries"] != native:
            raise ValueError(f"model.num_queries: {model_cfg.preset} has RF-DETR's {native} "
                             "queries (its checkpoints carry them); leave it unset")
        return build_rfdetr(model_cfg.preset, num_classes=num_classes,
                            gradient_checkpointing=r["gradient_checkpointing"])
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
    return model, build_criterion(model_cfg, loss_cfg, model, num_classes), PostProcessor()


def build_criterion(model_cfg: ModelConfig, loss_cfg: LossConfig, model: nn.Module,
                    num_classes: int) -> SetCriterion:
    """The loss for ``model``; Seg presets get the mask terms and mask matching costs."""
    masks = is_segmentation(model_cfg.preset)
    matcher = HungarianMatcher(loss_cfg.cost_class, loss_cfg.cost_bbox, loss_cfg.cost_giou,
                               loss_cfg.focal_alpha, loss_cfg.focal_gamma, masks=masks,
                               cost_mask_ce=loss_cfg.cost_mask_ce,
                               cost_mask_dice=loss_cfg.cost_mask_dice,
                               mask_point_sample_ratio=loss_cfg.mask_point_sample_ratio)
    # RF-DETR trains group_detr query groups (one in eval); the criterion matches each group
    return SetCriterion(num_classes, matcher, loss_cfg,
                        group_detr=int(getattr(model, "group_detr", 1)), masks=masks)
