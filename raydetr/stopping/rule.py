"""The early-stopping rule alone: a pure function of the monitored metric history (no Ray).

The Tune scheduler (:mod:`raydetr.stopping.scheduler`) applies it to stop trials; the worker's
log line calls the same :func:`replay` on its own history, so both always agree.
Semantics follow RF-DETR's ``EarlyStoppingCallback`` (see the scheduler's module docstring).
"""

from __future__ import annotations

import math
from collections.abc import Iterable


class EarlyStopping:
    """The stopping rule for one training run; plain Python, no Ray.

    Args:
        patience: consecutive non-improving (monitored) epochs that trigger a stop.
        min_delta: an epoch improves when ``value > best + min_delta``.
        skip_epochs: the first ``skip_epochs`` calls to :meth:`update` are ignored entirely.
        initial_best: starting best value; RF-DETR uses 0.0 for mAP.

    Attributes:
        best: best monitored value so far (``initial_best`` before any improvement).
        best_epoch: epoch label passed with the best value (None before any improvement).
        counter: consecutive non-improving monitored epochs.
        stopped: True once ``counter`` has reached ``patience`` (stays True).
        seen: calls to :meth:`update` so far, skipped ones included.
    """

    def __init__(
        self,
        patience: int = 10,
        min_delta: float = 0.001,
        skip_epochs: int = 0,
        initial_best: float = 0.0,
    ) -> None:
        if patience < 1:
            raise ValueError(f"early_stopping.patience must be >= 1, got {patience}")
        if min_delta < 0:
            raise ValueError(f"early_stopping.min_delta must be >= 0, got {min_delta}")
        if skip_epochs < 0:
            raise ValueError(f"early_stopping.skip_epochs must be >= 0, got {skip_epochs}")
        self.patience = int(patience)
        self.min_delta = float(min_delta)
        self.skip_epochs = int(skip_epochs)
        self.best = float(initial_best)
        self.best_epoch: int | None = None
        self.counter = 0
        self.stopped = False
        self.seen = 0

    @property
    def skipping(self) -> bool:
        """True while the next :meth:`update` would still be ignored."""
        return self.seen < self.skip_epochs

    def update(self, value: float, epoch: int | None = None) -> tuple[bool, bool]:
        """Record one epoch's monitored value; return ``(improved, stop)``.

        A NaN value never improves (it counts towards patience). A skipped epoch returns
        ``(False, False)`` and changes neither ``best`` nor ``counter``.
        """
        skipped = self.skipping
        self.seen += 1
        if skipped:
            return False, False
        improved = value > self.best + self.min_delta
        if improved:
            self.best = float(value)
            self.best_epoch = epoch if epoch is not None else self.seen  # from 1
            self.counter = 0
        else:
            self.counter += 1
        if self.counter >= self.patience:
            self.stopped = True
        return improved, self.stopped


def monitored_value(map_regular: float, map_ema: float | None, *, use_ema: bool) -> float:
    """The mAP the rule watches: ``max(map, map_ema)`` ignoring NaN (NaN if both are), or the
    EMA mAP alone with ``use_ema``; the regular mAP when there is no EMA mAP."""
    if map_ema is None:
        return float(map_regular)
    if use_ema:
        return float(map_ema)
    finite = [v for v in (float(map_regular), float(map_ema)) if not math.isnan(v)]
    return max(finite) if finite else math.nan


def replay(history: Iterable[tuple[int, float]], patience: int, min_delta: float,
           skip_epochs: int = 0) -> EarlyStopping:
    """The rule's state after feeding it ``(epoch, monitored value)`` pairs in order."""
    rule = EarlyStopping(patience, min_delta, skip_epochs)
    for epoch, value in history:
        rule.update(value, epoch)
    return rule
