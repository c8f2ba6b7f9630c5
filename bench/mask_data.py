"""What masks cost the data path: prepare, shard bytes, and loader images/s with and without them.

    .venv/bin/python bench/mask_data.py
    .venv/bin/python bench/mask_data.py --quick

Dataset: ../shared/data/brain-tumor-seg (Roboflow COCO segmentation export, 640x640), prepared
here once (its prepare time is printed). Shard bytes: the ``masks`` column's compressed size
against the whole split's. Loader: one process, ``iter_local_batches`` over the train split
(decode + augmentation + resize, 1 loader thread) at rfdetr-seg-nano's 312 px, batch 8, for
``data.augment`` rfdetr and raydetr, with masks (a segmentation preset) and without (a detection
preset on the same shards). After one untimed warm-up pass, the two sides alternate, ``--rounds``
times; the median images/s is reported. The machine is shared: read the ratio, not the absolute figures.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

BRAIN = common.REPO.parent / "shared" / "data" / "brain-tumor-seg"


def images_per_s(prepared: Path, augment: str, masks: bool, limit: int) -> float:
    from raydetr.config import DataConfig
    from raydetr.data.loader import iter_local_batches

    cfg = DataConfig(augment=augment, loader_threads=1, prefetch_batches=1)
    n, t0 = 0, time.perf_counter()
    for batch in iter_local_batches(prepared, "train", batch_size=8, train=True, resolution=312,
                                    data_cfg=cfg, masks=masks):
        n += len(batch["targets"])
        if n >= limit:
            break
    return n / (time.perf_counter() - t0)


def main() -> None:
    import pyarrow.parquet as pq
    import torch

    from raydetr.data.parquet import prepare_dataset

    p = common.base_parser(__doc__, fits=False)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    if not (BRAIN / "train" / "_annotations.coco.json").is_file():
        sys.exit(f"brain-tumor-seg not found at {BRAIN}")
    torch.set_num_threads(1)
    work = common.workdir_of(args)
    prepared = work / "brain-tumor-seg"
    t0 = time.perf_counter()
    info = prepare_dataset(BRAIN, prepared, progress=False, overwrite=True)
    prepare_s = time.perf_counter() - t0
    images = sum(s["images"] for s in info["splits"].values())
    masks_bytes = total_bytes = 0
    for rel in info["splits"]["train"]["files"]:
        md = pq.read_metadata(prepared / rel)
        for g in range(md.num_row_groups):
            rg = md.row_group(g)
            for c in range(rg.num_columns):
                col = rg.column(c)
                total_bytes += col.total_compressed_size
                if col.path_in_schema.startswith("masks"):
                    masks_bytes += col.total_compressed_size
    limit = 32 if args.quick else 160
    rounds = 1 if args.quick else args.rounds
    images_per_s(prepared, "rfdetr", True, limit)  # warm-up: page cache, imports, allocator
    runs: dict[str, list[float]] = {}
    for _ in range(rounds):
        for augment in ("rfdetr", "raydetr"):
            for masks in (False, True):  # alternate the sides within every round
                key = f"{augment}/{'masks' if masks else 'boxes'}"
                runs.setdefault(key, []).append(images_per_s(prepared, augment, masks, limit))
    rows = []
    for augment in ("rfdetr", "raydetr"):
        boxes = common.median(runs[f"{augment}/boxes"])
        masks = common.median(runs[f"{augment}/masks"])
        rows.append([augment, boxes, masks, masks / boxes])
    common.print_table(f"brain-tumor-seg: prepared {images} images in {prepare_s:.1f} s; "
                       f"train masks column {masks_bytes} of {total_bytes} column bytes",
                       ["augment", "images/s boxes", "images/s masks", "ratio"], rows)
    common.write_json("mask_data", args, {
        "prepare_seconds": prepare_s, "images": images, "train_masks_bytes": masks_bytes,
        "train_column_bytes": total_bytes, "images_per_batch_run": limit, "runs": runs,
        "median_images_per_s": {r[0]: {"boxes": r[1], "masks": r[2]} for r in rows}})


if __name__ == "__main__":
    common.run(main)
