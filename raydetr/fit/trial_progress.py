"""One line per trial event of a search (``raydetr tune``), printed by a Tune Callback on the
driver: which trial started with which parameters, and how it ended with its best score.

Tune's own progress table is off (``verbose=0``): it redraws the whole table every few seconds.
"""

from __future__ import annotations

import logging
from typing import Any

from ray.tune import Callback

log = logging.getLogger("raydetr.search")


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class TrialProgress(Callback):
    """Logs ``trial <id> started: k=v ...`` and ``trial <id> finished|failed: k=v ...; best
    <metric> S after E epochs``. ``keys``: the searched config keys (the trial's parameters)."""

    def __init__(self, keys: list[str], metric: str = "score") -> None:
        self.keys = list(keys)
        self.metric = metric
        self._best: dict[str, float] = {}
        self._epochs: dict[str, int] = {}

    def _params(self, trial: Any) -> str:
        config = getattr(trial, "config", {}) or {}
        return " ".join(f"{k}={_fmt(config.get(k))}" for k in self.keys)

    def _summary(self, trial: Any) -> str:
        best = self._best.get(trial.trial_id)
        score = "no epoch finished" if best is None else f"best {self.metric} {best:.4f}"
        return f"{score} after {self._epochs.get(trial.trial_id, 0)} epochs"

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        log.info("trial %s started: %s", trial.trial_id, self._params(trial))

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict,
                        **info: Any) -> None:
        self._epochs[trial.trial_id] = self._epochs.get(trial.trial_id, 0) + 1
        score = result.get(self.metric)
        if isinstance(score, (int, float)):
            self._best[trial.trial_id] = max(float(score),
                                             self._best.get(trial.trial_id, float("-inf")))

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        log.info("trial %s finished: %s; %s", trial.trial_id, self._params(trial),
                 self._summary(trial))

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        log.info("trial %s failed: %s; %s (error in %s)", trial.trial_id, self._params(trial),
                 self._summary(trial), getattr(trial, "path", None) or "its trial folder")
