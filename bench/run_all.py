"""``make bench``: every benchmark in one run, then one summary table.

    .venv/bin/python bench/run_all.py                  # the suite (~15-20 min on 2 shared cores
                                                       # before eval_scale, which adds its own)
    .venv/bin/python bench/run_all.py --quick          # smoke run, results under the workdir
    .venv/bin/python bench/run_all.py --only ema checkpoint_size
    .venv/bin/python bench/run_all.py --with-tune      # also tune_vs_shadows (4 more fits, ~10 min)

Each script runs as its own process (a fresh Ray each time) with one shared ``--workdir``, so
the fits they share (the 1-worker and 2-worker runs) train once per suite run. Each writes
``<results>/<name>.json`` (default bench/results/; with --quick, <workdir>/results/, and that
workdir is kept; otherwise a workdir the suite made is removed at its end) and its
own table; this script reads the JSON files back and prints the summary: measure, value,
target, source script. Only numbers measured in this run are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

BENCH = Path(__file__).resolve().parent
ORDER = ["ema", "checkpoint_size", "ray_overhead", "scaling", "eval_cost", "eval_scale",
         "posthoc_snapshots", "data_path", "export", "gpu", "tune_vs_shadows"]


def ema_args(quick: bool, presets: list[str]) -> list[str]:
    if quick:
        return ["--presets", "rtdetr-r18", "--repeats", "3", "--train-repeats", "1"]
    return ["--presets", *presets, "--repeats", "10", "--train-repeats", "2"]


def ema_summary(data: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for p in data["presets"]:
        r = p["ratios"]
        share = r["update_share_of_train_step"]
        rows.append(common.summary_row(
            f"EMA update share of train step ({p['preset']}, {p['train_resolution']} px, b2)",
            share, "<= 2%", share <= 0.02, "%"))
        rows.append(common.summary_row(f"EMA update / memory bound ({p['preset']})",
                                       r["raydetr_over_memory_bound"], "info (1 = bound)", None,
                                       "x"))
        rows.append(common.summary_row(f"EMA update / memory bound, NaN guard off ({p['preset']})",
                                       r["raydetr_no_guard_over_memory_bound"],
                                       "info (1 = bound)", None, "x"))
    return rows


def fmt_value(v: Any, unit: str) -> str:
    if isinstance(v, float):
        if unit == "%":
            return f"{v:.2%}"
        return f"{v:.3g}{unit}" if unit in ("x", "s") else f"{v:.3g} {unit}".strip()
    return str(v)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes in every script")
    p.add_argument("--only", nargs="+", choices=ORDER, default=None)
    p.add_argument("--with-tune", action="store_true",
                   help="also run tune_vs_shadows (4 trainings; does not fit the 20 min budget "
                        "on 2 shared cores)")
    p.add_argument("--ema-presets", nargs="+", default=["rtdetr-r18"],
                   help="presets for bench/ema.py (small/medium take minutes on 2 cores)")
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--results", type=Path, default=None, help="JSON folder")
    args = p.parse_args()
    if args.workdir is not None:
        work = args.workdir.resolve()
    elif args.quick and args.results is None:  # the JSON goes under it: kept, and said so
        work = Path(tempfile.mkdtemp(prefix="raydetr-bench-")).resolve()
    else:
        work = common.temp_workdir().resolve()  # removed when the suite ends
    results = args.results or (work / "results" if args.quick else common.RESULTS_DIR)
    results.mkdir(parents=True, exist_ok=True)
    names = [n for n in (args.only or ORDER)
             if n != "tune_vs_shadows" or args.with_tune or args.only]
    print(f"bench workdir {work}; results {results}; scripts: {', '.join(names)}", flush=True)

    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", PYTHONUNBUFFERED="1")
    t_suite = time.perf_counter()
    wall: dict[str, float] = {}
    failed: list[str] = []
    for name in names:
        out = results / f"{name}.json"
        cmd = [sys.executable, str(BENCH / f"{name}.py"), "--out", str(out)]
        if name == "ema":
            cmd += ema_args(args.quick, args.ema_presets)
        else:
            cmd += ["--workdir", str(work)] + (["--quick"] if args.quick else [])
        print(f"\n=== {name}: {' '.join(cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.call(cmd, env=env, cwd=str(BENCH.parent))
        wall[name] = time.perf_counter() - t0
        if rc != 0:
            failed.append(name)
            print(f"=== {name} FAILED (exit {rc})", flush=True)
    total = time.perf_counter() - t_suite

    table = []
    for name in names:
        path = results / f"{name}.json"
        if name in failed or not path.is_file():
            table.append(["(failed: no result)", "-", "-", "-", f"{name}.py"])
            continue
        data = json.loads(path.read_text())
        rows = ema_summary(data) if name == "ema" else data.get("summary", [])
        for r in rows:
            ok = {True: "ok", False: "MISSED", None: ""}[r["ok"]]
            table.append([r["measure"], fmt_value(r["value"], r.get("unit", "")), r["target"],
                          ok, f"{name}.py"])
    common.print_table(
        f"raydetr bench summary ({os.cpu_count()} CPUs, load avg at end "
        f"{os.getloadavg()[0]:.1f}; suite wall {total / 60:.1f} min)",
        ["measure", "value", "target", "", "source"], table)
    print("script wall times: " + ", ".join(f"{n} {s:.0f}s" for n, s in wall.items()))
    print("JSON: " + ", ".join(str(results / f"{n}.json") for n in names))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
