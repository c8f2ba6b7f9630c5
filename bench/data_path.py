"""Data path: bytes each worker reads, shuffle quality, can the loader feed the step, prepare speed.

    .venv/bin/python bench/data_path.py
    .venv/bin/python bench/data_path.py --quick --resolution 64

Bytes: for N = 1, 2, 4 workers, each rank r runs the rank reader for E epochs
(``SplitReader(prepared, "train", data_cfg).train_batches(rank=r, world=N, ...)``, decode and
augmentation included, one reader for all epochs as the worker does) in this process, one rank
after the other, streaming (data.materialize_max_bytes=0, as for a split above the budget).
Bytes read are the process's ``rchar`` (/proc/self/io: bytes returned by read syscalls, so what
pyarrow really fetched, footers included) over that rank's reader start and epoch 1; the line
printed is the largest rank's share of the split's file bytes. Today's path (before issue 14)
streamed the whole split to every worker.
Images/s per worker: the same rank epochs (2 loader threads), median of epochs 2..E (epoch 1
is start-up), against today's path -- Ray Data
``read_parquet(...).materialize()`` once (as the driver did for splits under 1 GiB), then per
epoch ``iter_torch_batches(collate_fn=..., local_shuffle_buffer_size=256, prefetch_batches=2)``
with preserve_order=True, on a local Ray, one worker, no model -- and against the training step's
demand (forward + criterion + backward + clip + AdamW + EMA on pre-decoded batches).
Shuffle quality: Spearman rank correlation between a row's position in the Parquet files and
its position in epoch 1's training order (all ranks' batches, step by step), for the rank reader
and for today's 256-row local shuffle window, on the bench datasets and on a 4096-image split
(16 shard files). Today's Ray Data path also measures ~0 on these splits (its buffer mixes
far more than 256 rows here; not investigated further): the figure shows that the new order is
a global permutation, not that the old one was local.
Datasets: the bench's synthetic set, the real thermal-dogs-people set (YOLO) prepared here
(which also gives ``prepare_dataset`` throughput), and the 4096-image synthetic split (order only).
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

TODAY_SHUFFLE_WINDOW = 256  # the worker's local_shuffle_buffer_size before issue 14 (>= 8 x batch)
WORKER_COUNTS = (1, 2, 4)


def prepare_bench(workdir: Path, repeats: int) -> tuple[Path, dict[str, Any]]:
    from raydetr.data.parquet import load_info, prepare_dataset

    if not (common.THERMAL / "data.yaml").is_file():
        raise SystemExit(f"thermal dataset not found at {common.THERMAL}")
    out = workdir / "datasets" / "thermal-prepared"
    times = []
    for _ in range(repeats):
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        prepare_dataset(common.THERMAL, out, progress=False, overwrite=True)
        times.append(time.perf_counter() - t0)
    info = load_info(out)
    images = sum(s["images"] for s in info["splits"].values())
    sec = common.median(times)
    return out, {"images": images, "seconds": times, "images_per_s": images / sec,
                 "source_format": info["source_format"]}


def rchar() -> int:
    """Bytes this process has read through read syscalls so far (Linux /proc/self/io)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise RuntimeError("/proc/self/io has no rchar")


def rank_epochs(prepared: Path, *, world: int, rank: int, resolution: int, batch_size: int,
                epochs: int) -> dict[str, Any]:
    """One rank's reader over ``epochs`` epochs, streaming, built once as the worker builds it.

    Bytes: the reader's start (footers) and epoch 1, as rchar and the reader's own count.
    Images/s: the median of epochs 2..E (epoch 1 is start-up), as for today's path."""
    from raydetr.config import DataConfig
    from raydetr.data.loader import SplitReader

    cfg = DataConfig(materialize_max_bytes=0, multi_scale=False)
    speeds, n, first = [], 0, {}
    io0 = rchar()
    reader = SplitReader(prepared, "train", cfg)
    for epoch in range(1, epochs + 1):
        t0 = time.perf_counter()
        n = sum(b["images"].shape[0] for b in reader.train_batches(
            seed=0, epoch=epoch, rank=rank, world=world, batch_size=batch_size,
            resolution=resolution))
        speeds.append(n / (time.perf_counter() - t0))
        if epoch == 1:
            first = {"rchar_bytes": rchar() - io0, "counted_bytes": reader.bytes_read}
    return {"images": n, "images_per_s": common.median(speeds[1:] or speeds),
            "epoch_images_per_s": speeds, **first, "split_bytes": reader.file_bytes}


