"""Early stopping on validation mAP, RF-DETR style, as a Ray Tune ``TrialScheduler``.

Two pieces:

- :class:`EarlyStopping` is the decision rule alone (no Ray): feed it one monitored mAP per
  epoch with ``update(value)``; it says whether that was an improvement and whether to stop.
- :class:`EarlyStoppingScheduler` applies the rule to every trial of a Tune run (one trial for a
  plain training run, many for a search), keyed by trial id, and returns ``STOP`` when a trial
  has gone ``patience`` epochs without improving by more than ``min_delta``.

Semantics follow RF-DETR's ``EarlyStoppingCallback`` (rfdetr/util/early_stopping.py):
the best value starts at 0.0 (mAP is never negative); an epoch improves when
``value > best + min_delta`` (strictly: exactly ``best + min_delta`` is not an improvement);
the trial stops when the count of consecutive non-improving epochs reaches ``patience``.
The monitored value is ``map_ema`` when ``use_ema``, else ``max(map, map_ema)``; the regular
``map`` alone when EMA is off or the result carries no EMA mAP (for a segmentation preset:
the same with ``map_segm``, the record's deciding metric). Added here: ``skip_epochs``
ignores the first N monitored epochs entirely (warm-up noise counts for neither best nor
patience).

Where the decision runs: in the Tune driver process (the ``TuneController``), on each result
that Ray Train's ``TuneReportCallback`` forwards (rank 0's ``ray.train.report`` metrics).
A ``STOP`` ends the trial actor and with it the Train run: no ``finally`` in the workers and
no last checkpoint, so anything the driver needs afterwards comes from storage and from
:meth:`EarlyStoppingScheduler.state`.

Retries: when a Train worker group restarts from an earlier checkpoint, epochs already seen are
reported again. The scheduler keeps each trial's (epoch, value) history and, on an epoch at or
before the last one seen, drops the later history and replays the rule, so a retried epoch
counts once.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ray.tune.experiment import Trial
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from raydetr.config import ConfigError, EarlyStoppingConfig
from raydetr.record import EpochResult
from raydetr.stopping.decisions import post_decision
from raydetr.stopping.rule import EarlyStopping, monitored_value, replay

if TYPE_CHECKING:
    from ray.tune.execution.tune_controller import TuneController

logger = logging.getLogger("raydetr.early_stopping")

_STATE_VERSION = 1


@dataclass
class _TrialState:
    history: list[tuple[int, float]] = field(default_factory=list)
    rule: EarlyStopping | None = None
    finished: bool = False


class EarlyStoppingScheduler(FIFOScheduler):
    """Tune scheduler that stops a trial after ``patience`` epochs without mAP improvement.

    Trials run in FIFO order (as with Tune's default scheduler); on each result carrying ``map``
    the monitored value (see :func:`monitored_value`) updates that trial's
    :class:`EarlyStopping` and a ``STOP`` is returned once it fires. Results without ``map``
    get ``CONTINUE``. The epoch is the result's ``epoch`` (else ``training_iteration``).

    Args:
        patience, min_delta, skip_epochs: see :class:`EarlyStopping`.
        use_ema: monitor the EMA mAP only (needs ``ema_enabled``).
        ema_enabled: whether the run trains an EMA at all; False: monitor ``map``.
        state_path: optional local JSON file; when set, the state is written there after each
            monitored result and read back on first use, so a restored Tune experiment
            (``Tuner.restore``, which unpickles the scheduler as it was at the start) keeps its
            counters. Only safe for one scheduler per file.
        decision_board: name of the run's decision board (:mod:`raydetr.stopping.decisions`);
            every decision is posted there so workers never run past a STOP.
    """

    # One decision per reported epoch: never let Tune batch several results per decision.
    _supports_buffered_results = False

    def __init__(
        self,
        patience: int = 10,
        min_delta: float = 0.001,
        use_ema: bool = False,
        skip_epochs: int = 0,
        ema_enabled: bool = True,
        *,
        state_path: str | os.PathLike[str] | None = None,
        decision_board: str | None = None,
    ) -> None:
        super().__init__()
        if use_ema and not ema_enabled:
            raise ConfigError(
                "early_stopping.use_ema=true needs ema.enabled=true: there is no EMA mAP to "
                "monitor. Set early_stopping.use_ema=false or ema.enabled=true."
            )
        EarlyStopping(patience, min_delta, skip_epochs)  # validate arguments early
        self.patience = int(patience)
        self.min_delta = float(min_delta)
        self.use_ema = bool(use_ema)
        self.skip_epochs = int(skip_epochs)
        self.ema_enabled = bool(ema_enabled)
        self.state_path = str(state_path) if state_path is not None else None
        self.decision_board = decision_board
        self._trials: dict[str, _TrialState] = {}
        self._loaded_state_path = False
        self._search_metric: str | None = None
        self._search_mode: str | None = None

    @classmethod
    def from_config(
        cls,
        cfg: EarlyStoppingConfig,
        ema_enabled: bool,
        *,
        state_path: str | os.PathLike[str] | None = None,
        decision_board: str | None = None,
    ) -> EarlyStoppingScheduler:
        """Build from ``Config.early_stopping`` and ``Config.ema.enabled``."""
        return cls(
            patience=cfg.patience,
            min_delta=cfg.min_delta,
            use_ema=cfg.use_ema,
            skip_epochs=cfg.skip_epochs,
            ema_enabled=ema_enabled,
            state_path=state_path,
            decision_board=decision_board,
        )

    @property
    def monitored(self) -> str:
        """Human-readable name of the monitored value."""
        if not self.ema_enabled:
            return "map"
        return "map_ema" if self.use_ema else "max(map, map_ema)"

    # ---- Tune hooks --------------------------------------------------------------------

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        """Accept whatever metric/mode the Tuner uses: this scheduler watches its own keys.

        ``self.metric`` stays None on purpose: Tune's strict metric check would otherwise reject
        results without that key (e.g. rows that carry no ``map``).
        """
        self._search_metric, self._search_mode = metric, mode
        return True

    def on_trial_add(self, tune_controller: TuneController, trial: Trial) -> None:
        self._ensure_loaded()
        self._trials.setdefault(trial.trial_id, _TrialState())

    def on_trial_result(
        self, tune_controller: TuneController, trial: Trial, result: dict[str, Any]
    ) -> str:
        decision = self._decide(trial, result)
        if self.decision_board is not None:
            # Workers wait for this before their next epoch (raydetr.stopping.decisions).
            post_decision(self.decision_board, trial.trial_id,
                          _epoch_of(result, default=-1), decision)
        return decision

    def _decide(self, trial: Trial, result: dict[str, Any]) -> str:
        record = EpochResult.from_result(result)
        if record is None:  # not an epoch's report (e.g. Tune's final result)
            return TrialScheduler.CONTINUE
        # the record's deciding metric: bbox map, or map_segm for a segmentation preset
        value = monitored_value(record.value, record.value_ema if self.ema_enabled else None,
                                use_ema=self.use_ema)
        self._ensure_loaded()
        trial_id = trial.trial_id
        state = self._trials.setdefault(trial_id, _TrialState())
        epoch = record.epoch  # numbered from 1
        if state.history and epoch <= state.history[-1][0]:
            logger.info(
                "Epoch %d reported again for trial %s (retried from a checkpoint): "
                "early-stopping state rebuilt from the epochs before it",
                *(epoch, trial_id),
            )
            state.history = [(e, v) for e, v in state.history if e < epoch]
        state.history.append((epoch, value))
        rule = self._replay(state.history)
        state.rule = rule
        self._log_epoch(trial_id, epoch, value, rule)
        self._persist()
        return TrialScheduler.STOP if rule.stopped else TrialScheduler.CONTINUE

    def on_trial_complete(
        self, tune_controller: TuneController, trial: Trial, result: dict[str, Any] | None
    ) -> None:
        self._mark_finished(trial)

    def on_trial_error(self, tune_controller: TuneController, trial: Trial) -> None:
        self._mark_finished(trial)

    def on_trial_remove(self, tune_controller: TuneController, trial: Trial) -> None:
        self._mark_finished(trial)

    def debug_string(self) -> str:
        stopped = sum(1 for s in self._trials.values() if s.rule is not None and s.rule.stopped)
        return (
            f"Using EarlyStoppingScheduler on {self.monitored} (patience={self.patience}, "
            f"min_delta={self.min_delta}, skip_epochs={self.skip_epochs}): "
            f"{stopped} of {len(self._trials)} trials stopped early."
        )

    # ---- state for the driver ------------------------------------------------------------

    def state(self, trial: Trial | str) -> dict[str, Any]:
        """Why a trial ended: ``best``, ``best_epoch``, ``counter``, ``stopped`` (+ context).

        ``stopped`` is True only when this scheduler stopped the trial. Unknown trial ids give
        the initial state (nothing monitored yet). With ``state_path``, a scheduler that Tune
        did not use itself (the driver's copy after ``Tuner.restore``) reads the file.
        """
        self._ensure_loaded()
        trial_id = trial if isinstance(trial, str) else trial.trial_id
        state = self._trials.get(trial_id, _TrialState())
        rule = state.rule or EarlyStopping(self.patience, self.min_delta, self.skip_epochs)
        return {
            "best": rule.best,
            "best_epoch": rule.best_epoch,
            "counter": rule.counter,
            "stopped": rule.stopped,
            "epochs_seen": len(state.history),
            "last_epoch": state.history[-1][0] if state.history else None,
            "monitored": self.monitored,
            "patience": self.patience,
            "min_delta": self.min_delta,
        }

    def states(self) -> dict[str, dict[str, Any]]:
        """:meth:`state` for every trial seen, keyed by trial id."""
        self._ensure_loaded()
        return {trial_id: self.state(trial_id) for trial_id in self._trials}

    def save(self, checkpoint_path: str) -> None:
        """Write every trial's epoch history as JSON (atomic; no pickle)."""
        payload = {
            "version": _STATE_VERSION,
            "params": {
                "patience": self.patience,
                "min_delta": self.min_delta,
                "use_ema": self.use_ema,
                "skip_epochs": self.skip_epochs,
                "ema_enabled": self.ema_enabled,
            },
            "trials": {
                trial_id: {"history": [[e, v] for e, v in s.history], "finished": s.finished}
                for trial_id, s in self._trials.items()
            },
        }
        path = Path(checkpoint_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f)
        os.replace(tmp, path)

    def restore(self, checkpoint_path: str) -> None:
        """Load what :meth:`save` wrote; the decisions are replayed with this scheduler's
        current parameters (so a changed patience applies to the stored history)."""
        path = Path(checkpoint_path)
        try:
            payload = json.loads(path.read_text())
            trials = payload["trials"]
            restored = {
                str(trial_id): _TrialState(
                    history=[(int(e), float(v)) for e, v in data["history"]],
                    finished=bool(data.get("finished", False)),
                )
                for trial_id, data in trials.items()
            }
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(
                f"{path}: not an early-stopping state file written by "
                f"EarlyStoppingScheduler.save ({exc}). Delete it to start the counters afresh."
            ) from exc
        for state in restored.values():
            state.rule = self._replay(state.history) if state.history else None
        self._trials = restored
        self._loaded_state_path = True

    # ---- internals -----------------------------------------------------------------------

    def _replay(self, history: list[tuple[int, float]]) -> EarlyStopping:
        return replay(history, self.patience, self.min_delta, self.skip_epochs)

    def _log_epoch(self, trial_id: str, epoch: int, value: float, rule: EarlyStopping) -> None:
        where = f"[trial {trial_id}]"
        if rule.seen <= rule.skip_epochs:
            msg = f"(not monitored: first {rule.skip_epochs} epochs skipped) {where}"
            logger.info("Epoch %d: mAP = %.3f %s", epoch, value, msg)
            return
        logger.info(
            "Epoch %d: mAP = %.3f (best: %.3f) - counter: %d %s",
            *(epoch, value, rule.best, rule.counter, where),
        )
        if rule.stopped:
            at = f" at epoch {rule.best_epoch}" if rule.best_epoch is not None else ""
            logger.info(
                "Early stopping at epoch %d: no improvement > %g in %d epochs "
                "(best mAP %.3f%s) %s, monitored %s",
                *(epoch, self.min_delta, self.patience, rule.best, at, where, self.monitored),
            )

    def _mark_finished(self, trial: Trial) -> None:
        if trial.trial_id in self._trials:
            self._trials[trial.trial_id].finished = True

    def _ensure_loaded(self) -> None:
        if self._loaded_state_path or self.state_path is None:
            return
        self._loaded_state_path = True
        if Path(self.state_path).is_file():
            self.restore(self.state_path)
            n, path = len(self._trials), self.state_path
            logger.info("Early-stopping state for %d trials restored from %s", n, path)

    def _persist(self) -> None:
        if self.state_path is not None:
            self.save(self.state_path)


def _epoch_of(result: dict[str, Any], default: int) -> int:
    for key in ("epoch", "training_iteration"):
        value = result.get(key)
        if value is not None and not isinstance(value, bool):
            try:
                return int(value)
            except (TypeError, ValueError):
                continue
    return default
