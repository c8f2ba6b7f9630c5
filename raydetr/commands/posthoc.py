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
import math
from pathlib import Path

from raydetr.fit.posthoc import PosthocError, sigma_rel_grid, sweep


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
