"""Model preset names and the facts the config checks about them (no torch needed).

    preset_family("rfdetr-nano")            # -> "rfdetr"
    resolution_multiple("rfdetr-base")      # -> 56 (patch 14 x 4 windows per side)
    is_segmentation("rfdetr-seg-nano")      # -> True (predicts masks as well as boxes)
"""

from __future__ import annotations

from typing import Literal

# Old ResNet preset names -> their new names ("nano" now means RF-DETR's nano to most users).
RENAMED_PRESETS = {"nano": "rtdetr-r18", "small": "rtdetr-r34", "medium": "rtdetr-r50"}
RTDETR_PRESETS = ("rtdetr-r18", "rtdetr-r34", "rtdetr-r50")
RFDETR_DETECTION_PRESETS = ("rfdetr-nano", "rfdetr-small", "rfdetr-medium", "rfdetr-base",
                            "rfdetr-large")
RFDETR_SEGMENTATION_PRESETS = ("rfdetr-seg-preview", "rfdetr-seg-nano", "rfdetr-seg-small",
                               "rfdetr-seg-medium", "rfdetr-seg-large", "rfdetr-seg-xlarge",
                               "rfdetr-seg-2xlarge")
RFDETR_PRESETS = RFDETR_DETECTION_PRESETS + RFDETR_SEGMENTATION_PRESETS
# Input side must be a multiple of patch size x windows per side (RF-DETR's windowing).
RFDETR_RESOLUTION_MULTIPLE = {"rfdetr-nano": 32, "rfdetr-small": 32, "rfdetr-medium": 32,
                              "rfdetr-base": 56, "rfdetr-large": 32,
                              "rfdetr-seg-nano": 12,  # one window: patch 12 alone
                              **{p: 24 for p in RFDETR_SEGMENTATION_PRESETS
                                 if p != "rfdetr-seg-nano"}}


def preset_family(preset: str) -> Literal["rtdetr", "rfdetr"]:
    return "rfdetr" if preset.startswith("rfdetr-") else "rtdetr"


def resolution_multiple(preset: str) -> int:
    return RFDETR_RESOLUTION_MULTIPLE.get(preset, 32)


def is_segmentation(preset: str) -> bool:
    """Presets whose model predicts per-query masks (RF-DETR Seg)."""
    return preset in RFDETR_SEGMENTATION_PRESETS


# Evaluation per family: (detections kept per image by the postprocessor, COCOeval maxDets at
# which AP and the last AR are reported). RF-DETR keeps num_select = 300 (its TrainConfig) and
# reports COCO at maxDets 500 (eval_max_dets, its patched summarize); COCO's usual is 100 / 100.
EVAL_SETTINGS = {"rfdetr": (300, 500), "rtdetr": (100, 100)}


def eval_settings(preset: str) -> tuple[int, int]:
    """(num_select, max_dets) of the preset's family, e.g. (300, 500) for rfdetr-nano."""
    return EVAL_SETTINGS[preset_family(preset)]
