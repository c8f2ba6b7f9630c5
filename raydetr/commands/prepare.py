"""``raydetr prepare`` and ``raydetr make-synthetic``: datasets on disk.

    raydetr prepare data/raw-coco data/prepared --shard-size 256
    raydetr make-synthetic data/shapes --train-images 256 --val-images 64
"""

from __future__ import annotations

import argparse
from pathlib import Path

from raydetr.data.parquet import prepare_dataset
from raydetr.data.synthetic import make_synthetic


def run(args: argparse.Namespace) -> int:
    if args.command == "make-synthetic":
        out = make_synthetic(Path(args.out), train_images=args.train_images,
                             val_images=args.val_images, image_size=args.image_size,
                             seed=args.seed)
        print(f"synthetic dataset written to {out}")
        return 0
    prepare_dataset(Path(args.src), Path(args.out), shard_size=args.shard_size,
                    row_group_size=args.row_group_size, fmt=args.format,
                    overwrite=args.overwrite)
    return 0
