"""Epoch-end evaluation on the workers: every variant through one decode, records to rank 0.

The EMA shadows are evaluated through ONE eval model whose weights are swapped in per variant,
so K decays cost one model copy on the model's device, not K (and with ``ema.device=cpu`` the
shadows themselves stay off the accelerator).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from raydetr.train.engine import predict_records


def variant_name(decay: float) -> str:
    return f"ema@{decay}"


class ShadowEvaluator:
    """The regular model plus one eval model that takes each EMA shadow in turn."""

    def __init__(self, model: nn.Module, ema: Any = None) -> None:
        self.model = model
        self.ema = ema
        self.eval_model = copy.deepcopy(model).eval() if ema is not None else None
        self._loaded: int | None = None  # shadow index now in eval_model

    def variants(self) -> dict[str, nn.Module]:
        out: dict[str, nn.Module] = {"regular": self.model}
        if self.ema is not None:
            for d in self.ema.decays:
                out[variant_name(d)] = self.eval_model
        return out

    def before(self, name: str) -> None:
        """Swap shadow ``name`` into the eval model (only when another one is loaded)."""
        if name == "regular" or self.ema is None:
            return
        index = [variant_name(d) for d in self.ema.decays].index(name)
        if index != self._loaded:
            self.ema.load_into(self.eval_model, index)
            self._loaded = index

    def predict(self, postprocessor: nn.Module, batches: Iterable[dict],
                device: torch.device, amp_dtype: torch.dtype | None,
                top_k: int = 100) -> dict[str, list[dict]]:
        """Records of every variant, ``top_k`` detections per image (the family's num_select)."""
        self._loaded = None  # the shadows moved since the last evaluation
        return predict_records(self.variants(), postprocessor, batches, device, amp_dtype,
                               top_k=top_k, before=self.before)

    def model_copies_bytes(self) -> int:
        """Bytes of parameters and buffers held by eval-only model copies."""
        if self.eval_model is None:
            return 0
        return sum(t.numel() * t.element_size()
                   for t in (*self.eval_model.parameters(), *self.eval_model.buffers()))


def gather_records(records: dict[str, list[dict]], rank: int,
                   world: int) -> dict[str, list[dict]] | None:
    """Every rank's records, merged on rank 0 (None on the other ranks)."""
    if world == 1:
        return records
    gathered: list[Any] | None = [None] * world if rank == 0 else None
    dist.gather_object(records, gathered, dst=0)
    if rank != 0:
        return None
    merged: dict[str, list[dict]] = {k: [] for k in records}
    for part in gathered:
        for k, v in part.items():
            merged[k].extend(v)
    return merged
