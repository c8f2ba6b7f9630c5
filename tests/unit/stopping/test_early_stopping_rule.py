"""EarlyStopping (pure rule) and EarlyStoppingScheduler decisions on scripted mAP sequences."""

from __future__ import annotations

import logging
import math

import pytest
from ray.tune.experiment import Trial
from ray.tune.schedulers import TrialScheduler

from raydetr.config import ConfigError, EarlyStoppingConfig
from raydetr.ema.shadow import Shadow
from raydetr.record import Bests, EpochResult
from raydetr.stopping.rule import monitored_value, replay
from raydetr.stopping.scheduler import EarlyStopping, EarlyStoppingScheduler

STOP, CONTINUE = TrialScheduler.STOP, TrialScheduler.CONTINUE


def make_trial() -> Trial:
    # A stub Trial is a real ray.tune Trial object; it needs no running Ray.
    return Trial("__fake", stub=True)


def feed(scheduler: EarlyStoppingScheduler, trial: Trial, rows: list[dict]) -> list[str]:
    return [scheduler.on_trial_result(None, trial, row) for row in rows]


def report(epoch: int, m: float, ema: float | None = None) -> dict:
    """One epoch's result as a worker reports it (``EpochResult.to_report()``), epoch from 1."""
    per = {"map50": 0.0, "map75": 0.0, "mar": 0.0}
    shadows = {Shadow(0, 0.99, 0.99): {**per, "map": ema}} if ema is not None else {}
    record = EpochResult(epoch=epoch, step=10 * epoch, regular={**per, "map": m}, ema=shadows,
                         bests=Bests(), score=m, monitored=m)
    return {**record.to_report(), "training_iteration": epoch}


def rows_from(maps: list[float], ema: list[float] | None = None, start: int = 1) -> list[dict]:
    """Results as the workers report them: ``epoch`` numbered from 1."""
    return [report(start + i, m, ema[i] if ema is not None else None) for i, m in enumerate(maps)]


# ---- pure rule -------------------------------------------------------------------------------


def test_defaults_match_rfdetr_and_config():
    rule = EarlyStopping()
    sched = EarlyStoppingScheduler()
    cfg = EarlyStoppingConfig()
    assert (rule.patience, rule.min_delta, rule.skip_epochs, rule.best) == (10, 0.001, 0, 0.0)
    assert (sched.patience, sched.min_delta, sched.use_ema, sched.skip_epochs) == (
        cfg.patience,
        cfg.min_delta,
        cfg.use_ema,
        cfg.skip_epochs,
    )


def test_min_delta_edge_exactly_best_plus_delta_is_not_improvement():
    rule = EarlyStopping(patience=5, min_delta=0.001)
    assert rule.update(0.45) == (True, False)
    assert rule.update(0.45 + 0.001) == (False, False)  # exactly best + min_delta
    assert rule.counter == 1 and rule.best == 0.45
    assert rule.update(0.45 + 0.001 + 1e-9) == (True, False)  # slightly more
    assert rule.counter == 0 and rule.best == pytest.approx(0.451)


def test_min_delta_edge_exact_binary_values():
    rule = EarlyStopping(patience=3, min_delta=0.125)
    rule.update(0.25)
    assert rule.update(0.375)[0] is False  # 0.25 + 0.125 == 0.375 exactly in binary
    assert rule.update(0.375 + 2**-20)[0] is True


def test_first_value_must_beat_zero_plus_min_delta():
    rule = EarlyStopping(patience=3, min_delta=0.001)
    assert rule.update(0.0) == (False, False)  # RF-DETR: best starts at 0.0
    assert rule.update(0.001) == (False, False)
    assert rule.update(0.0011)[0] is True


def test_stops_exactly_at_patience_th_non_improving_epoch():
    rule = EarlyStopping(patience=3, min_delta=0.0)
    assert rule.update(0.5, epoch=1) == (True, False)
    assert rule.update(0.4, epoch=2) == (False, False)
    assert rule.update(0.5, epoch=3) == (False, False)  # equal is not better
    assert rule.update(0.3, epoch=4) == (False, True)  # third non-improving epoch
    assert (rule.counter, rule.best, rule.best_epoch, rule.stopped) == (3, 0.5, 1, True)


