"""Load a published detector (winner dir, registry URI or MLflow model dir), predict, draw.

The served MLflow model (``raydetr/registry/pyfunc.py``) calls into this module, so the CLI, the
Python API and the HTTP endpoint share one preprocessing / postprocessing path:

    det = Detector.from_uri("models:/raydetr@champion")      # or Detector.from_dir("runs/x/winner")
    df = det.predict(["a.jpg", b"<png bytes>", rgb_uint8_array], threshold=0.5)
    det.draw("a.jpg", df[df.image_index == 0]).save("a_boxes.jpg")

Detections are a DataFrame with one row per box, columns ``DETECTION_COLUMNS``; boxes are
``x1, y1, x2, y2`` in absolute pixels of the original image (not the resized model input).
``predict_command`` / ``evaluate_command`` (raydetr/evaluate.py) back ``raydetr predict`` /
``raydetr evaluate``.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageDraw, ImageFont, UnidentifiedImageError

from raydetr.registry.mlflow import (
    ModelLoadError,
    RegistryError,
    download_model,
    read_meta,
)

DETECTION_COLUMNS = ["image_index", "class_id", "class_name", "score", "x1", "y1", "x2", "y2"]
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
DEFAULT_TOP_K = 100


class ImageInputError(ValueError):
    """An input image that cannot be read; the message names the file or the input index."""


# ----------------------------------------------------------------------------- image inputs

def _decode(data: bytes, where: str) -> np.ndarray:
    from raydetr.data.transforms import decode_image

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


# ----------------------------------------------------------------------------- detector

class Detector:
    """A published detector in eval mode: ``predict`` images -> detections DataFrame."""

    def __init__(self, model: torch.nn.Module, postprocessor: torch.nn.Module, meta: dict,
                 *, source: str = "", device: str | torch.device = "cpu",
                 model_version: Any = None) -> None:
        self.model = model.eval().to(device)
        self.postprocessor = postprocessor.eval()
        self.meta = meta
        self.classes: list[str] = list(meta["classes"])
        self.resolution = int(meta["resolution"])
        self.device = torch.device(device)
        self.source = source
        self.model_version = model_version  # mlflow ModelVersion when loaded from the registry

    # -- loading
    @classmethod
    def from_files(cls, weights: str | Path, meta: str | Path, *, device: str | None = None,
                   source: str = "", model_version: Any = None) -> Detector:
        """Build from ``model.safetensors`` + ``meta.json`` (no pickle: safetensors only)."""
        from safetensors.torch import load_file

        from raydetr.config import LossConfig, ModelConfig
        from raydetr.model.build import build

        meta_dict = read_meta(meta)
        weights = Path(weights)
        if not weights.is_file():
            raise ModelLoadError(f"weights file not found: {weights}")
        try:
            # backbone_weights is a training-machine path; the published weights replace it.
            model_cfg = ModelConfig(**{**meta_dict["model"], "backbone_weights": None})
        except Exception as exc:
            raise ModelLoadError(f"{meta}: 'model' section does not fit this raydetr: {exc}") from None
        model, _criterion, postprocessor = build(model_cfg, LossConfig(), int(meta_dict["num_classes"]))
        try:
            state = load_file(str(weights), device="cpu")
        except Exception as exc:
            raise ModelLoadError(f"{weights}: not a readable safetensors file ({exc})") from None
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as exc:  # shape mismatch, e.g. another number of classes
            raise ModelLoadError(f"{weights} does not match the architecture in {meta}: "
                                 f"{str(exc).splitlines()[-1].strip()}") from None
        if missing or unexpected:
            raise ModelLoadError(
                f"{weights} does not match the architecture in {meta}: missing keys "
                f"{missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected keys "
                f"{unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
            )
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        return cls(model, postprocessor, meta_dict, source=source or str(weights.parent),
                   device=device, model_version=model_version)

    @classmethod
    def from_dir(cls, path: str | Path, *, device: str | None = None) -> Detector:
        """A winner dir (``model.safetensors`` + ``meta.json``) or a downloaded MLflow model dir."""
        path = Path(path)
        if (path / "model.safetensors").is_file() and (path / "meta.json").is_file():
            return cls.from_files(path / "model.safetensors", path / "meta.json", device=device,
                                  source=str(path))
        if (path / "MLmodel").is_file():
            from raydetr.registry.mlflow import model_dir_artifacts

            weights, meta = model_dir_artifacts(path)
            return cls.from_files(weights, meta, device=device, source=str(path))
        raise ModelLoadError(
            f"{path}: not a model directory; expected model.safetensors + meta.json (a run's "
            "winner/ dir) or an MLflow model dir (MLmodel)"
        )

    @classmethod
    def from_uri(cls, uri: str | Path, *, tracking_uri: str | None = None,
                 device: str | None = None) -> Detector:
        """``models:/name@alias``, ``models:/name/3``, ``runs:/<id>/model`` or a local dir."""
        text = str(uri)
        if not text.startswith(("models:/", "runs:/", "mlflow-artifacts:/")) or Path(text).exists():
            return cls.from_dir(text, device=device)
        with tempfile.TemporaryDirectory(prefix="raydetr-model-") as tmp:
            local, version = download_model(text, tmp, tracking_uri=tracking_uri)
            det = cls.from_dir(local, device=device)
        det.source, det.model_version = text, version
        return det

    # -- inference
    @torch.no_grad()
    def forward(self, images: torch.Tensor, orig_sizes_hw: torch.Tensor,
                top_k: int = DEFAULT_TOP_K) -> list[dict[str, np.ndarray]]:
        """images float32[B,3,S,S] (normalised), orig_sizes_hw int64[B,2] ->
        per image dict(scores f32[K], labels i64[K], boxes f32[K,4] xyxy absolute pixels)."""
        outputs = self.model(images.to(self.device))
        q, c = outputs["pred_logits"].shape[1:]
        results = self.postprocessor(outputs, orig_sizes_hw.to(self.device), top_k=min(top_k, q * c))
        return [{k: r[k].float().cpu().numpy() if k != "labels" else r[k].cpu().numpy()
                 for k in ("scores", "labels", "boxes")} for r in results]

    def detect_arrays(self, arrays: Sequence[np.ndarray], top_k: int = DEFAULT_TOP_K
                      ) -> list[dict[str, np.ndarray]]:
        """RGB uint8[H,W,3] images (any sizes) -> raw per-image detections (see ``forward``)."""
        from raydetr.data.transforms import to_model_input

        batch = to_model_input(list(arrays), self.resolution)
        sizes = torch.tensor([[a.shape[0], a.shape[1]] for a in arrays], dtype=torch.int64)
        return self.forward(batch, sizes, top_k)

    def predict(self, images: Any, threshold: float = 0.5, max_detections: int | None = None,
                batch_size: int = 8) -> pd.DataFrame:
        """Images (see ``image_items``) -> DataFrame ``DETECTION_COLUMNS``, one row per box with
        ``score >= threshold``, at most ``max_detections`` per image, best first."""
        items = image_items(images)
        top_k = int(max_detections) if max_detections else DEFAULT_TOP_K
        rows: list[dict[str, Any]] = []
        for start in range(0, len(items), batch_size):
            arrays = [load_image(it, start + i) for i, it in enumerate(items[start:start + batch_size])]
            for offset, det in enumerate(self.detect_arrays(arrays, top_k)):
                rows.extend(self._rows(start + offset, det, threshold))
        return detections_frame(rows)

    def _rows(self, image_index: int, det: dict[str, np.ndarray], threshold: float
              ) -> list[dict[str, Any]]:
        keep = np.flatnonzero(det["scores"] >= threshold)
        keep = keep[np.argsort(-det["scores"][keep], kind="stable")]
        out = []
        for k in keep:
            cid = int(det["labels"][k])
            x1, y1, x2, y2 = (float(v) for v in det["boxes"][k])
            name = self.classes[cid] if 0 <= cid < len(self.classes) else str(cid)
            out.append(dict(image_index=image_index, class_id=cid, class_name=name,
                            score=float(det["scores"][k]), x1=x1, y1=y1, x2=x2, y2=y2))
        return out

    def draw(self, image: Any, detections: pd.DataFrame | Iterable[dict]) -> Image.Image:
        """A copy of ``image`` with each detection's box and ``class score`` label drawn."""
        return draw_detections(Image.fromarray(load_image(image)), detections)


