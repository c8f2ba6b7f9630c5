"""``raydetr tune --posthoc RUN``: a Ray Tune search over the post-hoc EMA width of a finished
run. Every trial reconstructs one power-function EMA profile from the run's snapshots and
evaluates it on the val split; no trial trains.

    raydetr tune --posthoc runs/myrun --sigma-rel-range 0.02 0.25 --num-samples 16

The search space is ``sigma_rel`` (continuous, log-uniform between the bounds; ``--search-alg
grid`` spaces ``--num-samples`` points evenly in log instead). From Python any Tune searcher or
scheduler can be passed: ``posthoc_search(run, (0.02, 0.25), 16, search_alg=OptunaSearch())``.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raydetr.artifacts import RunDir
from raydetr.fit.cluster import init_ray
from raydetr.fit.posthoc import (
    PosthocError,
    evaluate_profile,
    open_run,
    sigma_rel_grid,
    write_profiles,
)

log = logging.getLogger("raydetr.posthoc_search")


@dataclass
class PosthocSearchResult:
    rows: list[dict[str, Any]]
    best: dict[str, Any]
    seconds: float


def _trainable(run_path: str, step: int | None):
    def trial(config: dict[str, Any]) -> None:
        import torch
        from ray import tune

        torch.set_num_threads(1)
        run = open_run(Path(run_path))
        model_dir, = write_profiles(run, [float(config["sigma_rel"])], step,
                                    RunDir(run.run_dir).posthoc / "tune")
        tune.report(evaluate_profile(model_dir, run.prepared, run.val_split))

    return trial


def posthoc_search(run_path: Path, bounds: tuple[float, float], num_samples: int, *,
                   step: int | None = None, search_alg: Any = None, scheduler: Any = None,
                   grid: bool = False, max_concurrent_trials: int | None = None
                   ) -> PosthocSearchResult:
    """Tune over ``sigma_rel`` in ``bounds``; returns every trial's metrics and the best."""
    from ray import tune


    start = time.perf_counter()
    lo, hi = bounds
    if not 0 < lo < hi < 0.28:
        raise PosthocError(f"sigma_rel bounds must satisfy 0 < LO < HI < 0.28; got {lo}, {hi}")
    if num_samples < 1:
        raise PosthocError(f"--num-samples must be >= 1, got {num_samples}")
    run = open_run(run_path)  # fails fast on a run without snapshots / a missing step
    write_profiles(run, [lo], step, RunDir(run.run_dir).posthoc / "tune")
    init_ray(run.cfg)
    if grid:
        space = {"sigma_rel": tune.grid_search(sigma_rel_grid(lo, hi, num_samples))}
        samples = 1
    else:
        space = {"sigma_rel": tune.loguniform(lo, hi)}
        samples = num_samples
    tuner = tune.Tuner(
        tune.with_resources(_trainable(str(run.run_dir), step), {"cpu": 1}),
        param_space=space,
        tune_config=tune.TuneConfig(metric=run.decided_by, mode="max", num_samples=samples,
                                    search_alg=search_alg, scheduler=scheduler,
                                    max_concurrent_trials=max_concurrent_trials),
        run_config=tune.RunConfig(name=f"posthoc_tune-{time.strftime('%Y%m%d-%H%M%S')}",
                                  storage_path=str(run.run_dir), verbose=0),
    )
    results = tuner.fit()
    errors = [r.error for r in results if r.error is not None]
    if errors:
        raise RuntimeError(f"{len(errors)} post-hoc trial(s) failed; first: {errors[0]}")
    rows = sorted((dict(r.metrics) for r in results), key=lambda m: m["sigma_rel"])
    keys = run.metric_keys
    rows = [{k: r[k] for k in ("sigma_rel", "gamma", *keys, "profile_residual", "step",
                               "model_dir")} for r in rows]
    best = run.best_of(rows)
    out = RunDir(run.run_dir).posthoc / "tune_results.json"
    out.write_text(json.dumps({"rows": rows, "best": best}, indent=2))
    lines = [f"post-hoc Tune search over sigma_rel in [{lo:g}, {hi:g}] ({len(rows)} trials, "
             f"step {best['step']}):", "  ".join(f"{h:>10}" for h in ("sigma_rel", *keys))]
    for r in rows:
        lines.append("  ".join(f"{r[k]:>10.4f}" for k in ("sigma_rel", *keys))
                     + ("  <- best" if r is best else ""))
    print("\n".join(lines) + f"\nresults: {out}")
    return PosthocSearchResult(rows=rows, best=best, seconds=time.perf_counter() - start)
