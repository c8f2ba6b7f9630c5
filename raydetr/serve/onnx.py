"""ONNX export of a detector, and an onnxruntime-backed model that plugs into ``Detector``.

    path, opset = export_onnx(det.model, "model.onnx", resolution=384, meta=det.meta)
    report = check_onnx(det.model, path, resolution=384)        # max |onnx - torch|, batch 1 and 4
    runtime = OnnxRuntimeModel(path)                             # forward(images) -> outputs dict

The graph has one input, ``images`` float32[B, 3, S, S] (ImageNet-normalised, as
``raydetr.data.transforms.to_model_input`` makes it), and named outputs:

    raw (default)     pred_logits f32[B,Q,C], pred_boxes f32[B,Q,4] normalised cxcywh
                      (+ pred_masks f32[B,Q,h,w] mask logits, for a model that returns them)
    --postprocess     scores f32[B,K], labels i64[B,K], boxes_xyxy f32[B,K,4] normalised 0..1,
                      best first (raydetr.model.postprocess.decode_topk, the torch path's own decode)
                      (+ masks f32[B,K,h,w] mask probabilities of the selected queries)

B is dynamic unless a fixed batch is asked for. Inputs and outputs stay float32 in a ``--half``
export (the weights and the compute inside are float16). The model's ``meta.json`` rides in the
graph's metadata (key ``raydetr.meta``), so a ``.onnx`` file alone is enough for ``raydetr
predict`` / ``evaluate``. onnx and onnxruntime are imported where used (optional, heavy).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from raydetr.artifacts import ModelDirError, ModelMeta
from raydetr.data.synthetic import draw_image
from raydetr.data.transforms import to_model_input
from raydetr.errors import UserError
from raydetr.model.postprocess import PostProcessor, decode_topk, scale_boxes
from raydetr.model.rfdetr.backbone import Embeddings

INPUT_NAME = "images"
RAW_OUTPUTS = ("pred_logits", "pred_boxes", "pred_masks")
DECODED_OUTPUTS = ("scores", "labels", "boxes_xyxy", "masks")
META_KEY = "raydetr.meta"
DEFAULT_OPSET = 17
MIN_OPSET = 16  # GridSample (both families' deformable attention) is in ONNX from opset 16
MAX_OPSET = 20  # the last opset torch's TorchScript-based exporter writes
DEFAULT_TOP_K = 100
FP32_ATOL = 1e-4  # the contract: max |onnxruntime - torch| of logits and boxes in float32
HALF_TOP_N = 10  # --half: every one of float32's top-N detections per image must be found ...
HALF_MIN_IOU = 0.9  # ... among float16's top-2N with the same class and IoU above this


class OnnxExportError(UserError, ValueError):
    """An export that cannot be made or does not hold its tolerance; the message says why."""


class GraphOutputs(nn.Module):
    """The traced module: ``images`` -> a tuple of named tensors (``output_names``).

    ``top_k`` None: the model's raw outputs; else the top-k decode inside the graph.
    """

    def __init__(self, model: nn.Module, output_names: Sequence[str], top_k: int | None = None
                 ) -> None:
        super().__init__()
        self.model, self.output_names, self.top_k = model, tuple(output_names), top_k

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        out = self.model(images)
        if self.top_k is None:
            return tuple(out[name].float() for name in self.output_names)
        d = decode_topk(out["pred_logits"], out["pred_boxes"], self.top_k)
        result = {"scores": d["scores"], "labels": d["labels"], "boxes_xyxy": d["boxes_xyxy"]}
        if "masks" in self.output_names:
            masks = out["pred_masks"].float()
            idx = d["queries"][:, :, None, None].expand(-1, -1, *masks.shape[-2:])
            result["masks"] = masks.gather(1, idx).sigmoid()
        return tuple(result[name] for name in self.output_names)


def output_names(model: nn.Module, resolution: int, postprocess: bool) -> list[str]:
    """The graph's output names for this model: what it returns decides (masks or not)."""
    with torch.no_grad():
        out = model.eval()(torch.zeros(1, 3, resolution, resolution))
    missing = [k for k in RAW_OUTPUTS[:2] if not isinstance(out.get(k), Tensor)]
    if missing:
        raise OnnxExportError(f"the model's outputs lack {missing}; cannot export a detector")
    names = [k for k in RAW_OUTPUTS if isinstance(out.get(k), Tensor)]
    if not postprocess:
        return names
    return list(DECODED_OUTPUTS[:3]) + (["masks"] if "pred_masks" in names else [])