def bytes_and_speed(prepared: Path, resolution: int, batch_size: int,
                    epochs: int) -> dict[str, Any]:
    rank_epochs(prepared, world=1, rank=0, resolution=resolution, batch_size=batch_size,
                epochs=1)  # warm-up: lazy imports, PIL plugins
    out: dict[str, Any] = {}
    for world in WORKER_COUNTS:
        ranks = [rank_epochs(prepared, world=world, rank=r, resolution=resolution,
                             batch_size=batch_size, epochs=epochs) for r in range(world)]
        split = ranks[0]["split_bytes"]
        out[str(world)] = {
            "ranks": ranks,
            "max_rchar_over_split": max(r["rchar_bytes"] for r in ranks) / split,
            "max_counted_over_split": max(r["counted_bytes"] for r in ranks) / split,
            "images_per_s_per_worker": common.median([r["images_per_s"] for r in ranks]),
        }
    return out


def _today_collate_class() -> type:
    """Today's (pre issue 14) Ray Data collate: decode + augment a numpy batch."""
    import numpy as np
    from ray.data.collate_fn import NumpyBatchCollateFn

    from raydetr.config import DataConfig
    from raydetr.data.collate import collate

    class TodayCollate(NumpyBatchCollateFn):
        def __init__(self, resolution: int, seed: tuple[int, ...]) -> None:
            self.resolution, self.seed = resolution, seed

        def __call__(self, batch: dict[str, np.ndarray]) -> Any:
            ids = np.asarray(batch["image_id"])
            rng = np.random.default_rng([*self.seed, int(ids[0]) % 2**32, len(ids)])
            return collate(batch, train=True, resolution=self.resolution,
                           data_cfg=DataConfig(multi_scale=False), rng=rng)

    return TodayCollate


def today_supply(prepared: Path, resolution: int, batch_size: int, epochs: int) -> list[float]:
    """images/s of today's path (Ray Data, one worker, no model), per epoch."""
    import ray.data

    from raydetr.config import Config
    from raydetr.data.parquet import split_files
    from raydetr.fit.cluster import init_ray

    init_ray(Config())  # as the driver does for a 1-worker fit
    _today_context()
    # as the driver did for train splits under 1 GiB: read once into the object store
    ds = ray.data.read_parquet(split_files(prepared, "train")).materialize()
    collate_cls = _today_collate_class()
    out = []
    for epoch in range(epochs):
        t0 = time.perf_counter()
        n = 0
        for batch in ds.iter_torch_batches(
                batch_size=batch_size, collate_fn=collate_cls(resolution, (0, epoch, 0, 1)),
                local_shuffle_buffer_size=TODAY_SHUFFLE_WINDOW, local_shuffle_seed=epoch,
                prefetch_batches=2):
            n += batch["images"].shape[0]
        out.append(n / (time.perf_counter() - t0))
    return out


def _today_context() -> None:
    """Ray Data settings of today's fit: file order kept (ExecutionOptions(preserve_order=True)
    in the driver's DataConfig), no progress bars."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.execution_options.preserve_order = True


def _positions(prepared: Path) -> dict[int, int]:
    """image_id -> row position in the split's Parquet files."""
    import pyarrow.parquet as pq

    from raydetr.data.parquet import split_files

    ids = [i for f in split_files(prepared, "train")
           for i in pq.read_table(f, columns=["image_id"]).column(0).to_pylist()]
    return {image_id: pos for pos, image_id in enumerate(ids)}


