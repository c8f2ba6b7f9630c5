"""Post-hoc EMA profiles into MLflow: one nested run per profile under the training run."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from raydetr.artifacts import RunDir
from raydetr.config import Config
from raydetr.registry.tracking import (
    check_reachable,
    ensure_experiment,
    mlflow_session,
    quiet_mlflow,
    resolve_tracking_uri,
)

log = logging.getLogger("raydetr.posthoc")


def _training_run_id(run: RunDir) -> str | None:
    """The MLflow run the training published (fit.json / registered.json), if any."""
    for path in (run.fit_info, run.registered):
        if path.is_file():
            data = json.loads(path.read_text())
            reg = data.get("registered", data) if path == run.fit_info else data
            if isinstance(reg, dict) and reg.get("run_id"):
                return str(reg["run_id"])
    return None


def log_posthoc_runs(cfg: Config, run: RunDir, rows: list[dict[str, Any]],
                     metric_keys: Sequence[str]) -> str | None:
    """One nested run per profile under the training run (or under a new parent run when the
    training published nothing). A registry outage is reported, not fatal: results are on
    disk."""
    import mlflow
    from mlflow.entities import Metric, Param

    output_dir = Path(cfg.run.output_dir)
    try:
        uri = resolve_tracking_uri(cfg.mlflow, output_dir)
        check_reachable(uri)
        with mlflow_session(uri), quiet_mlflow():
            client = mlflow.MlflowClient(tracking_uri=uri)
            exp_id = ensure_experiment(client, cfg.mlflow.experiment, uri, output_dir)
            parent = _training_run_id(run)
            if parent is None:
                parent = client.create_run(exp_id, run_name=f"{cfg.run.name}-posthoc",
                                           tags={"raydetr.kind": "posthoc"}).info.run_id
                client.set_terminated(parent)
                log.info("the training run published no MLflow run; nested the post-hoc runs "
                         "under a new run %s", parent)
            now = int(time.time() * 1000)
            for r in rows:
                child = client.create_run(
                    exp_id, run_name=f"{cfg.run.name}-posthoc-sr{r['sigma_rel']:.4g}",
                    tags={"mlflow.parentRunId": parent, "raydetr.kind": "posthoc"})
                cid = child.info.run_id
                client.log_batch(cid, params=[
                    Param("sigma_rel", str(r["sigma_rel"])), Param("gamma", f"{r['gamma']:.6g}"),
                    Param("step", str(r["step"])), Param("snapshots", str(r["snapshots"]))],
                    metrics=[Metric(k, float(r[k]), now, int(r["step"]))
                             for k in (*metric_keys, "profile_residual")])
                client.set_terminated(cid)
            return parent
    except Exception as exc:  # noqa: BLE001 - the sweep's results must survive an outage
        log.error("MLflow logging failed (%s: %s); the results are in %s", type(exc).__name__,
                  exc, run.posthoc / "results.json")
        return None


