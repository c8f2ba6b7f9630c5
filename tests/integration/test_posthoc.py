"""Post-hoc EMA end to end on a real local Ray and a real MLflow server.

One training run (1 CPU worker, 2 epochs, rank 0 killed once after training epoch 2 and
restarted from the epoch-1 checkpoint by FailureConfig) tracks the power EMA at sigma_rel 0.07
directly (ema.schedule=power) and records post-hoc snapshots of 0.05 and 0.10. The same run
shows MLflow is live and survives the restart: the run is RUNNING with epoch metrics while it
trains, and afterwards exactly one run holds every epoch once, FINISHED, with the registered
model. `raydetr posthoc` reconstructs 0.07 from the snapshots, which must match the directly
tracked shadow, evaluates the profiles as Ray tasks, logs nested MLflow runs under the training
run and registers the best only when it beats the winner. Then `raydetr tune --posthoc` runs a
Tune search with no training, and a 2-worker run checks ema.reference_batch.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from safetensors.torch import load_file

from raydetr.commands.cli import main
from raydetr.config import load_config
from raydetr.ema.posthoc import list_snapshots
from raydetr.fit.driver import fit
from raydetr.fit.posthoc import evaluate_profile, open_run
from raydetr.train.checkpoint import latest_checkpoint, read_state

pytestmark = pytest.mark.slow
EVERY = 2


@pytest.fixture(scope="module")
def local_ray():
    import ray

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    # address="local": never attach to another `ray start` cluster on this machine.
    ray.init(address="local", num_cpus=4, include_dashboard=True, dashboard_host="127.0.0.1")
    yield
    ray.shutdown()


def tiny(out: Path, name: str, *extra: str):
    return load_config(None, [
        f"run.output_dir={out}", f"run.name={name}", "run.seed=7",
        "model.resolution=64", "model.num_queries=20", "model.num_denoising=0",
        "data.synthetic_image_size=64", "data.synthetic_train_images=16",
        "data.synthetic_val_images=8", "data.multi_scale=false",
        "optim.batch_size=4", "optim.epochs=3", "optim.warmup_steps=2", *extra,
    ])


@pytest.fixture(scope="module")
def trained(module_tmp, local_ray, mlflow_server):
    out = module_tmp
    cfg = tiny(out, "ph", "ema.schedule=power", "ema.schedule_kwargs={sigma_rel: 0.07}",
               "ema.decay=0.99999999", "ema.posthoc.enabled=true",
               f"ema.posthoc.every_steps={EVERY}", "scaling.max_failures=1", "optim.epochs=2",
               f"mlflow.tracking_uri={mlflow_server.uri}", "mlflow.experiment=posthoc")
    marker = out / "killed-once"
    watcher = _LiveRuns(mlflow_server.uri, "posthoc")
    os.environ["RAYDETR_FAULT_INJECT"] = f"2:0:{marker}"  # after training epoch 2
    try:
        watcher.start()
        result = fit(cfg)
    finally:
        watcher.stop()
        del os.environ["RAYDETR_FAULT_INJECT"]
    assert marker.exists(), "the fault was not injected"
    return result, mlflow_server, watcher.seen


class _LiveRuns(threading.Thread):
    """Polls MLflow while the fit runs: the first RUNNING run with a logged ``map`` step."""

    def __init__(self, uri: str, experiment: str):
        super().__init__(daemon=True)
        from mlflow import MlflowClient

        self.client, self.experiment = MlflowClient(tracking_uri=uri), experiment
        self.seen: tuple[str, list[int]] | Exception | None = None
        self.halt = threading.Event()

    def run(self):
        try:
            while not self.halt.is_set() and self.seen is None:
                exp = self.client.get_experiment_by_name(self.experiment)
                for run in self.client.search_runs([exp.experiment_id]) if exp else []:
                    steps = [m.step
                             for m in self.client.get_metric_history(run.info.run_id, "map")]
                    if run.info.status == "RUNNING" and steps:
                        self.seen = (run.info.run_id, steps)
                self.halt.wait(1.0)
        except Exception as exc:  # noqa: BLE001 - reported by the test, not lost in the thread
            self.seen = exc

    def stop(self):
        self.halt.set()
        self.join(timeout=30)


def test_mlflow_is_live_and_one_run_survives_the_restart(trained):
    from mlflow import MlflowClient

    result, server, seen_live = trained
    assert seen_live is not None, "no metric was visible while the fit was running"
    assert not isinstance(seen_live, Exception), f"polling MLflow failed: {seen_live!r}"
    client = MlflowClient(tracking_uri=server.uri)
    exp = client.get_experiment_by_name("posthoc")
    runs = client.search_runs([exp.experiment_id], filter_string="attributes.run_name = 'ph'")
    assert len(runs) == 1, [r.info.run_id for r in runs]
    run = runs[0]
    assert run.info.run_id == seen_live[0] and run.info.status == "FINISHED"
    history = json.loads((result.run_dir / "history.json").read_text())
    for key in ("map", "map_ema", "train_loss", "lr"):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert steps == [int(h["epoch"]) for h in history] and len(steps) == 2, (key, steps)
    registered = json.loads((result.run_dir / "fit.json").read_text())["registered"]
    version = client.get_model_version(registered["model_name"], str(registered["version"]))
    assert version.run_id == run.info.run_id


def test_snapshots_survive_the_restart(trained):
    result, _, _ = trained
    state = read_state(latest_checkpoint(result.train_dir))
    steps = int(state["step"])
    snaps = list_snapshots(result.train_dir / "posthoc")
    assert sorted({s.step for s in snaps}) == list(range(EVERY, steps + 1, EVERY))
    assert all(s.updates == s.step for s in snaps)  # the restored tracker kept counting
    assert {s.sigma_rel for s in snaps} == {0.05, 0.10}
    assert state["posthoc"]["written"][-1] == steps
    # The run still reported both mAPs every epoch.
    assert all("map" in h and "map_ema" in h for h in state["history"])
    assert len(state["history"]) == 2


def test_posthoc_command_reconstructs_the_direct_shadow(trained, capsys):
    import mlflow

    result, server, _ = trained
    rc = main(["posthoc", str(result.run_dir), "--sigma-rel", "0.05", "0.07", "0.1",
               "--register"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "post-hoc EMA of ph" in printed
    report = json.loads((result.run_dir / "posthoc" / "results.json").read_text())
    rows = {r["sigma_rel"]: r for r in report["rows"]}
    assert set(rows) == {0.05, 0.07, 0.1}

    # Weights: the 0.07 reconstruction vs the checkpoint's directly tracked shadow.
    state = read_state(latest_checkpoint(result.train_dir))
    direct = state["ema"]["shadows"][0]
    rebuilt = load_file(str(Path(rows[0.07]["model_dir"]) / "model.safetensors"))
    keys = [k for k in direct if direct[k].is_floating_point()]
    rel_err = math.sqrt(sum(float((rebuilt[k].double() - direct[k].double()).pow(2).sum())
                            for k in keys) / sum(float(direct[k].double().pow(2).sum())
                                                 for k in keys))
    # mAP: the direct shadow through the same evaluation path.
    run = open_run(result.run_dir)
    direct_dir = result.run_dir / "posthoc" / "direct"
    direct_dir.mkdir()
    from raydetr.artifacts import save_weights

    save_weights({k: v.float() if v.is_floating_point() else v for k, v in direct.items()},
                 direct_dir / "model.safetensors")
    meta = json.loads((Path(rows[0.07]["model_dir"]) / "meta.json").read_text())
    (direct_dir / "meta.json").write_text(json.dumps(meta))
    direct_metrics = evaluate_profile(direct_dir, run.prepared, run.val_split)
    map_diff = abs(rows[0.07]["map"] - direct_metrics["map"])
    print(f"\nRay run: post-hoc 0.07 vs direct shadow: relative weight error {rel_err:.2e}, "
          f"mAP {rows[0.07]['map']:.4f} vs {direct_metrics['map']:.4f} (diff {map_diff:.4f})")
    assert rel_err < 1e-3
    assert map_diff < 0.01
    assert rows[0.1]["profile_residual"] < 1e-6  # a tracked profile is represented exactly

    # MLflow: one nested run per profile under the training run.
    client = mlflow.MlflowClient(tracking_uri=server.uri)
    fit_info = json.loads((result.run_dir / "fit.json").read_text())
    parent = fit_info["registered"]["run_id"]
    exp = client.get_experiment_by_name("posthoc")
    children = client.search_runs([exp.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent}'")
    assert sorted(float(c.data.params["sigma_rel"]) for c in children) == [0.05, 0.07, 0.1]
    assert all("map" in c.data.metrics for c in children)

    # --register: published only when the best profile beats the run's winner.
    best, winner_map = report["best"], report["winner_map"]
    mv = client.get_model_version_by_alias("raydetr", "champion")
    with capsys.disabled():
        print(f"\n{printed}\nbest post-hoc mAP {best['map']:.4f} vs winner {winner_map:.4f}; "
              f"champion is version {mv.version} ({mv.tags.get('variant')})")
    if best["map"] > winner_map:
        assert mv.tags["variant"] == "posthoc_ema" and "registered:" in printed
    else:
        assert mv.tags["variant"] != "posthoc_ema" and "not registered" in printed


def test_tune_posthoc_searches_without_training(trained, capsys):
    result, _, _ = trained
    rc = main(["tune", "--posthoc", str(result.run_dir), "--sigma-rel-range", "0.03", "0.2",
               "--num-samples", "2"])
    assert rc == 0
    report = json.loads((result.run_dir / "posthoc" / "tune_results.json").read_text())
    assert len(report["rows"]) == 2
    assert all(0.03 <= r["sigma_rel"] <= 0.2 for r in report["rows"])
    assert not (result.run_dir / "trials").exists()  # no trial trained
    assert "post-hoc Tune search" in capsys.readouterr().out


def test_posthoc_user_errors_exit_2(tmp_path, trained):
    result, _, _ = trained
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    bad = [
        ([str(tmp_path), "--sigma-rel", "0.05"], "not a raydetr run directory"),
        ([str(result.run_dir), "--sigma-rel", "0.5"], "must be in (0, 0.28)"),
        ([str(result.run_dir), "--sigma-rel", "0.05", "--step", "3"], "no snapshot at step 3"),
    ]
    for args, message in bad:
        proc = subprocess.run([sys.executable, "-m", "raydetr.commands.cli", "posthoc", *args],
                              capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 2, proc.stderr
        assert message in proc.stderr and "Traceback" not in proc.stderr


def test_reference_batch_scales_the_decay_for_two_workers(tmp_path, local_ray):
    """ema.decay=0.99 and ema.tau=20 for a reference batch of 4 (what 1 worker x 4 images uses
    unchanged): 2 workers x 4 are k=2 reference batches per step, so the run uses 0.99**2 and
    tau/2, and keeps weight 0.99**(N/4) on the model of N images ago, as 1 worker does (the
    k=1 case and that algebra: tests/unit/ema)."""
    cfg = tiny(tmp_path, "w2", "scaling.num_workers=2", "optim.epochs=1",
               "data.synthetic_train_images=8",
               "ema.decay=0.99", "ema.tau=20", "ema.reference_batch=4",
               "mlflow.enabled=false")
    result = fit(cfg)
    ema = read_state(latest_checkpoint(result.train_dir))["ema"]
    assert not (result.train_dir / "posthoc").exists()  # off by default
    assert ema["decays"][0] == pytest.approx(0.99**2)
    assert ema["schedule_kwargs"]["tau"] == pytest.approx(20 / 2)
    # one typed identity: named by the configured decay, applied with the effective one
    row = read_state(latest_checkpoint(result.train_dir))["history"][-1]
    assert "map_ema@0.99" in row and row["map_ema_decay_effective"] == pytest.approx(0.99**2)
    if result.meta.variant == "ema":
        assert result.meta.shadow["decay"] == 0.99
        assert result.meta.shadow["effective"] == pytest.approx(0.99**2)
