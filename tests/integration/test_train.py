"""The main job on a real local Ray: DDP on 2 CPU workers, faults, resume, early stopping, search,
and the training-core defects of issue 11 (a stop decided on epoch N leaves nothing after N
however slow the scheduler is; an import-path EMA schedule reaches every worker with
total_steps; the best-weights cache is removed after success, early stop and failure).

Tiny sizes (64 px synthetic images, a handful of images): these tests check mechanics and exact
equalities, not accuracy (tests/unit/train has the overfit test; bench/ has convergence).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import pytest
import torch

from raydetr.config import load_config
from raydetr.fit.cluster import FitError
from raydetr.fit.driver import fit, has_checkpoints
from raydetr.train.checkpoint import best_cache_dir, latest_checkpoint, read_state

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
        "optim.batch_size=4", "optim.epochs=3", "optim.warmup_steps=2",
        *extra,
    ])


# 2 workers (DDP, gloo), 2 shadows: the uninterrupted reference of the fault test, and the
# one-run-with-shadows side of the search test.
TWO = ("scaling.num_workers=2", "ema.decay=[0.9,0.99]", "mlflow.enabled=false", "optim.epochs=2")


@pytest.fixture(scope="module")
def reference(module_tmp, local_ray):
    return fit(tiny(module_tmp / "reference", "ref", *TWO))


def final_state(result_or_dir) -> dict:
    train_dir = getattr(result_or_dir, "train_dir", result_or_dir)
    return read_state(latest_checkpoint(train_dir))


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"tensor {k} differs"


def test_fault_restart_and_resume_equal_uninterrupted(tmp_path, reference, monkeypatch):
    """2 workers (DDP, gloo). A rank killed with os._exit restarts from the latest checkpoint
    (FailureConfig) and ends with exactly the weights of an uninterrupted run; so does a run
    that died for good and was continued with --resume."""
    ref_state = final_state(reference)
    assert [h["epoch"] for h in ref_state["history"]] == [1, 2]  # numbered from 1
    assert latest_checkpoint(reference.train_dir).name == "epoch_0002"

    monkeypatch.setenv("RAYDETR_FAULT_INJECT", f"2:1:{tmp_path / 'killed-once'}")
    restarted = fit(tiny(tmp_path, "restart", *TWO, "scaling.max_failures=1"))
    assert (tmp_path / "killed-once").exists(), "the fault was not injected"
    state = final_state(restarted)
    assert_same_weights(state["model"], ref_state["model"])
    assert state["ema"]["updates"] == ref_state["ema"]["updates"]
    for a, b in zip(state["ema"]["shadows"], ref_state["ema"]["shadows"]):
        assert_same_weights(a, b)

    monkeypatch.setenv("RAYDETR_FAULT_INJECT", f"2:0:{tmp_path / 'killed-for-good'}")
    with pytest.raises(FitError, match="--resume"):
        fit(tiny(tmp_path, "resumed", *TWO))
    # issue 11 defect 10: a run that failed for good leaves no best-weights cache either
    assert not best_cache_dir(str(tmp_path / "resumed" / "train")).exists()
    monkeypatch.delenv("RAYDETR_FAULT_INJECT")
    resumed = fit(tiny(tmp_path, "resumed", *TWO), resume=True)
    state = final_state(resumed)
    assert_same_weights(state["model"], ref_state["model"])
    assert [h["epoch"] for h in state["history"]] == [1, 2]
    assert state["ema"]["updates"] == ref_state["ema"]["updates"]


def test_two_worker_evaluation_is_pycocotools_on_the_whole_val_split(reference):
    """Issue 24: the 2-worker fit matched each rank's val images there and accumulated on rank
    0. Re-predicting the final weights (regular and both shadows) rank by rank as the workers
    did: the per-rank matches merged give pycocotools' numbers on the whole split (1e-9). (This
    process's forward is not bit-identical to the workers', so the fit's own numbers are not
    compared here: tests/unit/eval compares the two evaluations on fixed detections.)"""
    from raydetr.config import build_config
    from raydetr.data.loader import SplitReader
    from raydetr.eval.coco import coco_metrics
    from raydetr.eval.distributed import coco_metrics_of_matches, match_records
    from raydetr.fit.driver import ensure_prepared
    from raydetr.model.build import build, resolve_model_config
    from raydetr.train.engine import predict_records

    state = final_state(reference)
    cfg, classes, last = build_config(dict(state["config"]), "test"), state["classes"], \
        state["history"][-1]
    model, _, postprocessor = build(cfg.model, cfg.loss, len(classes))
    reader = SplitReader(ensure_prepared(cfg), cfg.data.val_split, cfg.data)
    resolution = resolve_model_config(cfg.model)["resolution"]
    variants = {"map": state["model"], **{
        f"map_ema@{d}": {**state["model"], **shadow}
        for d, shadow in zip(state["ema"]["decays"], state["ema"]["shadows"])}}
    assert set(variants) <= set(last)
    recall = []
    for key, weights in variants.items():
        model.load_state_dict(weights)
        per_rank = [predict_records({"m": model}, postprocessor, reader.eval_batches(
            rank=rank, world=2, batch_size=max(cfg.optim.batch_size, 8),
            resolution=resolution), "cpu")["m"] for rank in range(2)]
        assert all(per_rank) and len({r["image_id"] for recs in per_rank for r in recs}) == 8
        parts = [match_records(recs, classes) for recs in per_rank]
        distributed = coco_metrics_of_matches(parts, classes)
        single = coco_metrics([r for recs in per_rank for r in recs], classes)
        assert distributed.pop("per_class") == pytest.approx(single.pop("per_class"), abs=1e-9)
        assert distributed == pytest.approx(single, abs=1e-9), key
        recall.append(single["mar"])
    assert max(recall) > 0  # the comparison is not between all-zero metrics
    assert last["eval_seconds"] >= last["eval_match_seconds"] > 0


def test_failed_start_does_not_block_and_finished_run_needs_resume(tmp_path, local_ray,
                                                                   monkeypatch, caplog):
    """A run whose worker dies before its first epoch is saved leaves tune/ + train/ but no
    checkpoint: the next attempt with the same name starts afresh. Once an epoch is saved, the
    same name needs --resume."""
    cfg = tiny(tmp_path, "once", "optim.epochs=1", "mlflow.enabled=false",
               "scaling.max_failures=0")
    monkeypatch.setenv("RAYDETR_FAULT_INJECT", f"1:0:{tmp_path / 'killed'}")  # epoch 1
    with pytest.raises(FitError, match="No epoch finished"):
        fit(cfg)
    monkeypatch.delenv("RAYDETR_FAULT_INJECT")
    run_dir = tmp_path / "once"
    assert (run_dir / "tune").is_dir() and not has_checkpoints(run_dir)
    with caplog.at_level(logging.INFO, logger="raydetr.driver"):
        result = fit(cfg)
    assert "never finished an epoch: starting it afresh (removing tune, train" in caplog.text
    assert [h["epoch"] for h in json.loads((result.run_dir / "history.json").read_text())] == [1]
    assert has_checkpoints(run_dir)
    with pytest.raises(FitError, match="already exists"):
        fit(cfg)


def test_early_stop_waits_for_a_slow_scheduler_registers_and_leaves_nothing_running(
        tmp_path, local_ray, monkeypatch):
    """A Tune-scheduler STOP ends the trial; post-fit still registers from storage (embedded
    sqlite MLflow), and no worker actor or placement group survives. Issue 11 defect 1: the
    scheduler takes 5 s to decide STOP on epoch 2 (an epoch here takes ~1 s); the workers wait
    for the decision, so nothing after epoch 2 reaches the result. Defect 10: the early-stopped
    run leaves no best-weights cache."""
    import mlflow
    from ray.util import placement_group_table

    from raydetr.stopping.scheduler import EarlyStoppingScheduler

    decide = EarlyStoppingScheduler.on_trial_result

    def slow_stop(self, controller, trial, result):
        decision = decide(self, controller, trial, result)
        if decision == EarlyStoppingScheduler.STOP:
            time.sleep(5)
        return decision

    monkeypatch.setattr(EarlyStoppingScheduler, "on_trial_result", slow_stop)
    cfg = tiny(tmp_path, "es", "optim.epochs=8", "early_stopping.enabled=true",
               "early_stopping.patience=2", "early_stopping.min_delta=0.9",
               "mlflow.model_name=es-model")
    result = fit(cfg)
    assert result.stopped_early
    history = json.loads((result.run_dir / "history.json").read_text())
    assert len(history) == 2, "patience 2 with an unreachable min_delta stops after 2 epochs"
    assert [h["epoch"] for h in history] == [1, 2], "an epoch after the STOP reached the result"
    assert latest_checkpoint(result.train_dir).name == "epoch_0002"
    assert result.meta.epoch in (1, 2) and result.meta.epochs_run == 2
    assert not best_cache_dir(str(result.train_dir)).exists()
    assert result.registered is not None
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    version = client.get_model_version_by_alias("es-model", "champion")
    assert version.tags["variant"] == result.meta.variant
    assert client.get_run(version.run_id).info.status == "FINISHED"

    # Ray Train removes a killed run's placement group asynchronously (its cleaner polls the
    # State API, which answers slowly on a saturated machine: seen to need over 60 s).
    deadline = time.time() + 180
    while True:
        alive = _alive_actor_classes()
        pgs = [pg for pg in placement_group_table().values() if pg["state"] != "REMOVED"]
        if not (alive or pgs) or time.time() > deadline:
            break
        time.sleep(1)
    assert not alive, f"actors left behind: {alive}"
    assert not pgs, f"placement groups left behind: {pgs}"


def _alive_actor_classes() -> list[str]:
    import ray

    actors = ray._private.state.actors()  # GCS table; works without the dashboard
    return [a["ActorClassName"] for a in actors.values()
            if a["State"] == "ALIVE" and "Train" in a["ActorClassName"]]


def test_search_equals_shadows_and_nests_mlflow_runs(tmp_path, reference, caplog):
    """A 2-trial Tune search over ema.decay == one run with 2 EMA shadows (same seed, 2 workers
    each: the fault test's reference run), per decay;
    MLflow has a parent run with one nested run per trial; the best trial is registered. The
    driver logs one line per trial start/end and per post-fit step."""
    import mlflow

    from raydetr.fit.search import search

    decays = [0.9, 0.99]
    search_cfg = tiny(tmp_path, "search", "scaling.num_workers=2", "tune.scheduler=fifo",
                      "mlflow.model_name=searched",
                      f"tune.search_space={{ema.decay: {{grid: {decays}}}}}",
                      "tune.max_concurrent_trials=1", "optim.epochs=2")
    with caplog.at_level(logging.INFO, logger="raydetr"):
        found = search(search_cfg)
    assert len(found.rows) == 2
    lines = [r.getMessage() for r in caplog.records]
    for row in found.rows:
        tid, d = row["trial_id"], row["params"]["ema.decay"]
        assert [m for m in lines if m.startswith(f"trial {tid} ")] == [
            f"trial {tid} started: ema.decay={d}",
            f"trial {tid} finished: ema.decay={d}; best score "
            f"{max(h['score'] for h in row['history']):.4f} after 2 epochs"]
    steps = [m.split(" ")[1] + " " + m.split(" ")[2] for m in lines if m.startswith("post-fit:")]
    assert sorted(steps) == sorted(["stripping the"] * 2
                                   + [s for s in steps if s.startswith("winner ")]
                                   + ["logging run"] * 2 + ["logging the", "registered searched"])
    assert len([s for s in steps if s.startswith("winner ")]) == 2  # one winner line per trial
    shadow_state = final_state(reference)
    assert [float(d) for d in shadow_state["ema"]["decays"]] == decays
    shadow_hist = shadow_state["history"]
    for row in found.rows:
        d = row["params"]["ema.decay"]
        per_epoch_search = [h["map_ema"] for h in row["history"]]
        per_epoch_shadow = [h[f"map_ema@{d}"] for h in shadow_hist]
        assert per_epoch_search == per_epoch_shadow, f"decay {d}"
        assert [h["map"] for h in row["history"]] == [h["map"] for h in shadow_hist]

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("raydetr")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("raydetr.kind") == "search"]
    assert len(parents) == 1
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(children) == 2
    champion = client.get_model_version_by_alias("searched", "champion")
    assert champion.run_id in {c.info.run_id for c in children}


SG_FORMS = Path(__file__).parents[1] / "unit" / "ema"  # sg_decay_forms.py


@pytest.mark.parametrize("schedule", ["rdt_sched_pkg.decay:linear", "sg_decay_forms:LinearDecay",
                                      "sg_decay_forms:linear"])
def test_import_path_schedule_reaches_two_workers(tmp_path, local_ray, monkeypatch, schedule):
    """Issue 11 defect 4: ``ema.schedule=pkg.module:fn`` (not installed on the workers: it lives
    in a folder only the driver has on sys.path) trains on 2 workers and gets total_steps; so do
    SuperGradients' two forms (issue 21: its documentation's ``LinearDecay`` class built with
    **kwargs and called (decay, step, total_steps), and the same as a plain function), with its
    values: decay * step / total_steps at step = the optimizer step, from 1.
    Defect 10: the finished run leaves no best-weights cache."""
    pkg = tmp_path / "rdt_sched_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "decay.py").write_text(
        "def linear(updates, *, decay, total_steps):\n"
        "    return decay * min(1.0, updates / total_steps)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(str(SG_FORMS))
    cfg = tiny(tmp_path, "custom", "scaling.num_workers=2", "optim.epochs=2",
               f"ema.schedule={schedule}", "ema.decay=0.9", "mlflow.enabled=false")
    result = fit(cfg)
    state = read_state(latest_checkpoint(result.train_dir))
    total = state["ema"]["schedule_kwargs"]["total_steps"]
    assert total == state["step"] == 4  # 16 images / (4 x 2 workers) = 2 steps x 2 epochs
    for row in state["history"]:
        assert row["ema_decay"] == pytest.approx(0.9 * min(1.0, row["step"] / total))
    assert not best_cache_dir(str(result.train_dir)).exists()
