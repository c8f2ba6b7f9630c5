"""Mask (segm) evaluation cost: peak memory and seconds per 100 val images at 640 px.

    .venv/bin/python bench/mask_eval.py                      # 100 images, 300 masks each, 3 repeats
    .venv/bin/python bench/mask_eval.py --quick              # 16 images, 1 repeat
    .venv/bin/python bench/mask_eval.py --detections 100 --images 200

Ground truth: the first ``--images`` images of the real brain-tumor-seg val split
(../shared/data/brain-tumor-seg/valid, Roboflow COCO segmentation export, 640 x 640, polygons
decoded by pycocotools). Predictions: what a seg model's post-processor hands the evaluation,
``--detections`` K mask-logit maps per image at the mask resolution (78 x 78: rfdetr-seg-nano's
312 px input / 4) with scores, made synthetically (seeded): 3 noisy, shifted copies of each
ground-truth mask (logits from the mask averaged down to 78 x 78), the rest smooth random blobs
with lower scores. Batches of 8 images, as the epoch evaluation's val batches.

Two ways to turn them into COCO segm metrics, each run in its own process (its peak resident
memory is its own), alternating, ``--repeats`` times (medians reported):

- ``raydetr``: per image, ``raydetr.model.postprocess.masks_rle`` (8 masks at a time resized
  bilinearly to 640 x 640, > 0, RLE-encoded), the heap's free pages handed back after each
  batch (``raydetr.train.memory.release_freed_memory``): what ``predict_records`` does in each
  training worker and in ``raydetr evaluate``.
- ``all-at-once``: the memory pattern RF-DETR 1.4.1's evaluation has (its PostProcess resizes all
  K masks of an image at once as float and keeps the batch's bool masks until its CocoEvaluator
  encodes them one by one): per image all K logit maps resized to 640 x 640 in one call, > 0, the
  bool masks of the whole batch held, then encoded.

Both then match each batch's masks as they come (``match_records(iou_type="segm")``: pycocotools'
evaluate() on those images, as the training worker's MaskMatcher does and as RF-DETR's
CocoEvaluator evaluates per batch), keep the compact matches only, and accumulate them at the end
(``coco_metrics_of_matches``).

Peak memory: the process's peak resident set (VmHWM, reset through /proc/self/clear_refs right
before the measured part) minus its resident set then; tracemalloc's peak (numpy and Python
allocations; torch's CPU tensors are not traced) is printed too. Seconds: wall time of encode +
match + accumulate (making the synthetic inputs is excluded), scaled to 100 images. Both ways
must give the same map_segm (checked). torch threads: ``--threads`` (1 by default). The machine
is shared (2 cores, other engineers' jobs running): timings are noisy, hence the medians.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO, base_parser, median, print_table, write_json  # noqa: E402

VAL = REPO.parent / "shared" / "data" / "brain-tumor-seg" / "valid"
MASK_HW = (78, 78)
BATCH = 8
SIDES = ("raydetr", "all-at-once")


def load_ground_truth(n: int) -> list[dict[str, Any]]:
    """The first ``n`` val images (by id): id, height, width, bool masks [N, H, W]."""
    import numpy as np
    from pycocotools import mask as mask_utils

    data = json.loads((VAL / "_annotations.coco.json").read_text())
    anns: dict[int, list[dict]] = {}
    for a in data["annotations"]:
        anns.setdefault(a["image_id"], []).append(a)
    out = []
    for img in sorted(data["images"], key=lambda i: i["id"])[:n]:
        h, w = img["height"], img["width"]
        masks = []
        for a in anns.get(img["id"], []):
            rle = mask_utils.merge(mask_utils.frPyObjects(a["segmentation"], h, w))
            masks.append(mask_utils.decode(rle).astype(bool))
        out.append({"id": img["id"], "h": h, "w": w,
                    "masks": np.stack(masks) if masks else np.zeros((0, h, w), bool)})
    return out


def synthetic_outputs(gt: dict[str, Any], k: int, seed: int):
    """(mask logits float32 [K, 78, 78], scores f32[K], boxes xyxy f32[K, 4]) for one image."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    logits = []
    if len(gt["masks"]):
        small = F.interpolate(torch.from_numpy(gt["masks"]).float()[:, None], size=MASK_HW,
                              mode="area")[:, 0]
        for m in small:
            for _ in range(3):
                noisy = 12 * (m - 0.5) + 1.5 * torch.randn(MASK_HW, generator=g)
                shift = torch.randint(-2, 3, (2,), generator=g).tolist()
                logits.append(torch.roll(noisy, shifts=shift, dims=(0, 1)))
    n_true = len(logits)
    while len(logits) < k:
        blob = torch.randn(1, 1, 6, 6, generator=g)
        logits.append(F.interpolate(blob, size=MASK_HW, mode="bilinear",
                                    align_corners=False)[0, 0] * 6 - 4)
    logits_t = torch.stack(logits[:k])
    scores = torch.cat([0.5 + 0.5 * torch.rand(n_true, generator=g),
                        0.5 * torch.rand(k - n_true, generator=g)])[:k]
    on = logits_t > 0
    sy, sx = gt["h"] / MASK_HW[0], gt["w"] / MASK_HW[1]
    boxes = np.zeros((k, 4), np.float32)
    for i, m in enumerate(on.numpy()):
        ys, xs = np.nonzero(m)
        if len(xs):
            boxes[i] = [xs.min() * sx, ys.min() * sy, (xs.max() + 1) * sx, (ys.max() + 1) * sy]
    return logits_t, scores.numpy().astype(np.float32), boxes


