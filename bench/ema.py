"""Benchmark: time per EMA update for the rtdetr-r18/r34/r50 presets.

    .venv/bin/python bench/ema.py                       # all presets, 1 thread, CPU
    .venv/bin/python bench/ema.py --presets rtdetr-r18 --repeats 20 --train-resolution 256

Compares raydetr's ModelEma (one foreach lerp per shadow) with
  - the per-tensor state_dict() loop of RF-DETR 1.4 / timm ModelEmaV2, written out below
    (in-place mul_/add_ variant, and timm's out-of-place ``d*e + (1-d)*m`` then ``copy_``),
  - the memory bound: bytes touched (read shadow + read model + write shadow, per shadow) /
    copy bandwidth measured here on a large tensor copy,
and gives the update's share of one training step (forward + criterion + backward + AdamW step,
batch of 2 at --train-resolution). Prints a table and writes bench/results/ema.json. Every
number printed is measured by this script on this machine.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raydetr.config import LossConfig, ModelConfig  # noqa: E402
from raydetr.ema import ModelEma  # noqa: E402
from raydetr.model.build import build, resolve_model_config  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "ema.json"


def timed(fn, repeats: int, warmup: int = 2) -> float:
    """Median seconds of ``fn()``."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth_bytes_per_s(mib: int = 256, repeats: int = 5) -> float:
    src = torch.rand(mib * 2**20 // 4)
    dst = torch.empty_like(src)
    sec = timed(lambda: dst.copy_(src), repeats)
    return 2 * src.numel() * 4 / sec  # read + write


@torch.no_grad()
def reference_inplace(ema_model: nn.Module, model: nn.Module, d: float) -> None:
    """RF-DETR 1.4 / timm ModelEmaV2 loop over state_dict() items, in-place arithmetic."""
    msd = model.state_dict()
    for k, ema_v in ema_model.state_dict().items():
        v = msd[k].detach()
        if ema_v.dtype.is_floating_point:
            ema_v.mul_(d).add_(v, alpha=1 - d)
        else:
            ema_v.copy_(v)


@torch.no_grad()
def reference_timm_v2(ema_model: nn.Module, model: nn.Module, d: float) -> None:
    """timm ModelEmaV2._update as written: out-of-place update_fn, then copy_."""
    for ema_v, model_v in zip(ema_model.state_dict().values(), model.state_dict().values()):
        ema_v.copy_(d * ema_v + (1.0 - d) * model_v if ema_v.is_floating_point() else model_v)


def train_step_seconds(model, criterion, resolution: int, repeats: int) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, resolution, resolution, generator=g)
    targets = [
        {"labels": torch.tensor([1, 7]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.3], [0.3, 0.6, 0.1, 0.1]]),
         "image_id": torch.tensor(i), "orig_size": torch.tensor([resolution, resolution])}
        for i in range(2)
    ]  # fmt: skip
    model.train()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        out = model(images, targets)
        criterion(out, targets)["loss"].backward()
        opt.step()

    return timed(step, repeats, warmup=1)