def test_improvement_resets_counter():
    rule = EarlyStopping(patience=2, min_delta=0.01)
    decisions = [rule.update(v)[1] for v in (0.1, 0.1, 0.2, 0.2, 0.2)]
    assert decisions == [False, False, False, False, True]


def test_skip_epochs_ignored_entirely():
    rule = EarlyStopping(patience=2, min_delta=0.0, skip_epochs=3)
    # A high warm-up value must not become the best; low ones must not count.
    for v in (0.9, 0.1, 0.1):
        assert rule.update(v) == (False, False)
    assert (rule.best, rule.counter, rule.best_epoch) == (0.0, 0, None)
    assert rule.update(0.2) == (True, False)
    assert rule.best_epoch == 4  # epochs numbered from 1: the first monitored one is epoch 4
    assert rule.update(0.2) == (False, False)
    assert rule.update(0.2) == (False, True)


def test_nan_counts_as_no_improvement():
    rule = EarlyStopping(patience=2)
    rule.update(0.3)
    assert rule.update(math.nan) == (False, False)
    assert rule.update(math.nan) == (False, True)
    assert rule.best == 0.3


@pytest.mark.parametrize("kwargs", [{"patience": 0}, {"min_delta": -0.1}, {"skip_epochs": -1}])
def test_invalid_arguments_name_the_key(kwargs):
    key = next(iter(kwargs))
    with pytest.raises(ValueError, match=f"early_stopping.{key}"):
        EarlyStopping(**kwargs)


# ---- monitored value -------------------------------------------------------------------------


def test_monitored_value_variants():
    assert monitored_value(0.30, 0.35, use_ema=False) == 0.35  # max of both
    assert monitored_value(0.4, 0.35, use_ema=False) == 0.4
    assert monitored_value(0.4, 0.35, use_ema=True) == 0.35
    assert monitored_value(0.3, None, use_ema=True) == 0.3  # no EMA mAP: the regular one
    assert monitored_value(0.2, math.nan, use_ema=False) == 0.2
    assert math.isnan(monitored_value(math.nan, math.nan, use_ema=False))


def test_scheduler_reads_the_best_shadow_of_the_record():
    """Several shadows: the record's EMA mAP is its best shadow's (``map_ema@<decay>`` keys are
    for Tune and MLflow; nothing parses them back)."""
    per = {"map50": 0.0, "map75": 0.0, "mar": 0.0}
    record = EpochResult(epoch=1, step=1, regular={**per, "map": 0.2},
                         ema={Shadow(0, 0.99, 0.99): {**per, "map": 0.25},
                              Shadow(1, 0.999, 0.999): {**per, "map": 0.31}},
                         bests=Bests(), score=0.31, monitored=0.31)
    sched = EarlyStoppingScheduler(patience=1, use_ema=True)
    trial = make_trial()
    sched.on_trial_result(None, trial, record.to_report())
    assert sched.state(trial)["best"] == 0.31


# ---- replay: the worker's log line replays the rule on its history -------------------------


# Epoch:  1     2     3     4      5      6     (patience 2, min_delta 0.01)
# 0.1 and 0.2 improve; 0.2 does not (counter 1); 0.25 > 0.2 + 0.01 improves (counter 0);
# 0.25 and 0.24 do not: the second of them, epoch 6, stops the run; best 0.25 from epoch 4.
KNOWN = [(1, 0.1), (2, 0.2), (3, 0.2), (4, 0.25), (5, 0.25), (6, 0.24)]


def test_replay_known_sequence():
    rule = replay(KNOWN, patience=2, min_delta=0.01)
    assert (rule.best, rule.best_epoch, rule.counter, rule.stopped, rule.seen) == (
        0.25, 4, 2, True, 6)
    # Stopped one epoch earlier: not yet.
    assert replay(KNOWN[:5], patience=2, min_delta=0.01).stopped is False
    # skip_epochs=1: epoch 1's 0.9 is never the best, so 0.2 at epoch 2 is.
    rule = replay([(1, 0.9), (2, 0.2), (3, 0.2)], patience=2, min_delta=0.0, skip_epochs=1)
    assert (rule.best, rule.best_epoch, rule.counter, rule.stopped) == (0.2, 2, 1, False)
    assert replay([], patience=2, min_delta=0.0).best_epoch is None


