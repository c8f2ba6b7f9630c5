"""Training-trajectory equivalence: raydetr's rfdetr-nano recipe vs RF-DETR's own training loop.

    .venv/bin/python bench/rfdetr_trajectory.py                  # needs `make rfdetr-reference`
    .venv/bin/python bench/rfdetr_trajectory.py --steps 20 --batch 2 --resolution 256

From the same weights (a fresh init plus noise) and the same batches (random images with 1-4
boxes each; augmentation and multi-scale off), N optimizer steps of

* raydetr: ``raydetr.train.engine.train_one_epoch`` with the rfdetr-nano config's criterion,
  ``build_optimizer`` (fused AdamW over RF-DETR's parameter groups), ``build_lr_scheduler``,
  clipping ``optim.clip_max_norm`` and ``raydetr.ema.ModelEma`` (schedule rfdetr, tau 100);
* RF-DETR: its own ``engine.train_one_epoch`` with its criterion, ``get_param_dict`` + AdamW,
  LambdaLR, clip_max_norm and ``ModelEma`` (bench/rfdetr_reference.py, scratch venv);

then prints the relative difference of the loss at every step, and of the regular and the EMA
weights at the end: per tensor max|ours - RF-DETR| / max|RF-DETR|, the largest over tensors.
Writes bench/results/rfdetr_trajectory.json.

``--noise-floor`` also measures what float32 noise alone does to this trajectory: each side is
run a second time from the same weights moved by one ulp (``torch.nextafter`` on every float
tensor), and the same differences are printed for RF-DETR against itself and raydetr against
itself. raydetr vs RF-DETR within that floor means the two differ by no more than either
differs from itself under a one-ulp change of its starting point.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from raydetr.config import load_config  # noqa: E402
from raydetr.ema.ema import ModelEma  # noqa: E402
from raydetr.model.build import build  # noqa: E402
from raydetr.train.engine import train_one_epoch  # noqa: E402
from raydetr.train.optim import build_lr_scheduler, build_optimizer  # noqa: E402

RESULTS = REPO / "bench" / "results"
REF_DIR = Path(os.environ.get("RFDETR_REF", "/tmp/rfdetr-ref"))
NUM_LOGITS = 91


def make_batches(steps: int, batch: int, resolution: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        images = torch.randn(batch, 3, resolution, resolution, generator=g)
        targets = []
        for _ in range(batch):
            n = int(torch.randint(1, 5, (1,), generator=g))
            cxcy = torch.rand(n, 2, generator=g) * 0.6 + 0.2
            wh = torch.rand(n, 2, generator=g) * 0.3 + 0.05
            targets.append({"labels": torch.randint(1, NUM_LOGITS, (n,), generator=g),
                            "boxes": torch.cat([cxcy, wh], 1)})
        out.append({"images": images, "targets": targets})
    return out


class _Recorder(torch.nn.Module):
    def __init__(self, criterion: torch.nn.Module) -> None:
        super().__init__()
        self.criterion = criterion
        self.totals: list[float] = []

    def forward(self, outputs: dict, targets: list[dict]) -> dict:
        losses = self.criterion(outputs, targets)
        self.totals.append(float(losses["loss"].detach()))
        return losses


def run_ours(weights: dict[str, torch.Tensor], batches: list[dict], resolution: int,
             steps_per_epoch: int) -> dict[str, Any]:
    cfg = load_config(None, ["model.preset=rfdetr-nano", f"model.resolution={resolution}"])
    model, criterion, _ = build(cfg.model, cfg.loss, NUM_LOGITS)
    model.load_state_dict(weights)
    optimizer = build_optimizer(model, cfg.optim, cfg.model.preset)
    scheduler = build_lr_scheduler(optimizer, cfg.optim, steps_per_epoch)
    ema = ModelEma(model, tau=cfg.ema.tau, decays=cfg.ema.decay, schedule=cfg.ema.schedule)
    recorder = _Recorder(criterion)
    train_one_epoch(model, recorder, batches, optimizer, scheduler, device="cpu", epoch=1,
                    grad_accum_steps=1, clip_max_norm=cfg.optim.clip_max_norm, ema=ema)
    return {"losses": recorder.totals, "model": model.state_dict(),
            "ema": ema.shadow_state_dict(0)}


def one_ulp(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every float tensor moved one ulp towards +inf (integer buffers as they are)."""
    return {k: torch.nextafter(v, torch.full_like(v, math.inf)) if v.is_floating_point() else v
            for k, v in weights.items()}


def run_reference(args: argparse.Namespace, weights: dict[str, torch.Tensor], batches: list[dict],
                  steps_per_epoch: int) -> dict[str, Any]:
    """RF-DETR's side in the scratch venv (bench/rfdetr_reference.py trajectory)."""
    with tempfile.TemporaryDirectory() as tmp:
        w_path, b_path, r_path = (Path(tmp) / n for n in ("w.pt", "b.pt", "ref.pt"))
        torch.save(weights, w_path)
        torch.save({"batches": batches, "num_logits": NUM_LOGITS,
                    "steps_per_epoch": steps_per_epoch}, b_path)
        proc = subprocess.run(
            [str(args.python), str(REPO / "bench" / "rfdetr_reference.py"), "--rfdetr-src",
             str(args.rfdetr_src), "--threads", str(args.threads), "trajectory", "--weights",
             str(w_path), "--batches", str(b_path), "--out", str(r_path)],
            capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"RF-DETR side failed:\n{proc.stderr[-4000:]}")
        return torch.load(r_path, weights_only=True)


