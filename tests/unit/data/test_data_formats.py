"""Readers: YOLO (shared thermal dataset), COCO plain/Roboflow, VOC -> canonical records."""

from __future__ import annotations

import numpy as np
import pytest

from raydetr.data.dataset import read_dataset
from raydetr.data.formats import DatasetError, detect_format


def test_yolo_thermal(thermal_dir):
    splits = read_dataset(thermal_dir)
    assert {k: len(v.records) for k, v in splits.items()} == {"train": 142, "val": 41, "test": 20}
    for data in splits.values():
        assert data.classes == ["dog", "person"] and data.source_format == "yolo"
        assert data.report.negatives > 0
        assert data.report.negatives == sum(len(r.labels) == 0 for r in data.records)
        for r in data.records:
            assert (r.width, r.height) == (416, 416) and r.image_path.is_file()
            assert r.boxes_xyxy.dtype == np.float32 and r.labels.dtype == np.int64
            assert r.boxes_xyxy.shape == (len(r.labels), 4)
            assert (r.boxes_xyxy[:, 2:] > r.boxes_xyxy[:, :2]).all()
            assert (r.boxes_xyxy >= 0).all() and (r.boxes_xyxy <= 416).all()
    names = [r.file_name for r in splits["train"].records]
    assert any(" " in n for n in names)
    assert "IMG_0001 2_jpg.rf.a64c70befa56fe10f85e72fee63c4c01.jpg" in names
    assert len({r.image_id for r in splits["train"].records}) == 142


def test_yolo_label_values(make_yolo):
    splits = read_dataset(make_yolo())  # 40x30 images; '../train/images' resolved in the root
    a = next(r for r in splits["train"].records if r.file_name == "a 1.png")
    np.testing.assert_allclose(a.boxes_xyxy, [[10, 7.5, 30, 22.5], [6, 3, 10, 9]], atol=1e-4)
    assert a.labels.tolist() == [0, 1]
    assert splits["train"].report.negatives == 1 and list(splits) == ["train", "val"]


def test_yolo_yaml_absolute_and_missing_label_file(make_yolo, tmp_path):
    root = make_yolo()
    (root / "data.yaml").write_text(f"path: {root}\ntrain: train/images\nval: valid/images\n"
                                    "names: {0: dog, 1: person}\n")
    (root / "valid" / "labels" / "c.txt").unlink()
    splits = read_dataset(root)
    assert splits["val"].report.negatives == 1
    assert any("no label file" in w for w in splits["val"].report.warnings)


@pytest.mark.parametrize("layout", ["roboflow", "plain", "file"])
def test_coco_layouts(make_coco, layout):
    src = make_coco(layout)
    assert detect_format(src) == "coco"
    splits = read_dataset(src)
    assert set(splits) == ({"train"} if layout == "file" else {"train", "val"})
    train = splits["train"]
    assert train.classes == ["cat", "ant"]  # sorted category ids 1, 3; Roboflow id 0 skipped
    r0, r1, r2 = train.records
    np.testing.assert_allclose(r0.boxes_xyxy, [[2, 3, 12, 11], [20, 10, 35, 25]])
    assert r0.labels.tolist() == [0, 1] and r1.labels.tolist() == [1]
    assert r2.labels.size == 0 and train.report.negatives == 1
    assert r0.file_name == "img 0.png" and r0.image_path.is_file()


def test_coco_superclass_with_annotations_is_kept(make_coco):
    def edit(split, data):
        data["annotations"].append({"id": 9, "image_id": data["images"][2]["id"],
                                    "category_id": 0, "bbox": [1, 1, 4, 4]})

    splits = read_dataset(make_coco("roboflow", edit))
    assert splits["train"].classes == ["bugs", "cat", "ant"]


def test_coco_size_mismatch_uses_real_size_and_clips(make_coco):
    def edit(split, data):
        data["images"][0]["width"] = 400  # declared wrong; file is 40x30
        data["annotations"][1]["bbox"] = [30, 20, 50, 50]  # sticks out of 40x30

    splits = read_dataset(make_coco("roboflow", edit))
    r0, rep = splits["train"].records[0], splits["train"].report
    assert (r0.width, r0.height) == (40, 30)
    np.testing.assert_allclose(r0.boxes_xyxy[1], [30, 20, 40, 30])
    assert rep.size_mismatches == 1 and rep.clipped_boxes == 1
    assert any("annotation id 2" in w and "clipped" in w for w in rep.warnings)


def test_coco_crowd_counted(make_coco):
    def edit(split, data):
        data["annotations"][0]["iscrowd"] = 1

    rep = read_dataset(make_coco("roboflow", edit))["train"].report
    assert rep.skipped_crowd == 1 and rep.boxes == 2


def test_voc(make_voc):
    splits = read_dataset(make_voc())
    assert splits["train"].classes == ["bird", "horse"] and splits["train"].source_format == "voc"
    r0, r1 = splits["train"].records
    np.testing.assert_allclose(r0.boxes_xyxy, [[0, 0, 10, 10], [4, 5, 20, 25]])  # 1-based xmin
    assert r0.labels.tolist() == [1, 0] and r1.labels.size == 0
    assert len(splits["val"].records) == 1


def test_unused_files_are_reported(make_voc, make_yolo):
    voc = make_voc(sets={"train": ["0001"], "val": ["0003"]})
    assert "1 annotation file(s) in no ImageSets/Main list" in read_dataset(voc)["train"].report.warnings[0]
    yolo = make_yolo()
    (yolo / "train" / "images" / "notes.txt").write_text("x")
    warnings = read_dataset(yolo)["train"].report.warnings
    assert any("1 non-image file(s) ignored" in w and "notes.txt" in w for w in warnings)


def test_voc_given_classes(make_voc):
    src = make_voc()
    splits = read_dataset(src, classes=["horse", "bird", "cow"])
    assert splits["train"].records[0].labels.tolist() == [0, 1]
    with pytest.raises(DatasetError, match="unknown class 'horse'"):
        read_dataset(src, classes=["bird"])


def test_unknown_layout(tmp_path):
    with pytest.raises(DatasetError, match="cannot tell the dataset format"):
        read_dataset(tmp_path)
    with pytest.raises(DatasetError, match="not found"):
        read_dataset(tmp_path / "nope")
