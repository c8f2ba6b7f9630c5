"""Every bad input gives a DatasetError naming the file and the image / annotation id / line."""

from __future__ import annotations

import pytest

from raydetr.data.dataset import read_dataset
from raydetr.data.formats import DatasetError


def _coco_error(make_coco, edit, layout="roboflow") -> str:
    with pytest.raises(DatasetError) as info:
        read_dataset(make_coco(layout, edit))
    return str(info.value)


def _only_train(fn):
    return lambda split, data: fn(data) if split == "train" else None


def test_coco_missing_image(make_coco):
    msg = _coco_error(make_coco, _only_train(
        lambda d: d["images"].append({"id": 7, "file_name": "gone.png", "width": 4, "height": 4})))
    assert "train/_annotations.coco.json image id 7 ('gone.png')" in msg
    assert "image file not found" in msg


def test_coco_undecodable_image(make_coco, tmp_path):
    def edit(data):
        (tmp_path / "coco-roboflow" / "train" / "img 1.png").write_bytes(b"not an image")

    msg = _coco_error(make_coco, _only_train(edit))
    assert "image id 1 ('img 1.png')" in msg and "cannot decode image" in msg


def test_coco_truncated_png(make_coco, tmp_path):
    def edit(data):
        p = tmp_path / "coco-roboflow" / "train" / "img 1.png"
        p.write_bytes(p.read_bytes()[:-20])

    assert "image id 1 ('img 1.png')" in _coco_error(make_coco, _only_train(edit))


def test_coco_non_positive_box(make_coco):
    msg = _coco_error(make_coco, _only_train(
        lambda d: d["annotations"][1].update(bbox=[3, 3, 0, 5])))
    assert "_annotations.coco.json annotation id 2 (image id 0, 'img 0.png')" in msg
    assert "non-positive size" in msg


def test_coco_box_outside_image(make_coco):
    msg = _coco_error(make_coco, _only_train(
        lambda d: d["annotations"][0].update(bbox=[100, 100, 5, 5])))
    assert "annotation id 1" in msg and "entirely outside" in msg


def test_coco_unknown_category(make_coco):
    msg = _coco_error(make_coco, _only_train(
        lambda d: d["annotations"][0].update(category_id=42)))
    assert "annotation id 1" in msg and "unknown category id 42" in msg


def test_coco_annotation_for_unknown_image(make_coco):
    msg = _coco_error(make_coco, _only_train(
        lambda d: d["annotations"][0].update(image_id=555)))
    assert "annotation id 1 refers to unknown image id 555" in msg


def test_coco_duplicate_image_id(make_coco):
    msg = _coco_error(make_coco, _only_train(lambda d: d["images"][1].update(id=0)))
    assert "train/_annotations.coco.json: duplicate image id 0 ('img 0.png' and 'img 1.png')" in msg


def test_coco_duplicate_image_id_plain(make_coco):
    msg = _coco_error(make_coco, _only_train(lambda d: d["images"][1].update(id=0)), "plain")
    assert "annotations/instances_train.json: duplicate image id 0" in msg


def test_coco_empty_split(make_coco):
    def edit(split, data):
        if split == "val":
            data["images"], data["annotations"] = [], []

    assert "valid/_annotations.coco.json: split 'val' has no images" in _coco_error(make_coco, edit)


def test_all_problems_listed_up_to_a_limit(make_coco):
    def edit(data):
        data["annotations"] += [{"id": 1000 + k, "image_id": 0, "category_id": 99,
                                 "bbox": [1, 1, 2, 2]} for k in range(25)]
        data["annotations"][0]["bbox"] = [1, 1, -1, 2]

    msg = _coco_error(make_coco, _only_train(edit))
    assert msg.startswith("26 problem(s) in dataset")
    assert "annotation id 1 " in msg and "annotation id 1000 " in msg  # not just the first
    assert "... and 6 more" in msg


def _yolo_error(make_yolo, **kw) -> str:
    with pytest.raises(DatasetError) as info:
        read_dataset(make_yolo(**kw))
    return str(info.value)


def test_yolo_class_out_of_range(make_yolo):
    msg = _yolo_error(make_yolo, labels={"train": {"x y": "0 0.5 0.5 0.1 0.1\n2 0.5 0.5 0.1 0.1\n"}})
    assert "train/labels/x y.txt:2: class index 2 out of range 0..1" in msg


def test_yolo_non_positive_box(make_yolo):
    msg = _yolo_error(make_yolo, labels={"train": {"x": "\n1 0.5 0.5 0 0.1\n"}})
    assert "train/labels/x.txt:2: box has non-positive size" in msg


def test_yolo_bad_line(make_yolo):
    msg = _yolo_error(make_yolo, labels={"train": {"x": "1 0.5 0.5 0.1\n0 a b c d\n"}})
    assert "x.txt:1: expected 'class cx cy w h' (5 values) or a segment" in msg and "got 4" in msg
    assert "x.txt:2: not numbers" in msg


def test_yolo_box_clipped_counted(make_yolo):
    root = make_yolo(labels={"train": {"x": "0 0.95 0.5 0.2 0.2\n"}})
    rep = read_dataset(root)["train"].report
    assert rep.clipped_boxes == 1 and "x.txt:1: box clipped" in rep.warnings[0]


def test_yolo_undecodable_image(make_yolo):
    root = make_yolo()
    (root / "train" / "images" / "b.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(DatasetError, match=r"train image id 1 \('b.png'\): cannot decode image"):
        read_dataset(root)


def test_yolo_empty_split(make_yolo):
    root = make_yolo()
    for p in (root / "valid" / "images").iterdir():
        p.unlink()
    with pytest.raises(DatasetError, match=r"data.yaml: split 'val' .* has no images"):
        read_dataset(root)


def test_yolo_split_folder_fallback_and_missing(make_yolo):
    root = make_yolo(yaml_text="train: ../train/images\nval: nowhere/images\nnames: [dog, person]\n")
    splits = read_dataset(root)  # falls back to <root>/valid/images, and says so
    assert len(splits["val"].records) == 1
    assert "data.yaml: val: 'nowhere/images' not found; used" in splits["val"].report.warnings[0]
    for p in (root / "valid").rglob("*"):
        if p.is_file():
            p.unlink()
    (root / "valid" / "images").rmdir()
    with pytest.raises(DatasetError, match="data.yaml: val: 'nowhere/images' not found; tried"):
        read_dataset(root)


def test_yolo_nc_mismatch(make_yolo):
    msg = _yolo_error(make_yolo, yaml_text="train: train/images\nnc: 3\nnames: [dog, person]\n")
    assert "nc=3 but 'names' has 2 entries" in msg


def test_voc_problems(make_voc):
    root = make_voc(objects={"0001": [("bird", 10, 10, 5, 20)], "0002": [("bird", 1, 1, 5, 5)]},
                    sets={"train": ["0001", "0002", "0002", "0009"]})
    (root / "JPEGImages" / "0002.jpg.png").unlink()
    with pytest.raises(DatasetError) as info:
        read_dataset(root)
    msg = str(info.value)
    assert "Annotations/0001.xml (image id '0001') object 0 'bird': box has non-positive size" in msg
    assert "Annotations/0002.xml (image id '0002'): image file not found" in msg
    assert "ImageSets/Main/train.txt: duplicate image id '0002'" in msg
    assert "Annotations/0009.xml (image id '0009' from" in msg
