"""A search's parent MLflow run: the results table and every trial's row."""

from __future__ import annotations

from pathlib import Path

from raydetr.config import Config
from raydetr.registry.tracking import (
    check_reachable,
    ensure_experiment,
    mlflow_session,
    resolve_tracking_uri,
)


def log_search_parent(cfg: Config, parent_id: str | None, rows, table: str) -> str:
    """The results table and trials into the search's parent run (created live when the search
    started; created here when live logging could not reach MLflow then)."""
    import mlflow

    output_dir = Path(cfg.run.output_dir).resolve()
    uri = resolve_tracking_uri(cfg.mlflow, output_dir)
    check_reachable(uri)
    with mlflow_session(uri):
        client = mlflow.MlflowClient(tracking_uri=uri)
        if parent_id is None:
            exp_id = ensure_experiment(client, cfg.mlflow.experiment, uri, output_dir)
            parent_id = client.create_run(exp_id, run_name=f"{cfg.run.name}-search",
                                          tags={"raydetr.kind": "search"}).info.run_id
        client.log_text(parent_id, table, "search_results.txt")
        client.log_dict(parent_id, {"search_space": cfg.tune.search_space,
                                    "trials": [{k: v for k, v in r.items()
                                                if k not in ("history", "train_dir")}
                                               for r in rows]}, "search_results.json")
    return parent_id
