"""COCO evaluation at COCO scale: today's serial rank-0 pycocotools vs the per-rank matching.

    .venv/bin/python bench/eval_scale.py                     # 5000 images, 2 and 4 variants
    .venv/bin/python bench/eval_scale.py --quick             # 200 images
    .venv/bin/python bench/eval_scale.py --images 1000 --workers 1 2

Validation set: ``--images`` synthetic images drawn from the 100 real COCO val2014 images of
the shared reference (../shared/data/coco-reference): each synthetic image takes one real
image's size and ground-truth boxes (jittered 2%), so image sizes, boxes per image and the
category mix are COCO's. Each variant (the regular weights and each EMA shadow) has 300 scored
detections per image: 3 noisy copies of each ground-truth box (noise grows with the variant
index), the rest random boxes whose classes follow the same category mix, scores lower. Records
are raydetr's eval-record contract (raydetr.eval.coco), the same the workers produce.

Today (before this change): rank 0 runs ``coco_metrics`` (pycocotools evaluate + accumulate +
summarize) once per variant, serially, on every image; ``--today-variants`` of them are timed
(minutes each at 5000 images) and a K-variant epoch today is K x their mean.
Now: ``--workers`` W real processes (torch.distributed, gloo, on this machine) each run
``raydetr.eval.distributed.match_records`` for their own images (every W-th) and every variant,
the compact :class:`Matches` are gathered to rank 0 (``gather_matches``, as the training worker
does), and rank 0 accumulates each variant. Wall time of an epoch's evaluation = from a barrier
before the matching to rank 0's last metrics; per phase: the slowest rank's matching, the
gather, rank 0's accumulation. Every variant's 12 stats are checked against today's.
Model: t(N) = per_image x images x variants / min(N, cores) + fixed x variants, with
per_image = the 1-worker matching seconds per image per variant and fixed = the 1-worker
gather + accumulation seconds per variant; printed next to the measured wall for each W.
The machine is shared (2 cores, others working): every number is one run, under that load.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import numpy as np  # noqa: E402

REFERENCE = common.REPO.parent / "shared" / "data" / "coco-reference"
DETS_PER_IMAGE = 300


# --------------------------------------------------------------------------- data
def load_reference(ref_dir: Path) -> dict[str, Any]:
    """The real images' sizes and boxes (xyxy, class index) and the category list."""
    path = ref_dir / "instances_val2014_100.json"
    if not path.is_file():
        raise SystemExit(f"eval_scale: COCO reference not found at {path} "
                         "(../shared/data/coco-reference beside the repo; or pass --reference)")
    gt = json.loads(path.read_text())
    cats = sorted(c["id"] for c in gt["categories"])
    index = {c: i for i, c in enumerate(cats)}
    boxes: dict[int, list[list[float]]] = {im["id"]: [] for im in gt["images"]}
    labels: dict[int, list[int]] = {im["id"]: [] for im in gt["images"]}
    for a in gt["annotations"]:
        if a.get("iscrowd", 0):
            continue
        x, y, w, h = a["bbox"]
        boxes[a["image_id"]].append([x, y, x + w, y + h])
        labels[a["image_id"]].append(index[a["category_id"]])
    images = [(im["width"], im["height"], np.asarray(boxes[im["id"]], np.float64).reshape(-1, 4),
               np.asarray(labels[im["id"]], np.int64)) for im in gt["images"]]
    mix = np.bincount(np.concatenate([im[3] for im in images]), minlength=len(cats)) + 0.5
    return {"images": images, "classes": [str(c) for c in cats], "mix": mix / mix.sum()}


def _jitter(rng: np.random.Generator, boxes: np.ndarray, rel: float, w: int, h: int) -> np.ndarray:
    size = np.concatenate([boxes[:, 2:] - boxes[:, :2]] * 2, axis=1)
    out = boxes + rng.normal(0.0, rel, boxes.shape) * size
    out[:, 0::2] = out[:, 0::2].clip(0, w)
    out[:, 1::2] = out[:, 1::2].clip(0, h)
    out[:, 2:] = np.maximum(out[:, 2:], out[:, :2] + 1.0)
    return out


