"""Image + box augmentations (numpy) and the model input transform (torch).

Frames: ``boxes_xyxy`` are float32[N, 4] absolute pixels of the image they come with;
``normalise_boxes`` gives cxcywh in [0, 1] of that image, which a square resize (aspect not
kept, as RF-DETR) leaves unchanged, so targets are computed before ``to_model_input``.

Resize: ``to_model_input`` resizes each uint8 image with PIL (bilinear, antialiased when
shrinking), stacks, and normalises the batch in torch. PIL was the faster of the two backends
measured single-threaded on CPU (thermal 416x416 -> 384: ~290 vs ~230 images/s; 1248x832 ->
384: ~114 vs ~89 images/s for ``to_model_input_torch``, i.e. F.interpolate(antialias=True) on
uint8->float); the two agree to < 0.05 mean abs (test_model_input_mixed_sizes_and_backends_agree).
Images of different sizes in one batch are resized one by one, so no padding is needed.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from raydetr.data.formats import DatasetError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CROP_MIN_SIDE = 0.5          # crop sides are drawn from [CROP_MIN_SIDE, 1] x the image side
CROP_MIN_VISIBLE = 0.5       # a box keeps its label only if >= half its area stays in the crop
CROP_MIN_SIDE_PX = 1.0       # ... and both its sides stay at least this long
CROP_TRIES = 10


def decode_image(data: bytes) -> np.ndarray:
    """Encoded bytes (JPEG/PNG/...) -> uint8[H, W, 3] RGB. DatasetError if undecodable."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB"))
    except Exception as exc:  # PIL raises many types
        raise DatasetError(f"cannot decode image bytes ({len(data)} bytes): {exc}") from None


