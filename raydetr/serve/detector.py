"""Load a model dir (or a downloaded MLflow model dir) and predict.

The served MLflow model (``raydetr/registry/pyfunc.py``) calls into this module, so the CLI, the
Python API and the HTTP endpoint share one preprocessing / postprocessing path:

    det = Detector.from_dir("runs/x/winner")              # registry URIs: raydetr.registry.fetch
    df = det.predict(["a.jpg", b"<png bytes>", rgb_uint8_array], threshold=0.5)
    det.draw("a.jpg", df[df.image_index == 0]).save("a_boxes.jpg")

Detections are a DataFrame with one row per box, columns ``DETECTION_COLUMNS``; boxes are
``x1, y1, x2, y2`` in absolute pixels of the original image (not the resized model input).
A segmentation model (``rfdetr-seg-*``) adds ``mask``: the detection's mask at the original
size as COCO RLE, ``{"size": [height, width], "counts": str}`` (pycocotools' compressed RLE,
decoded by ``pycocotools.mask.decode`` or ``raydetr.eval.coco.decode_rle``), encoded only for
the detections kept, a few at a time.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image

from raydetr.artifacts import ModelDir, ModelDirError, load_weights, mlflow_model_files, read_meta
from raydetr.config import LossConfig, ModelConfig
from raydetr.config.presets import is_segmentation
from raydetr.data.transforms import to_model_input
from raydetr.model.build import build
from raydetr.model.postprocess import masks_rle
from raydetr.serve.draw import draw_detections
from raydetr.serve.images import image_items, load_image
from raydetr.serve.onnx import load_runtime

DETECTION_COLUMNS = ["image_index", "class_id", "class_name", "score", "x1", "y1", "x2", "y2"]
MASK_COLUMN = "mask"  # segmentation models: COCO RLE at the original size, after the box
DEFAULT_TOP_K = 100


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
        self.segmentation = is_segmentation(str(meta.get("model", {}).get("preset", "")))

    # -- loading
    @classmethod
    def from_files(cls, weights: str | Path, meta: str | Path, *, device: str | None = None,
                   source: str = "", model_version: Any = None) -> Detector:
        """Build from ``model.safetensors`` + ``meta.json`` (no pickle: safetensors only)."""
        model_meta = read_meta(meta)
        weights = Path(weights)
        if not weights.is_file():
            raise ModelDirError(f"weights file not found: {weights}")
        try:
            # backbone_weights is a training-machine path; the published weights replace it.
            model_cfg = ModelConfig(**{**model_meta.model, "backbone_weights": None})
        except Exception as exc:
            raise ModelDirError(f"{meta}: 'model' section does not fit this raydetr: {exc}") from None
        model, _criterion, postprocessor = build(model_cfg, LossConfig(), model_meta.num_classes)
        try:
            state = load_weights(weights)
        except Exception as exc:
            raise ModelDirError(f"{weights}: not a readable safetensors file ({exc})") from None
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as exc:  # shape mismatch, e.g. another number of classes
            raise ModelDirError(f"{weights} does not match the architecture in {meta}: "
                                f"{str(exc).splitlines()[-1].strip()}") from None
        if missing or unexpected:
            raise ModelDirError(
                f"{weights} does not match the architecture in {meta}: missing keys "
                f"{missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected keys "
                f"{unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
            )
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        return cls(model, postprocessor, model_meta.to_dict(), source=source or str(weights.parent),
                   device=device, model_version=model_version)

    @classmethod
    def from_dir(cls, path: str | Path, *, device: str | None = None) -> Detector:
        """A model dir (``model.safetensors`` + ``meta.json``) or a downloaded MLflow model dir."""
        path = Path(path)
        model_dir = ModelDir(path)
        if model_dir.exists():
            return cls.from_files(model_dir.weights_path, model_dir.meta_path, device=device,
                                  source=str(path))
        if (path / "MLmodel").is_file():
            weights, meta = mlflow_model_files(path)
            return cls.from_files(weights, meta, device=device, source=str(path))
        raise ModelDirError(
            f"{path}: not a model directory; expected model.safetensors + meta.json (a run's "
            "winner/ dir) or an MLflow model dir (MLmodel)"
        )

    @classmethod
    def from_onnx(cls, path: str | Path, *, threads: int | None = None) -> Detector:
        """A ``raydetr export`` ONNX file, run by onnxruntime on the CPU (same pre/post-processing)."""
        runtime, postprocessor, meta = load_runtime(path, threads=threads)
        return cls(runtime, postprocessor, meta, source=str(path), device="cpu")

    # -- inference
    @torch.no_grad()
    def forward(self, images: torch.Tensor, orig_sizes_hw: torch.Tensor,
                top_k: int = DEFAULT_TOP_K) -> list[dict[str, Any]]:
        """images float32[B,3,S,S] (normalised), orig_sizes_hw int64[B,2] ->
        per image dict(scores f32[K], labels i64[K], boxes f32[K,4] xyxy absolute pixels,
        size_hw (h, w); a segmentation model also mask_logits float Tensor[K, h/4-ish, w])."""
        outputs = self.model(images.to(self.device))
        results = self.postprocessor(outputs, orig_sizes_hw.to(self.device), top_k=top_k)
        out = []
        for r, size in zip(results, orig_sizes_hw.tolist()):
            d: dict[str, Any] = {k: r[k].float().cpu().numpy() if k != "labels" else r[k].cpu().numpy()
                                 for k in ("scores", "labels", "boxes")}
            d["size_hw"] = (int(size[0]), int(size[1]))
            if "mask_logits" in r:
                d["mask_logits"] = r["mask_logits"].float().cpu()
            out.append(d)
        return out

    def detect_arrays(self, arrays: Sequence[np.ndarray], top_k: int = DEFAULT_TOP_K
                      ) -> list[dict[str, Any]]:
        """RGB uint8[H,W,3] images (any sizes) -> raw per-image detections (see ``forward``)."""
        batch = to_model_input(list(arrays), self.resolution)
        sizes = torch.tensor([[a.shape[0], a.shape[1]] for a in arrays], dtype=torch.int64)
        return self.forward(batch, sizes, top_k)

    def predict(self, images: Any, threshold: float = 0.5, max_detections: int | None = None,
                batch_size: int = 8) -> pd.DataFrame:
        """Images (see ``image_items``) -> DataFrame ``DETECTION_COLUMNS`` (+ ``mask`` for a
        segmentation model), one row per box with ``score >= threshold``, at most
        ``max_detections`` per image, best first."""
        items = image_items(images)
        top_k = int(max_detections) if max_detections else DEFAULT_TOP_K
        rows: list[dict[str, Any]] = []
        for start in range(0, len(items), batch_size):
            arrays = [load_image(it, start + i) for i, it in enumerate(items[start:start + batch_size])]
            for offset, det in enumerate(self.detect_arrays(arrays, top_k)):
                rows.extend(self._rows(start + offset, det, threshold))
        return detections_frame(rows, masks=self.segmentation)

    def _rows(self, image_index: int, det: dict[str, Any], threshold: float
              ) -> list[dict[str, Any]]:
        keep = np.flatnonzero(det["scores"] >= threshold)
        keep = keep[np.argsort(-det["scores"][keep], kind="stable")]
        masks = None
        if det.get("mask_logits") is not None:  # only the kept detections' masks, at full size
            masks = masks_rle(det["mask_logits"][torch.as_tensor(keep, dtype=torch.long)],
                              det["size_hw"])
        out = []
        for n, k in enumerate(keep):
            cid = int(det["labels"][k])
            x1, y1, x2, y2 = (float(v) for v in det["boxes"][k])
            name = self.classes[cid] if 0 <= cid < len(self.classes) else str(cid)
            row = dict(image_index=image_index, class_id=cid, class_name=name,
                       score=float(det["scores"][k]), x1=x1, y1=y1, x2=x2, y2=y2)
            if masks is not None:  # JSON-ready: counts as text
                row[MASK_COLUMN] = {"size": [int(v) for v in masks[n]["size"]],
                                    "counts": masks[n]["counts"].decode("ascii")}
            out.append(row)
        return out

    def draw(self, image: Any, detections: pd.DataFrame | Iterable[dict]) -> Image.Image:
        """A copy of ``image`` with each detection's box and ``class score`` label drawn."""
        return draw_detections(Image.fromarray(load_image(image)), detections)


def detections_frame(rows: list[dict[str, Any]], masks: bool = False) -> pd.DataFrame:
    """Rows -> DataFrame with exactly ``DETECTION_COLUMNS`` (+ ``mask``, an object column of
    COCO RLE dicts, when ``masks``) and stable dtypes (also when empty)."""
    columns = DETECTION_COLUMNS + ([MASK_COLUMN] if masks else [])
    df = pd.DataFrame(rows, columns=columns)
    return df.astype({"image_index": "int64", "class_id": "int64", "class_name": object,
                      "score": "float64", "x1": "float64", "y1": "float64", "x2": "float64",
                      "y2": "float64", **({MASK_COLUMN: object} if masks else {})})
