"""An RF-DETR training step on CPU, images/s: raydetr's implementation vs RF-DETR's own.

    .venv/bin/python bench/rfdetr_step.py                              # ours only (says so)
    .venv/bin/python bench/rfdetr_step.py --reference /tmp/rfdetr-ref  # + RF-DETR's code
    .venv/bin/python bench/rfdetr_step.py --batch 2 --resolution 384 --threads 1 --steps 3
    # any preset, RF-DETR built from its source by bench/rfdetr_reference.py's importer:
    .venv/bin/python bench/rfdetr_step.py --preset rfdetr-seg-nano --resolution 312 \
        --rfdetr-src /tmp/rf/src --reference-python /tmp/rf/venv/bin/python

A step is forward (training mode: 13 x 300 queries) + the family's loss (IA-BCE, per-group
Hungarian matching on the final, auxiliary and encoder outputs) + backward + grad clipping (0.1)
+ AdamW step over the family's parameter groups. Both sides get the same images and targets
(seeded), the same batch, resolution and torch threads, each in a fresh subprocess.

The reference is RF-DETR's own model, criterion and ``get_param_dict`` built from its source
in a scratch environment outside the repository (``--reference DIR``: a directory with
``rfref.py`` and ``venv/``, see its README.txt; rfref.build(preset, with_criterion=True)
returns model, criterion, postprocessor, args). Without it only our numbers are reported.
Reported per side: median wall seconds and process CPU seconds per step after one warm-up
step, and images/s from each; ratio = ours / reference throughput (> 1: ours is faster).
Seg presets: the targets also carry masks (each box filled, at the input size) and both sides
add their mask losses (point-sampled BCE + dice, mask matching costs).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from raydetr.config.presets import is_segmentation

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"

# Runs inside either interpreter: build a batch the same way on both sides, then time steps.
_COMMON = r'''
import json, statistics, sys, time
import torch
P = json.loads(sys.argv[1])
THREADS, BATCH, RES, STEPS = P["threads"], P["batch"], P["resolution"], P["steps"]
torch.set_num_threads(THREADS)
torch.manual_seed(0)
images = torch.randn(BATCH, 3, RES, RES)
gen = torch.Generator().manual_seed(1)
targets = []
for _ in range(BATCH):
    n = 3
    cxcy = torch.rand(n, 2, generator=gen) * 0.6 + 0.2
    wh = torch.rand(n, 2, generator=gen) * 0.2 + 0.05
    targets.append({"labels": torch.randint(1, 91, (n,), generator=gen),
                    "boxes": torch.cat([cxcy, wh], 1)})
    if P["masks"]:
        grid = (torch.arange(RES) + 0.5) / RES
        lo, hi = cxcy - wh / 2, cxcy + wh / 2
        targets[-1]["masks"] = ((grid[None, :, None] >= lo[:, None, None, 1])
                                & (grid[None, :, None] < hi[:, None, None, 1])
                                & (grid[None, None, :] >= lo[:, None, None, 0])
                                & (grid[None, None, :] < hi[:, None, None, 0]))

def timed(step):
    wall, cpu = [], []
    for i in range(STEPS + 1):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        if i:  # the first step is a warm-up (allocator, autograd graph caches)
            wall.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    print("RESULT " + json.dumps({"wall_s": wall, "cpu_s": cpu}))
'''

_OURS = r'''
sys.path.insert(0, P["repo"])
from raydetr.config import load_config
from raydetr.model.build import build
from raydetr.train.optim import build_optimizer
cfg = load_config(None, [f"model.preset={P['preset']}", f"model.resolution={RES}"])
model, criterion, _ = build(cfg.model, cfg.loss, 91)
model.train(); criterion.train()
opt = build_optimizer(model, cfg.optim, cfg.model.preset)
params = [p for g in opt.param_groups for p in g["params"]]

def step():
    loss = criterion(model(images), targets)["loss"]
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, cfg.optim.clip_max_norm)
    opt.step()

timed(step)
'''

_REFERENCE = r'''
sys.path.insert(0, P["reference"])
import rfref
from rfdetr.util.get_param_dicts import get_param_dict
model, criterion, _post, args = rfref.build("nano", with_criterion=True)
model.train(); criterion.train()
opt = torch.optim.AdamW(get_param_dict(args, model), lr=args.lr, weight_decay=args.weight_decay)
weights = criterion.weight_dict

def step():
    losses = criterion(model(images), targets)
    loss = sum(losses[k] * weights[k] for k in losses if k in weights)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
    opt.step()

timed(step)
'''

# RF-DETR built from its source dir (--rfdetr-src) with bench/rfdetr_reference.py's importer.
_REFERENCE_SRC = r'''
from pathlib import Path
sys.path.insert(0, P["repo"] + "/bench")
import rfdetr_reference as H
rf = H.import_rfdetr(Path(P["rfdetr_src"]))
from rfdetr.util.get_param_dicts import get_param_dict
model, args = H.build_reference(rf, P["preset"], training=True)
criterion, _post = rf.models.build_criterion_and_postprocessors(args)
model.train(); criterion.train()
opt = torch.optim.AdamW(get_param_dict(args, model), lr=args.lr, weight_decay=args.weight_decay)
weights = criterion.weight_dict

def step():
    losses = criterion(model(images), targets)
    loss = sum(losses[k] * weights[k] for k in losses if k in weights)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
    opt.step()

timed(step)
'''


def _run(python: str, body: str, subs: dict[str, Any]) -> dict[str, list[float]]:
    proc = subprocess.run([python, "-c", _COMMON + body, json.dumps(subs)], capture_output=True,
                          text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{python} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def _summary(raw: dict[str, list[float]], batch: int) -> dict[str, Any]:
    wall, cpu = statistics.median(raw["wall_s"]), statistics.median(raw["cpu_s"])
    return {**raw, "median_wall_s": wall, "median_cpu_s": cpu,
            "images_per_s": batch / wall, "images_per_cpu_s": batch / cpu}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reference", type=Path, default=None,
                   help="RF-DETR scratch reference dir (rfref.py + venv/); optional")
    p.add_argument("--rfdetr-src", type=Path, default=None,
                   help="or: RF-DETR's source dir (holding rfdetr/), built by "
                        "bench/rfdetr_reference.py's importer; needs --reference-python")
    p.add_argument("--reference-python", type=Path, default=None,
                   help="the scratch venv's python for --rfdetr-src")
    p.add_argument("--preset", default="rfdetr-nano")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--resolution", type=int, default=384)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up")
    p.add_argument("--out", type=Path, default=None,
                   help="default bench/results/rfdetr_step.json (<preset>_step.json if not nano)")
    args = p.parse_args(argv)
    if args.out is None:
        name = "rfdetr_step" if args.preset == "rfdetr-nano" else f"{args.preset}_step"
        args.out = RESULTS / f"{name}.json"

    if args.reference and args.preset != "rfdetr-nano":
        raise SystemExit("--reference (rfref.py) builds nano only; use --rfdetr-src for others")
    if args.rfdetr_src and not args.reference_python:
        raise SystemExit("--rfdetr-src needs --reference-python (the scratch venv's python)")
    subs = {"threads": args.threads, "batch": args.batch, "resolution": args.resolution,
            "steps": args.steps, "repo": str(REPO), "preset": args.preset,
            "masks": is_segmentation(args.preset),
            "rfdetr_src": str(args.rfdetr_src) if args.rfdetr_src else "",
            "reference": str(args.reference) if args.reference else ""}
    result: dict[str, Any] = {"preset": args.preset, "batch": args.batch,
                              "resolution": args.resolution, "threads": args.threads,
                              "steps": args.steps, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    result["ours"] = _summary(_run(sys.executable, _OURS, subs), args.batch)
    print(f"ours      : {result['ours']['median_wall_s']:.2f} s/step wall, "
          f"{result['ours']['median_cpu_s']:.2f} CPU-s/step -> "
          f"{result['ours']['images_per_s']:.3f} img/s ({result['ours']['images_per_cpu_s']:.3f} "
          "img per CPU-s)")
    if args.reference is None and args.rfdetr_src is None:
        print("reference : not run (pass --reference DIR or --rfdetr-src DIR with RF-DETR's "
              "scratch build)")
        result["reference"] = None
    else:
        if args.rfdetr_src is not None:
            python, body = str(args.reference_python), _REFERENCE_SRC
        else:
            python, body = str(args.reference / "venv" / "bin" / "python"), _REFERENCE
        result["reference"] = _summary(_run(python, body, subs), args.batch)
        ref = result["reference"]
        print(f"reference : {ref['median_wall_s']:.2f} s/step wall, {ref['median_cpu_s']:.2f} "
              f"CPU-s/step -> {ref['images_per_s']:.3f} img/s ({ref['images_per_cpu_s']:.3f} img "
              "per CPU-s)")
        result["ratio_wall"] = result["ours"]["images_per_s"] / ref["images_per_s"]
        result["ratio_cpu"] = result["ours"]["images_per_cpu_s"] / ref["images_per_cpu_s"]
        print(f"ours / RF-DETR throughput: {result['ratio_wall']:.3f} (wall), "
              f"{result['ratio_cpu']:.3f} (CPU time); target >= 1.0")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
