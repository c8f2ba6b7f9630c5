"""Instance masks through the data path: COCO polygons / RLE and YOLO segments -> compressed RLE
in the Parquet shards -> targets["masks"] after augmentation, for segmentation presets only."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pycocotools.mask as mask_utils
import pytest

from raydetr.config import DataConfig, load_config
from raydetr.data import masks as mk
from raydetr.data import rfdetr_augment as A
from raydetr.data.dataset import read_dataset
from raydetr.data.formats import DatasetError
from raydetr.data.loader import SplitReader, iter_local_batches
from raydetr.data.parquet import load_info, prepare_dataset
from raydetr.data.synthetic import make_synthetic
from raydetr.data.transforms import random_geometric_instances
from raydetr.fit.cluster import FitError
from raydetr.fit.driver import dataset_info

W, H = 40, 30  # the size of the images conftest writes

# Polygons inside the 40 x 30 test images, one per annotation of conftest.coco_dict.
TRIANGLE = [2.0, 3.0, 12.0, 3.0, 7.0, 11.0]
L_SHAPE = [20.0, 10.0, 35.0, 10.0, 35.0, 15.0, 25.0, 15.0, 25.0, 25.0, 20.0, 25.0]
SQUARE = [1.0, 1.0, 6.0, 1.0, 6.0, 6.0, 1.0, 6.0]


def _with_polygons(split: str, data: dict) -> None:
    for ann, poly in zip(data["annotations"], (TRIANGLE, L_SHAPE, SQUARE)):
        ann["segmentation"] = [poly]


# --------------------------------------------------------------------------- encoding
@pytest.mark.parametrize("poly", [TRIANGLE, L_SHAPE, SQUARE,
                                  [5.5, 2.25, 37.75, 8.5, 30.0, 28.0, 9.0, 20.5]])
def test_polygon_rle_area_round_trip(poly):
    """polygon -> RLE -> pixels: the pixel area is the polygon's area up to the boundary pixels,
    and decode/encode of the stored form is lossless."""
    rle = mk.polygon_rle([poly], H, W)
    pixels = mk.decode([rle], H, W)
    assert pixels.shape == (1, H, W) and pixels.dtype == bool
    xs, ys = poly[0::2], poly[1::2]
    perimeter = sum(np.hypot(np.diff(xs + xs[:1]), np.diff(ys + ys[:1])))
    assert abs(int(pixels.sum()) - mk.polygon_area(poly)) <= perimeter / 2
    assert mk.area(rle, H, W) == int(pixels.sum())
    assert mk.encode(pixels) == [rle]
    x1, y1, x2, y2 = mk.bbox_xyxy(rle, H, W)
    assert abs(x1 - min(xs)) <= 1 and abs(y1 - min(ys)) <= 1
    assert abs(x2 - max(xs)) <= 1 and abs(y2 - max(ys)) <= 1


def test_polygon_parts_are_one_instance():
    two = mk.polygon_rle([TRIANGLE, L_SHAPE], H, W)
    assert mk.area(two, H, W) == (mk.area(mk.polygon_rle([TRIANGLE], H, W), H, W)
                                  + mk.area(mk.polygon_rle([L_SHAPE], H, W), H, W))


# --------------------------------------------------------------------------- COCO reading
def test_coco_polygons_and_rle_become_masks(make_coco):
    def edit(split, data):
        _with_polygons(split, data)
        m = np.zeros((H, W), np.uint8, order="F")
        m[12:20, 22:30] = 1
        compressed = mask_utils.encode(m)
        data["annotations"][1]["segmentation"] = {"size": [H, W],
                                                  "counts": compressed["counts"].decode()}
        # an uncompressed RLE (COCO's crowd style) on a non-crowd instance
        flat = m.flatten(order="F")
        runs, cur, n = [], 0, 0
        for v in flat:
            if v != cur:
                runs.append(n)
                cur, n = v, 0
            n += 1
        runs.append(n)
        data["annotations"][2]["segmentation"] = {"size": [H, W], "counts": runs}

    splits = read_dataset(make_coco(edit=edit))
    rec = splits["train"].records[0]
    assert splits["train"].has_masks and len(rec.masks) == len(rec.boxes_xyxy) == 2
    assert mk.area(rec.masks[1], H, W) == 64
    assert mk.decode(rec.masks, H, W)[0].sum() == mk.area(mk.polygon_rle([TRIANGLE], H, W), H, W)
    assert mk.area(splits["train"].records[1].masks[0], H, W) == 64
    assert splits["train"].report.masks == 3


def test_crowd_skipped_box_only_instance_gets_its_box(make_coco):
    def edit(split, data):
        data["annotations"][0]["segmentation"] = [TRIANGLE]
        data["annotations"][1]["segmentation"] = []               # no mask: its box stands in
        data["annotations"][2].update(iscrowd=1, segmentation={"size": [H, W], "counts": [H * W]})

    split = read_dataset(make_coco(edit=edit))["train"]
    rec = split.records[0]
    assert mk.area(rec.masks[1], H, W) == 15 * 15       # bbox [20, 10, 15, 15]
    assert split.report.box_masks == 1 and split.report.skipped_crowd == 1
    assert split.records[1].masks == []                  # only the crowd region: nothing kept
    assert any("annotation id 2" in w and "box is used" in w for w in split.report.warnings)


def test_detection_coco_has_no_masks(make_coco):
    split = read_dataset(make_coco())["train"]
    assert not split.has_masks and all(r.masks is None for r in split.records)


@pytest.mark.parametrize("segmentation, message", [
    ({"size": [H + 1, W], "counts": [(H + 1) * W]}, "RLE size [31, 40] (height, width) is not"),
    ({"size": [H, W], "counts": [5, 7]}, "summing to height x width"),
    ({"size": [H, W], "counts": "not an rle"}, "compressed RLE 'counts' is not valid"),
    ("polygon?", "must be a list of polygons or an RLE dict"),
])
def test_bad_rle_is_an_error_naming_the_annotation(make_coco, segmentation, message):
    def edit(split, data):
        _with_polygons(split, data)
        data["annotations"][1]["segmentation"] = segmentation

    with pytest.raises(DatasetError) as err:
        read_dataset(make_coco(edit=edit))
    text = str(err.value)
    assert message in text and "annotation id 2 (image id 0" in text
    assert "_annotations.coco.json" in text


def test_bad_polygons_are_counted_drops_naming_the_annotation(make_coco):
    def edit(split, data):
        _with_polygons(split, data)
        data["annotations"][0]["segmentation"] = [[2, 3, 12, 3], TRIANGLE]    # one bad part
        data["annotations"][1]["segmentation"] = [[20, 10, 30, 10]]           # 2 points only
        data["annotations"][2]["segmentation"] = [[1, 1, 3, 3, 5, 5]]         # no pixels

    split = read_dataset(make_coco(edit=edit))["train"]
    rep = split.report
    assert rep.dropped_mask_parts == 2 and rep.dropped_instances == 2
    assert [len(r.boxes_xyxy) for r in split.records] == [1, 0, 0]
    assert len(split.records[0].masks) == 1
    warnings = "\n".join(rep.warnings)
    assert "annotation id 1 (image id 0" in warnings and "part 0 dropped" in warnings
    assert "annotation id 2 (image id 0" in warnings and "instance dropped" in warnings
    assert "annotation id 3 (image id 1" in warnings and "no pixels" in warnings


def test_polygon_outside_the_image_is_clipped_and_counted(make_coco):
    def edit(split, data):
        _with_polygons(split, data)
        data["annotations"][1]["segmentation"] = [[20, 10, 60, 10, 60, 45, 20, 45]]

    split = read_dataset(make_coco(edit=edit))["train"]
    assert split.report.clipped_masks == 1
    assert mk.area(split.records[0].masks[1], H, W) == (W - 20) * (H - 10)
    assert any("annotation id 2" in w and "clipped" in w for w in split.report.warnings)


# --------------------------------------------------------------------------- YOLO segments
def test_yolo_segments_become_masks_and_boxes(make_yolo):
    root = make_yolo(labels={"train": {"a 1": "0 0.1 0.1 0.6 0.1 0.35 0.9\n1 0.8 0.5 0.2 0.4\n",
                                       "b": "1 0.1 0.1 0.5 0.5 0.3 0.3\n"}})
    split = read_dataset(root)["train"]
    rec = next(r for r in split.records if r.file_name == "a 1.png")
    assert split.has_masks and len(rec.masks) == 2
    np.testing.assert_allclose(rec.boxes_xyxy[0], [0.1 * W, 0.1 * H, 0.6 * W, 0.9 * H], atol=1e-4)
    tri = [0.1 * W, 0.1 * H, 0.6 * W, 0.1 * H, 0.35 * W, 0.9 * H]
    assert mk.area(rec.masks[0], H, W) == mk.area(mk.polygon_rle([tri], H, W), H, W)
    assert mk.area(rec.masks[1], H, W) == pytest.approx(0.2 * W * 0.4 * H, abs=1)  # box line
    assert split.report.box_masks == 1
    assert split.report.dropped_instances == 1      # b: a collinear "polygon", no pixels
    assert any("b.txt:1" in w and "no pixels" in w for w in split.report.warnings)
    # the other split has box lines only, but the dataset has masks: every instance has one
    val = read_dataset(root)["val"]
    assert val.has_masks and len(val.records[0].masks) == 1


def test_yolo_detection_has_no_masks_and_bad_segment_is_named(make_yolo):
    split = read_dataset(make_yolo())["train"]
    assert not split.has_masks and all(r.masks is None for r in split.records)
    with pytest.raises(DatasetError, match=r"a 1.txt:1: expected .* segment .* got 6"):
        read_dataset(make_yolo(labels={"train": {"a 1": "0 0.1 0.1 0.6 0.1 0.35\n"}}))


# --------------------------------------------------------------------------- augmentation
def _painted(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """An image whose instance k is painted in colour k+1 exactly where its mask is."""
    rng = np.random.default_rng(seed)
    h, w = 60, 80
    image = np.zeros((h, w, 3), np.uint8)
    masks, boxes = [], []
    for k in range(3):
        x1, y1 = int(rng.integers(0, w - 20)), int(rng.integers(0, h - 20))
        x2, y2 = x1 + int(rng.integers(8, 20)), y1 + int(rng.integers(8, 20))
        m = np.zeros((h, w), bool)
        m[y1:y2, x1:x2] = True
        image[m & ~np.any(masks, axis=0) if masks else m] = 40 * (k + 1)
        masks.append(m & (image[..., 0] == 40 * (k + 1)))
        boxes.append([x1, y1, x2, y2])
    return image, np.array(boxes, np.float32), np.arange(3, dtype=np.int64), np.stack(masks)


@pytest.mark.parametrize("seed", range(12))
def test_flips_and_crops_keep_masks_on_their_pixels_and_boxes(seed):
    image, boxes, labels, masks = _painted(seed)
    rng = np.random.default_rng(seed)
    out, b, lab, m = random_geometric_instances(image, boxes, labels, masks, rng,
                                                hflip_prob=0.5, crop_prob=1.0)
    assert m.shape == (len(b), *out.shape[:2]) and len(lab) == len(b)
    for mask, box, label in zip(m, b, lab):
        # the mask still covers exactly the pixels of its instance's colour
        np.testing.assert_array_equal(mask, out[..., 0] == 40 * (label + 1))
        ys, xs = np.nonzero(mask)
        if len(xs):  # and lies inside its (clipped) box
            assert xs.min() >= box[0] - 1e-4 and xs.max() + 1 <= box[2] + 1e-4
            assert ys.min() >= box[1] - 1e-4 and ys.max() + 1 <= box[3] + 1e-4


@pytest.mark.parametrize("seed", range(8))
def test_rfdetr_augment_drops_masks_with_their_boxes(seed):
    """RF-DETR's branches (flip, square / resize-crop-resize): masks at S follow the boxes;
    instances cropped away lose their masks too."""
    image, boxes, labels, masks = _painted(seed)
    s = A.resize(A.Sample(image, boxes, labels, masks), 600, 800)  # large enough for branch B
    out = A.augment(s, np.random.default_rng(seed), 372)
    assert out.masks.shape == (len(out.boxes_xyxy), 372, 372)
    for mask, box in zip(out.masks, out.boxes_xyxy):
        ys, xs = np.nonzero(mask)
        assert len(xs) > 0
        assert xs.min() >= box[0] - 2 and xs.max() + 1 <= box[2] + 2
        assert ys.min() >= box[1] - 2 and ys.max() + 1 <= box[3] + 2


# --------------------------------------------------------------------------- shards + loader
@pytest.fixture
def seg_prepared(make_coco, tmp_path: Path) -> Path:
    out = tmp_path / "prepared-seg"
    prepare_dataset(make_coco(edit=_with_polygons), out, progress=False)
    return out


def test_parquet_round_trip_of_masks(seg_prepared, make_coco, tmp_path):
    info = load_info(seg_prepared)
    assert info["masks"] is True and info["splits"]["train"]["masks"] == 3
    table = pq.read_table(seg_prepared / info["splits"]["train"]["files"][0])
    stored = table.column("masks").to_pylist()
    assert stored[0] == [mk.polygon_rle([TRIANGLE], H, W), mk.polygon_rle([L_SHAPE], H, W)]
    assert stored[2] == []
    box_only = tmp_path / "prepared-boxes"
    prepare_dataset(make_coco(layout="plain"), box_only, progress=False)
    assert load_info(box_only)["masks"] is False
    t = pq.read_table(box_only / load_info(box_only)["splits"]["train"]["files"][0])
    assert t.column("masks").to_pylist() == [None, None, None]


def test_loader_yields_masks_only_when_asked(seg_prepared):
    for augment in ("raydetr", "rfdetr", "none"):
        cfg = DataConfig(augment=augment, multi_scale=False)
        batch = next(iter_local_batches(seg_prepared, "train", batch_size=3, train=True,
                                        resolution=48, data_cfg=cfg, masks=True))
        for t in batch["targets"]:
            assert t["masks"].dtype.is_floating_point is False and t["masks"].dtype.itemsize == 1
            assert tuple(t["masks"].shape) == (len(t["boxes"]), 48, 48)
            assert all(m.any() for m in t["masks"])
    val = next(iter_local_batches(seg_prepared, "val", batch_size=3, train=False, resolution=48,
                                  data_cfg=DataConfig(), masks=True))
    t0 = next(t for t in val["targets"] if int(t["image_id"]) == 100)
    assert t0["masks_rle"] == [mk.polygon_rle([TRIANGLE], H, W), mk.polygon_rle([L_SHAPE], H, W)]
    # the stored masks at model size are the resized originals: same fraction of the image
    full = mk.decode(t0["masks_rle"], H, W)
    np.testing.assert_allclose(t0["masks"].float().mean((1, 2)).numpy(), full.mean((1, 2)),
                               atol=0.02)
    # RF-DETR's per-step multi-scale: images at the step's size, masks stay at S (largest)
    reader = SplitReader(seg_prepared, "train", DataConfig(augment="rfdetr"), masks=True)
    for batch in reader.train_batches(seed=0, epoch=0, rank=0, world=1, batch_size=3,
                                      resolution=48, scales=(24, 36, 48)):
        assert batch["images"].shape[-1] in (24, 36, 48)
        assert all(tuple(t["masks"].shape[1:]) == (48, 48) for t in batch["targets"])
    plain = next(iter_local_batches(seg_prepared, "val", batch_size=3, train=False,
                                    resolution=48, data_cfg=DataConfig()))
    assert all("masks" not in t for t in plain["targets"])


def test_box_only_dataset_refused_for_masks(make_coco, tmp_path):
    out = tmp_path / "prepared-boxes"
    prepare_dataset(make_coco(), out, progress=False)
    with pytest.raises(DatasetError, match="has no instance masks"):
        SplitReader(out, "train", DataConfig(), masks=True)
    # an old shard without the masks column still reads for a detection preset
    info = load_info(out)
    shard = out / info["splits"]["train"]["files"][0]
    pq.write_table(pq.read_table(shard).drop_columns(["masks"]), shard)
    info["splits"]["train"].pop("shards")
    info.pop("masks")
    (out / "dataset.json").write_text(json.dumps(info))
    batch = next(iter_local_batches(out, "train", batch_size=3, train=False, resolution=32,
                                    data_cfg=DataConfig()))
    assert len(batch["targets"]) == 3


def test_seg_preset_on_box_only_dataset_fails_before_ray(make_coco, seg_prepared, tmp_path):
    out = tmp_path / "prepared-boxes"
    prepare_dataset(make_coco(), out, progress=False)
    seg = load_config(None, ["model.preset=rfdetr-seg-nano", "data.val_split=val"])
    with pytest.raises(FitError, match="rfdetr-seg-nano segments, but the dataset .* no instance"):
        dataset_info(out, seg)
    assert dataset_info(seg_prepared, seg)["masks"] is True
    det = load_config(None, ["model.preset=rfdetr-nano", "data.val_split=val"])
    assert dataset_info(seg_prepared, det)["masks"] is True  # a detection preset just ignores them


# --------------------------------------------------------------------------- a real export
@pytest.mark.slow
def test_prepare_brain_tumor_seg(brain_tumor_seg_dir, tmp_path):
    brain = brain_tumor_seg_dir
    info = prepare_dataset(brain, tmp_path / "bt", progress=False)
    assert info["masks"] is True
    for split, folder in (("train", "train"), ("val", "valid"), ("test", "test")):
        coco = json.loads((brain / folder / "_annotations.coco.json").read_text())
        with_seg = [a for a in coco["annotations"] if a.get("segmentation") and not a["iscrowd"]]
        s, rep = info["splits"][split], info["report"][split]
        assert s["images"] == len(coco["images"])
        assert s["boxes"] == s["masks"] == len(with_seg) - rep["dropped_instances"]
        assert rep["box_masks"] == 0
    # every stored mask lies on its box (the export's polygon and bbox agree)
    batch = next(iter_local_batches(tmp_path / "bt", "val", batch_size=32, train=False,
                                    resolution=312, data_cfg=DataConfig(), masks=True))
    n = 0
    for t in batch["targets"]:
        h, w = t["orig_size"].tolist()
        for rle, box in zip(t["masks_rle"], t["boxes"].numpy()):
            cx, cy, bw, bh = box * [w, h, w, h]
            mx1, my1, mx2, my2 = mk.bbox_xyxy(rle, h, w)
            assert abs(mx1 - (cx - bw / 2)) <= 2 and abs(mx2 - (cx + bw / 2)) <= 2
            assert abs(my1 - (cy - bh / 2)) <= 2 and abs(my2 - (cy + bh / 2)) <= 2
            n += 1
    assert n > 0


def test_synthetic_shapes_carry_masks_tight_to_their_boxes(tmp_path):
    raw = make_synthetic(tmp_path / "s", train_images=6, val_images=2, image_size=64, seed=1)
    split = read_dataset(raw)["train"]
    assert split.has_masks and split.report.box_masks == 0
    for r in split.records:
        assert len(r.masks) == len(r.boxes_xyxy) > 0
        for rle, box in zip(r.masks, r.boxes_xyxy):
            np.testing.assert_array_equal(mk.bbox_xyxy(rle, 64, 64), box)


@pytest.mark.parametrize("augment", ["rfdetr", "raydetr"])
def test_loader_masks_are_what_the_seg_criterion_takes(seg_prepared, augment):
    """A real batch (rfdetr: masks at S, images resized per step) into rfdetr-seg-nano's loss."""
    import torch

    from raydetr.model.build import build

    cfg = load_config(None, ["model.preset=rfdetr-seg-nano", "model.resolution=48",
                             f"data.augment={augment}"])
    torch.manual_seed(0)
    model, criterion, _ = build(cfg.model, cfg.loss, 2)
    batch = next(iter_local_batches(seg_prepared, "train", batch_size=2, train=True,
                                    resolution=48, data_cfg=cfg.data, masks=True,
                                    drop_last=True))
    assert any(len(t["masks"]) for t in batch["targets"])
    out = criterion(model.train()(batch["images"]), batch["targets"])
    assert torch.isfinite(out["loss"]) and out["loss_mask_dice"] >= 0
    out["loss"].backward()
