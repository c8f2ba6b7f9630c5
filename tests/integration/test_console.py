"""What a person sees during `raydetr train`, and where a local Ray listens (issue 12).

One short fit in a subprocess: its default output is a header, exactly one line per epoch, then
the winner (no COCOeval tables, no Ray chatter); while it trains, every listening socket of its
process tree (Ray's GCS, raylet, dashboard, workers) is on loopback. One known exception is
torch's, not Ray's: the torch.distributed rendezvous store (TCPStore) that Ray Train opens on the
rank-0 Train worker binds the wildcard address, and torch offers no bind-address setting; it is
listed separately, not hidden. A second fit, with ``--verbose``, a worker restart and a live
MLflow server, brings the COCOeval tables and Ray's output back.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from listening import is_loopback, listening_sockets

pytestmark = pytest.mark.slow

RAYDETR = Path(sys.executable).parent / "raydetr"
TINY = ["model.resolution=64", "data.synthetic_train_images=16", "data.synthetic_val_images=8",
        "data.synthetic_image_size=64", "data.multi_scale=false", "mlflow.enabled=false"]


def _train(tmp_path: Path, name: str, *args: str, sample_sockets: bool = False):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    proc = subprocess.Popen(
        [str(RAYDETR), "train", *args, *TINY, f"run.name={name}", f"run.output_dir={tmp_path}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        start_new_session=True)
    seen: list[tuple[int, str, str, int]] = []
    while sample_sockets and proc.poll() is None:
        seen.extend(listening_sockets(proc.pid))
        time.sleep(2.0)
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out
    return out.splitlines(), seen


def test_default_log_is_one_line_per_epoch_and_ray_stays_on_loopback(tmp_path):
    lines, sockets = _train(tmp_path, "quiet", "optim.epochs=2", sample_sockets=True)
    # every server of the local Ray (GCS, raylet, dashboard, workers) listened on loopback
    assert {name for _, name, _, _ in sockets} >= {"gcs_server", "raylet"}, sockets
    outside = {(name, addr) for _, name, addr, _ in sockets if not is_loopback(addr)}
    torch_store = {(n, a) for n, a in outside if n.startswith("ray::RayTrainWo") and a == "::"}
    assert not outside - torch_store, f"listening outside 127.0.0.0/8: {outside - torch_store}"
    assert len({port for _, n, a, port in sockets if (n, a) in torch_store}) <= 1, sockets

    header_end = next(i for i, line in enumerate(lines) if line.startswith("MLflow "))
    assert lines[header_end - 5].startswith("dataset ")  # the header block
    winner = next(i for i, line in enumerate(lines) if line.startswith(("post-fit", "winner")))
    between = lines[header_end + 1:winner]
    assert [line.split("  ")[0] for line in between] == ["epoch 1/2", "epoch 2/2"], lines
    assert all("mAP_ema" in line and "ETA" in line for line in between)
    text = "\n".join(lines)
    for chatter in ("Average Precision", "Reporting training result", "Checkpoint successfully",
                    "Configuration for experiment", "RayTrainWorker", "Traceback"):
        assert chatter not in text, chatter


def test_mlflow_is_live_one_run_survives_a_worker_restart_verbose(tmp_path, mlflow_server):
    """A 3-epoch fit whose rank 0 dies after training epoch 2 (FailureConfig restarts it):
    MLflow shows the run RUNNING with epoch metrics while it trains, and afterwards exactly one
    run holds every epoch once, FINISHED, with the registered model. Run with ``--verbose``:
    COCOeval's tables and Ray's worker output are in its log."""
    import json

    from mlflow import MlflowClient

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_USAGE_STATS_ENABLED="0",
               RAYDETR_FAULT_INJECT=f"2:0:{tmp_path / 'killed-once'}")
    args = [*TINY[:-1], "optim.epochs=3", "scaling.max_failures=1", "run.name=live",
            f"run.output_dir={tmp_path}", f"mlflow.tracking_uri={mlflow_server.uri}",
            "mlflow.model_name=live-model"]
    proc = subprocess.Popen([str(RAYDETR), "train", "--verbose", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
    client = MlflowClient(tracking_uri=mlflow_server.uri)
    seen_live = None
    while proc.poll() is None and seen_live is None:
        runs = client.search_runs(client.get_experiment_by_name("raydetr").experiment_id
                                  if client.get_experiment_by_name("raydetr") else "0")
        for run in runs:
            steps = [m.step for m in client.get_metric_history(run.info.run_id, "map")]
            if run.info.status == "RUNNING" and steps:
                seen_live = (run.info.run_id, steps)
        time.sleep(2.0)
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out
    assert "Average Precision" in out and "RayTrainWorker" in out  # --verbose
    assert (tmp_path / "killed-once").exists(), "the worker was not killed"
    assert seen_live is not None, "no metric was visible while the fit was running"

    exp = client.get_experiment_by_name("raydetr")
    runs = client.search_runs(exp.experiment_id, filter_string="attributes.run_name = 'live'")
    assert len(runs) == 1, [r.info.run_id for r in runs]
    run = runs[0]
    assert run.info.run_id == seen_live[0] and run.info.status == "FINISHED"
    history = json.loads((tmp_path / "live" / "history.json").read_text())
    for key in ("map", "map_ema", "train_loss", "lr"):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert steps == [int(h["epoch"]) for h in history] and len(steps) == 3, (key, steps)
    version = client.get_model_version_by_alias("live-model", "champion")
    assert version.run_id == run.info.run_id