def make_records(ref: dict[str, Any], image_ids: range | list[int], variants: int
                 ) -> list[list[dict[str, Any]]]:
    """records[variant][j] of the given synthetic image ids (deterministic per image)."""
    out: list[list[dict[str, Any]]] = [[] for _ in range(variants)]
    n_cls = len(ref["classes"])
    for image_id in image_ids:
        rng = np.random.default_rng(1_000_003 * image_id + 17)
        w, h, boxes, labels = ref["images"][int(rng.integers(len(ref["images"])))]
        gt = _jitter(rng, boxes, 0.02, w, h) if len(boxes) else boxes
        for v in range(variants):
            close = np.repeat(gt, 3, axis=0)
            close = _jitter(rng, close, 0.04 + 0.03 * v, w, h) if len(close) else close
            close, close_labels = close[:DETS_PER_IMAGE], np.repeat(labels, 3)[:DETS_PER_IMAGE]
            n_rand = DETS_PER_IMAGE - len(close)
            cx, cy = rng.uniform(0, w, n_rand), rng.uniform(0, h, n_rand)
            bw = np.exp(rng.uniform(np.log(8), np.log(max(w, h)), n_rand))
            bh = bw * np.exp(rng.normal(0, 0.5, n_rand))
            rand = np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], axis=1)
            rand[:, 0::2] = rand[:, 0::2].clip(0, w)
            rand[:, 1::2] = rand[:, 1::2].clip(0, h)
            det = np.concatenate([close, rand]).astype(np.float32)
            det_labels = np.concatenate([close_labels, rng.choice(n_cls, n_rand, p=ref["mix"])])
            scores = np.concatenate([rng.uniform(0.3, 0.95, len(close)),
                                     rng.uniform(0.0, 0.5, n_rand)]).astype(np.float32)
            order = np.argsort(-scores, kind="stable")  # a detector's top-k comes sorted
            out[v].append({"image_id": int(image_id), "width": int(w), "height": int(h),
                           "gt_boxes": gt.astype(np.float32), "gt_labels": labels,
                           "scores": scores[order], "labels": det_labels[order].astype(np.int64),
                           "boxes": det[order]})
    return out


# --------------------------------------------------------------------------- today
def today(ref: dict[str, Any], images: int, variants: int) -> dict[str, Any]:
    """Serial rank-0 pycocotools, one coco_metrics per variant on every image (the first
    ``variants`` variants)."""
    from raydetr.eval.coco import coco_metrics

    seconds, metrics = [], []
    for v in range(variants):
        records = make_records(ref, range(1, images + 1), v + 1)  # not timed
        t0 = time.perf_counter()
        metrics.append(coco_metrics(records[v], ref["classes"]))
        del records
        seconds.append(time.perf_counter() - t0)
        print(f"  today: variant {v}: {seconds[-1]:.2f} s", flush=True)
    return {"seconds_per_variant": seconds, "metrics": metrics}


# --------------------------------------------------------------------------- now
def _worker(rank: int, world: int, port: int, ref_dir: str, images: int, variants: int,
            out_dir: str) -> None:
    import torch
    import torch.distributed as dist

    from raydetr.eval.distributed import coco_metrics_of_matches, match_records
    from raydetr.train.evaluation import gather_matches

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    ref = load_reference(Path(ref_dir))
    records = make_records(ref, range(1 + rank, images + 1, world), variants)  # not timed
    dist.barrier()
    t0 = time.perf_counter()
    parts, match_s = {}, []
    for v in range(variants):
        t = time.perf_counter()
        parts[v] = match_records(records[v], ref["classes"])
        match_s.append(time.perf_counter() - t)
    t_matched = time.perf_counter()
    part_bytes = sum(p.nbytes() for p in parts.values())
    gathered = gather_matches(parts, rank, world)
    t_gathered = time.perf_counter()
    result: dict[str, Any] = {"rank": rank, "match_s": match_s, "matched_at": t_matched - t0,
                              "part_bytes": part_bytes}
    if gathered is not None:
        acc_s, metrics = [], []
        for v in range(variants):
            t = time.perf_counter()
            metrics.append(coco_metrics_of_matches(gathered[v], ref["classes"]))
            acc_s.append(time.perf_counter() - t)
        result.update(gather_s=t_gathered - t_matched, accumulate_s=acc_s, metrics=metrics,
                      wall_s=time.perf_counter() - t0)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def now(ref_dir: Path, images: int, variants: int, world: int, work: Path) -> dict[str, Any]:
    import socket

    import torch.multiprocessing as mp

    out = work / f"now_w{world}_v{variants}"
    out.mkdir(parents=True, exist_ok=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_worker, args=(world, port, str(ref_dir), images, variants, str(out)),
                       nprocs=world, join=True, start_method="spawn")
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]
    r0 = ranks[0]
    return {"workers": world, "wall_s": r0["wall_s"],
            "match_s_slowest_rank": max(r["matched_at"] for r in ranks),
            "match_s_per_variant_rank0": r0["match_s"], "gather_s": r0["gather_s"],
            "accumulate_s_per_variant": r0["accumulate_s"],
            "gathered_bytes": sum(r["part_bytes"] for r in ranks), "metrics": r0["metrics"]}


