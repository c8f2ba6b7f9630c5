"""Rows of a prepared dataset -> model batches, through Ray Data or plain pyarrow.

    Batch = {"images": float32[B, 3, S, S] (ImageNet-normalised),
             "targets": [{"labels": int64[N], "boxes": float32[N, 4] cxcywh in [0, 1] of the
                          (augmented) image, "image_id": int64 scalar, "orig_size": int64[2] (h, w)
                          of the stored image}, ...]}

Ray Data (workers):
    ds = read_split(prepared, "train")
    fn = make_collate(train=True, resolution=384, data_cfg=cfg.data, seed=0, epoch=e, rank=r)
    for batch in shard.iter_torch_batches(batch_size=4, collate_fn=fn): ...
Single process (tests, bench, local training):
    for batch in iter_local_batches(prepared, "train", batch_size=4, train=True, ...): ...

Determinism: every random draw (shuffle, crop, flip, multi-scale size) comes from a numpy
Generator seeded by (seed, epoch[, rank]), so the same inputs give the same batches.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from raydetr.config import DataConfig
from raydetr.data.formats import DatasetError
from raydetr.data.parquet import split_files
from raydetr.data.transforms import decode_image, normalise_boxes, random_geometric, to_model_input

Batch = dict[str, Any]
COLUMNS = ("image_id", "image", "width", "height", "boxes", "labels")


def scale_choices(resolution: int, scale_range: tuple[float, float]) -> list[int]:
    """Multiples of 32 within [lo * resolution, hi * resolution]; [resolution] if none fit."""
    lo, hi = scale_range
    sizes = [s for s in range(32, int(hi * resolution) + 1, 32) if s >= lo * resolution]
    return sizes or [resolution]


def rfdetr_scales(resolution: int, step: int) -> tuple[int, ...]:
    """RF-DETR's multi-scale training sizes: (resolution // step + k) * step for k = -5..5,
    ``step`` = patch size x windows (32 for nano/small/medium, 56 for base); sizes below one
    step (possible under ~6 steps of resolution) are left out. Nano at 384: 224..544."""
    base = resolution // step
    return tuple((base + k) * step for k in range(-5, 6) if base + k >= 1)


def collate(rows: dict[str, np.ndarray], *, train: bool, resolution: int, data_cfg: DataConfig,
            rng: np.random.Generator, scales: tuple[int, ...] | None = None) -> Batch:
    """Decode, augment (train only) and resize a batch of parquet rows (see module docstring).

    ``rows``: column -> array of length B, as Ray Data's numpy batches give them (``image``
    an object array of bytes; ``boxes`` / ``labels`` object arrays of 1-D arrays, or 2-D arrays
    when all rows happen to have the same number of values). Training with
    ``data_cfg.multi_scale`` resizes the whole batch to one size from ``scales`` (the model
    family's rule, e.g. ``rfdetr_scales``) or, when None, ``scale_choices``.
    """
    n = len(rows["image_id"])
    if n == 0:
        raise ValueError("collate got an empty batch")
    size = resolution
    if train and data_cfg.multi_scale:
        choices = scales or scale_choices(resolution, tuple(data_cfg.scale_range))
        size = int(choices[rng.integers(len(choices))])
    images, targets = [], []
    for i in range(n):
        image_id = int(rows["image_id"][i])
        try:
            image = decode_image(bytes(rows["image"][i]))
        except DatasetError as exc:
            raise DatasetError(f"image id {image_id}: {exc}") from None
        boxes = np.asarray(rows["boxes"][i], np.float32).reshape(-1, 4)
        labels = np.asarray(rows["labels"][i], np.int64).reshape(-1)
        orig_hw = image.shape[:2]
        if train:
            image, boxes, labels = random_geometric(image, boxes, labels, rng,
                                                    data_cfg.hflip_prob, data_cfg.crop_prob)
        h, w = image.shape[:2]
        images.append(image)
        targets.append({
            "labels": torch.from_numpy(labels.copy()),
            "boxes": torch.from_numpy(normalise_boxes(boxes, w, h)),
            "image_id": torch.tensor(image_id, dtype=torch.int64),
            "orig_size": torch.tensor(orig_hw, dtype=torch.int64),
        })
    return {"images": to_model_input(images, size), "targets": targets}


@functools.cache
def _ray_collate_class() -> type:
    """A ``NumpyBatchCollateFn`` subclass (Ray >= 2.47 deprecates plain functions as
    collate_fn). Built lazily: importing ray.data costs ~2 s, not needed by prepare or tests."""
    from ray.data.collate_fn import NumpyBatchCollateFn

    class RayCollate(NumpyBatchCollateFn):
        """Ray calls collate_fn from several prefetch threads at once, so a shared Generator
        would be drawn from in a racy order. Each batch gets its own Generator, seeded by
        (seed, epoch, rank) and the batch's first image id: augmentation is reproducible."""

        def __init__(self, shard: tuple[str, int, int], seed: tuple[int, ...],
                     **kwargs: Any) -> None:
            self.shard = shard
            self.seed = seed
            self.kwargs = kwargs

        def __call__(self, batch: dict[str, np.ndarray]) -> Batch | None:
            batch = select_rows(batch, *self.shard)
            ids = np.asarray(batch["image_id"])
            if len(ids) == 0:
                return None
            rng = np.random.default_rng([*self.seed, int(ids[0]) % 2**32, len(ids)])
            return collate(batch, rng=rng, **self.kwargs)

    return RayCollate


def make_collate(*, train: bool, resolution: int, data_cfg: DataConfig, seed: int, epoch: int,
                 rank: int = 0, world: int = 1, shard: str = "none",
                 scales: tuple[int, ...] | None = None
                 ) -> Callable[[dict[str, np.ndarray]], Batch | None]:
    """The collate_fn for ``iter_torch_batches``: ``collate`` bound to a fresh Generator seeded
    by (seed, epoch, rank). Make a new one each epoch.

    ``shard`` picks this rank's rows before anything is decoded:
      - ``"slice"``: the batch is a global batch of ``world`` equal parts; take part ``rank``
        (every worker streams the same seeded order, so the split is reproducible);
      - ``"image_id"``: rows whose ``image_id % world == rank`` (evaluation: nothing dropped);
        returns None when no row is left.
    """
    return _ray_collate_class()(shard=(shard, rank, world), seed=(seed, epoch, rank, 1),
                                train=train, resolution=resolution, data_cfg=data_cfg,
                                scales=scales)


def select_rows(rows: dict[str, np.ndarray], shard: str, rank: int, world: int
                ) -> dict[str, np.ndarray]:
    """This rank's rows of a numpy batch (see ``make_collate``)."""
    if shard == "none" or world == 1:
        return rows
    n = len(rows["image_id"])
    if shard == "slice":
        per = n // world
        sel = slice(rank * per, (rank + 1) * per)
    elif shard == "image_id":
        sel = (np.asarray(rows["image_id"]).astype(np.int64) % world) == rank
    else:
        raise ValueError(f"shard must be none, slice or image_id; got {shard!r}")
    return {k: np.asarray(v)[sel] for k, v in rows.items()}


def read_split(prepared_dir: Path | str, split: str) -> Any:
    """``ray.data.Dataset`` over the split's Parquet shards (one row per image)."""
    import ray.data

    return ray.data.read_parquet(split_files(prepared_dir, split))


def iter_local_batches(prepared_dir: Path | str, split: str, *, batch_size: int, train: bool,
                       resolution: int, data_cfg: DataConfig, seed: int = 0, epoch: int = 0,
                       shuffle: bool | None = None, drop_last: bool = False) -> Iterator[Batch]:
    """Batches read with pyarrow only (no Ray). ``shuffle`` defaults to ``train``; the order
    is a permutation seeded by (seed, epoch). Shards are memory-mapped, not loaded whole."""
    shuffle = train if shuffle is None else shuffle
    tables = [pq.read_table(f, columns=list(COLUMNS), memory_map=True)
              for f in split_files(prepared_dir, split)]
    index = [(t, r) for t, table in enumerate(tables) for r in range(table.num_rows)]
    order = np.arange(len(index))
    if shuffle:
        order = np.random.default_rng([seed, epoch, 0]).permutation(len(index))
    rng = np.random.default_rng([seed, epoch, 0, 1])
    stop = len(order) - (len(order) % batch_size if drop_last else 0)
    for start in range(0, stop, batch_size):
        picks = [index[k] for k in order[start:start + batch_size]]
        rows: dict[str, list[Any]] = {c: [] for c in COLUMNS}
        for t, r in picks:
            row = tables[t].slice(r, 1).to_pylist()[0]
            for c in COLUMNS:
                rows[c].append(row[c])
        arrays = {c: _object_array(v) for c, v in rows.items()}
        yield collate(arrays, train=train, resolution=resolution, data_cfg=data_cfg, rng=rng)


def _object_array(values: list[Any]) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out
