"""``raydetr tune``: a Ray Tune search over training (e.g. ``ema.decay``), or with ``--posthoc
RUN`` over the post-hoc EMA width of a finished run (no training).

    raydetr tune --config configs/tune_ema.yaml
    raydetr tune --posthoc runs/myrun --sigma-rel-range 0.02 0.25 --num-samples 8
"""

from __future__ import annotations

import argparse
from pathlib import Path

from raydetr.config import ConfigError, load_config
from raydetr.fit.posthoc_search import posthoc_search
from raydetr.fit.search import search


def run(args: argparse.Namespace) -> int:
    if args.posthoc:
        if args.overrides or args.config or args.resume:
            raise ConfigError("tune --posthoc takes no config, overrides or --resume: the run's "
                              "own config is used")
        posthoc_search(Path(args.posthoc), tuple(args.sigma_rel_range), args.num_samples,
                       step=args.step, grid=args.search_alg == "grid")
        return 0
    cfg = load_config(args.config, list(args.overrides))
    search(cfg, resume=args.resume)
    return 0
