"""ONNX export: onnxruntime gives torch's outputs (float32, batch 1 and 4, dynamic or fixed
batch), predict/evaluate through the .onnx file give torch's detections and mAP, the decode in
the graph, named mask outputs, the float16 check, and the errors a user sees."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pandas as pd
import pytest
import torch
from conftest import CLASSES, write_model_dir
from torch import nn

from raydetr.commands.cli import main
from raydetr.config import ModelConfig
from raydetr.model.postprocess import PostProcessor
from raydetr.serve.detector import Detector
from raydetr.serve.export import export_detector
from raydetr.serve.onnx import (
    META_KEY,
    OnnxExportError,
    check_half,
    check_images,
    export_onnx,
)


def _session_outputs(path: Path | ort.InferenceSession, images: torch.Tensor
                     ) -> dict[str, np.ndarray]:
    sess = (path if isinstance(path, ort.InferenceSession)
            else ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]))
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, {"images": images.numpy()})))


def assert_same_detections(a: pd.DataFrame, b: pd.DataFrame, score_tol: float = 1e-4,
                           box_tol_px: float = 1e-2) -> None:
    """Per image the same detections: every row of ``a`` has a row of ``b`` with the same class,
    score and box (within the tolerances), and the counts agree."""
    assert len(a) == len(b) and len(a) > 0
    for image, rows in a.groupby("image_index"):
        other = b[b.image_index == image]
        assert len(rows) == len(other), f"image {image}"
        boxes = other[["x1", "y1", "x2", "y2"]].to_numpy()
        for _, row in rows.iterrows():
            close = ((other.class_id.to_numpy() == row.class_id)
                     & (np.abs(other.score.to_numpy() - row.score) <= score_tol)
                     & (np.abs(boxes - row[["x1", "y1", "x2", "y2"]].to_numpy(float)).max(1)
                        <= box_tol_px))
            assert close.any(), f"image {image}: no match for {row.to_dict()}"


def test_rtdetr_onnxruntime_equals_torch_at_batch_1_and_4(rtdetr_dir, rtdetr_onnx):
    graph = onnx.load(str(rtdetr_onnx))
    assert [i.name for i in graph.graph.input] == ["images"]
    assert [o.name for o in graph.graph.output] == ["pred_logits", "pred_boxes"]
    batch_dim = graph.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.dim_value  # dynamic batch
    meta = json.loads({p.key: p.value for p in graph.metadata_props}[META_KEY])
    assert meta["classes"] == CLASSES and meta["onnx"]["opset"] == 17
    assert graph.opset_import[0].version == 17

    model = Detector.from_dir(rtdetr_dir, device="cpu").model
    images = check_images(64, 4, seed=11)  # not the images the export checked itself with
    with torch.no_grad():
        ref = model(images)
    sess = ort.InferenceSession(str(rtdetr_onnx), providers=["CPUExecutionProvider"])
    four = _session_outputs(sess, images)
    ones = [_session_outputs(sess, images[i:i + 1]) for i in range(4)]
    for name in ("pred_logits", "pred_boxes"):
        assert np.abs(four[name] - ref[name].numpy()).max() <= 1e-4, name
        for i, one in enumerate(ones):  # per-image results equal across batch sizes
            assert np.abs(one[name][0] - four[name][i]).max() <= 1e-5, (name, i)


def test_predict_through_onnx_equals_torch(rtdetr_dir, rtdetr_onnx, rgb_images, tmp_path):
    torch_det = Detector.from_dir(rtdetr_dir, device="cpu")
    onnx_det = Detector.from_onnx(str(rtdetr_onnx))
    assert onnx_det.classes == CLASSES and onnx_det.resolution == 64
    every = 20 * len(CLASSES)  # all queries x classes: no top-k boundary to tie on
    a = torch_det.predict(rgb_images, threshold=0.0, max_detections=every)
    b = onnx_det.predict(rgb_images, threshold=0.0, max_detections=every)
    assert len(a) == every * len(rgb_images)
    assert_same_detections(a, b)

    # the CLI: `raydetr predict --model model.onnx` writes the torch path's detections
    from raydetr.serve.images import encode_png

    img_dir = tmp_path / "imgs"
    img_dir.mkdir()
    for i, arr in enumerate(rgb_images):
        (img_dir / f"{i}.png").write_bytes(encode_png(arr))
    for model, out in ((str(rtdetr_dir), "torch"), (str(rtdetr_onnx), "onnx")):
        assert main(["predict", "--model", model, str(img_dir), "--out", str(tmp_path / out),
                     "--threshold", "0"]) == 0
    runs = [json.loads((tmp_path / o / "detections.json").read_text())["images"]
            for o in ("torch", "onnx")]
    frames = [pd.DataFrame([{"image_index": i, **d} for i, im in enumerate(r)
                            for d in im["detections"]]) for r in runs]
    assert_same_detections(*frames)


def test_evaluate_through_onnx_gives_the_torch_map(rtdetr_dir, rtdetr_onnx, tmp_path, capsys):
    from raydetr.data.parquet import prepare_dataset
    from raydetr.data.synthetic import make_synthetic
    from raydetr.serve.evaluation import run_evaluation

    raw = make_synthetic(tmp_path / "shapes", train_images=2, val_images=12, image_size=64, seed=4)
    prepared = tmp_path / "prepared"
    prepare_dataset(Path(raw), prepared)
    torch_m = run_evaluation(Detector.from_dir(rtdetr_dir, device="cpu"), prepared, "val")
    onnx_m = run_evaluation(Detector.from_onnx(str(rtdetr_onnx)), prepared, "val")
    for key in ("map", "map50", "map75", "mar"):
        assert abs(torch_m[key] - onnx_m[key]) <= 1e-3, key
    assert main(["evaluate", "--model", str(rtdetr_onnx), "--data", str(prepared)]) == 0
    assert "map" in capsys.readouterr().out


@pytest.mark.slow
def test_decode_in_the_graph_and_a_fixed_batch(rtdetr_dir, rgb_images, tmp_path):
    det = Detector.from_dir(rtdetr_dir, device="cpu")
    every = 20 * len(CLASSES)
    expected = det.predict(rgb_images, threshold=0.0, max_detections=every)
    report = export_detector(det, tmp_path / "decoded.onnx", batch=2, postprocess=True)
    assert report["outputs"] == ["scores", "labels", "boxes_xyxy"]
    sess = ort.InferenceSession(report["path"], providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].shape[0] == 2
    out = sess.run(None, {"images": check_images(64, 2).numpy()})
    assert out[0].shape == (2, every) and out[1].dtype == np.int64 and out[2].shape == (2, every, 4)
    assert (np.diff(out[0], axis=1) <= 0).all()  # best first
    assert out[2].min() >= 0.0 and out[2].max() <= 1.0  # normalised
    # three images through a batch-2 graph: fed in chunks, the same detections as torch
    got = Detector.from_onnx(report["path"]).predict(rgb_images, threshold=0.0, max_detections=every)
    assert_same_detections(expected, got)


class MaskHead(nn.Module):
    """A tiny segmentation-style model: logits, boxes and per-query mask logits."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 4, stride=4)
        self.logits = nn.Linear(8, 3)
        self.boxes = nn.Linear(8, 4)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.conv(images)  # [B,8,h,w]
        tokens = feats.flatten(2).transpose(1, 2)[:, :5]  # 5 "queries"
        masks = torch.einsum("bqc,bchw->bqhw", tokens, feats)
        return {"pred_logits": self.logits(tokens), "pred_boxes": self.boxes(tokens).sigmoid(),
                "pred_masks": masks, "aux_outputs": []}


