"""The README's commands, run as a user would run them (in a fresh folder).

- the 5-minute tour block, line by line;
- the Python snippet (pyfunc champion, RayDETR API);
- `mlflow ui` on the tour's database;
- `ray job submit ... configs/smoke.yaml` is run by test_multinode.py (on two nodes);
- `make demo` is `raydetr demo`, run here with one epoch.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
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


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: int = 600) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{shlex.join(cmd)} failed:\n{out[-4000:]}"
    return out


@pytest.fixture(scope="module")
def tour(tmp_path_factory) -> Path:
    cwd = tmp_path_factory.mktemp("tour")
    lines = [ln for ln in _block("<!-- tour", "bash").splitlines() if ln.strip()]
    assert lines and all(ln.startswith("raydetr ") for ln in lines)
    outputs = [_run(shlex.split(ln), cwd, _env()) for ln in lines]
    (cwd / "tour.log").write_text("\n".join(outputs))
    return cwd


def test_tour_commands(tour):
    log = (tour / "tour.log").read_text()
    assert re.search(r"epoch 4/4 .*mAP .*mAP_ema", log), "one line per epoch with both mAPs"
    assert "registered: models:/raydetr@champion" in log
    assert (tour / "predictions" / "detections.json").is_file()
    assert list((tour / "predictions").glob("*.jpg")), "images with boxes drawn"


def test_python_snippet(tour):
    code = _block("Use the champion from Python", "python")
    _run([sys.executable, "-c", code], tour,
         _env(MLFLOW_TRACKING_URI=f"sqlite:///{tour}/runs/mlflow.db",
              MLFLOW_ALLOW_PICKLE_DESERIALIZATION="false"))
    assert (tour / "runs" / "api" / "winner" / "model.safetensors").is_file()


def test_mlflow_ui_serves_the_tour_database(tour):
    line = re.search(r"`(mlflow ui [^`]+)`", README).group(1)
    port = free_port()
    proc = subprocess.Popen([*shlex.split(line), "--port", str(port)], cwd=tour,
                            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", timeout_s=120)
    finally:
        stop_group(proc)


def test_make_demo_command(tmp_path):
    makefile = (REPO / "Makefile").read_text()
    assert "$(BIN)/raydetr demo" in makefile
    # the demo's own path (synthetic data made, prepared, trained, registered), fewer images
    out = _run([str(VENV_BIN / "raydetr"), "demo", "optim.epochs=1",
                "data.synthetic_train_images=32", "data.synthetic_val_images=16"],
               tmp_path, _env())
    assert "registered: models:/raydetr@champion" in out