def detections_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Rows -> DataFrame with exactly ``DETECTION_COLUMNS`` and stable dtypes (also when empty)."""
    df = pd.DataFrame(rows, columns=DETECTION_COLUMNS)
    return df.astype({"image_index": "int64", "class_id": "int64", "class_name": object,
                      "score": "float64", "x1": "float64", "y1": "float64", "x2": "float64",
                      "y2": "float64"})


_PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
            (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212)]


def draw_detections(image: Image.Image, detections: pd.DataFrame | Iterable[dict]) -> Image.Image:
    """Boxes (xyxy absolute pixels) with ``class_name score`` labels, default PIL font."""
    out = image.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default()
    rows = detections.to_dict("records") if isinstance(detections, pd.DataFrame) else detections
    for d in rows:
        colour = _PALETTE[int(d["class_id"]) % len(_PALETTE)]
        box = [float(d["x1"]), float(d["y1"]), float(d["x2"]), float(d["y2"])]
        draw.rectangle(box, outline=colour, width=2)
        label = f"{d['class_name']} {float(d['score']):.2f}"
        left, top, right, bottom = draw.textbbox((box[0], box[1]), label, font=font)
        height = bottom - top
        y = box[1] - height - 2 if box[1] - height - 2 >= 0 else box[1]
        draw.rectangle([box[0], y, box[0] + (right - left) + 4, y + height + 2], fill=colour)
        draw.text((box[0] + 2, y), label, fill=(0, 0, 0), font=font)
    return out


# ----------------------------------------------------------------------------- predict CLI

def expand_image_paths(inputs: Sequence[str | Path]) -> list[Path]:
    """Files as given; directories -> every image file inside (recursive, sorted)."""
    paths: list[Path] = []
    for raw in inputs:
        p = Path(raw)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise ImageInputError(f"{p}: directory holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
            paths.extend(found)
        elif p.is_file():
            paths.append(p)
        else:
            raise ImageInputError(f"{p}: no such file or directory")
    return paths


def _check_images(paths: list[Path]) -> None:
    """Cheap header check of every file before any model is loaded or output written."""
    bad = []
    for p in paths:
        try:
            with Image.open(p) as im:
                im.verify()
        except (UnidentifiedImageError, OSError, SyntaxError) as exc:
            bad.append(f"  {p}: not an image ({exc.__class__.__name__})")
    if bad:
        raise ImageInputError("cannot read these inputs:\n" + "\n".join(bad))


def _output_names(paths: list[Path]) -> list[str]:
    used: set[str] = set()
    names = []
    for p in paths:
        name, n = f"{p.stem}.jpg", 1
        while name in used:
            name, n = f"{p.stem}_{n}.jpg", n + 1
        used.add(name)
        names.append(name)
    return names


def predict_command(model: str, images: Sequence[str | Path], out: str | Path,
                    threshold: float = 0.5, *, batch_size: int = 8) -> int:
    """``raydetr predict``: detections.json + one drawn ``<name>.jpg`` per image in ``out``.

    Everything is written to a staging dir beside ``out`` and moved in at the end, with
    ``detections.json`` last, so a failed run never leaves output that looks complete.
    Returns 0, or 2 on a user error (bad input, unknown model) after printing it.
    """
    from tqdm import tqdm

    out = Path(out)
    try:
        paths = expand_image_paths(images)
        if not paths:
            raise ImageInputError("no input images given")
        _check_images(paths)
        det = Detector.from_uri(model)
    except (ImageInputError, RegistryError) as exc:
        print(f"raydetr predict: error: {exc}", file=sys.stderr)
        return 2
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    records = []
    try:
        names = _output_names(paths)
        bar = tqdm(total=len(paths), desc="predict", unit="img", disable=len(paths) < 16 or None)
        for start in range(0, len(paths), batch_size):
            chunk = paths[start:start + batch_size]
            arrays = [load_image(p, start + i) for i, p in enumerate(chunk)]
            for i, (p, arr, raw) in enumerate(zip(chunk, arrays, det.detect_arrays(arrays))):
                dets = det._rows(start + i, raw, threshold)
                draw_detections(Image.fromarray(arr), dets).save(staging / names[start + i], quality=90)
                records.append({
                    "file": str(p), "width": int(arr.shape[1]), "height": int(arr.shape[0]),
                    "output": names[start + i],
                    "detections": [{k: d[k] for k in DETECTION_COLUMNS[1:]} for d in dets],
                })
            bar.update(len(chunk))
        bar.close()
        summary = {"model": det.source, "threshold": threshold, "classes": det.classes,
                   "images": records}
        (staging / "detections.json").write_text(json.dumps(summary, indent=2))
        out.mkdir(parents=True, exist_ok=True)
        (out / "detections.json").unlink(missing_ok=True)  # stale result must not look current
        for name in names + ["detections.json"]:
            os.replace(staging / name, out / name)
    except ImageInputError as exc:
        print(f"raydetr predict: error: {exc}", file=sys.stderr)
        return 2
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    n = sum(len(r["detections"]) for r in records)
    print(f"{n} detections in {len(records)} images (threshold {threshold}) -> {out}/detections.json")
    return 0


def encode_png(array: np.ndarray) -> bytes:
    """uint8[H,W,3] -> PNG bytes (for HTTP payloads and input examples)."""
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def evaluate_command(model: str, data: str | Path, split: str = "val",
                     log_to_mlflow: bool = False, **kwargs: Any) -> int:
    """``raydetr evaluate``: see ``raydetr.evaluate.evaluate_command``."""
    from raydetr.evaluate import evaluate_command as _evaluate

    return _evaluate(model, data, split, log_to_mlflow, **kwargs)
