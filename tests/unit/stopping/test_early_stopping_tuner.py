"""EarlyStoppingScheduler inside a real ray.tune.Tuner (local Ray, 2 CPUs)."""

from __future__ import annotations

import pytest
import ray
from ray import tune

from raydetr.stopping.scheduler import EarlyStoppingScheduler

# Epoch:        1     2     3      4      5      6      7     8     9    10
REGULAR = [0.10, 0.20, 0.30, 0.300, 0.305, 0.290, 0.28, 0.50, 0.60, 0.70]
EMA = [0.05, 0.25, 0.31, 0.311, 0.300, 0.310, 0.30, 0.55, 0.65, 0.75]
# max(map, map_ema) = .10 .25 .31 .311 .305 .310 .30 ...: best 0.31 at epoch 3, then
# epochs 4..7 do not beat 0.31 + 0.001 (0.311 is exactly that, and thus not better);
# patience 4 -> STOP at epoch 7, before the late rise.


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_tuner_stops_trial_at_expected_epoch(tmp_path):
    def scripted_trainable(config: dict) -> None:
        # Defined here so Ray pickles it by value (the test module is not importable in workers).
        # What the workers report: EpochResult.to_report() (flat keys + the typed record).
        from raydetr.ema.shadow import Shadow
        from raydetr.record import Bests, EpochResult

        # A row without a record (like Train-internal rows) must be ignored, not crash.
        tune.report({"epoch": -1, "note": 1.0})
        per = {"map50": 0.0, "map75": 0.0, "mar": 0.0}
        for epoch, (m, e) in enumerate(zip(REGULAR, EMA), start=1):  # numbered from 1
            m = m + config["rise"] * epoch
            record = EpochResult(epoch=epoch, step=epoch, regular={**per, "map": m},
                                 ema={Shadow(0, 0.99, 0.99): {**per, "map": e}}, bests=Bests(),
                                 score=max(m, e), monitored=max(m, e))
            tune.report(record.to_report())

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        scheduler = EarlyStoppingScheduler(patience=4, min_delta=0.001)
        tuner = tune.Tuner(
            scripted_trainable,
            param_space={"rise": tune.grid_search([0.0, 0.01])},
            tune_config=tune.TuneConfig(scheduler=scheduler, max_concurrent_trials=2),
            run_config=tune.RunConfig(name="es", storage_path=str(tmp_path), verbose=0),
        )
        results = tuner.fit()
    finally:
        ray.shutdown()

    assert results.num_errors == 0
    flat, rising = results[0], results[1]
    # Trial 0: stopped at epoch 7 -> 1 map-less row + 7 epochs reported.
    assert flat.metrics["epoch"] == 7
    assert len(flat.metrics_dataframe) == 8
    state = scheduler.state(flat.metrics["trial_id"])
    assert state == {**state, "stopped": True, "best": 0.31, "best_epoch": 3, "counter": 4}
    # Trial 1: regular mAP rises 0.01 per epoch on top: never 4 flat epochs -> runs to the end.
    assert rising.metrics["epoch"] == 10
    assert scheduler.state(rising.metrics["trial_id"])["stopped"] is False
