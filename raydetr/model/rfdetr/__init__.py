"""RF-DETR's model family (nano / small / medium / base / large, and the seven Seg models) in
plain PyTorch."""

from raydetr.model.rfdetr.lwdetr import LWDETR, build_rfdetr
from raydetr.model.rfdetr.presets import RFDETR_PRESETS, is_segmentation, resolution_step

__all__ = ["LWDETR", "RFDETR_PRESETS", "build_rfdetr", "is_segmentation", "resolution_step"]
