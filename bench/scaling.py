"""Scaling: 1 vs 2 Ray Train workers through the real fit path (samples/s per worker and total).

    .venv/bin/python bench/scaling.py                 # CPU, 1 torch thread per worker
    .venv/bin/python bench/scaling.py --quick
    .venv/bin/python bench/scaling.py --use-gpu       # GPU workers (not run on the CPU machines)

Each run is ``raydetr.fit.driver.fit`` (scaling.num_workers=N, scaling.torch_threads=1,
MLflow off) on the same synthetic set. ``images_per_s`` in history.json is rank 0's own
throughput (its shard); DDP keeps the ranks in lock-step, so total = per worker x N.
Epoch 1 (start-up) is left out. Efficiency = total(N) / (N x total(1)). Also reports
``eval_seconds`` (evaluation of both variants, split across the workers, COCOeval on rank 0).
On a machine with C cores shared with others, 2 workers can only scale while 2 cores are free;
the table says how many CPUs this machine has.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    p = common.base_parser(__doc__)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--use-gpu", action="store_true", help="scaling.use_gpu=true (one GPU each)")
    args = p.parse_args(argv)
    work = common.workdir_of(args)
    sizes = common.fit_sizes(args)
    prepared = common.synthetic_prepared(work, train_images=sizes["train_images"],
                                         val_images=sizes["val_images"])
    runs: dict[int, dict[str, Any]] = {}
    for n in args.workers:
        extra: dict[str, Any] = {}
        if n != 1:
            extra["scaling__num_workers"] = n
        if args.use_gpu:
            extra["scaling__use_gpu"] = True
        fit = common.fit_cached(work, common.fit_overrides(prepared, sizes, args.threads, **extra))
        per_worker = common.median(common.steady(fit["history"], "images_per_s"))
        runs[n] = {"per_worker_images_per_s": per_worker, "total_images_per_s": per_worker * n,
                   "train_seconds": common.median(common.steady(fit["history"], "train_seconds")),
                   "eval_seconds": common.median(common.steady(fit["history"], "eval_seconds")),
                   "fit_wall_s": fit["wall_s"], "run_dir": fit["run_dir"]}
    base = runs[min(runs)]
    rows = []
    for n, r in runs.items():
        r["speedup"] = r["total_images_per_s"] / base["total_images_per_s"]
        r["efficiency"] = r["speedup"] / (n / min(runs))
        rows.append([n, r["per_worker_images_per_s"], r["total_images_per_s"], r["speedup"],
                     r["efficiency"], r["train_seconds"], r["eval_seconds"], r["fit_wall_s"]])
    device = "GPU" if args.use_gpu else f"CPU ({os.cpu_count()} cores on this machine)"
    common.print_table(
        f"Scaling through driver.fit, {device}, {args.threads} torch thread(s)/worker, "
        f"{sizes['train_images']} train images x {sizes['resolution']} px, batch "
        f"{sizes['batch_size']}/worker (median of epochs 2..{sizes['epochs']})",
        ["workers", "img/s per worker", "img/s total", "speedup", "efficiency",
         "train s/epoch", "eval s/epoch", "fit wall s"], rows)
    if not args.use_gpu:
        print("GPU path (--use-gpu: scaling.use_gpu=true) was not run: no GPU on this machine.")
    summary = []
    for n, r in runs.items():
        if n == min(runs):
            continue
        summary.append(common.summary_row(f"scaling {min(runs)}->{n} workers: total img/s speedup",
                                          r["speedup"], f"info (ideal {n / min(runs):g})", None))
        summary.append(common.summary_row(f"scaling {n} workers: img/s per worker / 1 worker",
                                          r["per_worker_images_per_s"]
                                          / base["per_worker_images_per_s"], "info (ideal 1)",
                                          None))
    common.write_json("scaling", args, {"sizes": sizes, "threads": args.threads,
                                        "use_gpu": args.use_gpu, "runs": runs,
                                        "summary": summary})


if __name__ == "__main__":
    common.run(main)