def test_scheduler_stops_where_replay_says():
    sched = EarlyStoppingScheduler(patience=2, min_delta=0.01, ema_enabled=False)
    trial = make_trial()
    decisions = feed(sched, trial, rows_from([v for _, v in KNOWN]))
    assert decisions == [CONTINUE] * 5 + [STOP]
    state = sched.state(trial)
    assert (state["best"], state["best_epoch"], state["counter"]) == (0.25, 4, 2)


# ---- scheduler with real ray.tune Trial objects ----------------------------------------------


def test_scheduler_stops_at_expected_epoch():
    sched = EarlyStoppingScheduler(patience=3, min_delta=0.001)
    trial = make_trial()
    sched.on_trial_add(None, trial)
    decisions = feed(sched, trial, rows_from([0.1, 0.2, 0.2005, 0.15, 0.2, 0.3]))
    assert decisions == [CONTINUE, CONTINUE, CONTINUE, CONTINUE, STOP, STOP]
    state = sched.state(trial)
    assert state["stopped"] is True
    assert state["best"] == 0.3  # the last row was still monitored (a late buffered result)
    assert sched.state(trial.trial_id)["last_epoch"] == 6


def test_scheduler_use_ema_monitors_map_ema_only():
    sched = EarlyStoppingScheduler(patience=2, use_ema=True)
    trial = make_trial()
    # Regular mAP keeps improving, EMA mAP does not: stop after 2 flat EMA epochs.
    rows = rows_from([0.1, 0.2, 0.3, 0.4], ema=[0.25, 0.25, 0.25, 0.25])
    assert feed(sched, trial, rows[:3]) == [CONTINUE, CONTINUE, STOP]
    assert sched.state(trial)["best"] == 0.25
    assert sched.state(trial)["monitored"] == "map_ema"


def test_scheduler_best_of_both_uses_max():
    # Regular mAP is flat but EMA mAP overtakes it: the max keeps rising, so no stop, where
    # monitoring the regular mAP alone stops at the second flat epoch.
    rows = rows_from([0.30, 0.30, 0.30], ema=[0.10, 0.35, 0.40])
    sched = EarlyStoppingScheduler(patience=2)
    trial = make_trial()
    assert feed(sched, trial, rows) == [CONTINUE] * 3
    assert sched.state(trial)["best"] == 0.4
    assert feed(sched, trial, rows_from([0.39, 0.2], ema=[0.2, 0.3], start=4)) == [CONTINUE, STOP]
    regular_only = EarlyStoppingScheduler(patience=2, ema_enabled=False)
    assert feed(regular_only, make_trial(), rows) == [CONTINUE, CONTINUE, STOP]


def test_scheduler_ema_disabled_monitors_regular_map():
    sched = EarlyStoppingScheduler(patience=2, ema_enabled=False)
    trial = make_trial()
    rows = rows_from([0.3, 0.3, 0.3], ema=[0.4, 0.5, 0.6])  # map_ema ignored
    assert feed(sched, trial, rows) == [CONTINUE, CONTINUE, STOP]
    assert sched.state(trial)["best"] == 0.3
    assert sched.monitored == "map"


def test_scheduler_skip_epochs():
    sched = EarlyStoppingScheduler(patience=1, skip_epochs=2)
    trial = make_trial()
    assert feed(sched, trial, rows_from([0.5, 0.0, 0.1, 0.1])) == [
        CONTINUE,
        CONTINUE,
        CONTINUE,
        STOP,
    ]
    assert sched.state(trial)["best_epoch"] == 3  # skip 2 epochs: the first one watched is 3


def test_scheduler_trials_are_independent():
    sched = EarlyStoppingScheduler(patience=2)
    a, b = make_trial(), make_trial()
    assert a.trial_id != b.trial_id
    flat = rows_from([0.2, 0.2, 0.2])
    rising = rows_from([0.1, 0.2, 0.3])
    out_a, out_b = [], []
    for ra, rb in zip(flat, rising):  # interleaved like a concurrent search
        out_a.append(sched.on_trial_result(None, a, ra))
        out_b.append(sched.on_trial_result(None, b, rb))
    assert out_a == [CONTINUE, CONTINUE, STOP]
    assert out_b == [CONTINUE, CONTINUE, CONTINUE]
    assert set(sched.states()) == {a.trial_id, b.trial_id}