def export_onnx(model: nn.Module, path: str | Path, *, resolution: int, meta: dict[str, Any],
                batch: int | None = None, opset: int = DEFAULT_OPSET, postprocess: bool = False,
                top_k: int = DEFAULT_TOP_K, half: bool = False) -> tuple[Path, int]:
    """Write ``model`` as ONNX to ``path`` (batch None: dynamic); returns (path, opset).

    TorchScript-based exporter (``dynamo=False``): it needs no extra package and handles every
    raydetr family; the trace runs at batch 2 so that no batch size is baked into the graph.
    ``half``: the float32 graph converted by onnxruntime's float16 converter, inputs and outputs
    kept float32.
    """
    import onnx

    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise OnnxExportError(f"--opset {opset}: choose {MIN_OPSET}..{MAX_OPSET} (GridSample needs "
                              f"{MIN_OPSET}; torch's TorchScript exporter writes up to {MAX_OPSET})")
    path = Path(path)
    model = model.eval().float()
    names = output_names(model, resolution, postprocess)
    decode_k = None
    if postprocess:
        with torch.no_grad():
            q, c = model(torch.zeros(1, 3, resolution, resolution))["pred_logits"].shape[1:]
        decode_k = min(top_k, q * c)
    wrapper = GraphOutputs(fixed_input_size(model, resolution), names, decode_k).eval()
    dummy = torch.zeros(batch or 2, 3, resolution, resolution)
    dynamic = None if batch else {n: {0: "batch"} for n in (INPUT_NAME, *names)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with torch.no_grad(), warnings.catch_warnings(), _quiet_stderr():
            # the tracer's notes on Python-side shape arithmetic: the checks below are the proof
            warnings.simplefilter("ignore")
            torch.onnx.export(wrapper, (dummy,), str(tmp), input_names=[INPUT_NAME],
                              output_names=names, dynamic_axes=dynamic, opset_version=opset,
                              dynamo=False, do_constant_folding=True)
    except Exception as exc:  # the exporter's own errors: say which model and opset
        tmp.unlink(missing_ok=True)
        raise OnnxExportError(f"ONNX export of {meta['model'].get('preset')} at opset {opset} "
                              f"failed: {str(exc).splitlines()[0][:300]}") from None
    graph = onnx.load(str(tmp))
    if half:
        from onnxruntime.transformers.float16 import convert_float_to_float16
        from onnxruntime.transformers.onnx_model import OnnxModel

        half_model = OnnxModel(convert_float_to_float16(graph, keep_io_types=True))
        half_model.topological_sort()  # the converter appends its input casts at the end
        graph = half_model.model
    info = {**meta, "onnx": {"opset": opset, "batch": batch or "dynamic", "resolution": resolution,
                             "postprocess": postprocess, "top_k": decode_k, "half": half,
                             "outputs": names}}
    onnx.helper.set_model_props(graph, {META_KEY: json.dumps(info)})
    onnx.checker.check_model(graph)
    onnx.save(graph, str(path))
    tmp.unlink(missing_ok=True)
    return path, opset


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2 for the block: on a failure torch's exporter writes its whole
    IR graph there (thousands of lines); the error raised after it says what went wrong."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def fixed_input_size(model: nn.Module, resolution: int) -> nn.Module:
    """A copy of ``model`` for tracing at one input size. RF-DETR resizes its position table
    with antialiased bicubic interpolation, an op ONNX lacks; at a fixed input size the result
    is a constant, so it is computed once here and the graph holds it."""
    if not any(isinstance(m, Embeddings) for m in model.modules()):
        return model
    model = copy.deepcopy(model)
    for m in model.modules():
        if isinstance(m, Embeddings):
            grid = resolution // m.patch_size
            with torch.no_grad():
                table = m.positions(grid, grid, True).detach().clone()
            m.positions = lambda gh, gw, square, _table=table: _table  # type: ignore[method-assign]
    return model


class OnnxRuntimeModel(nn.Module):
    """An ONNX file run by onnxruntime, called like the torch model: ``forward(images)`` ->
    dict of the graph's named outputs as CPU tensors. A fixed-batch graph is fed in chunks of
    its batch (the last chunk padded), so any batch size works."""

    def __init__(self, path: str | Path, *, threads: int | None = None) -> None:
        super().__init__()
        import onnxruntime as ort

        self.path = Path(path)
        opts = ort.SessionOptions()
        opts.log_severity_level = 3  # errors only: no per-node warnings on the console
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(self.path), opts,
                                                providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise ModelDirError(f"{self.path}: onnxruntime cannot load it "
                                 f"({str(exc).splitlines()[0][:300]})") from None
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]
        dim = self.session.get_inputs()[0].shape[0]
        self.fixed_batch = int(dim) if isinstance(dim, int) else None

    @property
    def decoded(self) -> bool:
        """True for a ``--postprocess`` graph (scores/labels/boxes_xyxy outputs)."""
        return "scores" in self.output_names

    def run_numpy(self, images: np.ndarray) -> list[np.ndarray]:
        images = np.ascontiguousarray(images, dtype=np.float32)
        step = self.fixed_batch
        if step is None or len(images) == step:
            return self.session.run(self.output_names, {self.input_name: images})
        chunks: list[list[np.ndarray]] = []
        for start in range(0, len(images), step):
            part = images[start:start + step]
            pad = step - len(part)
            if pad:
                part = np.concatenate([part, np.repeat(part[-1:], pad, axis=0)])
            outs = self.session.run(self.output_names, {self.input_name: part})
            chunks.append([o[:step - pad] for o in outs])
        return [np.concatenate(parts) for parts in zip(*chunks)]

    def forward(self, images: Tensor, targets: Any = None) -> dict[str, Tensor]:
        outs = self.run_numpy(images.detach().to("cpu", torch.float32).numpy())
        return {name: torch.from_numpy(o) for name, o in zip(self.output_names, outs)}

    def meta(self) -> dict[str, Any]:
        """The raydetr meta.json stored in the graph (with an ``onnx`` section)."""
        text = self.session.get_modelmeta().custom_metadata_map.get(META_KEY)
        if text is None:
            raise ModelDirError(f"{self.path}: no '{META_KEY}' metadata; this ONNX file was not "
                                 "written by `raydetr export`, so its classes and input size "
                                 "are unknown")
        meta = json.loads(text)
        ModelMeta.from_dict(meta, where=f"{self.path}: '{META_KEY}' metadata")  # checks the keys
        return meta


