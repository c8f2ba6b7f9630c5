"""Two Ray nodes on 127.0.0.1 (a head and a worker node, each its own raylet: see
two_node_cluster.py; token auth), a real `ray job submit` of the README's command (jobs/train.py
--config configs/smoke.yaml) with one Train worker on each node, storage in a directory both
nodes see, a real `mlflow server`. Then the worker node dies
mid-epoch (every process of it, raylet included, SIGKILLed): with scaling.max_failures=1 the
run restarts on the head's CPUs from the last checkpoint and ends with exactly the weights of
the uninterrupted run.

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
import shutil
import subprocess
import sys
import tempfile
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
    env: dict[str, str]  # for clients: token auth + loopback-only mode
    worker_node_id: str
    proc: subprocess.Popen

    def kill_worker_node(self) -> None:
        self.proc.stdin.write("kill\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline().strip()
        assert line == "killed", f"two_node_cluster.py answered {line!r}"


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    logs = tmp_path_factory.mktemp("ray2")
    # short (Ray's socket paths are long); under the session's TMPDIR, removed with it
    temp_dir = Path(tempfile.gettempdir()) / f"r{secrets.token_hex(3)}"
    env = dict(os.environ)
    env.update(
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",  # local-only mode: every address is loopback
        RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16),
        OMP_NUM_THREADS="1", RAY_USAGE_STATS_ENABLED="0",
        RAY_DEDUP_LOGS="0",  # keep every rank's "rank r of 2 on node ..." line in the job log
        # notice the dead node in ~2 s instead of ~30 s
        RAY_health_check_period_ms="500", RAY_health_check_timeout_ms="1000",
        RAY_health_check_failure_threshold="3",
        PATH=f"{VENV_BIN}:{env.get('PATH', '')}",
    )
    env.pop("RAY_ADDRESS", None)
    err = open(logs / "cluster.log", "w")
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("two_node_cluster.py")),
         str(free_port()), str(free_port()), str(temp_dir), str(WORKER_NODE_MEMORY)],
        env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True,
        start_new_session=True)
    try:
        first = proc.stdout.readline()
        if not first:
            raise RuntimeError(f"two_node_cluster.py exited; see {logs / 'cluster.log'}")
        info = json.loads(first)
        wait_http(f"{info['dashboard_url']}/api/version", timeout_s=90, alive=proc)
        _wait_job_agent(info["dashboard_url"], env, logs)
        yield TwoNodes(dashboard_url=info["dashboard_url"], env=env,
                       worker_node_id=info["worker_node_id"], proc=proc)
    finally:
        proc.stdin.close()  # the helper shuts the cluster down
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            stop_group(proc)
        err.close()
        for d in (temp_dir, Path(f"{temp_dir}w")):  # both nodes' Ray temp dirs
            shutil.rmtree(d, ignore_errors=True)


def _wait_job_agent(url: str, env: dict[str, str], logs: Path, timeout_s: float = 120) -> None:
    """The dashboard answers before the head's job agent has registered ("No available agent
    to submit job"): submit an empty job until one is accepted and succeeds."""
    deadline = time.time() + timeout_s
    while True:
        proc = subprocess.run([str(VENV_BIN / "ray"), "job", "submit", "--address", url, "--",
                               "python", "-c", "pass"], env=env, capture_output=True,
                              text=True, timeout=300)
        if proc.returncode == 0:
            return
        (logs / "agent-probe.log").write_text(proc.stdout + proc.stderr)
        if "No available agent" not in proc.stderr + proc.stdout or time.time() > deadline:
            raise RuntimeError(f"the job server does not take jobs; see {logs}/agent-probe.log")
        time.sleep(3)


def _job_cmd(cluster: TwoNodes, out: Path, name: str, mlflow_uri: str, *extra: str) -> list[str]:
    return [
        str(VENV_BIN / "ray"), "job", "submit", "--address", cluster.dashboard_url,
        "--working-dir", str(REPO), "--",
        "python", "jobs/train.py", "--config", "configs/smoke.yaml",
        f"run.output_dir={out}", f"run.name={name}", "run.seed=3", "optim.epochs=3",
        "scaling.num_workers=2", "scaling.cpus_per_worker=1", "scaling.torch_threads=1",
        "scaling.placement_strategy=SPREAD", "ema.decay=[0.9,0.99]",
        # run.verbose: the workers' own lines (rank placement, per-step losses) reach the job log
        "run.log_every_steps=1", "run.verbose=true", f"mlflow.tracking_uri={mlflow_uri}",
        f"mlflow.model_name={name}-detector", *extra,
    ]


def _nodes_of_ranks(log: str) -> dict[int, set[str]]:
    out: dict[int, set[str]] = {}
    for rank, node in re.findall(r"rank (\d) of 2 on node (\w+)", log):
        out.setdefault(int(rank), set()).add(node)
    return out


def _final_state(out: Path, name: str) -> dict:
    return read_state(latest_checkpoint(out / name / "train"))


def test_two_nodes_job_keeps_both_bests_and_registers(two_nodes, mlflow_server, module_tmp):
    import mlflow

    out = module_tmp / "runs"
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(_job_cmd(two_nodes, out, "spread", mlflow_server.uri),
                          env=two_nodes.env, capture_output=True, text=True, timeout=600,
                          cwd=REPO)
    log = proc.stdout + proc.stderr
    (out / "spread.log").write_text(log)
    assert proc.returncode == 0, log[-4000:]
    assert re.search(r"Job '\S+' succeeded", log), f"no success line; see {out / 'spread.log'}"
    assert "effective 8 = 4 per worker x 1 accumulation x 2 workers" in log  # the header
    nodes = _nodes_of_ranks(log)
    assert sorted(nodes) == [0, 1] and len(nodes[0] | nodes[1]) == 2, (
        f"the two workers were not on two nodes: {nodes}")
    assert two_nodes.worker_node_id in nodes[0] | nodes[1]
    assert "registered: models:/spread-detector@champion" in log
    ckpt = latest_checkpoint(out / "spread" / "train")
    assert all((ckpt / f).is_file() for f in BEST_FILES.values()), "both bests kept"
    bests = json.loads((ckpt / "bests.json").read_text())
    assert set(bests) >= {"regular", "ema"}
    client = mlflow.MlflowClient(tracking_uri=mlflow_server.uri)
    version = client.get_model_version_by_alias("spread-detector", "champion")
    assert version.tags["variant"] in ("ema", "regular")
    history = client.get_metric_history(version.run_id, "map_ema")
    assert [m.step for m in history] == [1, 2, 3], "per-epoch EMA mAP logged, epochs from 1"
    assert (out / "spread" / "winner" / "model.safetensors").is_file()


def test_worker_node_killed_mid_epoch_ends_equal(two_nodes, mlflow_server, module_tmp):
    out = module_tmp / "runs"
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
            # epoch 2 has made a step: kill the worker node now
            if not killed and re.search(r"epoch 2 step 1 loss", line):
                two_nodes.kill_worker_node()
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
    assert two_nodes.worker_node_id not in after[0]
    state, ref = _final_state(out, "killed"), read_state(latest_checkpoint(reference))
    assert [h["epoch"] for h in state["history"]] == [1, 2, 3]
    for k in ref["model"]:
        assert torch.equal(state["model"][k], ref["model"][k]), f"tensor {k} differs"
    assert state["ema"]["updates"] == ref["ema"]["updates"]
    for a, b in zip(state["ema"]["shadows"], ref["ema"]["shadows"]):
        assert all(torch.equal(a[k], b[k]) for k in b)
    assert "registered: models:/killed-detector@champion" in log