def test_a_model_with_masks_exports_them_as_named_outputs(tmp_path):
    model = MaskHead().eval()
    meta = {"classes": CLASSES, "num_classes": 3, "model": {"preset": "mask-test"},
            "resolution": 32}
    images = check_images(32, 3)
    with torch.no_grad():
        ref = model(images)
    raw, _ = export_onnx(model, tmp_path / "raw.onnx", resolution=32, meta=meta)
    out = _session_outputs(raw, images)
    assert list(out) == ["pred_logits", "pred_boxes", "pred_masks"]
    assert out["pred_masks"].shape == (3, 5, 8, 8)
    assert np.abs(out["pred_masks"] - ref["pred_masks"].numpy()).max() <= 1e-4

    dec, _ = export_onnx(model, tmp_path / "dec.onnx", resolution=32, meta=meta, postprocess=True,
                         top_k=4)
    out = _session_outputs(dec, images)
    assert list(out) == ["scores", "labels", "boxes_xyxy", "mask_logits"]
    assert out["mask_logits"].shape == (3, 4, 8, 8)
    # each kept detection's mask logits are its query's
    flat = ref["pred_logits"].sigmoid().flatten(1).topk(4, dim=1).indices // 3
    for b in range(3):
        for k in range(4):
            expect = ref["pred_masks"][b, flat[b, k]].numpy()
            assert np.abs(out["mask_logits"][b, k] - expect).max() <= 1e-4