def compare(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Per-step relative loss difference and final weight differences of run a against b."""
    if len(a["losses"]) != len(b["losses"]):
        raise SystemExit(f"step counts differ: {len(a['losses'])} vs {len(b['losses'])}")
    loss_rel = [abs(x - y) / abs(y) if y else abs(x - y) for x, y in zip(a["losses"], b["losses"])]
    return {"loss_rel_diff": loss_rel, "max_loss_rel_diff": max(loss_rel),
            "regular": rel_diff(a["model"], b["model"]), "ema": rel_diff(a["ema"], b["ema"])}


def _summary(name: str, c: dict[str, Any], steps: int) -> None:
    print(f"{name}: max relative loss difference {c['max_loss_rel_diff']:.2e}; after {steps} "
          f"steps regular weights {c['regular']['max_rel']:.2e}, EMA {c['ema']['max_rel']:.2e}"
          f" (max abs {c['regular']['max_abs']:.2e}, {c['ema']['max_abs']:.2e})")


def rel_diff(ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> dict[str, Any]:
    if list(ours) != list(ref):
        missing, extra = set(ref) - set(ours), set(ours) - set(ref)
        raise SystemExit(f"state_dict keys differ: missing {sorted(missing)[:5]}, "
                         f"extra {sorted(extra)[:5]}")
    worst, worst_key, max_abs = 0.0, "", 0.0
    for k, r in ref.items():
        d = float((ours[k].float() - r.float()).abs().max())
        scale = float(r.float().abs().max())
        rel = d / scale if scale > 0 else d
        max_abs = max(max_abs, d)
        if rel > worst:
            worst, worst_key = rel, k
    return {"max_rel": worst, "worst_tensor": worst_key, "max_abs": max_abs}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rfdetr-src", type=Path, default=REF_DIR / "src")
    p.add_argument("--python", type=Path, default=REF_DIR / "venv" / "bin" / "python")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--noise-floor", action="store_true",
                   help="also run each side from its weights moved by one ulp (see above)")
    p.add_argument("--out", type=Path, default=RESULTS / "rfdetr_trajectory.json")
    args = p.parse_args(argv)
    if not args.python.exists():
        raise SystemExit(f"no RF-DETR scratch venv at {args.python}: run `make rfdetr-reference "
                         "RFDETR_REPO=/path/to/rf-detr` (README)")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from raydetr.model.rfdetr import build_rfdetr

    fresh = build_rfdetr("rfdetr-nano", num_classes=NUM_LOGITS).state_dict()
    g = torch.Generator().manual_seed(0)
    weights = {k: v + 0.02 * torch.randn(v.shape, generator=g) for k, v in fresh.items()}
    batches = make_batches(args.steps, args.batch, args.resolution)
    steps_per_epoch = args.steps  # one epoch; the schedule is constant (step at epoch 100)
    t0 = time.perf_counter()
    ref = run_reference(args, weights, batches, steps_per_epoch)
    t_ref = time.perf_counter() - t0
    t0 = time.perf_counter()
    ours = run_ours(weights, batches, args.resolution, steps_per_epoch)
    t_ours = time.perf_counter() - t0

    print(f"rfdetr-nano, {args.steps} optimizer steps, batch {args.batch}, {args.resolution} px, "
          f"{args.threads} thread(s); raydetr {t_ours:.0f} s, RF-DETR {t_ref:.0f} s")
    print("step  raydetr loss   RF-DETR loss   rel. diff")
    loss_rel = []
    for i, (a, b) in enumerate(zip(ours["losses"], ref["losses"])):
        rel = abs(a - b) / abs(b) if b else abs(a - b)
        loss_rel.append(rel)
        print(f"{i + 1:4d}  {a:12.6f}  {b:12.6f}   {rel:.2e}")
    main_cmp = compare(ours, ref)
    regular, ema = main_cmp["regular"], main_cmp["ema"]
    print(f"max relative loss difference over {len(loss_rel)} steps: {max(loss_rel):.2e}")
    print(f"regular weights after {args.steps} steps: max relative diff {regular['max_rel']:.2e} "
          f"({regular['worst_tensor']}), max abs diff {regular['max_abs']:.2e}")
    print(f"EMA weights after {args.steps} steps: max relative diff {ema['max_rel']:.2e} "
          f"({ema['worst_tensor']}), max abs diff {ema['max_abs']:.2e}")
    result = {"steps": args.steps, "batch": args.batch, "resolution": args.resolution,
              "threads": args.threads, "losses_raydetr": ours["losses"],
              "losses_rfdetr": ref["losses"], "loss_rel_diff": loss_rel,
              "max_loss_rel_diff": max(loss_rel), "regular": regular, "ema": ema,
              "finite": all(math.isfinite(x) for x in ours["losses"]),
              "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if args.noise_floor:
        nudged = one_ulp(weights)
        floor = {"RF-DETR vs RF-DETR from weights + 1 ulp":
                 compare(run_reference(args, nudged, batches, steps_per_epoch), ref),
                 "raydetr vs raydetr from weights + 1 ulp":
                 compare(run_ours(nudged, batches, args.resolution, steps_per_epoch), ours)}
        print("float32 noise floor (each side against itself, started one ulp apart):")
        _summary("raydetr vs RF-DETR (same weights)", main_cmp, args.steps)
        for name, c in floor.items():
            _summary(name, c, args.steps)
        print("step  " + "  ".join(["raydetr/RF-DETR", "RF-DETR/RF-DETR+ulp",
                                     "raydetr/raydetr+ulp"]))
        cols = [main_cmp["loss_rel_diff"], *(c["loss_rel_diff"] for c in floor.values())]
        for i, row in enumerate(zip(*cols)):
            print(f"{i + 1:4d}  " + "  ".join(f"{v:15.2e}" for v in row))
        result["noise_floor"] = floor
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