def hflip(image: np.ndarray, boxes_xyxy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mirror left-right. image uint8[H, W, 3]; boxes float32[N, 4] xyxy pixels."""
    w = image.shape[1]
    flipped = boxes_xyxy[:, [2, 1, 0, 3]].copy()
    flipped[:, 0] = w - flipped[:, 0]
    flipped[:, 2] = w - flipped[:, 2]
    return np.ascontiguousarray(image[:, ::-1]), flipped


def crop_boxes(boxes_xyxy: np.ndarray, x0: float, y0: float, x1: float, y1: float
               ) -> tuple[np.ndarray, np.ndarray]:
    """Boxes in the frame of crop [x0, x1) x [y0, y1): (clipped boxes float32[M, 4], kept
    bool[N]). A box is kept if >= CROP_MIN_VISIBLE of its area and >= 1 px per side remain."""
    clipped = boxes_xyxy.copy()
    clipped[:, [0, 2]] = np.clip(clipped[:, [0, 2]], x0, x1) - x0
    clipped[:, [1, 3]] = np.clip(clipped[:, [1, 3]], y0, y1) - y0
    cw, ch = clipped[:, 2] - clipped[:, 0], clipped[:, 3] - clipped[:, 1]
    area = (boxes_xyxy[:, 2] - boxes_xyxy[:, 0]) * (boxes_xyxy[:, 3] - boxes_xyxy[:, 1])
    keep = (cw >= CROP_MIN_SIDE_PX) & (ch >= CROP_MIN_SIDE_PX) & (
        cw * ch >= CROP_MIN_VISIBLE * np.maximum(area, 1e-6))
    return clipped[keep].astype(np.float32), keep


def _crop_window(h: int, w: int, boxes_xyxy: np.ndarray, rng: np.random.Generator
                 ) -> tuple[int, int, int, int, np.ndarray, np.ndarray] | None:
    """(x0, y0, crop w, crop h, clipped boxes, kept) of a crop that keeps a box (or any crop of
    an image without boxes); None after CROP_TRIES crops that all lose every box."""
    for _ in range(CROP_TRIES):
        cw = int(round(w * rng.uniform(CROP_MIN_SIDE, 1.0)))
        ch = int(round(h * rng.uniform(CROP_MIN_SIDE, 1.0)))
        x0 = int(rng.integers(0, w - cw + 1))
        y0 = int(rng.integers(0, h - ch + 1))
        boxes, keep = crop_boxes(boxes_xyxy, x0, y0, x0 + cw, y0 + ch)
        if len(boxes_xyxy) == 0 or keep.any():
            return x0, y0, cw, ch, boxes, keep
    return None


def random_crop(image: np.ndarray, boxes_xyxy: np.ndarray, labels: np.ndarray,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random crop (sides in [0.5, 1] x image). An image that had boxes keeps at least one:
    up to CROP_TRIES crops are drawn and, if all lose every box, the image is left uncropped."""
    return random_crop_instances(image, boxes_xyxy, labels, None, rng)[:3]


def random_crop_instances(image: np.ndarray, boxes_xyxy: np.ndarray, labels: np.ndarray,
                          masks: np.ndarray | None, rng: np.random.Generator
                          ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """``random_crop`` with optional masks bool[N, H, W]: sliced to the crop, and dropped
    together with the boxes the crop drops."""
    window = _crop_window(*image.shape[:2], boxes_xyxy, rng)
    if window is None:
        return image, boxes_xyxy, labels, masks
    x0, y0, cw, ch, boxes, keep = window
    if masks is not None:
        masks = np.ascontiguousarray(masks[keep][:, y0:y0 + ch, x0:x0 + cw])
    return image[y0:y0 + ch, x0:x0 + cw], boxes, labels[keep], masks


def random_geometric(image: np.ndarray, boxes_xyxy: np.ndarray, labels: np.ndarray,
                     rng: np.random.Generator, hflip_prob: float = 0.5, crop_prob: float = 0.3
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random box-safe crop (prob ``crop_prob``) then horizontal flip (prob ``hflip_prob``).

    image uint8[H, W, 3]; boxes float32[N, 4] xyxy pixels; labels int64[N]. Returns the same
    kinds in the frame of the new image (boxes dropped by the crop take their labels along).
    The draws use ``rng`` in a fixed order, so a seeded rng gives the same result every time.
    """
    return random_geometric_instances(image, boxes_xyxy, labels, None, rng, hflip_prob,
                                      crop_prob)[:3]


def random_geometric_instances(image: np.ndarray, boxes_xyxy: np.ndarray, labels: np.ndarray,
                               masks: np.ndarray | None, rng: np.random.Generator,
                               hflip_prob: float = 0.5, crop_prob: float = 0.3
                               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """``random_geometric`` with optional masks bool[N, H, W] following the crop and the flip
    (same draws as without masks)."""
    boxes_xyxy = np.asarray(boxes_xyxy, np.float32).reshape(-1, 4)
    labels = np.asarray(labels, np.int64)
    if crop_prob > 0 and rng.random() < crop_prob:
        image, boxes_xyxy, labels, masks = random_crop_instances(image, boxes_xyxy, labels,
                                                                 masks, rng)
    if hflip_prob > 0 and rng.random() < hflip_prob:
        image, boxes_xyxy = hflip(image, boxes_xyxy)
        masks = None if masks is None else np.ascontiguousarray(masks[:, :, ::-1])
    return image, boxes_xyxy, labels, masks


def resize_masks(masks: np.ndarray, h: int, w: int) -> np.ndarray:
    """bool[N, H, W] -> bool[N, h, w], nearest (``F.interpolate``), as RF-DETR resizes masks."""
    if masks.shape[1:] == (h, w):
        return masks
    if masks.shape[0] == 0:
        return np.zeros((0, h, w), dtype=bool)
    m = torch.from_numpy(np.ascontiguousarray(masks)).to(torch.uint8)[:, None]
    return torch.nn.functional.interpolate(m, size=(h, w), mode="nearest")[:, 0].bool().numpy()


def normalise_boxes(boxes_xyxy: np.ndarray, w: int, h: int) -> np.ndarray:
    """xyxy absolute pixels of a w x h image -> float32[N, 4] cxcywh in [0, 1]."""
    b = np.asarray(boxes_xyxy, np.float32).reshape(-1, 4)
    out = np.empty_like(b)
    out[:, 0] = (b[:, 0] + b[:, 2]) / (2 * w)
    out[:, 1] = (b[:, 1] + b[:, 3]) / (2 * h)
    out[:, 2] = (b[:, 2] - b[:, 0]) / w
    out[:, 3] = (b[:, 3] - b[:, 1]) / h
    return out


def resize_uint8(image: np.ndarray, size: int) -> np.ndarray:
    """uint8[H, W, 3] -> uint8[size, size, 3] (PIL bilinear, antialiased when shrinking)."""
    if image.shape[0] == size and image.shape[1] == size:
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))


def to_model_input(images: list[np.ndarray], size: int) -> torch.Tensor:
    """list of uint8[H_i, W_i, 3] RGB -> float32[B, 3, size, size], ImageNet-normalised.

    Each image is stretched to size x size (aspect not kept) on its own, then the batch is
    normalised at once: (x / 255 - mean) / std.
    """
    batch = np.stack([resize_uint8(np.asarray(im, np.uint8), size) for im in images])
    # channels-first on uint8 first: normalising a permuted float view is ~4x slower
    return _normalise(torch.from_numpy(batch).permute(0, 3, 1, 2).contiguous().float())


def _normalise(x: torch.Tensor) -> torch.Tensor:
    """In place: float32[B, 3, S, S] in 0..255 -> (x / 255 - mean) / std."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype).view(1, 3, 1, 1) * 255.0
    return x.sub_(mean).div_(std)


def to_model_input_torch(images: list[np.ndarray], size: int) -> torch.Tensor:
    """Same contract as ``to_model_input`` but resizing with F.interpolate(antialias=True) on
    float tensors; kept for the backend comparison (and for GPU-side resizing later)."""
    out = []
    for im in images:
        x = torch.from_numpy(np.array(im, np.uint8)).permute(2, 0, 1)[None].contiguous().float()
        if x.shape[-2:] != (size, size):
            x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear",
                                                align_corners=False, antialias=True)
        out.append(x)
    return _normalise(torch.cat(out))


def denormalise(x: torch.Tensor) -> np.ndarray:
    """Inverse of the normalisation: float32[B, 3, S, S] -> uint8[B, S, S, 3] (for checks)."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255.0
    y = (x * std + mean).round().clamp(0, 255).to(torch.uint8)
    return y.permute(0, 2, 3, 1).numpy()