def _record(gt, scores, boxes, masks) -> dict[str, Any]:
    import numpy as np

    from raydetr.eval.coco import encode_rle

    n = len(gt["masks"])
    return {"image_id": gt["id"], "width": gt["w"], "height": gt["h"],
            "gt_boxes": np.asarray([_box(m) for m in gt["masks"]], np.float32).reshape(n, 4),
            "gt_labels": np.zeros(n, np.int64), "gt_masks": encode_rle(gt["masks"]),
            "scores": scores, "labels": np.zeros(len(scores), np.int64), "boxes": boxes,
            "masks": masks}


def _box(m):
    import numpy as np

    ys, xs = np.nonzero(m)
    return [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def child(side: str, images: int, k: int, threads: int) -> dict[str, Any]:
    """One measured run in this process: encode + match + accumulate for every image."""
    import torch
    import torch.nn.functional as F
    from pycocotools import mask as mask_utils

    from raydetr.eval.distributed import coco_metrics_of_matches, match_records
    from raydetr.model.postprocess import masks_rle
    from raydetr.train.memory import release_freed_memory

    torch.set_num_threads(threads)
    gts = load_ground_truth(images)
    # warm the code paths on one image outside the measurement
    lg, sc, bx = synthetic_outputs(gts[0], k, seed=0)
    masks_rle(lg[:2], (gts[0]["h"], gts[0]["w"]))
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    rss0 = _rss_kb("VmRSS")
    tracemalloc.start()
    encode_s = match_s = 0.0
    parts, n_images = [], 0
    for start in range(0, len(gts), BATCH):
        batch = [(gt, *synthetic_outputs(gt, k, seed=gt["id"] + 1)) for gt in gts[start:start + BATCH]]
        t0 = time.perf_counter()
        records = []
        if side == "raydetr":  # what predict_records does per val batch
            for gt, logits, scores, boxes in batch:
                records.append(_record(gt, scores, boxes, masks_rle(logits, (gt["h"], gt["w"]))))
            release_freed_memory()
        else:
            held = []
            for gt, logits, _, _ in batch:
                full = F.interpolate(logits[:, None], size=(gt["h"], gt["w"]), mode="bilinear",
                                     align_corners=False)
                held.append(full > 0)
                del full
            for (gt, _, scores, boxes), masks in zip(batch, held):
                rles = [mask_utils.encode(m[0].numpy()[:, :, None].astype("uint8", order="F"))[0]
                        for m in masks]
                records.append(_record(gt, scores, boxes, rles))
            del held
        t1 = time.perf_counter()
        # each batch's masks matched as they come (the worker's MaskMatcher; RF-DETR's
        # CocoEvaluator also evaluates per batch), the RLEs then dropped
        parts.append(match_records(records, ["Tumor"], (1, 10, 500), iou_type="segm"))
        t2 = time.perf_counter()
        encode_s, match_s = encode_s + t1 - t0, match_s + t2 - t1
        n_images += len(records)
        del batch, records
    t2 = time.perf_counter()
    metrics = coco_metrics_of_matches(parts, ["Tumor"])
    t3 = time.perf_counter()
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    peak_kb = _rss_kb("VmHWM") - rss0
    return {"side": side, "images": n_images, "detections": k, "encode_s": encode_s,
            "match_s": match_s, "accumulate_s": t3 - t2, "seconds": encode_s + match_s + t3 - t2,
            "peak_rss_mb": peak_kb / 1024, "tracemalloc_peak_mb": traced_peak / 2**20,
            "map_segm": metrics["map"], "map50_segm": metrics["map50"]}


def main() -> None:
    p = base_parser(__doc__.split("\n\n")[0], fits=False)
    p.add_argument("--images", type=int, default=100)
    p.add_argument("--detections", type=int, default=300, help="masks per image (num_select)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--child", choices=SIDES, default=None, help=argparse_hidden())
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.images, args.detections, args.threads)))
        return
    if not VAL.is_dir():
        sys.exit(f"{VAL} not found: this bench needs the shared brain-tumor-seg dataset")
    if args.quick:
        args.images, args.repeats = 16, 1
    runs: list[dict[str, Any]] = []
    for rep in range(args.repeats):
        for side in (SIDES if rep % 2 == 0 else SIDES[::-1]):  # alternate the order
            cmd = [sys.executable, __file__, "--child", side, "--images", str(args.images),
                   "--detections", str(args.detections), "--threads", str(args.threads)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True,
                                 env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
            r = runs[-1]
            print(f"repeat {rep + 1} {side}: {r['seconds']:.2f} s for {r['images']} images, "
                  f"peak RSS +{r['peak_rss_mb']:.0f} MB, map_segm {r['map_segm']:.4f}", flush=True)
    maps = {round(r["map_segm"], 12) for r in runs}
    if len(maps) != 1:
        sys.exit(f"the two ways disagree on map_segm: {sorted(maps)}")
    summary = {}
    for side in SIDES:
        rs = [r for r in runs if r["side"] == side]
        n = rs[0]["images"]
        summary[side] = {
            "seconds_per_100_images": median([r["seconds"] for r in rs]) * 100 / n,
            "encode_seconds_per_100_images": median([r["encode_s"] for r in rs]) * 100 / n,
            "match_seconds_per_100_images": median([r["match_s"] for r in rs]) * 100 / n,
            "accumulate_seconds": median([r["accumulate_s"] for r in rs]),
            "peak_rss_mb": median([r["peak_rss_mb"] for r in rs]),
            "tracemalloc_peak_mb": median([r["tracemalloc_peak_mb"] for r in rs]),
        }
    print_table(
        f"mask evaluation, {runs[0]['images']} brain-tumor-seg val images at 640x640, "
        f"{args.detections} masks each (78x78 logits), {args.threads} torch thread(s), "
        f"median of {args.repeats}",
        ["way", "s / 100 img", "encode s", "match s", "accumulate s", "peak RSS MB",
         "tracemalloc MB"],
        [[side, s["seconds_per_100_images"], s["encode_seconds_per_100_images"],
          s["match_seconds_per_100_images"], s["accumulate_seconds"], s["peak_rss_mb"],
          s["tracemalloc_peak_mb"]] for side, s in summary.items()])
    print(f"\nmap_segm {runs[0]['map_segm']:.4f} (map50_segm {runs[0]['map50_segm']:.4f}) "
          "from both ways")
    write_json("mask_eval", args, {
        "images": runs[0]["images"], "detections": args.detections, "image_size": [640, 640],
        "mask_logits_hw": list(MASK_HW), "threads": args.threads, "repeats": args.repeats,
        "batch": BATCH, "map_segm": runs[0]["map_segm"], "summary": summary, "runs": runs})


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
