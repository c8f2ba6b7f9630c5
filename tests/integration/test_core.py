"""Training-core defects on a real local Ray (issue 11): a stop decided on epoch N leaves
nothing after N however slow the scheduler is; an import-path EMA schedule reaches every
worker with total_steps; the best-weights cache is removed after success and early stop
(after a failure: test_train.py's fault test). Tiny sizes: mechanics, not accuracy."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from raydetr.config import load_config
from raydetr.train.checkpoint import best_cache_dir, latest_checkpoint, read_state
from raydetr.train.driver import fit

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def local_ray():
    import ray

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray.init(num_cpus=4, include_dashboard=True, dashboard_host="127.0.0.1")
    yield
    ray.shutdown()


def tiny(out: Path, name: str, *extra: str):
    return load_config(None, [
        f"run.output_dir={out}", f"run.name={name}", "run.seed=7",
        "model.resolution=64", "model.num_queries=20", "model.num_denoising=0",
        "data.synthetic_image_size=64", "data.synthetic_train_images=16",
        "data.synthetic_val_images=8", "data.multi_scale=false",
        "optim.batch_size=4", "optim.warmup_steps=2", "mlflow.enabled=false", *extra,
    ])


def test_stop_is_deterministic_with_a_slow_scheduler(tmp_path, local_ray, monkeypatch):
    """Defect 1: the scheduler takes 8 s to decide STOP on epoch 1 (an epoch here takes ~1 s).
    The workers wait for the decision, so the registered result holds epoch 1 only.
    Defect 10: the early-stopped run leaves no best-weights cache."""
    from raydetr.tune.early_stopping import EarlyStoppingScheduler

    decide = EarlyStoppingScheduler.on_trial_result

    def slow(self, controller, trial, result):
        time.sleep(8)
        return decide(self, controller, trial, result)

    monkeypatch.setattr(EarlyStoppingScheduler, "on_trial_result", slow)
    cfg = tiny(tmp_path, "slowstop", "optim.epochs=5", "early_stopping.enabled=true",
               "early_stopping.patience=1", "early_stopping.min_delta=0.9")
    result = fit(cfg)
    assert result.stopped_early
    history = json.loads((result.run_dir / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1], "an epoch after the STOP reached the result"
    assert result.meta["epochs_run"] == 1 and result.meta["epoch"] == 1
    assert latest_checkpoint(result.train_dir).name == "epoch_0001"
    assert not best_cache_dir(str(result.train_dir)).exists()


def test_import_path_schedule_reaches_two_workers(tmp_path, local_ray, monkeypatch):
    """Defect 4: ``ema.schedule=pkg.module:fn`` (not installed on the workers: it lives in a
    temp dir only the driver has on sys.path) trains on 2 workers and gets total_steps.
    Defect 10: the finished run leaves no best-weights cache."""
    pkg = tmp_path / "rdt_sched_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "decay.py").write_text(
        "def linear(updates, *, decay, total_steps):\n"
        "    return decay * min(1.0, updates / total_steps)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = tiny(tmp_path, "custom", "scaling.num_workers=2", "optim.epochs=2",
               "ema.schedule=rdt_sched_pkg.decay:linear", "ema.decay=0.9")
    result = fit(cfg)
    state = read_state(latest_checkpoint(result.train_dir))
    total = state["ema"]["schedule_kwargs"]["total_steps"]
    assert total == state["step"] == 4  # 16 images / (4 x 2 workers) = 2 steps x 2 epochs
    for row in state["history"]:
        assert row["ema_decay"] == pytest.approx(0.9 * min(1.0, row["step"] / total))
    assert not best_cache_dir(str(result.train_dir)).exists()