class Ranked(nn.Module):
    """A tiny detector whose scores are well apart, as a trained model's top detections are:
    each token's logits get a fixed offset by token and class."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 16, 8, stride=8)
        self.logits = nn.Linear(16, 3)
        self.boxes = nn.Linear(16, 4)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        tokens = self.conv(images).flatten(2).transpose(1, 2)  # [B,64,16] at 64 px
        q, c = tokens.shape[1], 3
        offset = torch.arange(q)[:, None] * 2.0 + torch.arange(c)[None, :] * 0.5 - 2.0 * q
        return {"pred_logits": self.logits(tokens) * 0.1 + offset,
                "pred_boxes": self.boxes(tokens).sigmoid()}


class Overflow(nn.Module):
    """Boxes computed through values above float16's largest (65504): equal in float32."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.model(images)
        return {"pred_logits": out["pred_logits"],
                "pred_boxes": ((out["pred_boxes"] * 1000.0) ** 2 / 1e6).sqrt()}


@pytest.mark.slow
def test_half_export_is_checked_against_float32(rtdetr_dir, tmp_path, capsys):
    meta = {"classes": CLASSES, "num_classes": 3, "model": {"preset": "half-test"},
            "resolution": 64}
    model = Ranked().eval()
    path, _ = export_onnx(model, tmp_path / "half.onnx", resolution=64, meta=meta, half=True)
    graph = onnx.load(str(path))
    assert graph.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert graph.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in graph.graph.initializer)
    report = check_half(model, path, resolution=64)  # accepted: top detections kept
    assert report["lost"] == 0 and 0 < report["max_score_diff"] < 1e-2

    bad = Overflow(model).eval()
    path, _ = export_onnx(bad, tmp_path / "bad.onnx", resolution=64, meta=meta, half=True)
    with pytest.raises(OnnxExportError, match="float16 export refused"):
        check_half(bad, path, resolution=64)

    # the CLI on the random-init rtdetr (near-tied scores): refused or accepted, never silent
    out = tmp_path / "cli-half.onnx"
    rc = main(["export", str(rtdetr_dir), str(out), "--format", "onnx", "--half"])
    text = capsys.readouterr()
    if rc == 0:
        assert "float16 check" in text.out and out.is_file()
    else:
        assert rc == 2 and "float16 export refused" in text.err and not out.exists()


@pytest.mark.slow
def test_export_cli_writes_into_the_model_dir_and_reports(rtdetr_dir, capsys, tmp_path):
    model_dir = tmp_path / "copy"
    model_dir.mkdir()
    for f in ("model.safetensors", "meta.json"):
        (model_dir / f).write_bytes((rtdetr_dir / f).read_bytes())
    assert main(["export", str(model_dir), "--format", "onnx", "--opset", "18"]) == 0
    out = capsys.readouterr().out
    assert f"-> {model_dir / 'model.onnx'}" in out and "batch dynamic, opset 18" in out
    assert "onnxruntime vs torch, batch 4" in out
    assert onnx.load(str(model_dir / "model.onnx")).opset_import[0].version == 18


