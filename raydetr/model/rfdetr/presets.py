"""RF-DETR's four detection configs (rf-detr 1.4.1, ``RFDETR{Nano,Small,Medium,Base}Config``).

Every value here is RF-DETR's published config; together they fix the architecture and so the
``state_dict`` keys and shapes a checkpoint must have.
"""

from __future__ import annotations

from typing import Any

# Shared by all four configs: DINOv2-small windowed ViT, one P4 projector level, LW-DETR decoder.
_COMMON: dict[str, Any] = dict(
    vit_width=384, vit_depth=12, vit_heads=6, vit_mlp_ratio=4,
    hidden_dim=256, sa_nheads=8, ca_nheads=16, dec_n_points=2, dim_feedforward=2048,
    num_queries=300, num_select=300, group_detr=13, projector_blocks=3,
    # RF-DETR's COCO models: 90 category ids + 1, the logit index is the COCO category id.
    num_classes=91,
)

RFDETR_PRESETS: dict[str, dict[str, Any]] = {
    "rfdetr-nano": dict(_COMMON, resolution=384, patch_size=16, num_windows=2,
                        positional_encoding_size=24, out_feature_indexes=[3, 6, 9, 12],
                        dec_layers=2),
    "rfdetr-small": dict(_COMMON, resolution=512, patch_size=16, num_windows=2,
                         positional_encoding_size=32, out_feature_indexes=[3, 6, 9, 12],
                         dec_layers=3),
    "rfdetr-medium": dict(_COMMON, resolution=576, patch_size=16, num_windows=2,
                          positional_encoding_size=36, out_feature_indexes=[3, 6, 9, 12],
                          dec_layers=4),
    "rfdetr-base": dict(_COMMON, resolution=560, patch_size=14, num_windows=4,
                        positional_encoding_size=37, out_feature_indexes=[2, 5, 8, 11],
                        dec_layers=3),
}


def resolution_step(preset: str) -> int:
    """Input sides must be a multiple of this (patch size x windows per side)."""
    p = RFDETR_PRESETS[preset]
    return int(p["patch_size"] * p["num_windows"])
