"""How `raydetr train` ends: the winner, and where it was registered or how to register it."""

from __future__ import annotations

import dataclasses
import json

import torch

from raydetr.commands.cli import main
from raydetr.commands.train import fit_summary
from raydetr.config import load_config
from raydetr.ema.shadow import Shadow
from raydetr.fit.postfit import finalize
from raydetr.model.build import build
from raydetr.record import Bests
from raydetr.train.checkpoint import BestWeightsCache, update_bests, write_checkpoint


def _finished_run(tmp_path, *overrides):
    """A real post-fit of a one-epoch checkpoint (no Ray, no training)."""
    cfg = load_config(None, [f"run.output_dir={tmp_path}", "run.name=r", "model.resolution=64",
                             "model.num_queries=10", "model.num_denoising=0", *overrides])
    torch.manual_seed(0)
    model, _, _ = build(cfg.model, cfg.loss, 2)
    bests, cache = Bests(), BestWeightsCache(tmp_path / "cache")
    update_bests(bests, cache, epoch=1, map_regular=0.1, map_ema=0.2, shadow=Shadow(0, 0.993, 0.993),
                 regular_weights=model.state_dict, ema_weights=model.state_dict)
    train_dir = tmp_path / "r" / "train"
    write_checkpoint(train_dir / "epoch_0001", bests=bests, cache=cache, state={
        "epoch": 1, "history": [{"epoch": 1, "map": 0.1, "map_ema": 0.2}],
        "classes": ["a", "b"], "config": cfg.to_dict()})
    return cfg, finalize(cfg, tmp_path / "r", train_dir, {})


def test_mlflow_off_says_so_and_the_advice_registers(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg, result = _finished_run(tmp_path, "mlflow=false")
    assert result.registered is None
    text = fit_summary(result, cfg)
    assert "MLflow was off (mlflow.enabled=false)" in text
    assert "once MLflow is reachable" not in text
    advice = text.split("To register this winner: ")[1].split(" [")[0]
    assert advice == f"raydetr register {result.run_dir}"
    assert main(advice.split()[1:]) == 0  # the advice works as printed
    info = json.loads(capsys.readouterr().out)
    assert info["model_uri"].startswith("models:/raydetr")
    assert (tmp_path / "mlflow.db").is_file()


def test_registry_outage_says_run_register_later(tmp_path):
    cfg, result = _finished_run(tmp_path, "mlflow.tracking_uri=http://127.0.0.1:9")
    assert result.registered is None
    text = fit_summary(result, cfg)
    assert f"run `raydetr register {result.run_dir}` once MLflow is reachable" in text
    assert "was off" not in text


def test_summary_leads_with_the_metric_that_decided_the_winner(tmp_path):
    cfg, result = _finished_run(tmp_path, "mlflow=false")
    first = fit_summary(result, cfg).strip().splitlines()[0]
    assert first.startswith("winner: ema weights, epoch 1, mAP ") and "map_segm" not in first
    # a segmentation winner's metrics hold map_segm (what decided it) beside the box mAP
    seg_meta = dataclasses.replace(result.meta, metrics={**result.meta.metrics, "map": 0.0659,
                                                         "map_segm": 0.2038})
    seg = fit_summary(dataclasses.replace(result, meta=seg_meta), cfg).strip().splitlines()[0]
    assert seg_meta.decided_by == "map_segm"
    assert seg.startswith("winner: ema weights, epoch 1, map_segm 0.2038, mAP 0.0659 -> ")
