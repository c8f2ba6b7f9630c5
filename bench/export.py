"""ONNX export: CPU latency and throughput of torch eager vs onnxruntime, same model, same input.

    .venv/bin/python bench/export.py                       # rtdetr-r18 + rfdetr-nano at 384 px
    .venv/bin/python bench/export.py --quick               # 128 px, fewer rounds (a smoke run)

For each preset a random-init model (timing does not depend on the weights' values) is written
as a model dir and exported with ``raydetr.serve.export.export_detector`` (float32, dynamic
batch, raw outputs; the export's own check proves onnxruntime == torch within 1e-4 first). Then,
on one fixed model-input tensor (preprocessing excluded, it is the same code for both):

    latency    batch 1, with 1 and with 2 intra-op threads (torch.set_num_threads /
               onnxruntime intra_op_num_threads), seconds per forward
    throughput batch 8 with 2 threads, images/s

Each round times both sides back to back, the order alternating from round to round (torch
first, then onnxruntime first, ...), so load from other processes lands on both; every number is
the median over rounds of that round's median call. Prints a table, the line
``onnxruntime / torch images/s, rfdetr-nano: R`` and writes bench/results/export.json.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

PRESETS = ["rtdetr-r18", "rfdetr-nano"]
CLASSES = 3


def write_model_dir(out: Path, preset: str, resolution: int) -> Path:
    import json

    import torch
    from safetensors.torch import save_file

    from raydetr.config import LossConfig, ModelConfig
    from raydetr.model.build import build

    cfg = ModelConfig(preset=preset, resolution=resolution)
    torch.manual_seed(0)
    model, _, _ = build(cfg, LossConfig(), CLASSES)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out / "model.safetensors")
    meta = {"classes": [f"c{i}" for i in range(CLASSES)], "num_classes": CLASSES,
            "model": cfg.model_dump(mode="json"), "resolution": resolution, "variant": "ema"}
    (out / "meta.json").write_text(json.dumps(meta))
    return out


def call_s(fn, calls: int) -> float:
    """Median seconds of ``calls`` calls (after the round's first, untimed call)."""
    fn()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_preset(preset: str, work: Path, rounds: int, calls: int, resolution: int | None,
                 batch: int) -> dict[str, Any]:
    import torch

    from raydetr.config import ModelConfig
    from raydetr.model.build import resolve_model_config
    from raydetr.serve.detector import Detector
    from raydetr.serve.export import export_detector
    from raydetr.serve.onnx import OnnxRuntimeModel, check_images

    res = resolution or int(resolve_model_config(ModelConfig(preset=preset))["resolution"])
    model_dir = write_model_dir(work / preset, preset, res)
    det = Detector.from_dir(model_dir, device="cpu")
    torch.set_num_threads(2)
    start = time.perf_counter()
    report = export_detector(det, model_dir / "model.onnx")
    export_s = time.perf_counter() - start
    worst = max(max(d.values()) for d in report["check"]["batches"].values())
    model = det.model.eval()
    runtimes = {t: OnnxRuntimeModel(report["path"], threads=t) for t in (1, 2)}
    images = check_images(res, batch)
    one, many = images[:1].numpy(), images.numpy()

    def torch_fn(x, threads):
        def fn():
            with torch.no_grad():
                model(torch.from_numpy(x))
        return fn

    def ort_fn(x, threads):
        return lambda: runtimes[threads].run_numpy(x)

    cases = {"latency_b1_t1": (one, 1), "latency_b1_t2": (one, 2), f"batch{batch}_t2": (many, 2)}
    rows: dict[str, dict[str, list[float]]] = {c: {"torch": [], "onnxruntime": []} for c in cases}
    for r in range(rounds):
        for case, (x, threads) in cases.items():
            sides = [("torch", torch_fn(x, threads)), ("onnxruntime", ort_fn(x, threads))]
            for side, fn in (sides if r % 2 == 0 else sides[::-1]):
                torch.set_num_threads(threads)  # untimed; onnxruntime's sessions have their own
                rows[case][side].append(call_s(fn, calls if len(x) == 1 else max(1, calls // 2)))
        print(f"  {preset}: round {r + 1}/{rounds} done", flush=True)
    out: dict[str, Any] = {"preset": preset, "resolution": res, "export_s": export_s,
                           "onnx_bytes": report["bytes"], "max_abs_diff_vs_torch": worst,
                           "rounds": rounds, "calls_per_round": calls, "cases": {}}
    for case, (x, threads) in cases.items():
        med = {side: statistics.median(v) for side, v in rows[case].items()}
        out["cases"][case] = {"batch": len(x), "threads": threads, "seconds": med,
                              "images_per_s": {s: len(x) / v for s, v in med.items()},
                              "per_round_s": rows[case]}
    return out


def main() -> None:
    p = common.base_parser(__doc__, fits=False)
    p.add_argument("--presets", nargs="+", default=PRESETS)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--calls", type=int, default=4, help="timed calls per side per round (batch 1)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--resolution", type=int, help="default: each preset's own")
    args = p.parse_args()
    if args.quick:
        args.rounds, args.calls, args.resolution = 2, 2, args.resolution or 128
    work = common.workdir_of(args)
    results = []
    for preset in args.presets:
        print(f"{preset}: export + {args.rounds} rounds", flush=True)
        results.append(bench_preset(preset, work, args.rounds, args.calls, args.resolution,
                                    args.batch))
    rows = []
    for r in results:
        for case, c in r["cases"].items():
            t, o = c["seconds"]["torch"], c["seconds"]["onnxruntime"]
            rows.append([r["preset"], r["resolution"], case, c["batch"], c["threads"],
                         round(t * 1000, 1), round(o * 1000, 1),
                         round(c["images_per_s"]["torch"], 2),
                         round(c["images_per_s"]["onnxruntime"], 2), round(t / o, 2)])
    common.print_table(
        f"torch eager vs onnxruntime, CPU, median of {args.rounds} alternating rounds",
        ["preset", "px", "case", "batch", "threads", "torch ms", "ort ms", "torch img/s",
         "ort img/s", "ort / torch img/s"], rows)
    for r in results:
        print(f"{r['preset']}: export {r['export_s']:.1f} s, {r['onnx_bytes'] / 1e6:.1f} MB, "
              f"max |onnxruntime - torch| {r['max_abs_diff_vs_torch']:.2e}")
    ratios = {}
    for r in results:
        case = r["cases"][f"batch{args.batch}_t2"]["images_per_s"]
        ratios[r["preset"]] = case["onnxruntime"] / case["torch"]
        print(f"onnxruntime / torch images/s, {r['preset']}: {ratios[r['preset']]:.2f}")
    summary = [common.summary_row(f"onnxruntime / torch images/s, {k} (batch {args.batch})", v,
                                  "info", None, "x") for k, v in ratios.items()]
    common.write_json("export", args, {"results": results, "ratio_images_per_s": ratios,
                                       "summary": summary})


if __name__ == "__main__":
    common.run(main)