def test_results_without_a_record_are_ignored():
    sched = EarlyStoppingScheduler(patience=1)
    trial = make_trial()
    sched.on_trial_result(None, trial, report(1, 0.5))
    for row in ({"epoch": 2, "train_loss": 3.0}, {"done": True}, {"map": 0.9, "epoch": 2}):
        assert sched.on_trial_result(None, trial, row) == CONTINUE
    assert sched.state(trial)["counter"] == 0
    assert sched.state(trial)["epochs_seen"] == 1


def test_retried_epochs_count_once():
    sched = EarlyStoppingScheduler(patience=3)
    trial = make_trial()
    feed(sched, trial, rows_from([0.5, 0.4, 0.4]))  # counter 2
    # The worker group restarted from the epoch-1 checkpoint: epochs 2.. are reported again.
    assert feed(sched, trial, rows_from([0.6], start=2)) == [CONTINUE]
    state = sched.state(trial)
    assert (state["best"], state["counter"], state["epochs_seen"]) == (0.6, 0, 2)


def test_set_search_properties_accepts_anything_and_keeps_metric_unset():
    sched = EarlyStoppingScheduler()
    assert sched.set_search_properties("map", "max") is True
    assert sched.set_search_properties("loss", "min", extra=1) is True
    assert sched.set_search_properties(None, None) is True
    assert sched.metric is None  # no strict metric check on rows without `map`


def test_from_config_and_use_ema_without_ema():
    cfg = EarlyStoppingConfig(enabled=True, patience=4, min_delta=0.01, use_ema=True, skip_epochs=1)
    sched = EarlyStoppingScheduler.from_config(cfg, ema_enabled=True)
    assert (sched.patience, sched.min_delta, sched.use_ema, sched.skip_epochs) == (4, 0.01, True, 1)
    with pytest.raises(ConfigError, match="ema.enabled"):
        EarlyStoppingScheduler.from_config(cfg, ema_enabled=False)


def test_save_restore_round_trip(tmp_path):
    sched = EarlyStoppingScheduler(patience=3)
    a, b = make_trial(), make_trial()
    feed(sched, a, rows_from([0.3, 0.2, 0.2]))
    feed(sched, b, rows_from([0.1]))
    path = tmp_path / "es.json"
    sched.save(str(path))
    fresh = EarlyStoppingScheduler(patience=3)
    fresh.restore(str(path))
    assert fresh.states() == sched.states()
    assert fresh.on_trial_result(None, a, report(4, 0.2)) == STOP
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="bad.json"):
        fresh.restore(str(tmp_path / "bad.json"))


def test_state_path_survives_unpickled_fresh_scheduler(tmp_path):
    import pickle

    path = tmp_path / "state" / "early_stopping.json"
    sched = EarlyStoppingScheduler(patience=2, state_path=path)
    blank = pickle.dumps(sched)  # what Tuner.restore gets back: the scheduler as at the start
    trial = make_trial()
    feed(sched, trial, rows_from([0.3, 0.3]))
    restored = pickle.loads(blank)
    assert restored.on_trial_result(None, trial, report(3, 0.3)) == STOP
    # The driver's own object (never used by Tune after a restore) reads the file.
    driver_copy = EarlyStoppingScheduler(patience=2, state_path=path)
    assert driver_copy.state(trial.trial_id)["stopped"] is True
    assert driver_copy.state(trial.trial_id)["last_epoch"] == 3


def test_log_lines(caplog):
    sched = EarlyStoppingScheduler(patience=2, min_delta=0.001)
    trial = make_trial()
    with caplog.at_level(logging.INFO, logger="raydetr.early_stopping"):
        feed(sched, trial, rows_from([0.455, 0.454, 0.450], start=9))
    text = caplog.text
    assert "Epoch 10: mAP = 0.454 (best: 0.455) - counter: 1" in text
    assert (
        "Early stopping at epoch 11: no improvement > 0.001 in 2 epochs "
        "(best mAP 0.455 at epoch 9)" in text
    )
    assert "Using EarlyStoppingScheduler on max(map, map_ema)" in sched.debug_string()
