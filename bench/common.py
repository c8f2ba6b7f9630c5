"""Shared helpers of the bench scripts: the synthetic dataset, real-path fits, tables, JSON.

Every bench script takes ``--workdir`` (default: a fresh temp dir). ``bench/run_all.py`` passes
one workdir to all of them, so a fit with the same settings (e.g. the 1-worker run used by the
Ray-overhead, scaling and evaluation benches) runs once per suite run and is read back from
``<workdir>/fits/<key>/``. Nothing is read from an earlier suite run: a fresh workdir is
made each time, and removed when the process that made it ends (a ``--workdir`` you pass is
kept).

Fits go through the real path (``raydetr.fit.driver.fit``, Tune + TorchTrainer + post-fit)
with MLflow off, each with its own ``run.name`` under the workdir; Ray is started by the
driver for that fit (so it sizes the cluster as a user's fit would) and shut down after it.
"""

from __future__ import annotations

import argparse
import atexit
import hashlib
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

# Ray's local-only mode keeps every port on loopback (see ARCHITECTURE.md); before ray.init.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ.setdefault("RAY_DEDUP_LOGS", "1")

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
RESULTS_DIR = REPO / "bench" / "results"
THERMAL = REPO.parent / "shared" / "data" / "thermal-dogs-people"

# One fit configuration shared by the benches (small: 2 shared CPU cores). Multi-scale at 64 px
# only has 64 in range (multiples of 32 in [48, 80]), so every batch has the same size.
FIT = {"full": dict(train_images=48, val_images=16, epochs=4, resolution=64, batch_size=4),
       "quick": dict(train_images=16, val_images=8, epochs=2, resolution=64, batch_size=4)}


def base_parser(description: str, *, fits: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=None,
                   help="scratch dir (datasets, fits); default: a new temp dir")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/)")
    p.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run)")
    if fits:
        p.add_argument("--threads", type=int, default=1,
                       help="torch threads, the same in Ray workers and the plain loop")
    return p


def temp_workdir() -> Path:
    """A fresh scratch dir, removed when this process exits (datasets and fits are 30 MB to
    1 GB per run)."""
    work = Path(tempfile.mkdtemp(prefix="raydetr-bench-"))
    atexit.register(shutil.rmtree, work, ignore_errors=True)
    return work


def workdir_of(args: argparse.Namespace) -> Path:
    if args.workdir is None:
        args.workdir = temp_workdir()
    args.workdir = Path(args.workdir).resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)
    return args.workdir


def fit_sizes(args: argparse.Namespace) -> dict[str, int]:
    return dict(FIT["quick" if args.quick else "full"])


# --------------------------------------------------------------------------- data
def synthetic_prepared(workdir: Path, *, train_images: int, val_images: int, image_size: int = 64,
                       seed: int = 0) -> Path:
    """A prepared synthetic dataset under ``workdir/datasets`` (made once per workdir)."""
    from raydetr.data.parquet import is_prepared, prepare_dataset
    from raydetr.data.synthetic import make_synthetic

    key = f"synthetic-{train_images}-{val_images}-{image_size}-{seed}"
    out = workdir / "datasets" / key / "prepared"
    if not is_prepared(out):
        raw = make_synthetic(workdir / "datasets" / key / "raw", train_images=train_images,
                             val_images=val_images, image_size=image_size, seed=seed)
        prepare_dataset(raw, out, progress=False, overwrite=True)
    return out


def fit_overrides(prepared: Path, sizes: dict[str, int], threads: int, **extra: Any) -> list[str]:
    """Dotted overrides of a bench fit (MLflow off; ``extra`` keys use '__' for '.')."""
    ov = {
        "data.path": str(prepared), "mlflow.enabled": False,
        "model.resolution": sizes["resolution"], "optim.batch_size": sizes["batch_size"],
        "optim.epochs": sizes["epochs"], "scaling.torch_threads": threads,
        "run.keep_checkpoints": 1,
    }
    ov.update({k.replace("__", "."): v for k, v in extra.items()})
    return [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in ov.items()]


def shutdown_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


def fit_cached(workdir: Path, overrides: list[str]) -> dict[str, Any]:
    """Run ``driver.fit`` once per (workdir, overrides); returns history, meta, wall seconds.

    The result is stored in ``<workdir>/fits/<key>/bench_fit.json`` so the other bench scripts
    of the same suite run reuse it instead of training again.
    """
    key = hashlib.sha1("\n".join(sorted(overrides)).encode()).hexdigest()[:12]
    cache = workdir / "fits" / key / "bench_fit.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    from raydetr.config import load_config
    from raydetr.fit.driver import fit

    cfg = load_config(None, [*overrides, f"run.output_dir={workdir / 'fits' / key}",
                             f"run.name=fit-{key}"])
    shutdown_ray()  # the driver starts Ray sized for this fit
    t0 = time.perf_counter()
    try:
        result = fit(cfg)
    finally:
        wall = time.perf_counter() - t0
        shutdown_ray()
    history = json.loads((result.run_dir / "history.json").read_text())
    out = {"overrides": overrides, "wall_s": wall, "history": history, "meta": result.meta,
           "run_dir": str(result.run_dir)}
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(out, indent=2, default=str))
    return out


def steady(history: list[dict[str, Any]], key: str) -> list[float]:
    """Values of ``key`` for epochs 2..N (epoch 1 carries start-up: compile, caches, pools)."""
    rows = history[1:] if len(history) > 1 else history
    return [float(h[key]) for h in rows if key in h]


# --------------------------------------------------------------------------- timing
def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def timed(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def machine() -> dict[str, Any]:
    import torch

    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"machine": platform.machine(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version(), "loadavg_at_end": load, "device": "cpu"}


# --------------------------------------------------------------------------- output
def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
        return str(v)

    cells = [[fmt(v) for v in r] for r in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in cells)) if cells else len(str(h))
              for i, h in enumerate(header)]
    print(f"\n{title}")
    print("  ".join(f"{h:<{w}}" for h, w in zip(header, widths)))
    print("  ".join("-" * w for w in widths))
    for r in cells:
        print("  ".join(f"{c:<{w}}" for c, w in zip(r, widths)))


def summary_row(measure: str, value: float | str | None, target: str, ok: bool | None,
                unit: str = "") -> dict[str, Any]:
    """One row of run_all's summary table (``ok`` None: no target)."""
    return {"measure": measure, "value": value, "unit": unit, "target": target, "ok": ok}


def write_json(name: str, args: argparse.Namespace, payload: dict[str, Any]) -> Path:
    out = args.out or RESULTS_DIR / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"meta": {**machine(), "command": " ".join(sys.argv),
                        "quick": bool(getattr(args, "quick", False))}, **payload}
    out.write_text(json.dumps(payload, indent=2, default=str))
    print(f"wrote {out}")
    return out


def run(main: Callable[[], Any]) -> None:
    """Entry point of a bench script: run it, and shut Ray down whatever happens."""
    try:
        main()
    finally:
        shutdown_ray()
