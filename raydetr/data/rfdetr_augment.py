"""RF-DETR's training augmentation (rf-detr 1.4.1, ``make_coco_transforms_square_div_64`` with
its TrainConfig defaults), written for raydetr's numpy samples and seeded generators.

Per image, in RF-DETR's order (``Sample``: uint8[H, W, 3] image, float32[N, 4] xyxy pixel boxes,
int64[N] labels, optional bool[N, H, W] masks, all following every step):

1. horizontal flip with p 0.5: boxes (W - x2, y1, W - x1, y2), masks mirrored;
2. with p 0.5 branch A: square resize to S (the largest multi-scale size; aspect not kept);
   otherwise branch B: shorter side to 400 | 500 | 600 (longer side int(s * long / short),
   truncated; unchanged when the shorter side already is s) -> crop of random size
   w in [384, min(W, 600)], h in [384, min(H, 600)] (inclusive) at a random offset (each
   position equally likely) -> square resize to S. The crop shifts boxes, clips them to the
   crop and drops every instance whose clipped box has no width or no height (RF-DETR's rule;
   masks are sliced and dropped with their boxes);
3. then, per batch, the whole batch is resized to the step's size (``batch_resize``).

Images resize with PIL bilinear (torchvision's resize of a PIL image, antialiased when
shrinking); boxes scale by (S/W, S/H); masks resize nearest (``transforms.resize_masks``).
Every draw comes from the ``np.random.Generator`` passed in (raydetr seeds one per batch), in
RF-DETR's order: flip, branch, shorter side, crop width, crop height, crop top, crop left.
RF-DETR draws from Python's and torch's global generators instead; the distributions are the
same, the streams are not.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from raydetr.data.transforms import resize_masks

SHORTER_SIDES = (400, 500, 600)   # RandomResize([400, 500, 600]), no max size
CROP_MIN, CROP_MAX = 384, 600     # RandomSizeCrop(384, 600)
FLIP_PROB = 0.5
SQUARE_BRANCH_PROB = 0.5          # RandomSelect(SquareResize, resize-crop-resize, p=0.5)


@dataclass(frozen=True)
class Sample:
    """One image and its instances; boxes xyxy in pixels of ``image``."""

    image: np.ndarray                 # uint8[H, W, 3]
    boxes_xyxy: np.ndarray            # float32[N, 4]
    labels: np.ndarray                # int64[N]
    masks: np.ndarray | None = None   # bool[N, H, W]

    @property
    def hw(self) -> tuple[int, int]:
        return int(self.image.shape[0]), int(self.image.shape[1])


@dataclass(frozen=True)
class Draws:
    """The random choices of one image's augmentation (crop fields only for branch B)."""

    flip: bool
    square: bool                      # True: branch A (square resize only)
    shorter: int = 0
    crop_w: int = 0
    crop_h: int = 0
    top: int = 0
    left: int = 0


def shorter_side_size(h: int, w: int, shorter: int) -> tuple[int, int]:
    """(h, w) after RF-DETR's ``resize(image, size=shorter)`` without a max size."""
    if (w <= h and w == shorter) or (h <= w and h == shorter):
        return h, w
    if w < h:
        return int(shorter * h / w), shorter
    return shorter, int(shorter * w / h)


def draw(rng: np.random.Generator, h: int, w: int) -> Draws:
    """One image's draws for an h x w input, in RF-DETR's order."""
    flip = bool(rng.random() < FLIP_PROB)
    if rng.random() < SQUARE_BRANCH_PROB:
        return Draws(flip=flip, square=True)
    shorter = int(SHORTER_SIDES[rng.integers(len(SHORTER_SIDES))])
    rh, rw = shorter_side_size(h, w, shorter)
    crop_w = int(rng.integers(CROP_MIN, min(rw, CROP_MAX) + 1))
    crop_h = int(rng.integers(CROP_MIN, min(rh, CROP_MAX) + 1))
    top = int(rng.integers(0, rh - crop_h + 1))
    left = int(rng.integers(0, rw - crop_w + 1))
    return Draws(flip, False, shorter, crop_w, crop_h, top, left)


def hflip(s: Sample) -> Sample:
    w = s.hw[1]
    b = s.boxes_xyxy
    boxes = np.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], axis=1).astype(np.float32)
    masks = None if s.masks is None else np.ascontiguousarray(s.masks[:, :, ::-1])
    return replace(s, image=np.ascontiguousarray(s.image[:, ::-1]), boxes_xyxy=boxes,
                   masks=masks)


def resize(s: Sample, h: int, w: int) -> Sample:
    """Image to h x w (PIL bilinear), boxes scaled by (w/W, h/H), masks nearest."""
    h0, w0 = s.hw
    if (h, w) == (h0, w0):
        return s
    image = np.asarray(Image.fromarray(s.image).resize((w, h), Image.BILINEAR))
    scale = np.array([w / w0, h / h0, w / w0, h / h0], dtype=np.float32)
    masks = None if s.masks is None else resize_masks(s.masks, h, w)
    return replace(s, image=image, boxes_xyxy=(s.boxes_xyxy * scale).astype(np.float32),
                   masks=masks)


def crop(s: Sample, top: int, left: int, h: int, w: int) -> Sample:
    """RF-DETR's crop: boxes shifted, clipped to [0, w] x [0, h]; instances whose clipped box
    has x2 <= x1 or y2 <= y1 are dropped (boxes decide; masks only when there are no boxes is
    RF-DETR's fallback, which never applies here since boxes are always present)."""
    boxes = s.boxes_xyxy - np.array([left, top, left, top], dtype=np.float32)
    boxes = np.minimum(boxes.reshape(-1, 2, 2), np.array([w, h], dtype=np.float32))
    boxes = np.maximum(boxes, 0.0)
    keep = np.all(boxes[:, 1, :] > boxes[:, 0, :], axis=1)
    masks = None if s.masks is None else s.masks[keep][:, top:top + h, left:left + w]
    return Sample(image=s.image[top:top + h, left:left + w],
                  boxes_xyxy=boxes.reshape(-1, 4)[keep].astype(np.float32),
                  labels=s.labels[keep], masks=masks)


def apply(s: Sample, d: Draws, size: int) -> Sample:
    """RF-DETR's per-image training transform with the choices ``d``; output size x size."""
    if d.flip:
        s = hflip(s)
    if not d.square:
        s = resize(s, *shorter_side_size(*s.hw, d.shorter))
        s = crop(s, d.top, d.left, d.crop_h, d.crop_w)
    return resize(s, size, size)


def augment(s: Sample, rng: np.random.Generator, size: int) -> Sample:
    """Draw then apply: one image of RF-DETR's training augmentation."""
    return apply(s, draw(rng, *s.hw), size)


def batch_resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """RF-DETR's per-step multi-scale: the whole normalised batch (B, 3, S, S) to size x size,
    bilinear, align_corners False, no antialias. Targets (normalised boxes) are unchanged."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