class DecodedPostProcessor(nn.Module):
    """The ``PostProcessor`` contract for a ``--postprocess`` graph: its top-k detections
    (already decoded, best first) with boxes scaled to each original image."""

    @torch.no_grad()
    def forward(self, outputs: dict, orig_sizes: Tensor, top_k: int = 100) -> list[dict[str, Tensor]]:
        k = min(top_k, outputs["scores"].shape[1])
        boxes = scale_boxes(outputs["boxes_xyxy"][:, :k], orig_sizes)
        results = [{"scores": s, "labels": lab, "boxes": bx}
                   for s, lab, bx in zip(outputs["scores"][:, :k], outputs["labels"][:, :k], boxes)]
        if "masks" in outputs:  # probabilities in the graph; logits for PostProcessor's contract
            for r, m in zip(results, outputs["masks"][:, :k]):
                r["mask_logits"] = torch.logit(m.float(), eps=1e-7)
        return results


def load_runtime(path: str | Path, threads: int | None = None
                 ) -> tuple[OnnxRuntimeModel, nn.Module, dict[str, Any]]:
    """(runtime model, its postprocessor, meta) for ``Detector`` from a ``.onnx`` file."""
    path = Path(path)
    if not path.is_file():
        raise ModelDirError(f"ONNX file not found: {path}")
    runtime = OnnxRuntimeModel(path, threads=threads)
    post = DecodedPostProcessor() if runtime.decoded else PostProcessor()
    return runtime, post, runtime.meta()


def check_images(resolution: int, count: int, seed: int = 0) -> Tensor:
    """A deterministic batch of synthetic shapes images, model input float32[count,3,S,S]."""
    rng = np.random.default_rng(seed)
    arrays = [np.asarray(draw_image(rng, resolution, 4)[0]) for _ in range(count)]
    return to_model_input(arrays, resolution)


