"""``raydetr posthoc RUN``: choose the EMA length of a finished run without retraining.

    raydetr posthoc runs/myrun --sigma-rel 0.02 0.05 0.1 0.2
    raydetr posthoc runs/myrun --sigma-rel-range 0.02 0.25 8 --step 480 --register

Reconstructs each power-function EMA profile from the run's post-hoc snapshots (one pass over
them, on the driver), evaluates every profile on the val split as parallel Ray tasks, prints a
table, logs one nested MLflow run per profile under the training run and, with ``--register``,
publishes the best profile through the post-fit path when it beats the run's winner.
Results: ``<run>/posthoc/results.json`` and one model dir per profile next to it.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raydetr.fit.driver import init_ray
from raydetr.fit.postfit import publish_winner
from raydetr.fit.posthoc import (
    METRIC_KEYS,
    PosthocError,
    PosthocRun,
    evaluate_profile,
    open_run,
    sigma_rel_grid,
    write_profiles,
)
from raydetr.registry.tracking import (
    check_reachable,
    ensure_experiment,
    mlflow_session,
    quiet_mlflow,
    resolve_tracking_uri,
)

log = logging.getLogger("raydetr.posthoc")


@dataclass
class SweepResult:
    run: PosthocRun
    rows: list[dict[str, Any]]
    best: dict[str, Any]
    winner_map: float | None
    registered: dict[str, Any] | None
    seconds: float


def _eval_remote():
    import ray

    @ray.remote(num_cpus=1)
    def evaluate_task(model_dir: str, prepared: str, split: str) -> dict[str, Any]:
        import torch

        torch.set_num_threads(1)  # one task per CPU; more threads only contend
        return evaluate_profile(Path(model_dir), Path(prepared), split)

    return evaluate_task


def sweep(run_path: Path, sigma_rels: list[float], *, step: int | None = None,
          register: bool = False, use_mlflow: bool = True) -> SweepResult:
    """Reconstruct + evaluate every sigma_rel; see the module docstring."""
    import ray

    start = time.perf_counter()
    bad = [s for s in sigma_rels if not 0 < s < 0.28]
    if not sigma_rels or bad:
        raise PosthocError(f"--sigma-rel values must be in (0, 0.28); got {bad or 'none'}")
    run = open_run(run_path)
    out_root = run.run_dir / "posthoc"
    dirs = write_profiles(run, sorted(set(sigma_rels)), step, out_root)
    init_ray(run.cfg)
    task = _eval_remote()
    rows = ray.get([task.remote(str(d), str(run.prepared), run.val_split) for d in dirs])
    rows.sort(key=lambda r: r["sigma_rel"])
    best = max(rows, key=lambda r: r["map"])
    winner = run.winner_meta
    winner_map = (winner.get("metrics") or {}).get("map") if winner else None
    (out_root / "results.json").write_text(json.dumps(
        {"rows": rows, "best": best, "winner_map": winner_map}, indent=2))
    print(format_table(rows, best, winner, run))
    registered = None
    if use_mlflow and run.cfg.mlflow.enabled:
        _log_nested(run, rows)
    if register:
        registered = _register_best(run, best, winner_map)
    return SweepResult(run=run, rows=rows, best=best, winner_map=winner_map,
                       registered=registered, seconds=time.perf_counter() - start)


def format_table(rows: list[dict[str, Any]], best: dict[str, Any], winner: dict | None,
                 run: PosthocRun) -> str:
    head = ["sigma_rel", "gamma", *METRIC_KEYS, "fit_resid", "snapshots"]
    lines = [f"post-hoc EMA of {run.run_dir.name} at step {rows[0]['step']} "
             f"({rows[0]['images']} {run.val_split} images)",
             "  ".join(f"{h:>10}" for h in head)]
    for r in rows:
        vals = [r["sigma_rel"], r["gamma"], *(r[k] for k in METRIC_KEYS),
                r["profile_residual"], r["snapshots"]]
        mark = "  <- best" if r is best else ""
        lines.append("  ".join(f"{v:>10.4f}" if isinstance(v, float) else f"{v:>10}"
                               for v in vals) + mark)
    if winner:
        m = (winner.get("metrics") or {}).get("map")
        lines.append(f"run winner: {winner.get('variant')} weights, epoch "
                     f"{int(winner.get('epoch', -1))}, mAP "
                     f"{m:.4f}" if m is not None else "run winner: mAP unknown")
    return "\n".join(lines)


def _training_run_id(run: PosthocRun) -> str | None:
    """The MLflow run the training published (fit.json / registered.json), if any."""
    for name in ("fit.json", "registered.json"):
        path = run.run_dir / name
        if path.is_file():
            data = json.loads(path.read_text())
            reg = data.get("registered", data) if name == "fit.json" else data
            if isinstance(reg, dict) and reg.get("run_id"):
                return str(reg["run_id"])
    return None


def _log_nested(run: PosthocRun, rows: list[dict[str, Any]]) -> str | None:
    """One nested run per profile under the training run (or under a new parent run when the
    training published nothing). A registry outage is reported, not fatal: results are on
    disk."""
    import mlflow
    from mlflow.entities import Metric, Param

    output_dir = Path(run.cfg.run.output_dir)
    try:
        uri = resolve_tracking_uri(run.cfg.mlflow, output_dir)
        check_reachable(uri)
        with mlflow_session(uri), quiet_mlflow():
            client = mlflow.MlflowClient(tracking_uri=uri)
            exp_id = ensure_experiment(client, run.cfg.mlflow.experiment, uri, output_dir)
            parent = _training_run_id(run)
            if parent is None:
                parent = client.create_run(exp_id, run_name=f"{run.cfg.run.name}-posthoc",
                                           tags={"raydetr.kind": "posthoc"}).info.run_id
                client.set_terminated(parent)
                log.info("the training run published no MLflow run; nested the post-hoc runs "
                         "under a new run %s", parent)
            now = int(time.time() * 1000)
            for r in rows:
                child = client.create_run(
                    exp_id, run_name=f"{run.cfg.run.name}-posthoc-sr{r['sigma_rel']:.4g}",
                    tags={"mlflow.parentRunId": parent, "raydetr.kind": "posthoc"})
                cid = child.info.run_id
                client.log_batch(cid, params=[
                    Param("sigma_rel", str(r["sigma_rel"])), Param("gamma", f"{r['gamma']:.6g}"),
                    Param("step", str(r["step"])), Param("snapshots", str(r["snapshots"]))],
                    metrics=[Metric(k, float(r[k]), now, int(r["step"]))
                             for k in (*METRIC_KEYS, "profile_residual")])
                client.set_terminated(cid)
            return parent
    except Exception as exc:  # noqa: BLE001 - the sweep's results must survive an outage
        log.error("MLflow logging failed (%s: %s); the results are in %s", type(exc).__name__,
                  exc, run.run_dir / "posthoc" / "results.json")
        return None


def _register_best(run: PosthocRun, best: dict[str, Any], winner_map: float | None
                   ) -> dict[str, Any] | None:
    """Publish the best profile (stripped, registered with the alias) if it beats the winner."""
    if winner_map is not None and not best["map"] > winner_map:
        print(f"not registered: best post-hoc mAP {best['map']:.4f} does not beat the run's "
              f"winner ({winner_map:.4f})")
        return None
    src = Path(best["model_dir"])
    dst = run.run_dir / "posthoc" / "winner"
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    meta = json.loads((dst / "meta.json").read_text())
    meta.update(metrics={k: best[k] for k in METRIC_KEYS},
                epoch=int(run.history[-1]["epoch"]) if run.history else -1,
                epochs_run=len(run.history))
    (dst / "meta.json").write_text(json.dumps(meta, indent=2))
    reg = publish_winner(run.cfg, run.run_dir, dst, run.history, meta, register=True)
    if reg is None:
        raise PosthocError(f"registration failed (see the log); the profile is in {dst}")
    print(f"registered: {reg['model_uri']} (version {reg['version']}): post-hoc sigma_rel "
          f"{best['sigma_rel']:g}, mAP {best['map']:.4f}"
          + (f" > winner {winner_map:.4f}" if winner_map is not None else ""))
    return reg


def run(args: argparse.Namespace) -> int:
    return command(args.run, args.sigma_rel, args.sigma_rel_range, args.step, args.register,
                   args.no_mlflow)


def command(run: str, sigma_rels: list[float] | None, sigma_rel_range: list[str] | None,
            step: int | None, register: bool, no_mlflow: bool) -> int:
    """CLI entry; user mistakes raise PosthocError (exit 2 in cli.main)."""
    values = list(sigma_rels or [])
    if sigma_rel_range:
        lo, hi, n = float(sigma_rel_range[0]), float(sigma_rel_range[1]), int(sigma_rel_range[2])
        values += sigma_rel_grid(lo, hi, n)
    if not values:
        raise PosthocError("give --sigma-rel S [S ...] and/or --sigma-rel-range LO HI N")
    if any(not math.isfinite(v) for v in values):
        raise PosthocError(f"--sigma-rel values must be finite, got {values}")
    sweep(Path(run), values, step=step, register=register, use_mlflow=not no_mlflow)
    return 0
