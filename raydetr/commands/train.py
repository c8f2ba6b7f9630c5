"""``raydetr train`` and ``raydetr demo``: one fit on Ray, the winner published to MLflow.

    raydetr train --config configs/thermal.yaml scaling.num_workers=2
    raydetr demo                      # built-in synthetic dataset, local Ray, local MLflow
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from raydetr.config import Config, load_config
from raydetr.fit.driver import fit
from raydetr.fit.postfit import FitResult

# The demo's embedded defaults: small enough for a laptop CPU, large enough to learn.
DEMO_OVERRIDES = [
    "run.name=demo",
    "model.resolution=128",
    "optim.epochs=8",
    "optim.batch_size=8",
    "data.synthetic_train_images=256",
    "data.synthetic_val_images=64",
    "data.multi_scale=false",
    "scaling.num_workers=1",
]


def run(args: argparse.Namespace) -> int:
    if args.command == "demo":
        cfg = _demo_config(args.output_dir, list(args.overrides))
        result = fit(cfg)
    else:
        overrides = list(args.overrides)
        if args.early_stopping:
            overrides.append("early_stopping.enabled=true")
        cfg = load_config(args.config, overrides)
        result = fit(cfg, resume=args.resume, pretrain_weights=args.pretrain_weights)
    print(fit_summary(result, cfg))
    return 0


def _demo_config(output_dir: str, overrides: list[str]) -> Config:
    base = DEMO_OVERRIDES + [f"run.output_dir={output_dir}"]
    cfg = load_config(None, base + overrides)
    print("demo: built-in synthetic dataset, local Ray, MLflow at "
          f"{Path(cfg.run.output_dir).resolve() / 'mlflow.db'}\n"
          "      overrides: " + " ".join(DEMO_OVERRIDES))
    if (Path(cfg.run.output_dir) / cfg.run.name / "tune").exists():  # a demo ran here before
        cfg = load_config(None, base + ["run.name=demo-" + time.strftime("%Y%m%d-%H%M%S")]
                          + overrides)
    return cfg


def fit_summary(result: FitResult, cfg: Config) -> str:
    """The lines a fit ends with: the winner, and where it was registered (or how to)."""
    meta = result.meta
    lines = [f"\nwinner: {meta.variant} weights, epoch {meta.epoch}, "
             f"{meta.scores_text()} -> {result.winner_dir}"]
    r = result.registered
    if r:
        lines.append(f"registered: {r.get('model_uri')} (version {r.get('version')}, "
                     f"alias {r.get('alias')})")
    elif not cfg.mlflow.enabled:
        lines.append(f"not registered: MLflow was off (mlflow.enabled=false). To register this "
                     f"winner: raydetr register {result.run_dir} "
                     "[mlflow.tracking_uri=URI]")
    else:
        lines.append(f"not registered (see the errors above); run `raydetr register "
                     f"{result.run_dir}` once MLflow is reachable")
    return "\n".join(lines)