def check_onnx(model: nn.Module, path: str | Path, *, resolution: int,
               batches: Sequence[int] = (1, 4), atol: float = FP32_ATOL) -> dict[str, Any]:
    """Compare onnxruntime with torch on the same inputs (float32 graphs): max abs difference
    per output and batch size; raises ``OnnxExportError`` above ``atol`` (logits and boxes, or
    scores and boxes_xyxy for a decoded graph) or when labels differ."""
    runtime = OnnxRuntimeModel(path)
    names = runtime.output_names
    top_k = _meta_top_k(runtime)
    wrapper = GraphOutputs(model.eval().float(), names, top_k).eval()
    images = check_images(resolution, max(batches))
    report: dict[str, Any] = {"atol": atol, "batches": {}}
    for b in batches:
        with torch.no_grad():
            expected = [t.numpy() for t in wrapper(images[:b])]
        got = runtime.run_numpy(images[:b].numpy())
        diffs = {n: float(np.abs(e.astype(np.float64) - g).max()) if e.size else 0.0
                 for n, e, g in zip(names, expected, got)}
        report["batches"][b] = diffs
        bad = {n: d for n, d in diffs.items() if n != "labels" and d > atol}
        if bad or diffs.get("labels", 0.0) != 0.0:
            raise OnnxExportError(f"{path}: onnxruntime differs from torch at batch {b}: max abs "
                                  f"difference {diffs} (tolerance {atol})")
    return report


def _meta_top_k(runtime: OnnxRuntimeModel) -> int | None:
    return runtime.meta().get("onnx", {}).get("top_k") if runtime.decoded else None


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of xyxy boxes a[N,4], b[M,4] -> [N,M]."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area = lambda x: np.clip(x[:, 2:] - x[:, :2], 0, None).prod(-1)  # noqa: E731
    union = area(a)[:, None] + area(b)[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def check_half(model: nn.Module, path: str | Path, *, resolution: int, count: int = 4,
               top_n: int = HALF_TOP_N, min_iou: float = HALF_MIN_IOU) -> dict[str, Any]:
    """A float16 graph against the float32 torch model: per image, each of float32's top-N
    detections must appear among float16's top-2N with the same class and IoU > ``min_iou``.
    Raises ``OnnxExportError`` (how many were lost, where) when it does not hold."""
    runtime = OnnxRuntimeModel(path)
    images = check_images(resolution, count)
    with torch.no_grad():
        ref_out = model.eval().float()(images)
    ref = decode_topk(ref_out["pred_logits"], ref_out["pred_boxes"], 2 * top_n)
    outs = runtime(images)
    if runtime.decoded:
        got = {k: outs[k] for k in ("scores", "labels", "boxes_xyxy")}
    else:
        got = decode_topk(outs["pred_logits"], outs["pred_boxes"], 2 * top_n)
    lost, score_diff = [], 0.0
    for i in range(count):
        ref_boxes = ref["boxes_xyxy"][i, :top_n].numpy()
        ref_labels = ref["labels"][i, :top_n].numpy()
        half_boxes = got["boxes_xyxy"][i, :2 * top_n].numpy()
        half_labels = got["labels"][i, :2 * top_n].numpy()
        iou = _iou(ref_boxes, half_boxes)
        match = (iou > min_iou) & (ref_labels[:, None] == half_labels[None, :])
        lost += [(i, int(j)) for j in np.flatnonzero(~match.any(1))]
        n = min(top_n, got["scores"].shape[1])
        score_diff = max(score_diff, float((ref["scores"][i, :n] - got["scores"][i, :n]).abs().max()))
    report = {"images": count, "top_n": top_n, "min_iou": min_iou, "lost": len(lost),
              "max_score_diff": score_diff}
    if lost:
        raise OnnxExportError(
            f"float16 export refused: {len(lost)} of {count * top_n} top-{top_n} float32 "
            f"detections (image, rank: {lost[:5]}{'...' if len(lost) > 5 else ''}) have no "
            f"float16 match (same class, IoU > {min_iou}); max score difference "
            f"{score_diff:.4f}. Export in float32 (without --half)")
    if not math.isfinite(score_diff):
        raise OnnxExportError("float16 export refused: non-finite scores (float16 overflow); "
                              "export in float32 (without --half)")
    return report
