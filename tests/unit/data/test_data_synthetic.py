"""Synthetic shapes: deterministic, Roboflow COCO layout, tight boxes, readable by formats."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from raydetr.data.dataset import read_dataset
from raydetr.data.formats import DatasetError
from raydetr.data.synthetic import draw_image, make_synthetic


def test_deterministic(tmp_path):
    a = make_synthetic(tmp_path / "a", train_images=6, val_images=3, image_size=64, seed=3)
    b = make_synthetic(tmp_path / "b", train_images=6, val_images=3, image_size=64, seed=3)
    c = make_synthetic(tmp_path / "c", train_images=6, val_images=3, image_size=64, seed=4)
    for split in ("train", "valid"):
        ja = (a / split / "_annotations.coco.json").read_text()
        assert ja == (b / split / "_annotations.coco.json").read_text()
        assert ja != (c / split / "_annotations.coco.json").read_text()
        for f in sorted((a / split).glob("*.jpg")):
            assert f.read_bytes() == (b / split / f.name).read_bytes()


def test_reads_as_coco_with_tight_boxes(tmp_path):
    out = make_synthetic(tmp_path / "s", train_images=8, val_images=2, image_size=96, seed=0,
                         max_objects=3)
    splits = read_dataset(out)
    assert splits["train"].classes == ["rectangle", "ellipse", "triangle"]
    assert len(splits["train"].records) == 8 and len(splits["val"].records) == 2
    for r in splits["train"].records:
        assert 1 <= len(r.labels) <= 3 and set(r.labels.tolist()) <= {0, 1, 2}
        side = np.minimum(r.boxes_xyxy[:, 2] - r.boxes_xyxy[:, 0], r.boxes_xyxy[:, 3] - r.boxes_xyxy[:, 1])
        assert (side >= 0.09 * 96).all()
        assert (r.boxes_xyxy >= 0).all() and (r.boxes_xyxy <= 96).all()
        assert Image.open(r.image_path).size == (96, 96)
    assert json.loads((out / "synthetic.json").read_text())["seed"] == 0


def test_boxes_tight_to_drawn_pixels():
    for k in range(30):  # one shape per image: every box edge touches the shape, nothing outside
        image, boxes, labels = draw_image(np.random.default_rng(k), 64, max_objects=1)
        x1, y1, x2, y2 = (int(v) for v in boxes[0])
        px = np.asarray(image).astype(int)
        inside = px[y1:y2, x1:x2]
        colour = inside[(y2 - y1) // 2, (x2 - x1) // 2] if labels[0] != 2 else None
        if colour is None:  # triangle: the colour is the most common one in the box
            vals, counts = np.unique(inside.reshape(-1, 3), axis=0, return_counts=True)
            colour = vals[counts.argmax()]
        mask = (px == colour).all(-1)
        ys, xs = np.nonzero(mask)
        assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x1, y1, x2, y2)


def test_reuse_and_conflicts(tmp_path):
    out = make_synthetic(tmp_path / "s", train_images=2, val_images=1, image_size=32)
    stamp = (out / "train" / "000000.jpg").stat().st_mtime_ns
    assert make_synthetic(out, train_images=2, val_images=1, image_size=32) == out
    assert (out / "train" / "000000.jpg").stat().st_mtime_ns == stamp
    with pytest.raises(DatasetError, match="pass overwrite=True"):
        make_synthetic(out, train_images=3, val_images=1, image_size=32)
    make_synthetic(out, train_images=3, val_images=1, image_size=32, overwrite=True)
    assert len(list((out / "train").glob("*.jpg"))) == 3
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "f").write_text("x")
    with pytest.raises(DatasetError, match="not a raydetr synthetic dataset"):
        make_synthetic(tmp_path / "other", overwrite=True)
