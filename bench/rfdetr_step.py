"""An RF-DETR training step on CPU, images/s: raydetr's vs RF-DETR's own code, alternated.

    .venv/bin/python bench/rfdetr_step.py                        # needs `make rfdetr-reference`
    .venv/bin/python bench/rfdetr_step.py --batch 2 4 --threads 1 2 --rounds 7
    .venv/bin/python bench/rfdetr_step.py --preset rfdetr-seg-nano   # 312 px, masks
    .venv/bin/python bench/rfdetr_step.py --no-reference         # ours only (says so)

``--preset`` is rfdetr-nano (default, 384 px) or rfdetr-seg-nano (312 px, its default
resolution): the seg step adds the mask head's forward, RF-DETR's seg recipe (mask matcher
costs, point-sampled mask CE + dice, class weight 5) and its backward; each target's masks are
its boxes filled at the input size, bool, as in ``bench/rfdetr_reference.py loss``.

A step is one optimizer step of each side's training loop: forward in training mode (13 x 300
queries for nano, 13 x 100 for seg-nano), the family's loss (IA-BCE, per-group Hungarian matching on the final, auxiliary and
encoder outputs), backward, grad clipping 0.1, AdamW over the family's parameter groups, LR
scheduler step, EMA update (decay 0.993, warm-up tau 100). raydetr's side is
``raydetr.train.engine.train_one_epoch`` over one batch, in a process set up as raydetr's CPU
training worker sets itself up (``raydetr.train.memory.keep_freed_memory``); RF-DETR's side is
``bench/rfdetr_reference.py``'s ``step`` (RF-DETR's model, criterion, ``get_param_dict``, AdamW,
LambdaLR and ``ModelEma``, built from its source in the scratch venv of
``make rfdetr-reference``). Both load the same weights (a fresh init plus noise, so no layer is
trivially zero) and get the same images and targets.

Measurement: for each (batch, threads), one long-lived process per side is started and warmed
up (2 steps); then ``--rounds`` rounds run the two sides one after the other (the order flips
every round), ``--steps`` steps each. Each round gives one ratio = RF-DETR's seconds / raydetr's
seconds (= raydetr's throughput / RF-DETR's; > 1: raydetr is faster), so load that drifts over
the run hits both sides of a round alike. Printed: per side the median images/s; the median
ratio with its min..max and interquartile range; the last line pools every round of every
setting. Process CPU seconds are reported too (steadier on a loaded machine).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
REF_DIR = Path(os.environ.get("RFDETR_REF", "/tmp/rfdetr-ref"))
DEFAULT_RESOLUTION = {"rfdetr-nano": 384, "rfdetr-seg-nano": 312}  # the presets' own

# Runs inside either interpreter: the batch (same seeds on both sides), then a command loop.
_COMMON = r'''
import json, sys, time
import torch
P = json.loads(sys.argv[1])
torch.set_num_threads(P["threads"])
BATCH, RES = P["batch"], P["resolution"]
torch.manual_seed(0)
images = torch.randn(BATCH, 3, RES, RES)
gen = torch.Generator().manual_seed(1)
targets = []
for _ in range(BATCH):
    n = 3
    cxcy = torch.rand(n, 2, generator=gen) * 0.6 + 0.2
    wh = torch.rand(n, 2, generator=gen) * 0.2 + 0.05
    t = {"labels": torch.randint(1, 91, (n,), generator=gen), "boxes": torch.cat([cxcy, wh], 1)}
    if P["masks"]:  # the boxes filled at the input size
        c = (torch.arange(RES) + 0.5) / RES
        lo, hi = cxcy - wh / 2, cxcy + wh / 2
        t["masks"] = ((c[None, :, None] >= lo[:, None, None, 1]) & (c[None, :, None] < hi[:, None, None, 1])
                      & (c[None, None, :] >= lo[:, None, None, 0]) & (c[None, None, :] < hi[:, None, None, 0]))
    targets.append(t)

def serve(step):
    out = sys.stdout
    sys.stdout = sys.stderr  # library prints must not reach the command channel
    for line in sys.stdin:
        n = int(line)
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(n):
            step()
        out.write("RESULT " + json.dumps({"wall_s": time.perf_counter() - t0,
                                          "cpu_s": time.process_time() - c0}) + "\n")
        out.flush()
'''

_OURS = r'''
sys.path.insert(0, P["repo"])
from raydetr.config import load_config
from raydetr.ema.ema import ModelEma
from raydetr.model.build import build
from raydetr.train.engine import train_one_epoch
from raydetr.train.memory import keep_freed_memory
from raydetr.train.optim import build_lr_scheduler, build_optimizer
keep_freed_memory()  # as raydetr's CPU training worker does at start
cfg = load_config(None, [f"model.preset={P['preset']}", f"model.resolution={RES}"])
model, criterion, _ = build(cfg.model, cfg.loss, 91)
model.load_state_dict(torch.load(P["weights"], weights_only=True))
opt = build_optimizer(model, cfg.optim, cfg.model.preset)
sched = build_lr_scheduler(opt, cfg.optim, 1000)
ema = ModelEma(model, tau=cfg.ema.tau, decays=cfg.ema.decay, schedule=cfg.ema.schedule)
batch = {"images": images, "targets": targets}

def step():
    train_one_epoch(model, criterion, [batch], opt, sched, device="cpu", epoch=1,
                    clip_max_norm=cfg.optim.clip_max_norm, ema=ema)

serve(step)
'''

_REFERENCE = r'''
sys.path.insert(0, P["bench"])
import rfdetr_reference as R
from pathlib import Path
rf = R.import_rfdetr(Path(P["source"]))
ref = R.build_training(rf, P["preset"], num_classes=90, resolution=RES)
ref.model.load_state_dict(torch.load(P["weights"], weights_only=True))
ref.make_optim()
ref.model.train(); ref.criterion.train()

def step():
    R.step(ref, images, targets)

serve(step)
'''


class Side:
    """One long-lived process timing steps of one implementation."""

    def __init__(self, name: str, python: str, body: str, params: dict[str, Any]) -> None:
        self.name = name
        self.stderr = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen([python, "-c", _COMMON + body, json.dumps(params)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.stderr, text=True)

    def failed(self) -> SystemExit:
        self.proc.wait(timeout=60)
        self.stderr.seek(0)
        return SystemExit(f"{self.name} side failed (exit {self.proc.returncode}):\n"
                          f"{self.stderr.read()[-3000:]}")

    def run(self, steps: int) -> dict[str, float]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        try:
            self.proc.stdin.write(f"{steps}\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            raise self.failed() from None
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise self.failed()
            if line.startswith("RESULT "):
                return json.loads(line[len("RESULT "):])

    def close(self) -> None:
        if self.proc.stdin:
            try:
                self.proc.stdin.close()
            except BrokenPipeError:
                pass
        if self.proc.poll() is None:
            self.proc.wait(timeout=60)


def _quartiles(xs: list[float]) -> tuple[float, float]:
    if len(xs) < 2:
        return xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[2]


def _spread(xs: list[float]) -> dict[str, float]:
    q1, q3 = _quartiles(xs)
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "q1": q1, "q3": q3}


def _fmt(s: dict[str, float]) -> str:
    return (f"{s['median']:.3f} (min {s['min']:.3f}, max {s['max']:.3f}, "
            f"IQR {s['q1']:.3f}..{s['q3']:.3f})")


def write_weights(path: Path, preset: str) -> None:
    """A fresh init of the preset plus noise (every tensor non-trivial), as both sides load it."""
    sys.path.insert(0, str(REPO))
    import torch

    from raydetr.model.rfdetr import build_rfdetr

    torch.manual_seed(0)
    model = build_rfdetr(preset, num_classes=91)
    g = torch.Generator().manual_seed(0)
    sd = {k: v + 0.02 * torch.randn(v.shape, generator=g) for k, v in model.state_dict().items()}
    torch.save(sd, path)


def measure(batch: int, threads: int, args: argparse.Namespace, weights: Path
            ) -> dict[str, Any]:
    params = {"threads": threads, "batch": batch, "resolution": args.resolution,
              "repo": str(REPO), "bench": str(REPO / "bench"), "source": str(args.rfdetr_src),
              "weights": str(weights), "preset": args.preset,
              "masks": args.preset.startswith("rfdetr-seg-")}
    sides = [Side("raydetr", sys.executable, _OURS, params)]
    if not args.no_reference:
        sides.append(Side("RF-DETR", str(args.python), _REFERENCE, params))
    try:
        for s in sides:
            s.run(args.warmup)
        rounds: list[dict[str, dict[str, float]]] = []
        for r in range(args.rounds):
            order = sides if r % 2 == 0 else sides[::-1]
            rounds.append({s.name: s.run(args.steps) for s in order})
    finally:
        for s in sides:
            s.close()
    out: dict[str, Any] = {"batch": batch, "threads": threads, "rounds": rounds}
    for s in sides:
        wall = [r[s.name]["wall_s"] / args.steps for r in rounds]
        cpu = [r[s.name]["cpu_s"] / args.steps for r in rounds]
        out[s.name] = {"s_per_step": _spread(wall), "cpu_s_per_step": _spread(cpu),
                       "images_per_s": batch / statistics.median(wall)}
    if not args.no_reference:
        out["ratio_wall"] = _spread([r["RF-DETR"]["wall_s"] / r["raydetr"]["wall_s"]
                                     for r in rounds])
        out["ratio_cpu"] = _spread([r["RF-DETR"]["cpu_s"] / r["raydetr"]["cpu_s"]
                                    for r in rounds])
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rfdetr-src", type=Path, default=REF_DIR / "src",
                   help="RF-DETR source dir (holds rfdetr/); default $RFDETR_REF/src")
    p.add_argument("--python", type=Path, default=REF_DIR / "venv" / "bin" / "python",
                   help="the scratch venv's python; default $RFDETR_REF/venv/bin/python")
    p.add_argument("--no-reference", action="store_true", help="time raydetr only")
    p.add_argument("--batch", type=int, nargs="+", default=[2, 4])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--preset", choices=sorted(DEFAULT_RESOLUTION), default="rfdetr-nano")
    p.add_argument("--resolution", type=int, default=None,
                   help="default: 384 for rfdetr-nano, 312 for rfdetr-seg-nano")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds per setting")
    p.add_argument("--steps", type=int, default=1, help="steps per side per round")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per side first")
    p.add_argument("--out", type=Path, default=None,
                   help="default bench/results/rfdetr_step.json (nano), rfdetr_step_seg-nano.json")
    args = p.parse_args(argv)
    args.resolution = args.resolution or DEFAULT_RESOLUTION[args.preset]
    if args.out is None:
        args.out = RESULTS / ("rfdetr_step.json" if args.preset == "rfdetr-nano"
                              else f"rfdetr_step_{args.preset.removeprefix('rfdetr-')}.json")
    if not args.no_reference and not args.python.exists():
        raise SystemExit(f"no RF-DETR scratch venv at {args.python}: run `make rfdetr-reference "
                         "RFDETR_REPO=/path/to/rf-detr` (README) or pass --no-reference")

    load = os.getloadavg()
    print(f"{args.preset} training step, {args.resolution} px, CPU ({os.cpu_count()} cores, "
          f"load average {load[0]:.1f} at start); {args.rounds} alternating rounds x "
          f"{args.steps} step(s) per side after {args.warmup} warm-up steps")
    result: dict[str, Any] = {"preset": args.preset, "resolution": args.resolution,
                              "rounds": args.rounds, "steps": args.steps,
                              "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                              "load_average_start": load, "settings": []}
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "weights.pt"
        write_weights(weights, args.preset)
        for batch in args.batch:
            for threads in args.threads:
                m = measure(batch, threads, args, weights)
                result["settings"].append(m)
                line = (f"batch {batch}, {threads} thread(s): raydetr "
                        f"{m['raydetr']['images_per_s']:.3f} img/s")
                if "RF-DETR" in m:
                    line += (f", RF-DETR {m['RF-DETR']['images_per_s']:.3f} img/s; ratio "
                             f"{_fmt(m['ratio_wall'])}, CPU-time ratio {m['ratio_cpu']['median']:.3f}")
                print(line, flush=True)
    result["load_average_end"] = os.getloadavg()
    if not args.no_reference:
        pooled = [r["RF-DETR"]["wall_s"] / r["raydetr"]["wall_s"]
                  for m in result["settings"] for r in m["rounds"]]
        pooled_cpu = [r["RF-DETR"]["cpu_s"] / r["raydetr"]["cpu_s"]
                      for m in result["settings"] for r in m["rounds"]]
        result["ratio_wall"], result["ratio_cpu"] = _spread(pooled), _spread(pooled_cpu)
        print(f"all settings, {len(pooled)} rounds: ratio {_fmt(result['ratio_wall'])}; "
              f"CPU-time ratio {_fmt(result['ratio_cpu'])}")
        print(f"{args.preset} step / RF-DETR step throughput: "
              f"{result['ratio_wall']['median']:.3f}")
    else:
        print("RF-DETR: not run (--no-reference)")
    print(f"load average at end {result['load_average_end'][0]:.1f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
