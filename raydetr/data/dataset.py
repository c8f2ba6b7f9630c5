"""Read and validate a dataset on disk (COCO / YOLO / VOC), dispatching to its reader.

    splits = read_dataset(Path("data/thermal-dogs-people"))   # format auto-detected

Its own module so that ``formats`` (types, checks) and ``readers`` (one reader per format) do
not import each other.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from raydetr.data import readers as r
from raydetr.data import yolo
from raydetr.data.formats import DatasetError, Problems, SplitData, detect_format


def read_dataset(src: Path | str, fmt: str | None = None, *, classes: Sequence[str] | None = None,
                 progress: bool = False) -> dict[str, SplitData]:
    """Read and validate a dataset; returns split name -> :class:`SplitData`.

    ``fmt``: 'coco' | 'yolo' | 'voc' | None (auto-detect). ``classes``: VOC class order (default:
    sorted names found in the XML). ``progress``: tqdm bar while images are checked.
    Raises DatasetError listing every hard problem found (up to 20, then a count).
    """
    src = Path(src).expanduser().resolve()
    if not src.exists():
        raise DatasetError(f"dataset not found: {src}")
    fmt = (fmt or detect_format(src)).lower()
    readers = {"coco": r.read_coco, "yolo": yolo.read_yolo, "voc": r.read_voc}
    if fmt not in readers:
        raise DatasetError(f"unknown dataset format '{fmt}'; use one of {sorted(readers)}")
    problems = Problems(src)
    splits = readers[fmt](src, problems, progress, classes=classes)
    problems.raise_if_any()
    return splits
