"""Ray overhead: raydetr's training step under TorchTrainer (1 worker) vs a plain PyTorch loop.

    .venv/bin/python bench/ray_overhead.py              # 48 images, 4 epochs, 64 px, 1 thread
    .venv/bin/python bench/ray_overhead.py --quick --threads 2

Ray side: the real path, ``raydetr.fit.driver.fit`` (Tune trial -> TorchTrainer, 1 worker,
the rank reader's decode + augment threads (raydetr.data.loader), DDP-wrapped model, EMA, per-epoch eval + checkpoint), MLflow off;
``images_per_s`` per epoch from the run's history.json (train_one_epoch's own timer: the
epoch's data loading + steps, not eval / checkpoint / start-up).
Plain side: the same model, config, seed, data and batch size in this process:
``iter_local_batches`` (pyarrow, decode inline) + ``engine.train_one_epoch`` with the same EMA,
and a second variant on batches decoded beforehand (pure compute: the upper bound).
Both use ``torch.set_num_threads(--threads)``. Epoch 1 is start-up and is left out; the plain
loop runs before AND after the fit and its mean is the reference, so slow drift of the
machine's load hits both sides alike. Ratio = Ray images/s / plain images/s (target >= 0.95).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402


def plain_trainer(prepared: Path, sizes: dict[str, int], threads: int):
    """Builds what the worker builds (same seed, optimizer, schedule, EMA); returns epoch fns."""
    import torch

    from raydetr.config import load_config
    from raydetr.data.loader import iter_local_batches
    from raydetr.data.parquet import load_info
    from raydetr.ema.ema import ModelEma
    from raydetr.model.build import build
    from raydetr.train.engine import train_one_epoch
    from raydetr.train.optim import build_lr_scheduler, build_optimizer
    from raydetr.train.worker import seed_everything

    torch.set_num_threads(threads)
    cfg = load_config(None, common.fit_overrides(prepared, sizes, threads))
    info = load_info(prepared)
    seed_everything(cfg.run.seed)
    model, criterion, _ = build(cfg.model, cfg.loss, len(info["classes"]))
    e = cfg.ema
    ema = ModelEma(model, tau=e.tau, decays=e.decay, schedule=e.schedule,
                   schedule_kwargs=e.schedule_kwargs, average_buffers=e.average_buffers,
                   nan_guard=e.nan_guard)
    n = info["splits"]["train"]["images"]
    steps = max(1, math.ceil(n / (cfg.optim.batch_size * cfg.optim.grad_accum_steps)))
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_lr_scheduler(optimizer, cfg.optim, steps)
    state = {"epoch": 0}

    def batches(epoch: int):
        return iter_local_batches(prepared, "train", batch_size=cfg.optim.batch_size, train=True,
                                  resolution=sizes["resolution"], data_cfg=cfg.data,
                                  seed=cfg.run.seed, epoch=epoch)

    def run(predecoded: bool) -> dict[str, Any]:
        epoch = state["epoch"]
        state["epoch"] += 1
        src = list(batches(epoch)) if predecoded else batches(epoch)
        return train_one_epoch(model, criterion, src, optimizer, scheduler, device="cpu",
                               epoch=epoch, grad_accum_steps=cfg.optim.grad_accum_steps,
                               clip_max_norm=cfg.optim.clip_max_norm, ema=ema)

    return run


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = common.base_parser(__doc__)
    p.add_argument("--plain-epochs", type=int, default=None,
                   help="measured plain epochs per side (before / after the fit); "
                        "default 2, quick 1")
    args = p.parse_args(argv)
    work = common.workdir_of(args)
    sizes = common.fit_sizes(args)
    k = args.plain_epochs or (1 if args.quick else 2)
    prepared = common.synthetic_prepared(work, train_images=sizes["train_images"],
                                         val_images=sizes["val_images"])

    run = plain_trainer(prepared, sizes, args.threads)
    run(False)  # start-up epoch (allocator, first-touch), not measured
    plain: dict[str, list[float]] = {"inline": [], "predecoded": []}
    for _ in range(k):
        plain["inline"].append(run(False)["images_per_s"])
        plain["predecoded"].append(run(True)["images_per_s"])

    fit = common.fit_cached(work, common.fit_overrides(prepared, sizes, args.threads))
    ray_ips = common.steady(fit["history"], "images_per_s")

    for _ in range(k):
        plain["inline"].append(run(False)["images_per_s"])
        plain["predecoded"].append(run(True)["images_per_s"])

    ray_med = common.median(ray_ips)
    ref = {name: common.median(v) for name, v in plain.items()}
    ratio = ray_med / ref["inline"]
    ratio_pre = ray_med / ref["predecoded"]
    common.print_table(
        f"Ray overhead: 1 TorchTrainer worker vs plain loop, {args.threads} torch thread(s), "
        f"{sizes['train_images']} images x {sizes['resolution']} px, batch {sizes['batch_size']}",
        ["path", "images/s (median)", "per epoch", "ratio Ray/this"],
        [["TorchTrainer via driver.fit (epochs 2..N)", ray_med,
          " ".join(f"{x:.2f}" for x in ray_ips), ""],
         ["plain: iter_local_batches + train_one_epoch", ref["inline"],
          " ".join(f"{x:.2f}" for x in plain["inline"]), ratio],
         ["plain: pre-decoded batches (compute only)", ref["predecoded"],
          " ".join(f"{x:.2f}" for x in plain["predecoded"]), ratio_pre]],
    )
    t_plain = sizes["train_images"] / ref["inline"]
    t_ray = sizes["train_images"] / ray_med
    print(f"Ray path costs {t_ray - t_plain:+.2f} s per epoch over the plain loop "
          f"({t_ray:.2f} s vs {t_plain:.2f} s for {sizes['train_images']} images)")
    print(f"fit wall time {fit['wall_s']:.1f} s for {len(fit['history'])} epochs "
          f"(start-up, eval, checkpoints included); plain epochs run before and after the fit")
    summary = [
        common.summary_row("Ray/plain images/s, 1 worker (loader inline)", ratio, ">= 0.95",
                           ratio >= 0.95),
        common.summary_row("Ray/plain images/s, 1 worker (plain pre-decoded)", ratio_pre, "info",
                           None),
        common.summary_row("Ray path extra seconds per epoch", t_ray - t_plain, "info", None,
                           "s"),
    ]
    common.write_json("ray_overhead", args, {
        "threads": args.threads, "sizes": sizes, "ray_images_per_s": ray_ips,
        "plain_images_per_s": plain, "ratio_vs_inline": ratio, "ratio_vs_predecoded": ratio_pre,
        "extra_seconds_per_epoch": t_ray - t_plain,
        "fit_wall_s": fit["wall_s"], "fit_run_dir": fit["run_dir"], "summary": summary,
    })
    return {"summary": summary}


if __name__ == "__main__":
    try:
        main()
    finally:
        common.shutdown_ray()
