"""Data path: can the loader feed the model? And how fast is ``raydetr prepare``?

    .venv/bin/python bench/data_path.py
    .venv/bin/python bench/data_path.py --quick --resolution 64

Supply: Ray Data decode + augment without a model, exactly as the worker iterates:
``read_split(prepared, "train").iter_torch_batches(batch_size, collate_fn=make_collate(train=True,
...), prefetch_batches=2)`` on a local Ray started like the driver's (1 worker). Epoch 1 (the
streaming executor's start-up) is reported apart from the steady epochs. For comparison the
single-process loader (``iter_local_batches``, decode inline) too, and Ray Data over the split
materialized once (``read_split(...).materialize()``): what a pass costs without the per-pass
file listing / read tasks. A pass over the small val split gives the loader's fixed cost per
epoch (the worker starts one train and one val pass each epoch).
Demand: images/s of the training step (forward + criterion + backward + clip + AdamW + EMA,
``train_one_epoch`` on pre-decoded batches) at the same resolution and thread count.
Supply / demand > 1 means the loader does not starve the step (they share this machine's cores).
Datasets: the bench's synthetic set, and the real thermal-dogs-people set (YOLO) prepared here,
which also gives ``prepare_dataset`` throughput (images/s, all splits, progress bar off).
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402


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


def ray_supply(prepared: Path, resolution: int, batch_size: int, epochs: int,
               split: str = "train", seconds: bool = False, materialize: bool = False
               ) -> list[float]:
    """images/s (or seconds per pass) of Ray Data decode + augment per epoch, no model.
    ``materialize``: read the Parquet rows into the object store once (what the driver could
    do for a small split), so a pass skips file listing and read tasks."""
    from raydetr.config import Config, DataConfig
    from raydetr.data.loader import make_collate, read_split
    from raydetr.train.driver import init_ray, quiet_ray_data

    init_ray(Config())  # as the driver does for a 1-worker fit
    quiet_ray_data()
    ds = read_split(prepared, split)
    if materialize:
        ds = ds.materialize()
    out = []
    for epoch in range(epochs):
        fn = make_collate(train=split == "train", resolution=resolution, data_cfg=DataConfig(), seed=0,
                          epoch=epoch)
        t0 = time.perf_counter()
        n = 0
        for batch in ds.iter_torch_batches(batch_size=batch_size, collate_fn=fn,
                                           local_shuffle_buffer_size=max(4 * batch_size, 64),
                                           local_shuffle_seed=epoch, prefetch_batches=2):
            n += batch["images"].shape[0]
        dt = time.perf_counter() - t0
        out.append(dt if seconds else n / dt)
    return out


def local_supply(prepared: Path, resolution: int, batch_size: int, epochs: int,
                 split: str = "train", seconds: bool = False) -> list[float]:
    from raydetr.config import DataConfig
    from raydetr.data.loader import iter_local_batches

    out = []
    for epoch in range(epochs):
        t0 = time.perf_counter()
        n = sum(b["images"].shape[0] for b in iter_local_batches(
            prepared, split, batch_size=batch_size, train=split == "train",
            resolution=resolution, data_cfg=DataConfig(), epoch=epoch))
        dt = time.perf_counter() - t0
        out.append(dt if seconds else n / dt)
    return out


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
    ema = ModelEma(model, decay=cfg.ema.decay)
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
    p.add_argument("--epochs", type=int, default=None, help="loader epochs (default 3, quick 2)")
    p.add_argument("--prepare-repeats", type=int, default=None, help="default 2, quick 1")
    args = p.parse_args(argv)
    work = common.workdir_of(args)
    sizes = common.fit_sizes(args)
    res = args.resolution or sizes["resolution"]
    bs = sizes["batch_size"]
    epochs = args.epochs or (2 if args.quick else 3)
    synthetic = common.synthetic_prepared(work, train_images=sizes["train_images"],
                                          val_images=sizes["val_images"])
    thermal, prep = prepare_bench(work, args.prepare_repeats or (1 if args.quick else 2))
    steps = 3 if args.quick else 6

    results: dict[str, Any] = {}
    rows = []
    for name, ds in (("synthetic", synthetic), ("thermal", thermal)):
        demand = step_demand(ds, res, bs, args.threads, steps)
        ray_ips = ray_supply(ds, res, bs, epochs)
        mat_ips = ray_supply(ds, res, bs, epochs, materialize=True)
        local_ips = local_supply(ds, res, bs, epochs)
        steady_ray = common.median(ray_ips[1:])
        results[name] = {"ray_images_per_s": ray_ips, "ray_materialized_images_per_s": mat_ips,
                         "local_images_per_s": local_ips, "step_images_per_s": demand,
                         "supply_over_demand": steady_ray / demand}
        rows.append([name, f"{ray_ips[0]:.1f}", steady_ray, common.median(mat_ips[1:]),
                     common.median(local_ips[1:]), demand, steady_ray / demand])
    # Fixed cost of one pass: the (small) val split, as the worker evaluates each epoch.
    val_n = sizes["val_images"]
    val_ray = ray_supply(synthetic, res, max(bs, 8), epochs, split="val", seconds=True)
    val_local = local_supply(synthetic, res, max(bs, 8), epochs, split="val", seconds=True)
    val_mat = ray_supply(synthetic, res, max(bs, 8), epochs, split="val", seconds=True,
                         materialize=True)
    val_pass = {"images": val_n, "ray": val_ray, "ray_materialized": val_mat, "local": val_local}
    common.shutdown_ray()
    common.print_table(
        f"Data path at {res} px, batch {bs}, train split, {args.threads} torch thread(s) for the "
        f"step (loader epochs 2..{epochs} median)",
        ["dataset", "Ray Data ep1 img/s", "Ray Data img/s", "materialized img/s",
         "local loader img/s",
         "train step img/s", "supply/demand"], rows)
    common.print_table(
        f"One pass over the synthetic val split ({val_n} images, batch {max(bs, 8)}, no model): "
        "per-epoch fixed cost of the loader", ["loader", "pass 1 s", "passes 2.. s (median)"],
        [["Ray Data read_split + iter_torch_batches", val_ray[0], common.median(val_ray[1:])],
         ["Ray Data, split materialized once", val_mat[0], common.median(val_mat[1:])],
         ["iter_local_batches (pyarrow)", val_local[0], common.median(val_local[1:])]])
    common.print_table("raydetr prepare (prepare_dataset) on thermal-dogs-people",
                       ["images", "format", "seconds (median)", "images/s"],
                       [[prep["images"], prep["source_format"], common.median(prep["seconds"]),
                         prep["images_per_s"]]])
    summary = [
        common.summary_row(f"Ray Data supply / train-step demand ({name}, {res} px)",
                           r["supply_over_demand"], "> 1", r["supply_over_demand"] > 1)
        for name, r in results.items()
    ]
    summary += [
        common.summary_row("Ray Data pass over val split, steady (fixed cost)",
                           common.median(val_ray[1:]), "info", None, "s"),
        common.summary_row("raydetr prepare throughput (thermal, YOLO)", prep["images_per_s"],
                           "info", None, "img/s"),
    ]
    common.write_json("data_path", args, {"resolution": res, "batch_size": bs,
                                          "threads": args.threads, "datasets": results,
                                          "val_pass_seconds": val_pass, "prepare": prep,
                                          "summary": summary})


if __name__ == "__main__":
    common.run(main)
