"""TrainState: everything a checkpoint restores, in one object.

    state = TrainState(model, optimizer, lr_scheduler, ema=ema, ema_factory=make_ema)
    torch.save(state.state_dict(), path)          # model, EMA, optimizer, LR schedule, epoch,
    state.load_state_dict(torch.load(path, ...))  # step, bests, history, RNG

The early-stopping counter is not stored: it is a pure function of ``history``
(:func:`raydetr.stopping.rule.replay`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from raydetr.record import Bests
from raydetr.train.checkpoint import rng_state, set_rng_state


@dataclass
class TrainState:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    ema: Any = None  # raydetr.ema.ModelEma or None
    # Builds a fresh EMA from the model's current weights; used when a checkpoint saved without
    # EMA is resumed with EMA on (the shadow must start from the loaded weights, as RF-DETR
    # rebuilds its EMA after loading).
    ema_factory: Callable[[nn.Module], Any] | None = None
    posthoc: Any = None  # raydetr.ema.posthoc.PosthocTracker (rank 0, ema.posthoc.enabled)
    epoch: int = 0  # number (from 1) of the last finished epoch = epochs finished; 0 before
    step: int = 0  # optimizer steps done
    bests: Bests = field(default_factory=Bests)
    history: list[dict[str, Any]] = field(default_factory=list)  # EpochResult.to_report() rows

    @property
    def next_epoch(self) -> int:
        """Number (from 1) of the epoch to run next."""
        return self.epoch + 1

    def state_dict(self) -> dict[str, Any]:
        """weights_only-safe (tensors, numbers, strings, lists, dicts)."""
        return {
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "posthoc": self.posthoc.state_dict() if self.posthoc is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "scaler": None,  # bf16 autocast needs no grad scaler
            "epoch": self.epoch,
            "step": self.step,
            "bests": self.bests.to_dict(),
            "history": list(self.history),
            "rng": rng_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        if self.ema is not None:
            if state.get("ema") is not None:
                self.ema.load_state_dict(state["ema"])
            elif self.ema_factory is not None:
                self.ema = self.ema_factory(self.model)
        if self.posthoc is not None:
            if state.get("posthoc") is None:
                raise ValueError("ema.posthoc.enabled is set but the checkpoint being resumed has "
                                 "no post-hoc EMA state: it cannot be added mid-run; start a new run")
            self.posthoc.load_state_dict(state["posthoc"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        if "bests" in state:
            self.bests = Bests.from_dict(state["bests"])
        self.history = list(state["history"])
        set_rng_state(state["rng"])