@pytest.mark.parametrize("case", ["empty_dir", "onnx_file", "bad_batch", "variant", "missing"])
def test_export_errors_are_clear(case, rtdetr_dir, tmp_path, capsys):
    args = {
        "empty_dir": [str(tmp_path)],
        "onnx_file": [str(tmp_path / "x.onnx")],
        "bad_batch": [str(rtdetr_dir), "--batch", "0"],
        "variant": [str(rtdetr_dir), "--variant", "regular"],
        "missing": [str(tmp_path / "nope")],
    }[case]
    assert main(["export", *args, "--format", "onnx"]) == 2
    err = capsys.readouterr().err
    expected = {
        "empty_dir": "not a model directory",
        "onnx_file": "is already an ONNX file",
        "bad_batch": "--batch must be 'dynamic' or a positive integer",
        "variant": "holds the ema weights only",
        "missing": "not a model directory",
    }[case]
    assert expected in err and "Traceback" not in err


def test_predict_with_an_onnx_file_that_raydetr_did_not_write(tmp_path, capsys):
    path = tmp_path / "foreign.onnx"
    torch.onnx.export(nn.Conv2d(3, 3, 1).eval(), (torch.zeros(1, 3, 8, 8),), str(path),
                      dynamo=False, input_names=["images"])
    img = tmp_path / "a.png"
    from raydetr.serve.images import encode_png

    img.write_bytes(encode_png(np.zeros((8, 8, 3), np.uint8)))
    assert main(["predict", "--model", str(path), str(img), "--out", str(tmp_path / "o")]) == 2
    assert "not written by `raydetr export`" in capsys.readouterr().err


@pytest.mark.slow
def test_rfdetr_nano_onnxruntime_equals_torch(tmp_path, rgb_images):
    model_dir = write_model_dir(tmp_path / "nano", ModelConfig(preset="rfdetr-nano", resolution=64),
                                64)
    det = Detector.from_dir(model_dir, device="cpu")
    report = export_detector(det, model_dir / "model.onnx")  # raises above 1e-4 at batch 1, 4
    for diffs in report["check"]["batches"].values():
        assert max(diffs.values()) <= 1e-4
    images = check_images(64, 4, seed=11)
    with torch.no_grad():
        ref = det.model(images)
    four = _session_outputs(Path(report["path"]), images)
    one = _session_outputs(Path(report["path"]), images[2:3])
    for name in ("pred_logits", "pred_boxes"):
        assert np.abs(four[name] - ref[name].numpy()).max() <= 1e-4, name
        assert np.abs(one[name][0] - four[name][2]).max() <= 1e-5, name
    every = 300 * len(CLASSES)
    assert_same_detections(det.predict(rgb_images, threshold=0.0, max_detections=every),
                           Detector.from_onnx(report["path"]).predict(
                               rgb_images, threshold=0.0, max_detections=every))


