"""Image inputs for prediction: paths, bytes, arrays or PIL images -> RGB uint8 arrays, and PNG
encoding (HTTP payloads, input examples). Errors name the file or the input index.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from raydetr.data.transforms import decode_image
from raydetr.errors import UserError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


class ImageInputError(UserError, ValueError):
    """An input image that cannot be read; the message names the file or the input index."""


def _decode(data: bytes, where: str) -> np.ndarray:

    try:
        return decode_image(bytes(data))
    except Exception as exc:  # the decoder's own error type is not part of our contract
        raise ImageInputError(f"{where}: not a readable image ({exc})") from None


def load_image(item: Any, index: int = 0) -> np.ndarray:
    """One image as RGB ``uint8[H, W, 3]`` from a path, encoded bytes, an array or a PIL image.

    Arrays must be ``uint8`` ``HxWx3`` (``HxW`` grey and ``HxWx4`` RGBA are converted).
    """
    if isinstance(item, (str, os.PathLike)):
        path = Path(item)
        if not path.is_file():
            raise ImageInputError(f"image {index}: file not found: {path}")
        return _decode(path.read_bytes(), f"image {index} ({path})")
    if isinstance(item, (bytes, bytearray, memoryview)):
        return _decode(bytes(item), f"image {index} (bytes)")
    if isinstance(item, Image.Image):
        return np.asarray(item.convert("RGB"), dtype=np.uint8)
    if isinstance(item, np.ndarray):
        arr = item
        if arr.dtype == object and arr.ndim == 1:  # a DataFrame cell holding nested lists
            arr = np.asarray(arr.tolist())
        if arr.dtype != np.uint8:
            raise ImageInputError(
                f"image {index}: arrays must be uint8 RGB HxWx3, got dtype {arr.dtype}; "
                "convert with arr.astype(np.uint8) from 0..255 values"
            )
        if arr.ndim == 2:
            arr = np.repeat(arr[:, :, None], 3, axis=2)
        elif arr.ndim == 3 and arr.shape[2] == 4:
            arr = arr[:, :, :3]
        if arr.ndim != 3 or arr.shape[2] != 3 or min(arr.shape[:2]) < 1:
            raise ImageInputError(f"image {index}: array shape {item.shape} is not HxWx3")
        return np.ascontiguousarray(arr)
    raise ImageInputError(
        f"image {index}: unsupported input type {type(item).__name__}; pass a file path, "
        "encoded image bytes, or a uint8 HxWx3 array"
    )


def image_items(images: Any) -> list[Any]:
    """Flatten the accepted input shapes to a list of single images.

    Accepts one image, a list/tuple/Series of images, a DataFrame (column ``image``, or its only
    column) or a ``uint8[B, H, W, 3]`` batch array.
    """
    if isinstance(images, pd.DataFrame):
        if "image" in images.columns:
            return list(images["image"])
        if len(images.columns) == 1:
            return list(images.iloc[:, 0])
        raise ImageInputError(
            f"DataFrame input needs an 'image' column; got columns {list(images.columns)}"
        )
    if isinstance(images, pd.Series):
        return list(images)
    if isinstance(images, np.ndarray) and images.ndim == 4:
        return list(images)
    if isinstance(images, (list, tuple)):
        return list(images)
    return [images]


def encode_png(array: np.ndarray) -> bytes:
    """uint8[H,W,3] -> PNG bytes (for HTTP payloads and input examples)."""
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()
