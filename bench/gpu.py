"""Benchmark: the GPU training recipe. Per preset: training images/s in bf16 autocast with 1 and
N workers (plain torch DDP over the GPUs present, NCCL), the EMA update time against its
memory-bandwidth bound, and evaluation seconds per epoch (regular + EMA weights, the
family's num_select / maxDets, the worker's own evaluation path).

    .venv/bin/python bench/gpu.py                                  # GPU machine: full sizes
    .venv/bin/python bench/gpu.py --presets rfdetr-nano --steps 50 --val-images 500
    .venv/bin/python bench/gpu.py --cpu                            # force the reduced CPU mode

Without CUDA it runs a REDUCED CPU MODE (64 px, batch 2, a few steps, 2 gloo workers, bf16
autocast on CPU) that only proves the code path runs: its figures are NOT GPU figures and the
script says so in its table and JSON (``"mode": "cpu-reduced"``).

What is measured, with raydetr's own pieces (raydetr.model.build, raydetr.train.optim
.build_optimizer, raydetr.train.engine.train_one_epoch, raydetr.ema.ModelEma,
raydetr.train.evaluation):
  - train images/s: synthetic shapes batches already on the host (no data loading), forward +
    criterion + backward + clip + fused AdamW + EMA update, after ``--warmup`` steps; with N
    workers each rank runs ``--steps`` steps of its own batch and the figure is the global
    images/s (N x batch x steps / the slowest rank's seconds);
  - EMA update: median seconds of ``ModelEma.update`` (one shadow) against
    bytes / bandwidth, bytes = 3 x the float32 shadow (read shadow, read model, write shadow),
    bandwidth = a large device-to-device copy measured here (read + write bytes / seconds);
    the JSON also gives the bound of the shadow's own read + write (2 x) alone;
  - evaluation: seconds for ``--val-images`` images through ShadowEvaluator.predict (regular and
    the EMA shadow) + evaluate_matches, as the worker's epoch-end evaluation runs it on 1 rank.
Writes bench/results/gpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

from raydetr.config import LossConfig, ModelConfig, OptimConfig  # noqa: E402
from raydetr.config.presets import eval_settings, is_segmentation  # noqa: E402
from raydetr.data.synthetic import CLASSES, draw_image  # noqa: E402
from raydetr.data.transforms import normalise_boxes, to_model_input  # noqa: E402
from raydetr.ema import ModelEma  # noqa: E402
from raydetr.model.build import build, resolve_model_config  # noqa: E402
from raydetr.train.engine import train_one_epoch  # noqa: E402
from raydetr.train.evaluation import ShadowEvaluator, evaluate_matches  # noqa: E402
from raydetr.train.optim import build_optimizer  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "gpu.json"
GPU_PRESETS = ["rtdetr-r18", "rtdetr-r50", "rfdetr-nano", "rfdetr-small", "rfdetr-medium"]
CPU_PRESETS = ["rtdetr-r18", "rfdetr-nano"]
NOT_GPU = "REDUCED CPU MODE: these are NOT GPU figures (no CUDA device here)"


def synthetic_batches(count: int, batch: int, resolution: int, seed: int) -> list[dict]:
    """``count`` batches in the collate format (raydetr.data.collate) of synthetic shapes."""
    rng = np.random.default_rng(seed)
    out = []
    for b in range(count):
        images, targets = [], []
        for i in range(batch):
            image, boxes, labels = draw_image(rng, resolution, 4)
            images.append(np.asarray(image))
            targets.append({
                "labels": torch.tensor(labels, dtype=torch.int64),
                "boxes": torch.from_numpy(normalise_boxes(np.array(boxes, np.float32),
                                                          resolution, resolution)),
                "image_id": torch.tensor(b * batch + i),
                "orig_size": torch.tensor([resolution, resolution])})
        out.append({"images": to_model_input(images, resolution), "targets": targets})
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _parts(preset: str, resolution: int, device: torch.device):
    torch.manual_seed(0)
    model, criterion, post = build(ModelConfig(preset=preset, resolution=resolution),
                                   LossConfig(), len(CLASSES))
    model.to(device)
    criterion.to(device)
    return model, criterion, post


def train_rank(rank: int, world: int, preset: str, a: dict[str, Any], port: int,
               out_dir: str) -> None:
    """One worker's timed training steps (also the 1-worker case, without a process group)."""
    cuda = a["device"] == "cuda"
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if not cuda:
        torch.set_num_threads(a["threads"])
    # DDP's note on channels-last gradient strides of 1x1 convs: harmless, not this bench's topic
    warnings.filterwarnings("ignore", message="Grad strides do not match")
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                                rank=rank, world_size=world)
    model, criterion, _ = _parts(preset, a["resolution"], device)
    optimizer = build_optimizer(model, OptimConfig(), preset)
    ema = ModelEma(model)
    net: torch.nn.Module = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[rank] if cuda else None,
            find_unused_parameters=preset.startswith("rfdetr"))
    batches = synthetic_batches(a["warmup"] + a["steps"], a["batch"], a["resolution"], 1 + rank)
    amp = torch.bfloat16
    kw = dict(device=device, epoch=1, ema=ema, amp_dtype=amp)
    train_one_epoch(net, criterion, batches[:a["warmup"]], optimizer, None, **kw)
    _sync(device)
    if world > 1:
        dist.barrier()
    t0 = time.perf_counter()
    stats = train_one_epoch(net, criterion, batches[a["warmup"]:], optimizer, None, **kw)
    _sync(device)
    seconds = time.perf_counter() - t0
    result = {"rank": rank, "seconds": seconds, "images": stats["images"],
              "train_loss": stats["train_loss"],
              "peak_memory_gib": (torch.cuda.max_memory_allocated(device) / 2**30
                                  if cuda else None)}
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    if world > 1:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def train_throughput(preset: str, world: int, a: dict[str, Any]) -> dict[str, Any]:
    """Global training images/s with ``world`` workers (the slowest rank's time)."""
    with tempfile.TemporaryDirectory() as tmp:
        if world == 1:
            train_rank(0, 1, preset, a, 0, tmp)
        else:
            mp.spawn(train_rank, args=(world, preset, a, free_port(), tmp), nprocs=world,
                     join=True)
        ranks = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(world)]
    seconds = max(r["seconds"] for r in ranks)
    images = sum(r["images"] for r in ranks)
    return {"workers": world, "images": images, "seconds": seconds,
            "images_per_s": images / seconds, "train_loss_rank0": ranks[0]["train_loss"],
            "peak_memory_gib_rank0": ranks[0]["peak_memory_gib"]}


