"""Dataset readers: COCO JSON, YOLO and Pascal VOC -> one canonical :class:`Record` form.

    from raydetr.data.dataset import read_dataset
    splits = read_dataset(Path("data/thermal-dogs-people"))   # format auto-detected
    splits["train"].records[0].boxes_xyxy                      # float32[N, 4], absolute pixels

Every reader validates as it goes. Hard problems (missing or undecodable image, box with
non-positive size, unknown category / class index, duplicate image id, empty split) are all
collected and raised together as one :class:`DatasetError` naming the file, the image or
annotation id and, for YOLO, the label line. Soft problems are fixed and counted in the split's
:class:`ValidationReport`: boxes sticking out of the image are clipped, declared image sizes that
disagree with the real file are replaced by the real size, COCO crowd regions are skipped.
Images without boxes are valid negatives. Nothing is dropped without being counted.

Split names are normalised to "train", "val", "test" (Roboflow/YOLO "valid" -> "val").
This module holds the record types and the validation helpers; the per-format readers live in
``raydetr/data/readers.py``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from raydetr.errors import UserError

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
SPLIT_DIRS = {"train": ("train",), "val": ("valid", "val", "validation"), "test": ("test",)}
MAX_LISTED = 20
CLIP_TOLERANCE_PX = 0.01  # float noise (e.g. YOLO 416.0000001) is clipped without being counted


class DatasetError(UserError, ValueError):
    """A problem in a dataset on disk that the user must fix; the message says where."""


@dataclass
class ValidationReport:
    """Counts of the soft fixes made while reading one split, plus one line per fix."""

    images: int = 0
    boxes: int = 0
    negatives: int = 0
    clipped_boxes: int = 0
    size_mismatches: int = 0
    skipped_crowd: int = 0
    masks: int = 0                # instances stored with a mask (datasets with masks only)
    box_masks: int = 0            # ... of which the box stands in (no segmentation given)
    clipped_masks: int = 0        # polygons with points outside the image, clipped
    dropped_mask_parts: int = 0   # polygon parts with fewer than 3 points, left out
    dropped_instances: int = 0    # instances dropped for their mask (no valid part, no pixels)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self, max_warnings: int = 50) -> dict[str, Any]:
        return {
            "images": self.images, "boxes": self.boxes, "negatives": self.negatives,
            "clipped_boxes": self.clipped_boxes, "size_mismatches": self.size_mismatches,
            "skipped_crowd": self.skipped_crowd, "masks": self.masks,
            "box_masks": self.box_masks, "clipped_masks": self.clipped_masks,
            "dropped_mask_parts": self.dropped_mask_parts,
            "dropped_instances": self.dropped_instances, "warnings_total": len(self.warnings),
            "warnings": self.warnings[:max_warnings],
        }


@dataclass
class Record:
    """One image. ``boxes_xyxy``: float32[N, 4] absolute pixels of the image file, clipped to
    [0, width] x [0, height]; ``labels``: int64[N] contiguous class index 0..C-1; ``masks``:
    None for a dataset without masks, else one COCO compressed-RLE ``counts`` (bytes) per
    instance at height x width (``raydetr.data.masks``)."""

    image_id: int
    file_name: str
    image_path: Path
    width: int
    height: int
    boxes_xyxy: np.ndarray
    labels: np.ndarray
    masks: list[bytes] | None = None


@dataclass
class SplitData:
    name: str
    records: list[Record]
    classes: list[str]
    source_format: str
    report: ValidationReport
    has_masks: bool = False


class Problems:
    """Collects hard errors so the user sees all of them at once, not one per run."""

    def __init__(self, src: Path) -> None:
        self.src, self.items = src, []

    def add(self, message: str) -> None:
        self.items.append(message)

    def raise_if_any(self) -> None:
        if not self.items:
            return
        shown = self.items[:MAX_LISTED]
        text = f"{len(self.items)} problem(s) in dataset {self.src}:\n" + "\n".join(
            f"  - {m}" for m in shown
        )
        if len(self.items) > len(shown):
            text += f"\n  ... and {len(self.items) - len(shown)} more"
        raise DatasetError(text + "\nFix the source dataset (or remove the bad entries) and rerun.")


def check_image(path: Path, where: str, problems: Problems) -> tuple[int, int] | None:
    """(width, height) of a readable image, else None and a problem naming ``where``."""
    if not path.is_file():
        problems.add(f"{where}: image file not found: {path}")
        return None
    try:
        with Image.open(path) as im:
            size = im.size
            im.verify()
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, ValueError...)
        problems.add(f"{where}: cannot decode image {path}: {exc}")
        return None
    return size


def check_box(xyxy: Sequence[float], w: int, h: int, where: str, report: ValidationReport,
         problems: Problems) -> list[float] | None:
    """Validate one absolute xyxy box; clip it to the image (counted) or record a problem."""
    x1, y1, x2, y2 = (float(v) for v in xyxy)
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        problems.add(f"{where}: box has non-finite coordinates {xyxy}")
        return None
    if x2 <= x1 or y2 <= y1:
        problems.add(f"{where}: box has non-positive size ({x2 - x1:g} x {y2 - y1:g} px)")
        return None
    c = [min(max(x1, 0.0), w), min(max(y1, 0.0), h), min(max(x2, 0.0), w), min(max(y2, 0.0), h)]
    if c[2] <= c[0] or c[3] <= c[1]:
        problems.add(f"{where}: box {[round(v, 2) for v in (x1, y1, x2, y2)]} lies entirely "
                     f"outside the {w}x{h} image")
        return None
    if max(abs(a - b) for a, b in zip(c, (x1, y1, x2, y2))) > CLIP_TOLERANCE_PX:
        report.clipped_boxes += 1
        report.warnings.append(f"{where}: box clipped to the {w}x{h} image")
    return c


def make_record(image_id: int, file_name: str, path: Path, w: int, h: int, boxes: list[list[float]],
            labels: list[int], report: ValidationReport, masks: list | None = None) -> Record:
    """``masks``: one entry per box (see ``raydetr.data.masks.finish_masks``) or None."""
    report.images += 1
    report.boxes += len(boxes)
    report.negatives += not boxes
    return Record(image_id, file_name, path, w, h,
                  np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(labels, np.int64),
                  masks)


def progress_bar(items: Sequence[Any], progress: bool, desc: str) -> Iterable[Any]:
    return tqdm(items, desc=desc, unit="img", disable=not progress, leave=False)


def split_from_name(name: str) -> str | None:
    low = name.lower()
    for split in ("train", "val", "test"):
        if split in low:
            return split
    return None


# ---------------------------------------------------------------- entry point
def detect_format(src: Path) -> str:
    """'coco', 'yolo' or 'voc' from the files present; DatasetError listing the layouts."""
    if src.is_file():
        if src.suffix == ".json":
            return "coco"
        if src.suffix in (".yaml", ".yml"):
            return "yolo"
    elif (src / "data.yaml").is_file() or (src / "data.yml").is_file():
        return "yolo"
    elif any((src / d / "_annotations.coco.json").is_file() for ds in SPLIT_DIRS.values() for d in ds):
        return "coco"
    elif (src / "Annotations").is_dir() and (src / "JPEGImages").is_dir():
        return "voc"
    elif any((src / "annotations").glob("*.json")) or any(src.glob("*.json")):
        return "coco"
    raise DatasetError(
        f"{src}: cannot tell the dataset format. Expected one of: COCO (a .json file, "
        "{train,valid,test}/_annotations.coco.json, or annotations/*.json + images), YOLO "
        "(data.yaml + <split>/images + <split>/labels), Pascal VOC (Annotations/, JPEGImages/, "
        "ImageSets/Main/*.txt). Or pass fmt='coco'|'yolo'|'voc'."
    )
