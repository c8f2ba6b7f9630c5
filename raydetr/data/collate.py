"""Parquet rows of a prepared dataset -> one model batch (decode, augment, resize).

    Batch = {"images": float32[B, 3, S, S] (ImageNet-normalised),
             "targets": [{"labels": int64[N], "boxes": float32[N, 4] cxcywh in [0, 1] of the
                          (augmented) image, "image_id": int64 scalar, "orig_size": int64[2] (h, w)
                          of the stored image}, ...]}

With ``masks=True`` (segmentation presets; the dataset must have masks) each target also has
"masks": bool[N, S, S], the instance masks after the same augmentation as the boxes, one size S
for the whole batch: the model input size (raydetr's pipeline and evaluation), or for
``data.augment=rfdetr`` the square size S before the per-step batch resize, where RF-DETR keeps
them too (the losses sample masks at normalised points, so any size lines up). Evaluation
targets also carry "masks_rle": the stored COCO RLE counts (bytes) per instance at
``orig_size``, for exact segm ground truth.

``loader.SplitReader`` decides which rows form a batch and reads them; this module turns them
into tensors. Every random draw comes from the Generator the caller passes.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import torch

from raydetr.config import DataConfig
from raydetr.data import masks as mk
from raydetr.data import rfdetr_augment
from raydetr.data.formats import DatasetError
from raydetr.data.transforms import (
    decode_image,
    normalise_boxes,
    random_geometric_instances,
    resize_masks,
    to_model_input,
)

Batch = dict[str, Any]
COLUMNS = ("image_id", "image", "width", "height", "boxes", "labels")
MASK_COLUMN = "masks"


def scale_choices(resolution: int, scale_range: tuple[float, float]) -> list[int]:
    """Multiples of 32 within [lo * resolution, hi * resolution]; [resolution] if none fit."""
    lo, hi = scale_range
    sizes = [s for s in range(32, int(hi * resolution) + 1, 32) if s >= lo * resolution]
    return sizes or [resolution]


def rfdetr_scales(resolution: int, step: int) -> tuple[int, ...]:
    """RF-DETR's multi-scale training sizes: (resolution // step + k) * step for k = -5..5,
    ``step`` = patch size x windows (32 for nano/small/medium, 56 for base); sizes below two
    steps are left out, as RF-DETR leaves them out. Nano at 384: 224..544."""
    base = resolution // step
    return tuple((base + k) * step for k in range(-5, 6) if base + k >= 2)


def collate(rows: dict[str, np.ndarray], *, train: bool, resolution: int, data_cfg: DataConfig,
            rng: np.random.Generator, scales: tuple[int, ...] | None = None,
            masks: bool = False, step_rng: np.random.Generator | None = None) -> Batch:
    """Decode, augment (train only) and resize a batch of parquet rows (see module docstring).

    ``rows``: column -> array of length B, as ``rows_of`` gives them (``image``
    an object array of bytes; ``boxes`` / ``labels`` object arrays of 1-D arrays, or 2-D arrays
    when all rows happen to have the same number of values). Training with
    ``data_cfg.multi_scale`` resizes the whole batch to one size from ``scales`` (the model
    family's rule, e.g. ``rfdetr_scales``) or, when None, ``scale_choices``. ``masks``: add
    each image's masks to its target (``rows`` then has a ``masks`` column).
    ``step_rng`` (default ``rng``) draws RF-DETR's per-step size: the loader gives every rank and
    micro-batch of one optimizer step the same one.
    """
    n = len(rows["image_id"])
    if n == 0:
        raise ValueError("collate got an empty batch")
    if train and data_cfg.augment == "rfdetr":
        return _collate_rfdetr(rows, resolution, data_cfg, rng, scales, masks, step_rng or rng)
    size = resolution
    if train and data_cfg.multi_scale:
        choices = scales or scale_choices(resolution, tuple(data_cfg.scale_range))
        size = int(choices[rng.integers(len(choices))])
    augment = train and data_cfg.augment == "raydetr"
    images, targets = [], []
    for i in range(n):
        image_id, image, boxes, labels = _decoded(rows, i)
        orig_hw = image.shape[:2]
        inst = _masks(rows, i, image_id, orig_hw, len(boxes)) if masks else None
        if augment:
            image, boxes, labels, inst = random_geometric_instances(
                image, boxes, labels, inst, rng, data_cfg.hflip_prob, data_cfg.crop_prob)
        h, w = image.shape[:2]
        images.append(image)
        target = {
            "labels": torch.from_numpy(labels.copy()),
            "boxes": torch.from_numpy(normalise_boxes(boxes, w, h)),
            "image_id": torch.tensor(image_id, dtype=torch.int64),
            "orig_size": torch.tensor(orig_hw, dtype=torch.int64),
        }
        if inst is not None:
            target["masks"] = torch.from_numpy(resize_masks(inst, size, size))
            if not train:
                target["masks_rle"] = [bytes(c) for c in rows[MASK_COLUMN][i]]
        targets.append(target)
    return {"images": to_model_input(images, size), "targets": targets}


def _decoded(rows: dict[str, np.ndarray], i: int) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    image_id = int(rows["image_id"][i])
    try:
        image = decode_image(bytes(rows["image"][i]))
    except DatasetError as exc:
        raise DatasetError(f"image id {image_id}: {exc}") from None
    boxes = np.asarray(rows["boxes"][i], np.float32).reshape(-1, 4)
    labels = np.asarray(rows["labels"][i], np.int64).reshape(-1)
    return image_id, image, boxes, labels


def _masks(rows: dict[str, np.ndarray], i: int, image_id: int, hw: tuple[int, int],
           n: int) -> np.ndarray:
    """Row ``i``'s masks, bool[n, h, w] at the stored image's size."""
    rles = rows[MASK_COLUMN][i] if MASK_COLUMN in rows else None
    if rles is None:
        raise DatasetError(f"image id {image_id}: the dataset has no masks; a segmentation "
                           "preset needs a dataset prepared from polygons or RLE")
    if len(rles) != n:
        raise DatasetError(f"image id {image_id}: {len(rles)} masks for {n} boxes; prepare the "
                           "dataset again")
    return mk.decode(rles, *hw)


def _collate_rfdetr(rows: dict[str, np.ndarray], resolution: int, data_cfg: DataConfig,
                    rng: np.random.Generator, scales: tuple[int, ...] | None,
                    masks: bool, step_rng: np.random.Generator) -> Batch:
    """RF-DETR's training pipeline (raydetr.data.rfdetr_augment): every image augmented and
    square-resized to the largest multi-scale size S, then the normalised batch resized to one
    size drawn from ``scales`` with ``step_rng`` (RF-DETR's per-step multi-scale). Without multi-scale (or
    without ``scales``) S is ``resolution`` and there is no batch resize."""
    multi = bool(data_cfg.multi_scale and scales)
    big = max(scales) if multi else resolution
    images, targets = [], []
    for i in range(len(rows["image_id"])):
        image_id, image, boxes, labels = _decoded(rows, i)
        inst = _masks(rows, i, image_id, image.shape[:2], len(boxes)) if masks else None
        out = rfdetr_augment.augment(rfdetr_augment.Sample(image, boxes, labels, inst), rng, big)
        images.append(out.image)
        target = {
            "labels": torch.from_numpy(out.labels.copy()),
            "boxes": torch.from_numpy(normalise_boxes(out.boxes_xyxy, big, big)),
            "image_id": torch.tensor(image_id, dtype=torch.int64),
            "orig_size": torch.tensor(image.shape[:2], dtype=torch.int64),
        }
        if out.masks is not None:
            target["masks"] = torch.from_numpy(np.ascontiguousarray(out.masks))
        targets.append(target)
    batch = to_model_input(images, big)
    if multi:
        batch = rfdetr_augment.batch_resize(batch, int(scales[step_rng.integers(len(scales))]))
    return {"images": batch, "targets": targets}


def rows_of(table: pa.Table) -> dict[str, np.ndarray]:
    """A pyarrow table of ``COLUMNS`` (+ ``masks``) -> column -> object array, as ``collate``
    takes them."""
    out = {}
    for c in (*COLUMNS, *([MASK_COLUMN] if MASK_COLUMN in table.column_names else [])):
        values = table.column(c).to_pylist()
        arr = np.empty(len(values), dtype=object)
        arr[:] = values
        out[c] = arr
    return out
