"""RF-DETR's configs: the detectors ``RFDETR{Nano,Small,Medium,Base,Large}Config`` and the
instance-segmentation models ``RFDETRSeg{Preview,Nano,Small,Medium,Large,XLarge,2XLarge}Config``.

Every value here is RF-DETR's published config (rf-detr 1.4.1; Large's query counts as 1.11
states them explicitly); together they fix the architecture and so the ``state_dict`` keys and
shapes a checkpoint must have. ``num_select`` is the top-k RF-DETR's ``predict`` keeps.
"""

from __future__ import annotations

from typing import Any

# Shared by all configs: DINOv2-small windowed ViT, one P4 projector level, LW-DETR decoder.
_COMMON: dict[str, Any] = dict(
    vit_width=384, vit_depth=12, vit_heads=6, vit_mlp_ratio=4,
    hidden_dim=256, sa_nheads=8, ca_nheads=16, dec_n_points=2, dim_feedforward=2048,
    num_queries=300, num_select=300, group_detr=13, projector_blocks=3,
    # RF-DETR's COCO models: 90 category ids + 1, the logit index is the COCO category id.
    num_classes=91, segmentation_head=False,
)
_TAPS = [3, 6, 9, 12]


def _seg(resolution: int, num_windows: int, dec_layers: int, queries: int) -> dict[str, Any]:
    # Every seg config: patch 12 and a position grid of resolution / 12 (never interpolated at
    # the native size); masks at input / 4 from a head with one block per decoder layer.
    return dict(_COMMON, resolution=resolution, patch_size=12, num_windows=num_windows,
                positional_encoding_size=resolution // 12, out_feature_indexes=_TAPS,
                dec_layers=dec_layers, num_queries=queries, num_select=queries,
                segmentation_head=True)


RFDETR_PRESETS: dict[str, dict[str, Any]] = {
    "rfdetr-nano": dict(_COMMON, resolution=384, patch_size=16, num_windows=2,
                        positional_encoding_size=24, out_feature_indexes=_TAPS, dec_layers=2),
    "rfdetr-small": dict(_COMMON, resolution=512, patch_size=16, num_windows=2,
                         positional_encoding_size=32, out_feature_indexes=_TAPS, dec_layers=3),
    "rfdetr-medium": dict(_COMMON, resolution=576, patch_size=16, num_windows=2,
                          positional_encoding_size=36, out_feature_indexes=_TAPS, dec_layers=4),
    "rfdetr-base": dict(_COMMON, resolution=560, patch_size=14, num_windows=4,
                        positional_encoding_size=37, out_feature_indexes=[2, 5, 8, 11],
                        dec_layers=3),
    # RF-DETR Large (2026, rf-detr-large-2026.pth): medium's layout at 704 px.
    "rfdetr-large": dict(_COMMON, resolution=704, patch_size=16, num_windows=2,
                         positional_encoding_size=44, out_feature_indexes=_TAPS, dec_layers=4),
    "rfdetr-seg-preview": _seg(432, 2, 4, 200),
    "rfdetr-seg-nano": _seg(312, 1, 4, 100),
    "rfdetr-seg-small": _seg(384, 2, 4, 100),
    "rfdetr-seg-medium": _seg(432, 2, 5, 200),
    "rfdetr-seg-large": _seg(504, 2, 5, 200),
    "rfdetr-seg-xlarge": _seg(624, 2, 6, 300),
    "rfdetr-seg-2xlarge": _seg(768, 2, 6, 300),
}


def resolution_step(preset: str) -> int:
    """Input sides must be a multiple of this (patch size x windows per side)."""
    p = RFDETR_PRESETS[preset]
    return int(p["patch_size"] * p["num_windows"])


def is_segmentation(preset: str) -> bool:
    """True for the presets that predict masks (``pred_masks``) besides boxes."""
    return bool(RFDETR_PRESETS.get(preset, {}).get("segmentation_head", False))
