"""raydetr's own local Ray: token auth on, as Ray would choose, without Ray's warning about it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

SCRIPT = """
import os
import ray  # imported first, as in a run (fit/search imports ray.tune at the top)
from ray._raylet import get_authentication_mode
from raydetr.config import load_config
from raydetr.fit.cluster import init_ray

init_ray(load_config(None, []))
print("AUTH", get_authentication_mode(), os.environ["RAY_AUTH_MODE"])
print("TASK", ray.get(ray.remote(lambda: 41 + 1).remote()))
ray.shutdown()
"""


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_local_ray_has_token_auth_and_no_warning(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    env["HOME"] = str(tmp_path)  # no token yet: the local Ray makes one, as Ray does
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                          env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "AUTH 1 token" in proc.stdout and "TASK 42" in proc.stdout, proc.stdout
    assert "Token authentication" not in proc.stderr + proc.stdout
    assert (tmp_path / ".ray" / "auth_token").is_file()
