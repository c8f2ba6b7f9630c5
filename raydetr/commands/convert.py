"""``raydetr convert-checkpoint``: an RF-DETR ``.pth`` -> a raydetr model dir.

    raydetr convert-checkpoint checkpoint_best_total.pth models/rfdetr-nano --preset rfdetr-nano
"""

from __future__ import annotations

import argparse

from raydetr.model.convert import convert_checkpoint


def run(args: argparse.Namespace) -> int:
    meta = convert_checkpoint(args.src, args.out_dir, preset=args.preset, variant=args.variant)
    print(f"{meta.preset} ({meta.variant} weights, {meta.num_classes} "
          f"logits, {meta.resolution} px) -> {args.out_dir}\n"
          f"  raydetr predict --model {args.out_dir} IMAGES... --out DIR")
    return 0
