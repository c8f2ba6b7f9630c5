"""RF-DETR's model family (nano / small / medium / base) in plain PyTorch."""

from raydetr.model.rfdetr.lwdetr import LWDETR, build_rfdetr
from raydetr.model.rfdetr.presets import RFDETR_PRESETS, resolution_step

__all__ = ["LWDETR", "RFDETR_PRESETS", "build_rfdetr", "resolution_step"]
