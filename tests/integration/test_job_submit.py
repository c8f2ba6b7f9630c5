"""`ray job submit` of jobs/train.py to a real Ray head (127.0.0.1, token auth), registering
into a real `mlflow server` (sqlite backend) on 127.0.0.1."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent

pytestmark = pytest.mark.slow


def test_job_submit_two_workers_registers_champion(ray_head, mlflow_server, tmp_path):
    import mlflow

    out = tmp_path / "runs"
    cmd = [
        str(VENV_BIN / "ray"), "job", "submit", "--address", ray_head.dashboard_url,
        "--working-dir", str(REPO), "--",
        # The README's command (configs/smoke.yaml), pointed at this test's storage + MLflow.
        "python", "jobs/train.py", "--config", "configs/smoke.yaml",
        f"run.output_dir={out}", "run.name=job",
        f"mlflow.tracking_uri={mlflow_server.uri}", "mlflow.model_name=job-detector",
    ]
    proc = subprocess.run(cmd, env=ray_head.env, capture_output=True, text=True, timeout=600,
                          cwd=REPO)
    log = proc.stdout + proc.stderr
    (tmp_path / "job.log").write_text(log)
    assert proc.returncode == 0, log[-4000:]
    assert re.search(r"Job '\S+' succeeded", log), f"no success line; see {tmp_path / 'job.log'}"
    assert "effective 8 = 4 per worker x 1 accumulation x 2 workers" in log  # the header
    assert "registered: models:/job-detector@champion" in log

    client = mlflow.MlflowClient(tracking_uri=mlflow_server.uri)
    version = client.get_model_version_by_alias("job-detector", "champion")
    assert version.tags["variant"] in ("ema", "regular")
    run = client.get_run(version.run_id)
    history = client.get_metric_history(run.info.run_id, "map_ema")
    assert [m.step for m in history] == [1, 2], "per-epoch EMA mAP logged, epochs from 1"
    assert (out / "job" / "winner" / "model.safetensors").is_file()
