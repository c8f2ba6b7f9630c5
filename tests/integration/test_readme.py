"""The README's commands, run as a user would run them (in a fresh folder).

- the 5-minute tour block, line by line; its `raydetr train` is also what a person sees by
  default (issue 12): a header, exactly one line per epoch, then the winner (no COCOeval
  tables, no Ray chatter), and while it trains every listening socket of its process tree
  (Ray's GCS, raylet, dashboard, workers) is on loopback. One known exception is torch's, not
  Ray's: the torch.distributed rendezvous store (TCPStore) that Ray Train opens on the rank-0
  Train worker binds the wildcard address, and torch offers no bind-address setting; it is
  listed separately, not hidden;
- the Python snippet (pyfunc champion, RayDETR API);
- `mlflow ui` on the tour's database;
- `ray job submit ... configs/smoke.yaml` is run by test_multinode.py (on two nodes);
- `make demo` is `raydetr demo`, run here with one epoch and ``--verbose``, which brings
  COCOeval's tables and Ray's worker output back.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from listening import is_loopback, listening_sockets
from tests_support import free_port, stop_group, wait_http

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text()
VENV_BIN = Path(sys.executable).parent

pytestmark = pytest.mark.slow


def _block(after: str, lang: str) -> str:
    start = README.index(after)
    m = re.compile(rf"```{lang}\n(.*?)```", re.S).search(README, start)
    assert m, f"no ```{lang} block after {after!r} in README.md"
    return m.group(1)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    env.update(PATH=f"{VENV_BIN}:{env.get('PATH', '')}", OMP_NUM_THREADS="1",
               RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", PYTHONUNBUFFERED="1", **extra)
    return env


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: int = 600,
         sockets: list[tuple[int, str, str, int]] | None = None) -> str:
    """Run ``cmd`` to the end and return its output (stdout + stderr, through a file: no pipe
    to fill). With ``sockets``, list the listening sockets of its process tree every second."""
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        deadline = time.time() + timeout
        try:
            while proc.poll() is None and time.time() < deadline:
                if sockets is not None:
                    sockets.extend(listening_sockets(proc.pid))
                try:
                    proc.wait(timeout=1.0)
                except subprocess.TimeoutExpired:
                    pass
        finally:
            stop_group(proc)  # only if still running: past the deadline
        log.seek(0)
        out = log.read()
    assert proc.returncode == 0, f"{shlex.join(cmd)} failed:\n{out[-4000:]}"
    return out


@dataclass
class Tour:
    cwd: Path
    log: str  # every command's output, in order
    train_lines: list[str]  # `raydetr train`'s output
    train_sockets: list[tuple[int, str, str, int]]  # sampled while it ran


@pytest.fixture(scope="module")
def tour(module_tmp) -> Tour:
    cwd = module_tmp
    lines = [ln for ln in _block("<!-- tour", "bash").splitlines() if ln.strip()]
    assert lines and all(ln.startswith("raydetr ") for ln in lines)
    assert sum(ln.startswith("raydetr train ") for ln in lines) == 1
    outputs, train_out, sockets = [], "", []
    for ln in lines:
        is_train = ln.startswith("raydetr train ")
        outputs.append(_run(shlex.split(ln), cwd, _env(), sockets=sockets if is_train else None))
        train_out = outputs[-1] if is_train else train_out
    (cwd / "tour.log").write_text("\n".join(outputs))
    return Tour(cwd, "\n".join(outputs), train_out.splitlines(), sockets)


def test_tour_commands(tour):
    log = tour.log
    assert re.search(r"epoch 4/4 .*mAP .*mAP_ema", log), "one line per epoch with both mAPs"
    assert "registered: models:/raydetr@champion" in log
    assert (tour.cwd / "predictions" / "detections.json").is_file()
    assert list((tour.cwd / "predictions").glob("*.jpg")), "images with boxes drawn"


def test_train_log_is_one_line_per_epoch_and_ray_stays_on_loopback(tour):
    sockets, lines = tour.train_sockets, tour.train_lines
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
    assert [line.split("  ")[0] for line in between] == [f"epoch {e}/4" for e in range(1, 5)], (
        lines)
    assert all("mAP_ema" in line and "ETA" in line for line in between)
    text = "\n".join(lines)
    for chatter in ("Average Precision", "Reporting training result", "Checkpoint successfully",
                    "Configuration for experiment", "RayTrainWorker", "Traceback"):
        assert chatter not in text, chatter


def test_python_snippet(tour):
    code = _block("Use the champion from Python", "python")
    _run([sys.executable, "-c", code], tour.cwd,
         _env(MLFLOW_TRACKING_URI=f"sqlite:///{tour.cwd}/runs/mlflow.db",
              MLFLOW_ALLOW_PICKLE_DESERIALIZATION="false"))
    assert (tour.cwd / "runs" / "api" / "winner" / "model.safetensors").is_file()


def test_mlflow_ui_serves_the_tour_database(tour):
    line = re.search(r"`(mlflow ui [^`]+)`", README).group(1)
    port = free_port()
    proc = subprocess.Popen([*shlex.split(line), "--port", str(port)], cwd=tour.cwd,
                            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", timeout_s=120)
    finally:
        stop_group(proc)


def test_make_demo_command(tmp_path):
    makefile = (REPO / "Makefile").read_text()
    assert "$(BIN)/raydetr demo" in makefile
    # the demo's own path (synthetic data made, prepared, trained, registered), fewer images;
    # --verbose: COCOeval's tables and Ray's worker output reach the console
    out = _run([str(VENV_BIN / "raydetr"), "demo", "--verbose", "optim.epochs=1",
                "data.synthetic_train_images=32", "data.synthetic_val_images=16"],
               tmp_path, _env())
    assert "registered: models:/raydetr@champion" in out
    assert "Average Precision" in out and "RayTrainWorker" in out