def shuffle_quality(prepared: Path, batch_size: int, world: int = 2) -> dict[str, float]:
    """Spearman(Parquet position, training position) of epoch 1: rank reader vs today's path."""
    import ray.data
    from scipy.stats import spearmanr

    from raydetr.data.loader import train_plan
    from raydetr.data.parquet import split_files

    pos = _positions(prepared)
    n = len(pos)
    plans = [train_plan(n, seed=0, epoch=1, rank=r, world=world, batch_size=batch_size)
             for r in range(world)]
    reader_order = [int(row) for step in zip(*plans) for part in step for row in part]
    _today_context()
    ds = ray.data.read_parquet(split_files(prepared, "train")).select_columns(["image_id"])
    today_order = [pos[int(i)] for b in ds.iter_batches(
        batch_size=batch_size * world, local_shuffle_buffer_size=TODAY_SHUFFLE_WINDOW,
        local_shuffle_seed=1) for i in b["image_id"]]
    rho = lambda order: float(spearmanr(order, range(len(order))).statistic)  # noqa: E731
    return {"images": n, "rank_reader": rho(reader_order), "today_window": rho(today_order)}


def step_demand(prepared: Path, resolution: int, batch_size: int, threads: int,
                max_batches: int) -> float:
    """images/s of train_one_epoch on pre-decoded batches (after one warm-up pass)."""
    import itertools

    import torch

    from raydetr.config import Config, DataConfig
    from raydetr.data.loader import iter_local_batches
    from raydetr.data.parquet import load_info
    from raydetr.ema.ema import ModelEma
    from raydetr.model.build import build
    from raydetr.train.engine import train_one_epoch
    from raydetr.train.optim import build_lr_scheduler, build_optimizer

    torch.set_num_threads(threads)
    cfg = Config()
    cfg.model.resolution = resolution
    torch.manual_seed(0)
    model, criterion, _ = build(cfg.model, cfg.loss, len(load_info(prepared)["classes"]))
    ema = ModelEma(model, decays=cfg.ema.decay)
    opt = build_optimizer(model, cfg.optim)
    sched = build_lr_scheduler(opt, cfg.optim, max_batches)
    batches = list(itertools.islice(iter_local_batches(
        prepared, "train", batch_size=batch_size, train=True, resolution=resolution,
        data_cfg=DataConfig(multi_scale=False)), max_batches))
    train_one_epoch(model, criterion, batches[:1], opt, sched, device="cpu", epoch=0, ema=ema)
    stats = train_one_epoch(model, criterion, batches, opt, sched, device="cpu", epoch=1, ema=ema)
    return float(stats["images_per_s"])