def _max_diff(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> float:
    keys = [k for k in a[0] if k != "per_class"]
    diffs = [abs(x[k] - y[k]) for x, y in zip(a, b) for k in keys]
    diffs += [abs(x["per_class"][c] - y["per_class"][c]) for x, y in zip(a, b)
              for c in x["per_class"]]
    return max(diffs)


def main(argv: list[str] | None = None) -> None:
    p = common.base_parser(__doc__, fits=False)
    p.add_argument("--images", type=int, default=None, help="default 5000 (--quick: 200)")
    p.add_argument("--variants", type=int, nargs="+", default=[2, 4])
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--reference", type=Path, default=REFERENCE)
    p.add_argument("--today-variants", type=int, default=1,
                   help="variants timed with today's path (each ~minutes at 5000 images); a "
                        "K-variant epoch today = K x their mean (variants cost alike)")
    args = p.parse_args(argv)
    images = args.images or (200 if args.quick else 5000)
    work = common.workdir_of(args) / "eval_scale"
    ref = load_reference(args.reference)
    cores = os.cpu_count() or 1
    most = max(args.variants)
    print(f"{images} synthetic COCO images, {DETS_PER_IMAGE} detections per image, "
          f"{len(ref['classes'])} classes; {cores} CPUs (shared)", flush=True)

    # Today's path evaluates the variants one after another and each costs alike: time
    # --today-variants of them; a K-variant epoch today is K x their mean. Now: every K is run.
    base = today(ref, images, min(args.today_variants, most))
    today_per_variant = float(np.mean(base["seconds_per_variant"]))
    runs: dict[int, dict[int, dict[str, Any]]] = {k: {} for k in args.variants}
    for k in args.variants:
        for w in args.workers:
            r = now(args.reference, images, k, w, work)
            n = min(k, len(base["metrics"]))
            r["max_abs_diff_vs_today"] = _max_diff(r["metrics"][:n], base["metrics"][:n])
            runs[k][w] = r
            print(f"  now: {k} variants, {w} workers: {r['wall_s']:.2f} s (match "
                  f"{r['match_s_slowest_rank']:.2f}, gather {r['gather_s']:.2f}, accumulate "
                  f"{sum(r['accumulate_s_per_variant']):.2f}); max |diff| vs today "
                  f"{r['max_abs_diff_vs_today']:.1e}", flush=True)

    # The model, from the 1-worker run with the most variants.
    one = runs[most].get(1)
    model = None
    if one is not None:
        per_image = one["match_s_slowest_rank"] / (images * most)
        fixed = (one["gather_s"] + sum(one["accumulate_s_per_variant"])) / most
        model = {"per_image_s": per_image, "fixed_s_per_variant": fixed}

    def predicted(k: int, w: int) -> float | None:
        if model is None:
            return None
        return (model["per_image_s"] * images * k / min(w, cores)
                + model["fixed_s_per_variant"] * k)

    rows, summary = [], []
    for k in args.variants:
        today_s = today_per_variant * k
        rows.append([k, f"today (rank 0, serial; {len(base['metrics'])} timed)", 1, today_s,
                     "-", 1.0, "-"])
        for w, r in runs[k].items():
            rows.append([k, "now (per-rank matching)", w, r["wall_s"], predicted(k, w) or "-",
                         r["wall_s"] / today_s, r["gathered_bytes"] / 1e6])
    common.print_table(
        f"Evaluation seconds per epoch, {images} images x {DETS_PER_IMAGE} detections "
        f"({cores} shared CPUs; model t(N) = per_image x images x K / min(N, cores) + fixed x K)",
        ["variants K", "how", "workers", "wall s", "model s", "/ today", "gathered MB"], rows)
    if model is not None:
        print(f"model: per image per variant {model['per_image_s'] * 1e3:.3f} ms (matching), "
              f"fixed per variant {model['fixed_s_per_variant']:.3f} s (gather + accumulate)")
        for n in (8, 16, 32):
            print(f"model: {most} variants on {n} workers with {n} cores: "
                  f"{model['per_image_s'] * images * most / n + model['fixed_s_per_variant'] * most:.2f} s")
    print(f"today: eval seconds per variant, {images} images, rank 0 serial: "
          f"{today_per_variant:.2f}")
    if one is not None:
        per_variant = one["wall_s"] / most
        ratio = per_variant / today_per_variant
        print(f"eval seconds per variant, {images} images, 1 worker: {per_variant:.2f} "
              f"(ratio to today's: {ratio:.3f})")
        summary.append(common.summary_row(
            f"eval seconds per variant, {images} images, 1 worker", per_variant, "info", None, "s"))
        summary.append(common.summary_row("eval per variant now (1 worker) / today", ratio,
                                          "<= 1", ratio <= 1.0, "x"))
    for w in args.workers:
        if w > 1 and w in runs[most]:
            ratio_w = runs[most][w]["wall_s"] / (today_per_variant * most)
            print(f"eval seconds per epoch, {most} variants, {w} workers / today: {ratio_w:.3f}")
            summary.append(common.summary_row(
                f"eval per epoch, {most} variants, {w} workers / today", ratio_w, "info", None,
                "x"))
    worst = max(r["max_abs_diff_vs_today"] for k in runs for r in runs[k].values())
    print(f"max |metric difference| now vs today over every run: {worst:.1e}")
    common.write_json("eval_scale", args, {
        "images": images, "dets_per_image": DETS_PER_IMAGE, "cores": cores,
        "today_seconds_per_variant": base["seconds_per_variant"],
        "now": {str(k): {str(w): {kk: vv for kk, vv in r.items() if kk != "metrics"}
                         for w, r in runs[k].items()} for k in runs},
        "model": model, "max_abs_metric_diff": worst, "summary": summary})


if __name__ == "__main__":
    common.run(main)
