"""RF-DETR's detector (``LWDETR``): windowed DINOv2 -> projector -> two-stage LW-DETR decoder,
plus, for the Seg presets, the mask head (raydetr/model/rfdetr/segmentation.py).

Parameter names and shapes equal RF-DETR's ``state_dict`` (rf-detr 1.4.1), so its checkpoints
load with zero missing and zero unexpected keys. Outputs (``pred_boxes`` normalised cxcywh of
the input image, no sigmoid; ``pred_logits`` raw; ``pred_masks`` mask logits at input / 4)
equal RF-DETR's for the same weights.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import Tensor, nn

from raydetr.model.rfdetr.backbone import WindowedDinov2
from raydetr.model.rfdetr.decoder import MLP
from raydetr.model.rfdetr.presets import RFDETR_PRESETS
from raydetr.model.rfdetr.projector import Projector
from raydetr.model.rfdetr.segmentation import SegmentationHead
from raydetr.model.rfdetr.transformer import Transformer, apply_box_delta


class DinoV2Encoder(nn.Module):
    """Holds the ViT as ``encoder`` (RF-DETR's extra nesting level in the key names)."""

    def __init__(self, vit: WindowedDinov2) -> None:
        super().__init__()
        self.encoder = vit


class Backbone(nn.Module):
    """ViT taps -> projector: one (B, hidden_dim, H/ps, W/ps) map (``backbone.0`` in keys)."""

    def __init__(self, vit: WindowedDinov2, hidden_dim: int, num_blocks: int) -> None:
        super().__init__()
        self.encoder = DinoV2Encoder(vit)
        width = vit.layernorm.normalized_shape[0]
        self.projector = Projector([width] * len(vit.out_feature_indexes), hidden_dim,
                                   num_blocks)

    def forward(self, images: Tensor) -> Tensor:
        return self.projector(self.encoder.encoder(images))[0]


class LWDETR(nn.Module):
    def __init__(self, num_classes: int, *, resolution: int, patch_size: int, num_windows: int,
                 positional_encoding_size: int, out_feature_indexes: list[int], dec_layers: int,
                 hidden_dim: int, sa_nheads: int, ca_nheads: int, dec_n_points: int,
                 dim_feedforward: int, num_queries: int, group_detr: int,
                 vit_width: int, vit_depth: int, vit_heads: int, vit_mlp_ratio: int,
                 projector_blocks: int, segmentation_head: bool = False,
                 gradient_checkpointing: bool = False) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.num_queries = num_queries
        self.group_detr = group_detr
        self.return_features = False  # set by the distillation teacher (raydetr.train.teacher)
        self.resolution = resolution
        self.block_size = patch_size * num_windows
        # Eval-mode masks of the aux layers and the encoder (as RF-DETR returns them). A
        # consumer that only post-processes the final layer sets this False: the same
        # pred_masks, without L dense (B, Q, H/4, W/4) tensors it would never read.
        self.eval_aux_masks = True
        # Registration order = RF-DETR's state_dict order: transformer, heads, queries, backbone.
        self.transformer = Transformer(hidden_dim, sa_nheads, ca_nheads, num_queries, dec_layers,
                                       dim_feedforward, group_detr, n_levels=1,
                                       n_points=dec_n_points)
        self.class_embed = nn.Linear(hidden_dim, num_classes)
        self.bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        # Seg presets: one mask block per decoder layer; PyTorch's default init (as RF-DETR).
        self.segmentation_head = (SegmentationHead(hidden_dim, dec_layers,
                                                   gradient_checkpointing=gradient_checkpointing)
                                  if segmentation_head else None)
        self.refpoint_embed = nn.Embedding(num_queries * group_detr, 4)
        self.query_feat = nn.Embedding(num_queries * group_detr, hidden_dim)
        vit = WindowedDinov2(vit_width, vit_depth, vit_heads, vit_mlp_ratio, patch_size,
                             num_windows, positional_encoding_size, out_feature_indexes,
                             gradient_checkpointing)
        self.backbone = nn.ModuleList([Backbone(vit, hidden_dim, projector_blocks)])
        self._init_heads()

    def _init_heads(self) -> None:
        nn.init.zeros_(self.refpoint_embed.weight)
        prior = 0.01  # focal-loss prior: every class starts at p = 0.01
        with torch.no_grad():
            self.class_embed.bias.fill_(-math.log((1 - prior) / prior))
        nn.init.zeros_(self.bbox_embed.layers[-1].weight)
        nn.init.zeros_(self.bbox_embed.layers[-1].bias)
        # The two-stage heads start as copies of the final heads, one per group.
        t = self.transformer
        t.enc_out_bbox_embed.extend(copy.deepcopy(self.bbox_embed) for _ in range(self.group_detr))
        t.enc_out_class_embed.extend(
            copy.deepcopy(self.class_embed) for _ in range(self.group_detr))

    @property
    def vit(self) -> WindowedDinov2:
        return self.backbone[0].encoder.encoder

    @property
    def gradient_checkpointing(self) -> bool:
        return self.vit.gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, enabled: bool) -> None:
        self.vit.gradient_checkpointing = bool(enabled)
        if self.segmentation_head is not None:
            self.segmentation_head.gradient_checkpointing = bool(enabled)

    def reinitialize_detection_head(self, num_classes: int) -> None:
        """Resize every class head to ``num_classes`` rows by tiling the existing rows.

        RF-DETR's rule: rows repeat ceil(n / old) times then truncate to n, so 91 -> 3 keeps
        rows 0..2 and 91 -> 100 gives rows 0..90 then 0..8. Box heads are untouched.
        """
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        heads = [self.class_embed, *self.transformer.enc_out_class_embed]
        for head in heads:
            old = head.weight.shape[0]
            reps = math.ceil(num_classes / old)
            with torch.no_grad():
                weight = head.weight.repeat(reps, 1)[:num_classes].clone()
                bias = head.bias.repeat(reps)[:num_classes].clone()
            head.weight = nn.Parameter(weight, requires_grad=head.weight.requires_grad)
            head.bias = nn.Parameter(bias, requires_grad=head.bias.requires_grad)
            head.out_features = num_classes
        self.num_classes = num_classes

    def check_input(self, images: Tensor) -> None:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
        h, w = images.shape[-2:]
        if h != w or h % self.block_size:
            raise ValueError(
                f"RF-DETR needs square images with sides a multiple of {self.block_size} "
                f"(patch size x windows per side), got {h}x{w}; resize to e.g. "
                f"{self.resolution}x{self.resolution}")

    def forward(self, images: Tensor, targets: Any = None) -> dict[str, Any]:
        """images (B, 3, H, W) ImageNet-normalised; ``targets`` is ignored (loss is separate).

        -> pred_logits (B, Q, C), pred_boxes (B, Q, 4) normalised cxcywh, aux_outputs (earlier
        decoder layers), enc_outputs (two-stage selection). Q = num_queries in eval,
        num_queries * group_detr in training.

        Seg presets add ``pred_masks`` to the final, every aux and the encoder output: in eval
        (B, Q, H/4, W/4) mask logits of the input image; in training RF-DETR's factors
        {spatial_features (B, D, H/4, W/4), query_features (B, Q, D), bias (1,)}, whose
        einsum + bias gives the logits (raydetr.loss.masks forms them for matched queries only).
        ``eval_aux_masks = False`` leaves the aux and encoder masks out in eval (inference).
        With ``return_features`` set (distillation's feature term): features, a one-item list
        with the projector's (B, D, H/ps, W/ps) map that the decoder attends to.
        """
        self.check_input(images)
        feature_map = self.backbone[0](images)
        if self.training:
            refpoints, queries = self.refpoint_embed.weight, self.query_feat.weight
        else:
            refpoints = self.refpoint_embed.weight[:self.num_queries]
            queries = self.query_feat.weight[:self.num_queries]
        hs, ref_boxes, enc_feats, enc_boxes = self.transformer(feature_map, refpoints, queries)
        boxes = apply_box_delta(self.bbox_embed(hs), ref_boxes[None])
        logits = self.class_embed(hs)
        groups = self.group_detr if self.training else 1
        enc_logits = torch.cat([
            head(chunk) for head, chunk in
            zip(self.transformer.enc_out_class_embed, enc_feats.chunk(groups, dim=1))], dim=1)
        out: dict[str, Any] = {
            "pred_logits": logits[-1], "pred_boxes": boxes[-1],
            "aux_outputs": [{"pred_logits": a, "pred_boxes": b}
                            for a, b in zip(logits[:-1], boxes[:-1])],
            "enc_outputs": {"pred_logits": enc_logits, "pred_boxes": enc_boxes},
        }
        if self.segmentation_head is not None:
            image_hw = (images.shape[-2], images.shape[-1])
            dense = not self.training
            every = self.training or self.eval_aux_masks
            masks = self.segmentation_head(feature_map, hs, image_hw, dense, last_only=not every)
            out["pred_masks"] = masks[-1]
            if every:
                for aux, m in zip(out["aux_outputs"], masks[:-1]):
                    aux["pred_masks"] = m
                out["enc_outputs"]["pred_masks"] = self.segmentation_head.encoder_masks(
                    feature_map, enc_feats, image_hw, dense)
        if self.return_features:
            out["features"] = [feature_map]
        return out


def build_rfdetr(preset: str, num_classes: int = 91, gradient_checkpointing: bool = False
                 ) -> LWDETR:
    """An RF-DETR model with RF-DETR's init (no pretrained weights are loaded here).
    Seg presets (``rfdetr-seg-*``) carry the mask head; see ``LWDETR.forward``."""
    if preset not in RFDETR_PRESETS:
        raise ValueError(f"unknown RF-DETR preset '{preset}'; choose one of "
                         f"{sorted(RFDETR_PRESETS)}")
    # num_select is the postprocessor's (top-k detections), not the model's.
    cfg = {k: v for k, v in RFDETR_PRESETS[preset].items() if k not in ("num_classes", "num_select")}
    return LWDETR(num_classes, gradient_checkpointing=gradient_checkpointing, **cfg)
