"""Post-hoc EMA profiles are scored as training scores: mask mAP decides for a seg run."""

from __future__ import annotations

from pathlib import Path

import pytest

from raydetr.artifacts import ModelMeta
from raydetr.config import load_config
from raydetr.fit.posthoc import PosthocRun, _register_best, format_table


def _run(preset: str) -> PosthocRun:
    cfg = load_config(None, [f"model.preset={preset}"])
    return PosthocRun(run_dir=Path("runs/r"), train_dir=Path("runs/r/train"), cfg=cfg,
                      classes=["tumour"], snapshots=[], history=[], prepared=Path("p"),
                      val_split="valid")


def _row(sigma_rel: float, box: float, segm: float | None) -> dict:
    row = {"sigma_rel": sigma_rel, "gamma": 1.0, "map": box, "map50": box, "map75": box,
           "mar": box, "profile_residual": 0.0, "snapshots": 4, "step": 10, "images": 5}
    if segm is not None:
        row.update(map_segm=segm, map50_segm=segm, map75_segm=segm, mar_segm=segm)
    return row


def test_a_seg_run_picks_and_compares_by_mask_map(capsys):
    run = _run("rfdetr-seg-nano")
    assert run.decided_by == "map_segm" and "mar_segm" in run.metric_keys
    rows = [_row(0.05, 0.30, 0.10), _row(0.10, 0.20, 0.25)]
    best = run.best_of(rows)
    assert best["sigma_rel"] == 0.10  # the higher mask mAP, not the higher box mAP
    winner = ModelMeta(classes=["tumour"], model={"preset": "rfdetr-seg-nano"}, resolution=312,
                       variant="ema", dataset="d", metrics={"map": 0.5, "map_segm": 0.2038},
                       epoch=2)
    table = format_table(rows, best, winner, run)
    assert "map_segm" in table.splitlines()[1] and table.splitlines()[3].endswith("<- best")
    assert table.splitlines()[-1] == "run winner: ema weights, epoch 2, map_segm 0.2038, mAP 0.5000"
    # 0.25 > 0.2038 would register; against a better winner it says which metric fell short
    assert _register_best(run, best, 0.30) is None
    assert "best post-hoc map_segm 0.2500 does not beat the run's winner (0.3000)" in \
        capsys.readouterr().out


@pytest.mark.parametrize("preset", ["rtdetr-r18", "rfdetr-nano"])
def test_a_box_run_still_picks_by_box_map(preset):
    run = _run(preset)
    assert run.decided_by == "map" and "map_segm" not in run.metric_keys
    assert run.best_of([_row(0.05, 0.30, None), _row(0.10, 0.20, None)])["sigma_rel"] == 0.05
