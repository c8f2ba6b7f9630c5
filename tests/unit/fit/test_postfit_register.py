"""Every run dir post-fit writes can be registered later (``raydetr register DIR``), including
a search trial's ``results/<trial_id>`` (issue 11, defect 7)."""

from __future__ import annotations

import json

import torch

from raydetr.config import MlflowConfig, load_config
from raydetr.ema.shadow import Shadow
from raydetr.fit.postfit import finalize
from raydetr.model.build import build
from raydetr.record import Bests
from raydetr.registry.publish import register_run_dir
from raydetr.train.checkpoint import BestWeightsCache, update_bests, write_checkpoint


def test_search_trial_results_dir_can_be_registered(tmp_path):
    cfg = load_config(None, [f"run.output_dir={tmp_path}", "run.name=search",
                             "model.resolution=64", "model.num_queries=10",
                             "model.num_denoising=0", "mlflow.model_name=trial-model"])
    torch.manual_seed(0)
    model, _, _ = build(cfg.model, cfg.loss, 2)
    bests, cache = Bests(), BestWeightsCache(tmp_path / "cache")
    update_bests(bests, cache, epoch=1, map_regular=0.1, map_ema=0.2, shadow=Shadow(0, 0.993, 0.993),
                 regular_weights=model.state_dict, ema_weights=model.state_dict)
    train_dir = tmp_path / "search" / "trials" / "abc123"
    history = [{"epoch": 1, "map": 0.1, "map_ema": 0.2}]
    write_checkpoint(train_dir / "epoch_0001", bests=bests, cache=cache, state={
        "epoch": 1, "history": history, "classes": ["a", "b"], "config": cfg.to_dict()})

    out = tmp_path / "search" / "results" / "abc123"  # where search post-fit puts a trial
    finalize(cfg, out, train_dir, {}, publish=False)
    assert json.loads((out / "config.json").read_text()) == cfg.to_dict()

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    info = register_run_dir(out, MlflowConfig(tracking_uri=uri, model_name="trial-model"))
    assert info["model_uri"].startswith("models:/trial-model")
    assert (out / "registered.json").is_file()