def bench_preset(preset: str, args, bandwidth: float) -> dict:
    torch.manual_seed(0)
    model, criterion, _ = build(ModelConfig(preset=preset), LossConfig(), num_classes=80)
    sd = model.state_dict()
    n_float = sum(v.numel() for v in sd.values() if v.is_floating_point())
    k = len(args.decays)
    row: dict = {"preset": preset, "tensors": len(sd), "float_elements": n_float}

    # the shadow is float32 here (the model is float32): K * (read shadow + read model + write shadow)
    bytes_1 = 3 * 4 * n_float
    row["memory_bound_ms"] = {"1": bytes_1 / bandwidth * 1e3, str(k): k * bytes_1 / bandwidth * 1e3}

    ema_module = copy.deepcopy(model)
    ema1 = ModelEma(model, decay=0.993)
    ema1_noguard = ModelEma(model, decay=0.993, nan_guard=False)
    emak = ModelEma(model, decays=args.decays)
    r = args.repeats
    ms = {
        "raydetr_1": timed(lambda: ema1.update(model), r),
        "raydetr_1_no_nan_guard": timed(lambda: ema1_noguard.update(model), r),
        "ref_inplace_1": timed(lambda: reference_inplace(ema_module, model, 0.993), r),
        "ref_timm_v2_1": timed(lambda: reference_timm_v2(ema_module, model, 0.993), r),
    }
    emak.fused_shadows = False
    ms[f"raydetr_{k}_per_shadow"] = timed(lambda: emak.update(model), r)
    emak.fused_shadows = True
    ms[f"raydetr_{k}_fused"] = timed(lambda: emak.update(model), r)
    ms[f"ref_inplace_{k}"] = k * ms["ref_inplace_1"]  # K separate EMA objects = K loops
    row["update_ms"] = {name: sec * 1e3 for name, sec in ms.items()}
    if args.train_resolution:
        res = args.train_resolution
    else:
        res = resolve_model_config(ModelConfig(preset=preset))["resolution"]
    row["train_resolution"] = res
    row["train_step_ms"] = train_step_seconds(model, criterion, res, args.train_repeats) * 1e3
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["rtdetr-r18", "rtdetr-r34", "rtdetr-r50"])
    p.add_argument("--decays", nargs="+", type=float, default=[0.99, 0.993, 0.999])
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--train-repeats", type=int, default=2)
    p.add_argument("--train-resolution", type=int, default=256,
                   help="training-step resolution (0: the preset's own)")  # fmt: skip
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    bandwidth = copy_bandwidth_bytes_per_s()
    k = len(args.decays)
    rows = [bench_preset(preset, args, bandwidth) for preset in args.presets]

    print(f"\nEMA update, CPU ({platform.processor() or platform.machine()}), torch "
          f"{torch.__version__}, {args.threads} thread(s); median of {args.repeats}; "
          f"copy bandwidth {bandwidth / 1e9:.2f} GB/s")  # fmt: skip
    hdr = (f"{'preset':7} {'float M':>8} {'tensors':>7} {'raydetr':>9} {'no guard':>9} "
           f"{'ref loop':>9} {'timm V2':>9} {'x faster':>8} {'vs bound':>8} "
           f"{f'K={k} sep':>9} {f'K={k} fused':>10} {f'ref K={k}':>9} {'step':>9} {'share':>6}")  # fmt: skip
    print(hdr)
    print("-" * len(hdr))
    for row in rows:
        u = row["update_ms"]
        bound = row["memory_bound_ms"]["1"]
        share = u["raydetr_1"] / row["train_step_ms"]
        row["ratios"] = {
            "ref_inplace_over_raydetr": u["ref_inplace_1"] / u["raydetr_1"],
            "ref_timm_v2_over_raydetr": u["ref_timm_v2_1"] / u["raydetr_1"],
            "raydetr_over_memory_bound": u["raydetr_1"] / bound,
            "raydetr_no_guard_over_memory_bound": u["raydetr_1_no_nan_guard"] / bound,
            "nan_guard_cost": u["raydetr_1"] / u["raydetr_1_no_nan_guard"] - 1,
            "update_share_of_train_step": share,
        }
        print(f"{row['preset']:7} {row['float_elements'] / 1e6:8.2f} {row['tensors']:7d} "
              f"{u['raydetr_1']:7.2f}ms {u['raydetr_1_no_nan_guard']:7.2f}ms "
              f"{u['ref_inplace_1']:7.2f}ms {u['ref_timm_v2_1']:7.2f}ms "
              f"{row['ratios']['ref_inplace_over_raydetr']:7.2f}x "
              f"{row['ratios']['raydetr_over_memory_bound']:7.2f}x "
              f"{u[f'raydetr_{k}_per_shadow']:7.2f}ms {u[f'raydetr_{k}_fused']:8.2f}ms "
              f"{u[f'ref_inplace_{k}']:7.2f}ms {row['train_step_ms']:7.0f}ms {share:6.2%}")  # fmt: skip
    print(
        "x faster = ref loop / raydetr; vs bound = raydetr / (12 bytes x float elements / "
        "copy bandwidth); step = forward+loss+backward+AdamW, batch 2 at "
        + ", ".join(f"{r['preset']} {r['train_resolution']}px" for r in rows)
        + "; share = raydetr update / step"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "threads": args.threads, "device": "cpu",
            "machine": platform.machine(), "copy_bandwidth_bytes_per_s": bandwidth,
            "decays": args.decays, "repeats": args.repeats, "command": " ".join(sys.argv)}  # fmt: skip
    args.out.write_text(json.dumps({"meta": meta, "presets": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