def test_a_run_dir_exports_its_winner_or_the_other_variant(rtdetr_dir, tmp_path, capsys):
    """RUN_DIR: the winner by default; --variant regular: the best regular weights of the run's
    last checkpoint (a different model here: another seed)."""
    from raydetr.record import Best, Bests
    from raydetr.train.checkpoint import BEST_FILES, BESTS_FILE, STATE_FILE

    run = tmp_path / "run"
    write_model_dir(run / "winner", ModelConfig(preset="rtdetr-r18", resolution=64, num_queries=20,
                                                num_denoising=0), 64)
    other = write_model_dir(tmp_path / "other", ModelConfig(
        preset="rtdetr-r18", resolution=64, num_queries=20, num_denoising=0), 64, seed=1)
    ckpt = run / "train" / "epoch_0002"
    ckpt.mkdir(parents=True)
    (ckpt / STATE_FILE).write_bytes(b"")  # only its presence marks a complete checkpoint here
    (ckpt / BEST_FILES["regular"]).write_bytes((other / "model.safetensors").read_bytes())
    bests = Bests(regular=Best(map=0.2, epoch=1), ema=Best(map=0.25, epoch=2, decay=0.993))
    (ckpt / BESTS_FILE).write_text(json.dumps(bests.to_dict()))

    assert main(["export", str(run), "--format", "onnx"]) == 0
    assert "(ema weights" in capsys.readouterr().out
    assert main(["export", str(run), "--format", "onnx", "--variant", "regular"]) == 0
    assert "(regular weights" in capsys.readouterr().out
    regular = run / "winner" / "model-regular.onnx"
    meta = json.loads({p.key: p.value for p in onnx.load(str(regular)).metadata_props}[META_KEY])
    assert meta["variant"] == "regular" and meta["epoch"] == 1
    images = check_images(64, 1)
    with torch.no_grad():
        expected = Detector.from_dir(other, device="cpu").model(images)["pred_logits"].numpy()
    got = _session_outputs(regular, images)["pred_logits"]
    assert np.abs(got - expected).max() <= 1e-4


@pytest.mark.slow
def test_rfdetr_seg_nano_exports_masks_and_onnxruntime_equals_torch(tmp_path, capsys):
    """`raydetr export` of a seg model: pred_masks is a named output with its real sizes, equal
    to torch at batch 1 and 4; --postprocess adds the top-k detections' mask logits."""
    res = 120  # seg-nano's multiple is 12; 10 x 10 patches hold its 100 queries
    model_dir = write_model_dir(tmp_path / "seg", ModelConfig(preset="rfdetr-seg-nano",
                                                              resolution=res), res)
    assert main(["export", str(model_dir), "--format", "onnx"]) == 0
    assert "onnxruntime vs torch, batch 4" in capsys.readouterr().out
    path = model_dir / "model.onnx"
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    shapes = {o.name: o.shape for o in sess.get_outputs()}
    assert shapes == {"pred_logits": ["batch", 100, 3], "pred_boxes": ["batch", 100, 4],
                      "pred_masks": ["batch", 100, res // 4, res // 4]}
    model = Detector.from_dir(model_dir, device="cpu").model
    images = check_images(res, 4, seed=11)
    with torch.no_grad():
        ref = model(images)
    four = _session_outputs(sess, images)
    ones = [_session_outputs(sess, images[i:i + 1]) for i in range(4)]
    diffs = {n: float(np.abs(four[n] - ref[n].numpy()).max())
             for n in ("pred_logits", "pred_boxes", "pred_masks")}
    print("seg-nano 120 px, batch 4, max |onnxruntime - torch|:", diffs)
    assert max(diffs.values()) <= 1e-4, diffs
    for name in diffs:
        for i, one in enumerate(ones):  # per-image results equal across batch sizes
            assert np.abs(one[name][0] - four[name][i]).max() <= 1e-4, (name, i)

    decoded = tmp_path / "decoded.onnx"
    assert main(["export", str(model_dir), str(decoded), "--format", "onnx",
                 "--postprocess"]) == 0
    out = _session_outputs(decoded, images)
    assert list(out) == ["scores", "labels", "boxes_xyxy", "mask_logits"]
    assert out["mask_logits"].shape == (4, 100, res // 4, res // 4)
    sizes = torch.tensor([[res, res]] * 4)
    expected = PostProcessor()(ref, sizes, top_k=100)  # the torch path's decode
    for i, e in enumerate(expected):
        assert np.array_equal(out["labels"][i], e["labels"].numpy())
        assert np.abs(out["scores"][i] - e["scores"].numpy()).max() <= 1e-4
        assert np.abs(out["mask_logits"][i] - e["mask_logits"].numpy()).max() <= 1e-4
