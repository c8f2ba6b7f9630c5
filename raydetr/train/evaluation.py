"""Epoch-end evaluation on the workers: every variant through one decode; each rank matches
its own images (raydetr.eval.distributed) and only the compact matches go to rank 0.

The EMA shadows are evaluated through ONE eval model whose weights are swapped in per variant,
so K decays cost one model copy on the model's device, not K (and with ``ema.device=cpu`` the
shadows themselves stay off the accelerator).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from raydetr.eval.coco import has_masks, with_segm
from raydetr.eval.distributed import coco_metrics_of_matches, match_records, merge
from raydetr.eval.matching import DEFAULT_MAX_DETS, Matches
from raydetr.train.engine import predict_records


class ShadowEvaluator:
    """The regular model plus one eval model that takes each EMA shadow in turn."""

    def __init__(self, model: nn.Module, ema: Any = None) -> None:
        self.model = model
        self.ema = ema
        self.eval_model = copy.deepcopy(model).eval() if ema is not None else None
        self._loaded: int | None = None  # shadow index now in eval_model

    def variants(self) -> dict[str, nn.Module]:
        """``"regular"`` and each shadow's label (``Shadow.label``) -> the model to run."""
        out: dict[str, nn.Module] = {"regular": self.model}
        if self.ema is not None:
            for shadow in self.ema.shadows:
                out[shadow.label] = self.eval_model
        return out

    def before(self, name: str) -> None:
        """Swap shadow ``name`` (a label) into the eval model (only when another one is
        loaded)."""
        if name == "regular" or self.ema is None:
            return
        index = next(s.index for s in self.ema.shadows if s.label == name)
        if index != self._loaded:
            self.ema.load_into(self.eval_model, index)
            self._loaded = index

    def predict(self, postprocessor: nn.Module, batches: Iterable[dict],
                device: torch.device, amp_dtype: torch.dtype | None,
                top_k: int = 100, on_masks: Any = None) -> dict[str, list[dict]]:
        """Records of every variant, ``top_k`` detections per image (the family's num_select);
        ``on_masks``: see ``predict_records`` (e.g. a :class:`MaskMatcher`)."""
        self._loaded = None  # the shadows moved since the last evaluation
        return predict_records(self.variants(), postprocessor, batches, device, amp_dtype,
                               top_k=top_k, before=self.before, on_masks=on_masks)

    def model_copies_bytes(self) -> int:
        """Bytes of parameters and buffers held by eval-only model copies."""
        if self.eval_model is None:
            return 0
        return sum(t.numel() * t.element_size()
                   for t in (*self.eval_model.parameters(), *self.eval_model.buffers()))


class MaskMatcher:
    """``predict_records``' ``on_masks``: matches each batch's masks (COCO segm, pycocotools'
    evaluate() on those images) as they come, so a rank holds one batch's RLEs, never its
    split's; ``parts()`` is this rank's segm :class:`Matches` per variant."""

    def __init__(self, classes: Sequence[str], max_dets: Sequence[int] = DEFAULT_MAX_DETS):
        self.classes, self.max_dets = list(classes), tuple(max_dets)
        self.batches: dict[str, list[Matches]] = {}

    def __call__(self, variant: str, records: list[dict]) -> None:
        self.batches.setdefault(variant, []).append(
            match_records(records, self.classes, self.max_dets, iou_type="segm"))

    def part(self, variant: str) -> Matches:
        """This rank's segm matches of ``variant`` (empty, with the same parameters, if none)."""
        got = self.batches.get(variant)
        return merge(got) if got else match_records([], self.classes, self.max_dets, "segm")


def gather_matches(parts: dict[Any, Matches], rank: int,
                   world: int) -> dict[Any, list[Matches]] | None:
    """Every rank's per-variant :class:`Matches`, as lists in rank order on rank 0 (None on the
    other ranks). Numpy arrays only: a few bytes per kept detection, not the detections."""
    if world == 1:
        return {k: [v] for k, v in parts.items()}
    gathered: list[Any] | None = [None] * world if rank == 0 else None
    dist.gather_object(parts, gathered, dst=0)
    if rank != 0:
        return None
    return {k: [part[k] for part in gathered] for k in parts}


def evaluate_matches(records: dict[str, list[dict]], classes: list[str], rank: int, world: int,
                     max_dets: Sequence[int] = DEFAULT_MAX_DETS, segm: bool = False,
                     masks: MaskMatcher | None = None
                     ) -> tuple[dict[str, dict[str, Any]] | None, dict[str, float]]:
    """COCO metrics per variant of every rank's records: match here, accumulate on rank 0.

    ``segm`` (a segmentation preset; every rank must pass the same): the masks are matched too
    (pycocotools' evaluate() on this rank's images), from the records' masks or, when the
    records came without them, from ``masks`` (the :class:`MaskMatcher` that matched them batch
    by batch), and each variant's dict also holds ``map_segm``, ``map50_segm``, ...
    (raydetr.eval.coco.with_segm).

    Returns (rank 0: {variant: coco_metrics dict}, else None) and this rank's seconds:
    ``eval_match_seconds`` (its matching), ``eval_gather_seconds`` (waiting for the slowest
    rank + the transfer), ``eval_accumulate_seconds`` (rank 0)."""
    t0 = time.perf_counter()
    parts = {(name, "bbox"): match_records(recs, classes, max_dets) for name, recs in records.items()}
    if segm:
        for name, recs in records.items():
            if masks is not None and recs and name not in masks.batches and not has_masks(recs):
                raise ValueError(
                    f"segm evaluation: none of this rank's {len(recs)} val images came with "
                    "masks (targets 'masks'); a segmentation preset needs a dataset with masks")
            parts[(name, "segm")] = (masks.part(name) if masks is not None and not has_masks(recs)
                                     else match_records(recs, classes, max_dets, iou_type="segm"))
    t1 = time.perf_counter()
    gathered = gather_matches(parts, rank, world)
    t2 = time.perf_counter()
    seconds = {"eval_match_seconds": t1 - t0, "eval_gather_seconds": t2 - t1}
    if gathered is None:
        return None, seconds
    metrics = {name: with_segm(coco_metrics_of_matches(gathered[(name, "bbox")], classes),
                               coco_metrics_of_matches(gathered[(name, "segm")], classes)
                               if segm else None)
               for name in records}
    seconds["eval_accumulate_seconds"] = time.perf_counter() - t2
    return metrics, seconds