def timed(fn, device: torch.device, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(device: torch.device, mib: int) -> float:
    """Bytes/s of a large copy on ``device`` (read + write)."""
    src = torch.rand(mib * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    sec = timed(lambda: dst.copy_(src), device, 10)
    return 2 * src.numel() * 4 / sec


def ema_vs_bound(preset: str, a: dict[str, Any], bandwidth: float) -> dict[str, Any]:
    device = torch.device(a["device"])
    model, _, _ = _parts(preset, a["resolution"], device)
    ema = ModelEma(model)
    shadow_bytes = sum(t.numel() * t.element_size() for t in ema.shadow_state_dict(0).values()
                       if t.is_floating_point())
    # as in training: the clipping norm's verdict is passed, so the NaN guard's pass is skipped
    finite = torch.tensor(True, device=device)
    with torch.no_grad():
        sec = timed(lambda: ema.update(model, finite=finite), device, a["ema_repeats"])
    bound = 3 * shadow_bytes / bandwidth
    return {"shadow_bytes": shadow_bytes, "update_seconds": sec, "bound_seconds": bound,
            "update_over_bound": sec / bound,
            # the shadow's own traffic only (read + write), without reading the model
            "bound_seconds_shadow_only": 2 * shadow_bytes / bandwidth}


def eval_seconds(preset: str, a: dict[str, Any]) -> dict[str, Any]:
    """Epoch-end evaluation of the regular model and its EMA shadow, as the worker runs it."""
    device = torch.device(a["device"])
    model, _, post = _parts(preset, a["resolution"], device)
    ema = ModelEma(model)
    evaluator = ShadowEvaluator(model, ema)
    batches = synthetic_batches(-(-a["val_images"] // a["eval_batch"]), a["eval_batch"],
                                a["resolution"], 99)
    num_select, max_dets = eval_settings(preset)
    _sync(device)
    t0 = time.perf_counter()
    records = evaluator.predict(post, batches, device, torch.bfloat16, top_k=num_select)
    _sync(device)
    t1 = time.perf_counter()
    metrics, seconds = evaluate_matches(records, list(CLASSES), 0, 1, max_dets=(1, 10, max_dets))
    total = time.perf_counter() - t0
    return {"val_images": len(batches) * a["eval_batch"], "variants": len(records),
            "predict_seconds": t1 - t0, "coco_seconds": total - (t1 - t0), "seconds": total,
            "num_select": num_select, "max_dets": max_dets}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="the reduced CPU mode even with CUDA")
    p.add_argument("--presets", nargs="+", default=None)
    p.add_argument("--resolution", type=int, default=None, help="default: preset's (GPU), 64 (CPU)")
    p.add_argument("--batch", type=int, default=None, help="per worker; default 8 (GPU), 2 (CPU)")
    p.add_argument("--steps", type=int, default=None, help="timed steps; default 30 (GPU), 2 (CPU)")
    p.add_argument("--warmup", type=int, default=None, help="default 5 (GPU), 1 (CPU)")
    p.add_argument("--workers", type=int, default=None,
                   help="N for the N-worker figure; default all GPUs (GPU), 2 (CPU)")
    p.add_argument("--val-images", type=int, default=None, help="default 500 (GPU), 8 (CPU)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per CPU worker")
    p.add_argument("--workdir", type=Path, default=None, help="unused (run_all passes it)")
    p.add_argument("--quick", action="store_true", help="same as the CPU defaults' sizes")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    gpu = torch.cuda.is_available() and not args.cpu
    small = not gpu or args.quick
    a = {"device": "cuda" if gpu else "cpu", "threads": args.threads,
         "batch": args.batch or (2 if small else 8), "steps": args.steps or (2 if small else 30),
         "warmup": args.warmup or (1 if small else 5),
         "val_images": args.val_images or (8 if small else 500),
         "ema_repeats": 5 if small else 50}
    a["eval_batch"] = max(a["batch"], 8) if not small else 4
    workers = args.workers or (torch.cuda.device_count() if gpu else 2)
    presets = args.presets or (GPU_PRESETS if gpu else CPU_PRESETS)
    seg = [q for q in presets if is_segmentation(q)]
    if seg:
        p.error(f"--presets {' '.join(seg)}: segmentation presets need mask targets, which the "
                "synthetic batches here do not carry; pick detection presets")
    device = torch.device(a["device"])
    if not gpu:
        torch.set_num_threads(args.threads)
        print(f"*** {NOT_GPU} ***", flush=True)
    name = torch.cuda.get_device_name(0) if gpu else platform.processor() or platform.machine()
    bandwidth = copy_bandwidth(device, 1024 if gpu else 128)
    rows, out = [], {"mode": "gpu" if gpu else "cpu-reduced", "note": None if gpu else NOT_GPU,
                     "device": name, "gpus": torch.cuda.device_count() if gpu else 0,
                     "copy_bandwidth_bytes_per_s": bandwidth, "settings": a, "presets": []}
    for preset in presets:
        res = args.resolution or (64 if small else int(
            resolve_model_config(ModelConfig(preset=preset))["resolution"]))
        pa = {**a, "resolution": res}
        t0 = time.perf_counter()
        entry: dict[str, Any] = {"preset": preset, "resolution": res}
        entry["train"] = [train_throughput(preset, 1, pa)]
        if workers > 1:
            entry["train"].append(train_throughput(preset, workers, pa))
        entry["ema"] = ema_vs_bound(preset, pa, bandwidth)
        entry["eval"] = eval_seconds(preset, pa)
        entry["wall_seconds"] = time.perf_counter() - t0
        out["presets"].append(entry)
        one = entry["train"][0]["images_per_s"]
        many = entry["train"][-1]["images_per_s"] if workers > 1 else float("nan")
        rows.append([preset, res, f"{one:.1f}", f"{many:.1f}" if workers > 1 else "-",
                     f"{entry['ema']['update_seconds'] * 1e3:.3f}",
                     f"{entry['ema']['bound_seconds'] * 1e3:.3f}",
                     f"{entry['ema']['update_over_bound']:.2f}",
                     f"{entry['eval']['seconds']:.2f}"])
        print(f"{preset}: done in {entry['wall_seconds']:.0f}s", flush=True)
    title = (f"bench/gpu.py on {name} ({out['mode']}; bf16 autocast; batch {a['batch']}/worker; "
             f"copy bandwidth {bandwidth / 1e9:.1f} GB/s; eval of {a['val_images']} images x "
             "2 variants)")
    head = ["preset", "px", "img/s 1 worker", f"img/s {workers} workers", "EMA ms",
            "bound ms", "EMA/bound", "eval s/epoch"]
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    print("\n" + title)
    for r in [head, *rows]:
        print("  ".join(str(v).rjust(w) for v, w in zip(r, widths)))
    if not gpu:
        print(f"*** {NOT_GPU} ***")
    tag = "" if gpu else "NOT GPU, CPU reduced mode: "
    out["summary"] = []
    for e in out["presets"]:
        for t in e["train"]:
            out["summary"].append(common.summary_row(
                f"{tag}bf16 train img/s, {t['workers']} worker(s) ({e['preset']}, "
                f"{e['resolution']} px)", t["images_per_s"], "info", None))
        out["summary"].append(common.summary_row(
            f"{tag}EMA update / memory bound ({e['preset']})", e["ema"]["update_over_bound"],
            "info (1 = bound)", None, "x"))
        out["summary"].append(common.summary_row(
            f"{tag}eval s per epoch, {e['eval']['val_images']} images x 2 variants "
            f"({e['preset']})", e["eval"]["seconds"], "info", None, "s"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
