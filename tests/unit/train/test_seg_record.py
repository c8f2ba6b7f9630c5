"""A segmentation preset's epoch record: mask mAP decides (best shadow, bests, early stopping,
score), both metrics are reported for every variant, the log line says what decides; a
detection record is unchanged."""

from __future__ import annotations

import pytest
from ray.tune.experiment import Trial

from raydetr.ema.shadow import Shadow
from raydetr.record import (
    Bests,
    EpochResult,
    deciding_metric,
    metric_keys,
)
from raydetr.stopping.scheduler import EarlyStoppingScheduler

S0, S1 = Shadow(0, 0.99, 0.99), Shadow(1, 0.999, 0.999)


def _metrics(map_bbox: float, map_segm: float) -> dict[str, float]:
    return {"map": map_bbox, "map50": 0.5, "map75": 0.4, "mar": 0.6,
            "map_segm": map_segm, "map50_segm": 0.45, "map75_segm": 0.35, "mar_segm": 0.55}


def _seg_record(epoch: int, reg_segm: float, ema_segm: tuple[float, float]) -> EpochResult:
    bests = Bests()
    bests.regular.map, bests.regular.epoch = 0.21, 1
    bests.ema.map, bests.ema.epoch = 0.33, 1
    # shadow 0 has the higher bbox mAP, shadow 1 the higher mask mAP
    return EpochResult(epoch=epoch, step=10 * epoch, regular=_metrics(0.40, reg_segm),
                       ema={S0: _metrics(0.50, ema_segm[0]), S1: _metrics(0.45, ema_segm[1])},
                       bests=bests, score=0.33, monitored=0.33, metric="map_segm",
                       train={"train_loss": 1.0, "lr": 1e-4, "images_per_s": 2.0})


def test_deciding_metric_and_keys():
    assert deciding_metric(True) == "map_segm" and deciding_metric(False) == "map"
    assert metric_keys(False) == ("map", "map50", "map75", "mar")
    assert "mar_segm" in metric_keys(True) and "map" in metric_keys(True)


def test_mask_map_decides_and_every_metric_is_reported():
    r = _seg_record(1, 0.21, (0.30, 0.33))
    assert r.best_shadow == S1  # by mask mAP, though S0's box mAP is higher
    assert (r.value, r.value_ema, r.map_ema) == (0.21, 0.33, 0.45)
    m = r.to_report()
    assert (m["map"], m["map_segm"], m["map_ema"], m["map_segm_ema"]) == (0.40, 0.21, 0.45, 0.33)
    assert (m["map_segm_ema@0.99"], m["map_segm_ema@0.999"]) == (0.30, 0.33)
    assert (m["map_ema@0.99"], m["map50_segm_ema@0.999"]) == (0.50, 0.45)
    assert (m["best_map_segm"], m["best_map_segm_ema"], m["best_map_segm_epoch"]) == (0.21, 0.33, 1)
    assert "best_map" not in m and m["winner_is_ema"] == 1
    line = r.format_line(5)
    assert "map_segm 0.2100 (best 0.2100 @1)" in line and "mAP 0.4000" in line
    assert "map_segm_ema 0.3300" in line and line.endswith("(decided by map_segm)")
    back = EpochResult.from_result(m)
    assert back.metric == "map_segm" and back.best_shadow == S1
    flat = {f"record/{k}": v for k, v in _flatten(r.to_dict()).items()}  # Tune's form
    assert EpochResult.from_result(flat).value_ema == 0.33


def test_detection_record_is_as_before():
    per = {"map": 0.3, "map50": 0.5, "map75": 0.2, "mar": 0.4}
    r = EpochResult(epoch=1, step=1, regular=per, ema={S0: {**per, "map": 0.35}}, bests=Bests(),
                    score=0.35, monitored=0.35)
    m = r.to_report()
    assert r.metric == "map" and "map_segm" not in m and "best_map_segm" not in m
    assert {"best_map", "best_map_ema", "best_map_epoch", "best_map_ema_epoch"} <= set(m)
    assert "decided by" not in r.format_line(2)
    assert EpochResult.from_dict({k: v for k, v in r.to_dict().items() if k != "metric"}
                                 ).metric == "map"  # a record written before this key


@pytest.mark.parametrize("use_ema, best", [(True, 0.33), (False, 0.33)])
def test_early_stopping_watches_mask_map(use_ema, best):
    """Box mAP improves every epoch, mask mAP never: a seg trial stops after patience."""
    sched = EarlyStoppingScheduler(patience=2, use_ema=use_ema)
    trial = Trial("__fake", stub=True)
    decisions = []
    for epoch in (1, 2, 3):
        r = _seg_record(epoch, 0.21, (0.30, 0.33))
        r.regular["map"] = 0.4 + epoch / 10
        r.ema = {s: {**met, "map": 0.5 + epoch / 10} for s, met in r.ema.items()}
        decisions.append(sched.on_trial_result(None, trial, r.to_report()))
    assert decisions == ["CONTINUE", "CONTINUE", "STOP"]
    assert sched.state(trial)["best"] == best


def _flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def test_curves_of_a_seg_run_are_its_mask_map():
    from raydetr.registry.plots import map_series

    history = [_seg_record(e, 0.1 * e, (0.15 * e, 0.2 * e)).to_report(with_record=False)
               for e in (1, 2)]
    series = {label: ys for label, _, ys in map_series(history)}
    assert series == {"regular": [0.1, 0.2], "EMA decay 0.99": [0.15, 0.3],
                      "EMA decay 0.999": [0.2, 0.4]}
    for row in history:  # a detection history draws its box mAP as before
        for k in [k for k in row if "segm" in k]:
            del row[k]
    assert {label: ys for label, _, ys in map_series(history)}["regular"] == [0.4, 0.4]