def main(argv: list[str] | None = None) -> None:
    p = common.base_parser(__doc__)
    p.add_argument("--resolution", type=int, default=None, help="default: the fit's (64)")
    p.add_argument("--epochs", type=int, default=None, help="today's-path epochs (3, quick 2)")
    p.add_argument("--prepare-repeats", type=int, default=None, help="default 2, quick 1")
    p.add_argument("--order-images", type=int, default=4096,
                   help="images of the split used for the shuffle-quality figure")
    args = p.parse_args(argv)
    work = common.workdir_of(args)
    sizes = common.fit_sizes(args)
    res = args.resolution or sizes["resolution"]
    bs = sizes["batch_size"]
    epochs = args.epochs or (2 if args.quick else 3)
    synthetic = common.synthetic_prepared(work, train_images=sizes["train_images"],
                                          val_images=sizes["val_images"])
    big = common.synthetic_prepared(work, train_images=args.order_images, val_images=8,
                                    image_size=32)
    thermal, prep = prepare_bench(work, args.prepare_repeats or (1 if args.quick else 2))
    steps = 3 if args.quick else 6

    results: dict[str, Any] = {}
    rows = []
    for name, ds in (("synthetic", synthetic), ("thermal", thermal)):
        common.shutdown_ray()  # rchar counts socket reads too: no Ray while measuring bytes
        per_n = bytes_and_speed(ds, res, bs, epochs)
        demand = step_demand(ds, res, bs, args.threads, steps)
        today = today_supply(ds, res, bs, epochs)
        order = shuffle_quality(ds, bs)
        today_ips = common.median(today[1:])
        mine = per_n["1"]["images_per_s_per_worker"]
        results[name] = {"workers": per_n, "today_images_per_s": today,
                         "step_images_per_s": demand, "shuffle_spearman": order}
        rows.append([name, today_ips, mine, per_n["2"]["images_per_s_per_worker"],
                     per_n["4"]["images_per_s_per_worker"], mine / today_ips, demand,
                     mine / demand])
    order_big = shuffle_quality(big, bs)
    results["order_split"] = order_big
    common.shutdown_ray()

    common.print_table(
        f"Loader images/s per worker at {res} px, batch {bs}, no model, median of epochs "
        f"2..{epochs} (rank reader: streaming, median over ranks; today: Ray Data); train step at "
        f"{args.threads} torch thread(s)",
        ["dataset", "today img/s", "rank reader N=1", "N=2", "N=4", "reader/today",
         "train step img/s", "reader N=1 / step"], rows)
    common.print_table(
        "Bytes read per worker per epoch / split file bytes (largest rank; rchar = what the "
        "process read, counted = the reader's own count)",
        ["dataset", "workers", "rchar ratio", "counted ratio", "target <= 1/N + 0.05"],
        [[name, n, r["workers"][str(n)]["max_rchar_over_split"],
          r["workers"][str(n)]["max_counted_over_split"], 1 / n + 0.05]
         for name, r in results.items() if name != "order_split" for n in WORKER_COUNTS])
    common.print_table(
        "Shuffle quality: Spearman(Parquet position, epoch-1 training position), 2 workers",
        ["split", "images", "rank reader (global permutation)",
         f"today ({TODAY_SHUFFLE_WINDOW}-row window)"],
        [[name, r["shuffle_spearman"]["images"], r["shuffle_spearman"]["rank_reader"],
          r["shuffle_spearman"]["today_window"]] for name, r in results.items()
         if name != "order_split"]
        + [[f"synthetic-{args.order_images}", order_big["images"], order_big["rank_reader"],
            order_big["today_window"]]])
    common.print_table("raydetr prepare (prepare_dataset) on thermal-dogs-people",
                       ["images", "format", "seconds (median)", "images/s"],
                       [[prep["images"], prep["source_format"], common.median(prep["seconds"]),
                         prep["images_per_s"]]])
    headline = results["thermal"]["workers"]
    print()
    for n in WORKER_COUNTS:
        print(f"bytes read per worker / split bytes, {n} workers: "
              f"{headline[str(n)]['max_rchar_over_split']:.3f}")
    print(f"(thermal train split; synthetic {res}-px split: " + ", ".join(
        f"{n} workers {results['synthetic']['workers'][str(n)]['max_rchar_over_split']:.3f}"
        for n in WORKER_COUNTS) + ")")

    summary = [
        common.summary_row(f"bytes read per worker / split bytes, {n} workers (thermal)",
                           headline[str(n)]["max_rchar_over_split"], f"<= {1 / n + 0.05:.2f}",
                           headline[str(n)]["max_rchar_over_split"] <= 1 / n + 0.05)
        for n in WORKER_COUNTS
    ]
    summary += [
        common.summary_row(f"rank reader / today img/s per worker ({r[0]})", r[5], ">= 1",
                           r[5] >= 1) for r in rows
    ]
    summary += [
        common.summary_row(f"Spearman Parquet vs training order, {args.order_images} images",
                           order_big["rank_reader"], "~0 (today "
                           f"{order_big['today_window']:.2f})", abs(order_big["rank_reader"]) < 0.05),
        common.summary_row("raydetr prepare throughput (thermal, YOLO)", prep["images_per_s"],
                           "info", None, "img/s"),
    ]
    common.write_json("data_path", args, {"resolution": res, "batch_size": bs,
                                          "threads": args.threads, "datasets": results,
                                          "prepare": prep, "summary": summary})


if __name__ == "__main__":
    common.run(main)
