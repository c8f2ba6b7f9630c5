"""Two Ray nodes on 127.0.0.1 (a head and a worker node, two `ray start` processes), a real
`ray job submit` of jobs/train.py with one Train worker on each node, storage in a directory
both nodes see, a real `mlflow server`. Then the worker node dies mid-epoch (its whole process
group, raylet included, SIGKILLed): with scaling.max_failures=1 the run restarts on the head's
CPUs from the last checkpoint and ends with exactly the weights of the uninterrupted run.

Resources force the placement: the head has 2 CPUs, the worker node 1 CPU and too little
`memory` for the Tune trial actor (which asks for 64 MiB and no CPU), so only a Train worker
can run there; scaling.placement_strategy=SPREAD puts the two workers on different nodes while
both are alive. The tests run in file order: the second kills the worker node.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from tests_support import free_port, stop_group, wait_http

from raydetr.train.checkpoint import BEST_FILES, latest_checkpoint, read_state

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
WORKER_NODE_MEMORY = 32 * 1024 * 1024  # below the trial actor's 64 MiB: no trial there

pytestmark = pytest.mark.slow


@dataclass
class TwoNodes:
    dashboard_url: str
    env: dict[str, str]
    worker_node: subprocess.Popen


def _ray_start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen([str(VENV_BIN / "ray"), "start", "--block", *args], env=env,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _wait_nodes(env: dict[str, str], gcs: str, count: int, timeout_s: float = 90) -> None:
    code = ("import ray, sys, time; ray.init(address=sys.argv[1], log_to_driver=False); "
            "n = sum(x['Alive'] for x in ray.nodes()); print(n)")
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        out = subprocess.run([sys.executable, "-c", code, gcs], env=env, capture_output=True,
                             text=True, timeout=60)
        if out.returncode == 0 and out.stdout.strip().splitlines()[-1:] == [str(count)]:
            return
        time.sleep(1)
    raise TimeoutError(f"the cluster did not reach {count} alive nodes: {out.stdout[-500:]}"
                       f"{out.stderr[-1500:]}")


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    logs = tmp_path_factory.mktemp("ray2")
    temp_dir = Path("/tmp") / f"rdt{secrets.token_hex(3)}"  # short: Ray's socket paths are long
    env = dict(os.environ)
    env.update(
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",  # local-only mode: every address is loopback
        RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16),
        OMP_NUM_THREADS="1", RAY_USAGE_STATS_ENABLED="0",
        # notice the dead node in ~2 s instead of the default ~30 s
        RAY_health_check_period_ms="500", RAY_health_check_timeout_ms="1000",
        RAY_health_check_failure_threshold="3",
        PATH=f"{VENV_BIN}:{env.get('PATH', '')}",
    )
    env.pop("RAY_ADDRESS", None)
    gcs_port, dash_port = free_port(), free_port()
    head = _ray_start(["--head", "--node-ip-address=127.0.0.1", f"--port={gcs_port}",
                       "--dashboard-host=127.0.0.1", f"--dashboard-port={dash_port}",
                       "--num-cpus=2", f"--temp-dir={temp_dir}", "--include-dashboard=true",
                       "--disable-usage-stats"], env, logs / "head.log")
    worker = None
    try:
        url = f"http://127.0.0.1:{dash_port}"
        wait_http(f"{url}/api/version", timeout_s=90, alive=head)
        worker = _ray_start([f"--address=127.0.0.1:{gcs_port}", "--node-ip-address=127.0.0.1",
                             "--num-cpus=1", f"--memory={WORKER_NODE_MEMORY}",
                             "--disable-usage-stats"], env, logs / "worker.log")
        _wait_nodes(env, f"127.0.0.1:{gcs_port}", 2)
        yield TwoNodes(dashboard_url=url, env=env, worker_node=worker)
    finally:
        if worker is not None:
            stop_group(worker)
        stop_group(head)


def _job_cmd(cluster: TwoNodes, out: Path, name: str, mlflow_uri: str, *extra: str) -> list[str]:
    return [
        str(VENV_BIN / "ray"), "job", "submit", "--address", cluster.dashboard_url,
        "--working-dir", str(REPO), "--",
        "python", "jobs/train.py", "--config", "configs/smoke.yaml",
        f"run.output_dir={out}", f"run.name={name}", "run.seed=3", "optim.epochs=3",
        "scaling.num_workers=2", "scaling.cpus_per_worker=1", "scaling.torch_threads=1",
        "scaling.placement_strategy=SPREAD", "ema.decays=[0.9,0.99]",
        "run.log_every_steps=1", f"mlflow.tracking_uri={mlflow_uri}",
        f"mlflow.model_name={name}-detector", *extra,
    ]


def _nodes_of_ranks(log: str) -> dict[int, set[str]]:
    out: dict[int, set[str]] = {}
    for rank, node in re.findall(r"rank (\d) of 2 on node (\w+)", log):
        out.setdefault(int(rank), set()).add(node)
    return out


def _final_state(out: Path, name: str) -> dict:
    return read_state(latest_checkpoint(out / name / "train"))


def test_two_nodes_job_keeps_both_bests_and_registers(two_nodes, mlflow_server, tmp_path_factory):
    import mlflow

    out = tmp_path_factory.getbasetemp() / "multinode-runs"
    proc = subprocess.run(_job_cmd(two_nodes, out, "spread", mlflow_server.uri),
                          env=two_nodes.env, capture_output=True, text=True, timeout=600,
                          cwd=REPO)
    log = proc.stdout + proc.stderr
    (out / "spread.log").write_text(log)
    assert proc.returncode == 0, log[-4000:]
    nodes = _nodes_of_ranks(log)
    assert sorted(nodes) == [0, 1] and len(nodes[0] | nodes[1]) == 2, (
        f"the two workers were not on two nodes: {nodes}")
    assert "registered: models:/spread-detector@champion" in log
    ckpt = latest_checkpoint(out / "spread" / "train")
    assert all((ckpt / f).is_file() for f in BEST_FILES.values()), "both bests kept"
    bests = json.loads((ckpt / "bests.json").read_text())
    assert set(bests) >= {"regular", "ema"}
    version = mlflow.MlflowClient(tracking_uri=mlflow_server.uri).get_model_version_by_alias(
        "spread-detector", "champion")
    assert version.tags["variant"] in ("ema", "regular")
    assert (out / "spread" / "winner" / "model.safetensors").is_file()


def test_worker_node_killed_mid_epoch_ends_equal(two_nodes, mlflow_server, tmp_path_factory):
    out = tmp_path_factory.getbasetemp() / "multinode-runs"
    reference = out / "spread" / "train"
    if not reference.is_dir():
        pytest.skip("needs the uninterrupted run of the previous test")
    proc = subprocess.Popen(
        _job_cmd(two_nodes, out, "killed", mlflow_server.uri, "scaling.max_failures=1"),
        env=two_nodes.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        cwd=REPO, start_new_session=True)
    lines: list[str] = []
    killed = 0  # number of log lines seen when the node was killed
    try:
        deadline = time.time() + 600
        for line in proc.stdout:
            lines.append(line)
            # second epoch (0-based 1) has made a step: kill the worker node now
            if not killed and re.search(r"epoch 1 step 1 loss", line):
                os.killpg(two_nodes.worker_node.pid, signal.SIGKILL)  # a crash, not a stop
                two_nodes.worker_node.wait(timeout=30)
                killed = len(lines)
            if time.time() > deadline:
                break
        proc.wait(timeout=60)
    finally:
        stop_group(proc)
        (out / "killed.log").write_text("".join(lines))
    log = "".join(lines)
    assert killed, "the run never reached epoch 2; see killed.log"
    assert proc.returncode == 0, log[-4000:]
    before, after = _nodes_of_ranks("".join(lines[:killed])), _nodes_of_ranks(
        "".join(lines[killed:]))
    assert len(before[0] | before[1]) == 2, f"not spread before the kill: {before}"
    assert sorted(after) == [0, 1] and len(after[0] | after[1]) == 1, (
        f"after the restart both ranks should run on the head: {after}")
    state, ref = _final_state(out, "killed"), read_state(latest_checkpoint(reference))
    assert [h["epoch"] for h in state["history"]] == [0, 1, 2]
    for k in ref["model"]:
        assert torch.equal(state["model"][k], ref["model"][k]), f"tensor {k} differs"
    assert state["ema"]["updates"] == ref["ema"]["updates"]
    for a, b in zip(state["ema"]["shadows"], ref["ema"]["shadows"]):
        assert all(torch.equal(a[k], b[k]) for k in b)
    assert "registered: models:/killed-detector@champion" in log
