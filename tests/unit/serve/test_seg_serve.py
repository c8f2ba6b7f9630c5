"""A segmentation model served: Detector.predict gives one mask per detection (COCO RLE at the
original size, the same pixels as the model's mask logits resized there), the pyfunc rows carry
it, ``raydetr predict`` draws it filled and writes it to detections.json, ``raydetr evaluate``'s
table shows segm beside bbox. A detection model's output is unchanged."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import write_model_dir
from PIL import Image

from raydetr.commands.predict import predict_command
from raydetr.config import ModelConfig
from raydetr.eval.coco import coco_metrics_all, decode_rle, encode_rle
from raydetr.model.postprocess import masks_at_size
from raydetr.serve.detector import DETECTION_COLUMNS, Detector
from raydetr.serve.draw import MASK_ALPHA, draw_detections
from raydetr.serve.evaluation import format_table, scalar_keys
from raydetr.serve.images import encode_png


@pytest.fixture(scope="module")
def seg_dir(tmp_path_factory):
    cfg = ModelConfig(preset="rfdetr-seg-nano", resolution=96)
    return write_model_dir(tmp_path_factory.mktemp("seg") / "model", cfg, 96)


@pytest.fixture(scope="module")
def seg_detector(seg_dir):
    return Detector.from_dir(seg_dir, device="cpu")


def test_predict_gives_each_detection_its_mask_at_the_original_size(seg_detector, rgb_images):
    assert seg_detector.segmentation
    df = seg_detector.predict(rgb_images, threshold=0.0, max_detections=5)
    assert list(df.columns) == [*DETECTION_COLUMNS, "mask"]
    for idx, img in enumerate(rgb_images):
        h, w = img.shape[:2]
        rows = df[df.image_index == idx]
        assert len(rows) == 5 and all(m["size"] == [h, w] for m in rows["mask"])
        raw = seg_detector.detect_arrays([img], top_k=5)[0]
        order = np.argsort(-raw["scores"], kind="stable")
        want = torch.cat(list(masks_at_size(raw["mask_logits"][order], (h, w)))).numpy()
        assert 0 < want.mean() < 1  # random weights, but masks with pixels on and off
        np.testing.assert_array_equal(decode_rle(list(rows["mask"])), want)
    none = seg_detector.predict(rgb_images[:1], threshold=1.01)
    assert list(none.columns) == [*DETECTION_COLUMNS, "mask"] and len(none) == 0


def test_detection_model_rows_have_no_mask(rtdetr_dir, rgb_images):
    det = Detector.from_dir(rtdetr_dir, device="cpu")
    assert not det.segmentation
    assert list(det.predict(rgb_images[:1], threshold=0.0).columns) == DETECTION_COLUMNS


def test_pyfunc_returns_one_row_per_detection_with_its_rle(seg_dir, seg_detector, rgb_images):
    from pycocotools import mask as mask_utils

    from raydetr.registry.pyfunc import RayDetrModel

    model = RayDetrModel()
    model.load_context(SimpleNamespace(artifacts={"weights": str(seg_dir / "model.safetensors"),
                                                  "meta": str(seg_dir / "meta.json")}))
    df = model.predict(None, [encode_png(img) for img in rgb_images],
                       {"threshold": 0.0, "max_detections": 3})
    assert len(df) == 3 * len(rgb_images) and "mask" in df.columns
    json.dumps(df.to_dict("records"))  # what a REST response carries
    first = df.iloc[0]["mask"]
    decoded = mask_utils.decode({"size": first["size"], "counts": first["counts"].encode()})
    assert decoded.shape == rgb_images[0].shape[:2]
    direct = seg_detector.predict(rgb_images, threshold=0.0, max_detections=3)
    assert list(df["mask"]) == list(direct["mask"])


def test_masks_are_filled_translucent_in_the_class_colour():
    image = Image.fromarray(np.zeros((40, 60, 3), np.uint8))
    mask = np.zeros((40, 60), bool)
    mask[10:30, 20:50] = True
    det = {"class_id": 1, "class_name": "b", "score": 0.9, "x1": 0.0, "y1": 0.0, "x2": 59.0,
           "y2": 39.0}
    for m in (mask, encode_rle(mask[None])[0]):
        out = np.asarray(draw_detections(image, [{**det, "mask": m}]))
        colour = np.array([60, 180, 75])  # class 1's colour
        np.testing.assert_array_equal(out[20, 35], np.round(colour * MASK_ALPHA))
        assert not out[20, 10].any() and not out[35, 35].any()  # off the mask: untouched
    plain = np.asarray(draw_detections(image, [det]))
    assert not plain[20, 35].any()
    with pytest.raises(ValueError, match="original image size"):
        draw_detections(image, [{**det, "mask": mask.T}])


def test_predict_command_draws_masks_and_writes_rle(seg_dir, rgb_images, tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    for i, img in enumerate(rgb_images):
        (src / f"{i}.png").write_bytes(encode_png(img))
    out = tmp_path / "out"
    assert predict_command(str(seg_dir), [src], out, threshold=0.0) == 0
    summary = json.loads((out / "detections.json").read_text())
    for rec in summary["images"]:
        assert rec["detections"] and all(d["mask"]["size"] == [rec["height"], rec["width"]]
                                         for d in rec["detections"])
        masks = decode_rle([d["mask"] for d in rec["detections"]])
        drawn = np.asarray(Image.open(out / rec["output"]), np.float32)
        src_img = np.asarray(Image.open(src / rec["output"].replace(".jpg", ".png")), np.float32)
        on = masks.any(0)  # where masks lie, the picture changed (beyond JPEG noise)
        assert on.any() and np.abs(drawn[on] - src_img[on]).mean() > 10


def test_evaluate_table_shows_segm_beside_bbox():
    h, w = 50, 60
    m = np.zeros((1, h, w), bool)
    m[10:30, 10:40] = True
    rec = {"image_id": 1, "width": w, "height": h, "gt_boxes": np.array([[10, 10, 40, 30]], np.float32),
           "gt_labels": np.array([0]), "boxes": np.array([[10, 10, 40, 30]], np.float32),
           "labels": np.array([0]), "scores": np.array([0.9], np.float32),
           "gt_masks": encode_rle(m), "masks": encode_rle(np.roll(m, 12, axis=2))}
    metrics = coco_metrics_all([rec], ["tumor"])
    table = format_table(metrics, "model on data [val], 1 images")
    assert "bbox    segm" in table.splitlines()[1]
    assert "map             1.0000  0.0000" in table
    assert "AP bbox AP segm" in table and "tumor" in table
    assert {"map", "map_segm", "mar_segm"} <= set(scalar_keys(metrics))


def test_decoded_onnx_masks_reach_the_same_mask_logits(tmp_path):
    """A ``--postprocess`` graph returns mask probabilities; its postprocessor turns them back
    into logits, so the masks at the original size are those of the torch model."""
    from test_onnx_export import MaskHead

    from raydetr.model.postprocess import PostProcessor
    from raydetr.serve.onnx import check_images, export_onnx, load_runtime

    model = MaskHead().eval()
    meta = {"classes": ["a", "b", "c"], "num_classes": 3, "model": {"preset": "mask-test"},
            "resolution": 32}
    path, _ = export_onnx(model, tmp_path / "dec.onnx", resolution=32, meta=meta,
                          postprocess=True, top_k=4)
    runtime, post, _ = load_runtime(path)
    images = check_images(32, 2)
    sizes = torch.tensor([[40, 50], [32, 20]])
    got = post(runtime(images), sizes, top_k=4)
    with torch.no_grad():
        want = PostProcessor()(model(images), sizes, top_k=4)
    for g, w, (h, wd) in zip(got, want, sizes.tolist()):
        clear = w["mask_logits"].abs() > 1e-2  # away from 0, the sign is the same
        assert (g["mask_logits"][clear].sign() == w["mask_logits"][clear].sign()).all()
        a = torch.cat(list(masks_at_size(g["mask_logits"], (h, wd))))
        b = torch.cat(list(masks_at_size(w["mask_logits"], (h, wd))))
        assert (a != b).float().mean() < 1e-3


def test_run_evaluation_reports_segm_for_a_seg_model(seg_detector, tmp_path, monkeypatch, capsys):
    """``raydetr evaluate``'s path with a seg model: on a box-only dataset bbox alone (said);
    with masks in the val targets (here each box filled, at the model input size, until the
    prepared format carries masks) bbox and segm, from the same records."""
    import raydetr.serve.evaluation as serve_eval
    from raydetr.data.parquet import prepare_dataset
    from raydetr.data.synthetic import make_synthetic

    raw = make_synthetic(tmp_path / "shapes", train_images=2, val_images=10, image_size=64, seed=4)
    prepared = tmp_path / "prepared"
    prepare_dataset(Path(raw), prepared)
    boxes_only = serve_eval.run_evaluation(seg_detector, prepared, "val")
    assert "map_segm" not in boxes_only and boxes_only["images"] == 10
    assert "bbox metrics only" in capsys.readouterr().err

    real = serve_eval.iter_local_batches

    def with_box_masks(*args, **kwargs):
        for batch in real(*args, **kwargs):
            s = batch["images"].shape[-1]
            for t in batch["targets"]:
                m = torch.zeros(len(t["boxes"]), s, s, dtype=torch.bool)
                for i, (cx, cy, w, h) in enumerate(t["boxes"].tolist()):
                    m[i, int((cy - h / 2) * s):int((cy + h / 2) * s) + 1,
                      int((cx - w / 2) * s):int((cx + w / 2) * s) + 1] = True
                t["masks"] = m
            yield batch

    monkeypatch.setattr(serve_eval, "iter_local_batches", with_box_masks)
    both = serve_eval.run_evaluation(seg_detector, prepared, "val")
    assert both["map"] == boxes_only["map"] and both["images"] == 10
    assert {"map_segm", "map50_segm", "mar_segm", "per_class_segm"} <= set(both)
    assert "segm" in format_table(both, "seg on shapes").splitlines()[1]
