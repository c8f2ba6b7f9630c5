"""Per-operator CPU profile of the rfdetr-nano training forward (and backward): raydetr's model
vs RF-DETR's own, same weights, same batch, in one process; and whether the outputs agree.

    /tmp/rfdetr-ref/venv/bin/python bench/rfdetr_profile.py [--batch 2 --threads 1 --top 25]

Runs in the scratch venv of ``make rfdetr-reference`` (RF-DETR needs transformers and peft;
raydetr's model and loss need only torch, scipy, pydantic and pyyaml, which that venv has).
Prints: max |difference| of every training output (final, auxiliary and encoder logits and
boxes; 13 x 300 queries; autograd on), median forward / backward seconds per side (alternated),
process CPU seconds per phase of each side's whole training step (forward, loss, backward,
clipping, AdamW + LR step, EMA update; median of ``--repeats``, alternated: raydetr's criterion,
``build_optimizer`` and ``ModelEma`` vs RF-DETR's criterion, AdamW over ``get_param_dict`` and
``ModelEma``), then the operators by self CPU time of each side's forward + backward
(torch.profiler), side by side. Both sides run in one process with glibc keeping freed memory
(``keep_freed_memory``), so neither pays page faults: this compares the code, not the allocator.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))

import rfdetr_reference as R  # noqa: E402

from raydetr.config import load_config  # noqa: E402
from raydetr.ema.ema import ModelEma  # noqa: E402
from raydetr.model.build import build_criterion  # noqa: E402
from raydetr.model.rfdetr import build_rfdetr  # noqa: E402
from raydetr.train.memory import keep_freed_memory  # noqa: E402
from raydetr.train.optim import build_lr_scheduler, build_optimizer  # noqa: E402


def build_pair(source: Path, resolution: int):
    rf = R.import_rfdetr(source)
    torch.manual_seed(0)
    ours = build_rfdetr("rfdetr-nano", num_classes=91)
    g = torch.Generator().manual_seed(0)
    sd = {k: v + 0.02 * torch.randn(v.shape, generator=g) for k, v in ours.state_dict().items()}
    ours.load_state_dict(sd)
    ref = R.build_training(rf, "rfdetr-nano", num_classes=90, resolution=resolution)
    ref.model.load_state_dict(sd)
    ref.make_optim()
    return ours, ref


PHASES = ("forward", "loss", "backward", "clip", "optim", "ema")


def step_phases(ours, ref, resolution: int):
    """Two step functions (ours, RF-DETR's) returning CPU seconds per phase of one step."""
    cfg = load_config(None, ["model.preset=rfdetr-nano", f"model.resolution={resolution}"])
    criterion = build_criterion(cfg.model, cfg.loss, ours, ours.num_classes)
    opt = build_optimizer(ours, cfg.optim, cfg.model.preset)
    sched = build_lr_scheduler(opt, cfg.optim, 1000)
    ema = ModelEma(ours, tau=cfg.ema.tau, decays=cfg.ema.decay, schedule=cfg.ema.schedule)
    params = [p for g in opt.param_groups for p in g["params"]]
    clock = time.process_time

    def ours_step(images, targets):
        t = [clock()]
        out = ours(images, targets)
        t.append(clock())
        loss = criterion(out, targets)["loss"]
        t.append(clock())
        loss.backward()
        t.append(clock())
        torch.nn.utils.clip_grad_norm_(params, cfg.optim.clip_max_norm)
        t.append(clock())
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        t.append(clock())
        ema.update(ours)
        t.append(clock())
        return [b - a for a, b in zip(t, t[1:])]

    def ref_step(images, targets):
        t = [clock()]
        out = ref.model(images, targets)
        t.append(clock())
        losses = ref.criterion(out, targets)
        w = ref.criterion.weight_dict
        loss = sum(losses[k] * w[k] for k in losses if k in w)
        t.append(clock())
        loss.backward()
        t.append(clock())
        torch.nn.utils.clip_grad_norm_(ref.model.parameters(), ref.args.clip_max_norm)
        t.append(clock())
        ref.optimizer.step()
        ref.lr_scheduler.step()
        ref.optimizer.zero_grad()
        t.append(clock())
        ref.ema.update(ref.model)
        t.append(clock())
        return [b - a for a, b in zip(t, t[1:])]
    return ours_step, ref_step


def _flat(out: dict) -> dict[str, torch.Tensor]:
    flat = {"pred_logits": out["pred_logits"], "pred_boxes": out["pred_boxes"],
            "enc_logits": out["enc_outputs"]["pred_logits"],
            "enc_boxes": out["enc_outputs"]["pred_boxes"]}
    for i, a in enumerate(out["aux_outputs"]):
        flat[f"aux{i}_logits"], flat[f"aux{i}_boxes"] = a["pred_logits"], a["pred_boxes"]
    return flat


def compare(ours, ref, images) -> float:
    # with autograd on, as in a training step (raydetr's query selection takes another path
    # under autograd: its outputs must be RF-DETR's there too)
    a, b = _flat(ours(images)), _flat(ref(images))
    worst = 0.0
    for k in b:
        d = float((a[k] - b[k]).detach().abs().max())
        worst = max(worst, d)
        print(f"  {k:14s} {tuple(b[k].shape)}  max |diff| {d:.3e}")
    return worst


def fwd_bwd(model, images):
    t0 = time.perf_counter()
    out = _flat(model(images))
    t1 = time.perf_counter()
    sum(v.float().square().mean() for v in out.values()).backward()
    t2 = time.perf_counter()
    model.zero_grad(set_to_none=True)
    return t1 - t0, t2 - t1


def profile(model, images, top: int) -> dict[str, float]:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    with tprofile(activities=[ProfilerActivity.CPU]) as prof:
        fwd_bwd(model, images)
    return {e.key: e.self_cpu_time_total / 1e3 for e in prof.key_averages()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rfdetr-src", type=Path, default=R.DEFAULT_SOURCE)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--resolution", type=int, default=384)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--top", type=int, default=30)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # both sides, one process: no page faults for either side's tensors
    ours, ref_training = build_pair(args.rfdetr_src, args.resolution)
    ref = ref_training.model
    ours.train()
    ref.train()
    ref_training.criterion.train()
    torch.manual_seed(1)
    images = torch.randn(args.batch, 3, args.resolution, args.resolution)
    print(f"training-mode outputs with autograd, batch {args.batch}, {args.resolution} px "
          "(raydetr vs RF-DETR):")
    worst = compare(ours, ref, images)
    print(f"  largest |diff| {worst:.3e}")
    times = {"raydetr": [], "RF-DETR": []}
    fwd_bwd(ours, images), fwd_bwd(ref, images)  # warm-up
    for i in range(args.repeats):
        for name, m in ((("raydetr", ours), ("RF-DETR", ref)) if i % 2 == 0
                        else (("RF-DETR", ref), ("raydetr", ours))):
            times[name].append(fwd_bwd(m, images))
    for name, ts in times.items():
        print(f"{name:8s} forward {statistics.median(t[0] for t in ts):.3f} s, backward "
              f"{statistics.median(t[1] for t in ts):.3f} s (median of {args.repeats}, "
              f"{args.threads} thread(s))")
    targets = R.make_targets(args.batch, args.resolution, with_masks=False)
    ours_step, ref_step = step_phases(ours, ref_training, args.resolution)
    rows = {"raydetr": [], "RF-DETR": []}
    ours_step(images, targets), ref_step(images, targets)  # warm-up
    for i in range(args.repeats):
        for name, f in ((("raydetr", ours_step), ("RF-DETR", ref_step)) if i % 2 == 0
                        else (("RF-DETR", ref_step), ("raydetr", ours_step))):
            rows[name].append(f(images, targets))
    print(f"\nprocess CPU s per phase of a training step (median of {args.repeats}):")
    print(f"{'':8s} " + " ".join(f"{k:>9s}" for k in PHASES) + f" {'total':>9s}")
    for name, rs in rows.items():
        med = [statistics.median(r[j] for r in rs) for j in range(len(PHASES))]
        print(f"{name:8s} " + " ".join(f"{v:9.3f}" for v in med) + f" {sum(med):9.3f}")
    a, b = profile(ours, images, args.top), profile(ref, images, args.top)
    print(f"\nself CPU ms per forward + backward, top {args.top} by max of both sides")
    print(f"{'operator':44s} {'raydetr':>9s} {'RF-DETR':>9s} {'diff':>8s}")
    keys = sorted(set(a) | set(b), key=lambda k: -max(a.get(k, 0), b.get(k, 0)))
    for k in keys[:args.top]:
        x, y = a.get(k, 0.0), b.get(k, 0.0)
        print(f"{k[:44]:44s} {x:9.1f} {y:9.1f} {x - y:+8.1f}")
    print(f"{'total':44s} {sum(a.values()):9.1f} {sum(b.values()):9.1f} "
          f"{sum(a.values()) - sum(b.values()):+8.1f}")


if __name__ == "__main__":
    main()
