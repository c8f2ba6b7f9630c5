"""Convergence of the rtdetr-r18 preset against CPU time, regular and EMA weights.

Single process, no Ray: make/prepare the data, train with train_one_epoch, evaluate both
weight variants with COCOeval after every epoch (evaluation time is not counted as training).

    .venv/bin/python bench/convergence.py --dataset synthetic --minutes 9
    .venv/bin/python bench/convergence.py --dataset thermal --minutes 10 --resolution 256

``cpu_min`` is the CPU time of this process spent training (time.process_time, all threads),
so it does not depend on what else runs on the machine; ``wall_min`` is given beside it.
Prints a table and writes bench/results/convergence.json (``--out``): one entry per dataset,
replaced on each run, with the exact command and configuration.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path

# On a shared, oversubscribed machine OpenMP's spin-waiting burns CPU time while a sibling
# thread is descheduled (measured here: 3.7 vs 0.6 CPU-s per rtdetr-r18 step with 2 threads).
# Must be set before torch loads libgomp.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from raydetr.config import DataConfig, EmaConfig, LossConfig, ModelConfig, OptimConfig  # noqa: E402
from raydetr.model.build import build, resolve_model_config  # noqa: E402
from raydetr.train.engine import evaluate, train_one_epoch  # noqa: E402
from raydetr.train.optim import build_lr_scheduler, build_optimizer  # noqa: E402

# From scratch (no backbone_weights: the CPU case) the backbone needs the head's learning rate;
# OptimConfig's 2e-4 / 1e-4 suit a pretrained backbone. Measured in the overfit test and here.
SCRATCH_LR = 1e-3

REPO = Path(__file__).resolve().parents[1]
THERMAL = REPO.parent / "shared" / "data" / "thermal-dogs-people"


def prepared_data(dataset: str, cache: Path) -> Path:
    from raydetr.data.parquet import is_prepared, prepare_dataset

    out = cache / f"{dataset}-prepared"
    if is_prepared(out):
        return out
    if dataset == "synthetic":
        from raydetr.data.synthetic import make_synthetic

        src = make_synthetic(cache / "synthetic-raw", train_images=1000, val_images=200,
                             image_size=128, seed=0, max_objects=4)
    else:
        src = THERMAL
        if not (src / "data.yaml").is_file():
            sys.exit(f"thermal dataset not found at {src}")
    prepare_dataset(src, out, progress=False)
    return out


class Budget:
    """Stops the batch stream once the training CPU budget is spent."""

    def __init__(self, cpu_seconds: float) -> None:
        self.limit = cpu_seconds
        self.used = 0.0
        self.exhausted = False

    def wrap(self, batches):
        mark = time.process_time()
        for batch in batches:
            yield batch
            now = time.process_time()
            self.used += now - mark
            mark = now
            if self.used >= self.limit:
                self.exhausted = True
                return


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--dataset", choices=["synthetic", "thermal"], default="synthetic")
    ap.add_argument("--minutes", type=float, default=9.0, help="training CPU-minute budget")
    ap.add_argument("--epochs", type=int, default=None,
                    help="schedule length (default: synthetic 4, thermal 40)")
    ap.add_argument("--resolution", type=int, default=None,
                    help="model input size (default: synthetic 128, thermal 256)")
    ap.add_argument("--batch-size", type=int, default=OptimConfig().batch_size)
    ap.add_argument("--lr", type=float, default=SCRATCH_LR)
    ap.add_argument("--lr-encoder", type=float, default=SCRATCH_LR)
    ap.add_argument("--warmup", type=int, default=OptimConfig().warmup_steps)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", type=Path, default=REPO / "bench" / "results" / "cache" / "convergence",
                    help="kept between runs (under bench/results/, git-ignored)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "convergence.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    from raydetr.data.loader import iter_local_batches
    from raydetr.data.parquet import load_info

    data_dir = prepared_data(args.dataset, args.cache)
    info = load_info(data_dir)
    classes = info["classes"]
    epochs = args.epochs or (4 if args.dataset == "synthetic" else 40)
    resolution = args.resolution or (128 if args.dataset == "synthetic" else 256)
    model_cfg = ModelConfig(preset="rtdetr-r18", resolution=resolution)
    optim_cfg = OptimConfig(epochs=epochs, batch_size=args.batch_size, lr=args.lr,
                            lr_encoder=args.lr_encoder, warmup_steps=args.warmup)
    data_cfg = DataConfig()
    ema_cfg = EmaConfig()
    model, criterion, post = build(model_cfg, LossConfig(), len(classes))
    optimizer = build_optimizer(model, optim_cfg)
    n_train = info["splits"]["train"]["images"]
    steps_per_epoch = -(-n_train // optim_cfg.batch_size)
    scheduler = build_lr_scheduler(optimizer, optim_cfg, steps_per_epoch)
    try:
        from raydetr.ema.ema import ModelEma
    except ImportError:
        ModelEma = None  # noqa: N806
    ema = (ModelEma(model, tau=ema_cfg.tau, decays=ema_cfg.decay,
                    schedule=ema_cfg.schedule)
           if ModelEma is not None else None)
    ema_model = copy.deepcopy(model) if ema is not None else None

    def val_batches():
        return iter_local_batches(data_dir, "val", batch_size=16, train=False,
                                  resolution=resolution, data_cfg=data_cfg)

    def write_results() -> dict:
        """Written after every epoch: a run cut short still leaves its rows."""
        result = {
            "command": " ".join([".venv/bin/python", "bench/convergence.py", *(argv or sys.argv[1:])]),
            "dataset": args.dataset, "data_dir": str(data_dir), "classes": classes,
            "model": resolve_model_config(model_cfg), "optim": optim_cfg.model_dump(),
            "ema": {"decay": ema_cfg.decay, "tau": ema_cfg.tau, "schedule": ema_cfg.schedule}
            if ema is not None else None,
            "threads": args.threads, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "budget_cpu_min": args.minutes, "torch": torch.__version__,
            "machine": platform.processor() or platform.machine(), "rows": rows,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        existing = json.loads(args.out.read_text()) if args.out.is_file() else {}
        existing[args.dataset] = result
        args.out.write_text(json.dumps(existing, indent=2))
        return result

    budget = Budget(args.minutes * 60)
    rows = []
    wall0 = time.perf_counter()
    print(f"rtdetr-r18 @ {resolution}px on {args.dataset} ({n_train} train images, "
          f"{info['splits']['val']['images']} val), {args.threads} threads, "
          f"budget {args.minutes} CPU-min, schedule {epochs} epochs", flush=True)
    header = f"{'epoch':>5} {'cpu_min':>8} {'wall_min':>8} {'loss':>7} {'map':>6} {'map50':>6} {'map_ema':>7} {'map50_ema':>9}"
    print(header, flush=True)
    for epoch in range(epochs):
        batches = iter_local_batches(data_dir, "train", batch_size=optim_cfg.batch_size, train=True,
                                     resolution=resolution, data_cfg=data_cfg, seed=args.seed,
                                     epoch=epoch)
        stats = train_one_epoch(model, criterion, budget.wrap(batches), optimizer, scheduler,
                                device="cpu", epoch=epoch + 1, clip_max_norm=optim_cfg.clip_max_norm,
                                ema=ema)
        variants = {"regular": model}
        if ema is not None:
            ema.load_into(ema_model)
            variants["ema"] = ema_model
        metrics = evaluate(variants, post, val_batches(), classes, "cpu")
        row = {"epoch": epoch + 1, "cpu_min": round(budget.used / 60, 3),
               "wall_min": round((time.perf_counter() - wall0) / 60, 3),
               "train_loss": round(stats["train_loss"], 4), "steps": stats["steps"],
               "images_per_s": round(stats["images_per_s"], 2),
               "map": round(metrics["regular"]["map"], 4),
               "map50": round(metrics["regular"]["map50"], 4),
               "mar": round(metrics["regular"]["mar"], 4)}
        if "ema" in metrics:
            row.update(map_ema=round(metrics["ema"]["map"], 4),
                       map50_ema=round(metrics["ema"]["map50"], 4),
                       mar_ema=round(metrics["ema"]["mar"], 4))
        rows.append(row)
        print(f"{row['epoch']:>5} {row['cpu_min']:>8.2f} {row['wall_min']:>8.2f} "
              f"{row['train_loss']:>7.3f} {row['map']:>6.3f} {row['map50']:>6.3f} "
              f"{row.get('map_ema', float('nan')):>7.3f} {row.get('map50_ema', float('nan')):>9.3f}",
              flush=True)
        write_results()
        if budget.exhausted:
            break

    result = write_results()
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
