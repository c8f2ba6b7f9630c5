"""Augmentations keep image and boxes consistent; model input normalisation round trips."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from raydetr.data.formats import DatasetError
from raydetr.data.transforms import (
    crop_boxes,
    decode_image,
    denormalise,
    hflip,
    normalise_boxes,
    random_crop,
    random_geometric,
    to_model_input,
    to_model_input_torch,
)


def _scene(seed: int = 0, n: int = 4, h: int = 60, w: int = 80):
    """An image whose boxes are painted solid white on black, so pixels check the boxes."""
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, [w - 12, h - 12], (n, 2))
    wh = rng.uniform(6, 12, (n, 2))
    boxes = np.round(np.concatenate([xy, xy + wh], 1)).astype(np.float32)
    image = np.zeros((h, w, 3), np.uint8)
    for x1, y1, x2, y2 in boxes.astype(int):
        image[y1:y2, x1:x2] = 255
    return image, boxes, np.arange(n, dtype=np.int64)


def test_decode():
    buf = io.BytesIO()
    Image.new("L", (5, 4), 7).save(buf, format="PNG")
    img = decode_image(buf.getvalue())
    assert img.shape == (4, 5, 3) and img.dtype == np.uint8 and (img == 7).all()
    with pytest.raises(DatasetError, match="cannot decode image bytes"):
        decode_image(b"nope")


def test_hflip_twice_is_identity():
    image, boxes, _ = _scene()
    im1, b1 = hflip(image, boxes)
    assert (b1[:, 2] > b1[:, 0]).all()
    for x1, y1, x2, y2 in b1.astype(int):  # flipped boxes still cover their white pixels
        assert (im1[y1:y2, x1:x2] == 255).all()
    im2, b2 = hflip(im1, b1)
    assert np.array_equal(im2, image) and np.allclose(b2, boxes)


def test_crop_keeps_boxes_inside_and_consistent():
    for seed in range(50):
        image, boxes, labels = _scene(seed)
        rng = np.random.default_rng(seed)
        out, b, lab = random_geometric(image, boxes, labels, rng, hflip_prob=0.5, crop_prob=1.0)
        h, w = out.shape[:2]
        assert len(b) == len(lab) >= 1  # never crops away every box
        assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all()
        assert (b[:, 2] <= w).all() and (b[:, 3] <= h).all()
        assert ((b[:, 2] - b[:, 0]) >= 1).all() and ((b[:, 3] - b[:, 1]) >= 1).all()
        for x1, y1, x2, y2 in np.round(b).astype(int):
            assert (out[y1:y2, x1:x2] == 255).all()
        assert set(lab.tolist()) <= set(labels.tolist())


def test_crop_drops_mostly_cut_boxes():
    boxes = np.array([[0, 0, 10, 10], [8, 0, 18, 10], [20, 20, 30, 30]], np.float32)
    kept, keep = crop_boxes(boxes, 0, 0, 12, 40)  # 2nd box keeps 40% of its area, 3rd none
    assert keep.tolist() == [True, False, False]
    np.testing.assert_allclose(kept, [[0, 0, 10, 10]])


def test_crop_never_removes_all_boxes():
    image = np.zeros((100, 100, 3), np.uint8)
    boxes = np.array([[0, 0, 100, 100]], np.float32)  # small crops keep < 50% of it: dropped
    tiny = np.array([[0, 0, 2, 2]], np.float32)       # a corner box most crops cut away
    for seed in range(20):
        for b in (boxes, tiny):
            _, out, lab = random_crop(image, b, np.array([0]), np.random.default_rng(seed))
            assert len(out) == 1 and lab.tolist() == [0]


def test_negative_images_crop_freely():
    image = np.zeros((50, 40, 3), np.uint8)
    out, b, lab = random_crop(image, np.zeros((0, 4), np.float32), np.zeros(0, np.int64),
                              np.random.default_rng(0))
    assert b.shape == (0, 4) and lab.shape == (0,) and out.shape[0] <= 50


def test_geometric_deterministic():
    image, boxes, labels = _scene(3)
    a = random_geometric(image, boxes, labels, np.random.default_rng(7), 0.5, 0.5)
    b = random_geometric(image, boxes, labels, np.random.default_rng(7), 0.5, 0.5)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_normalise_boxes():
    cxcywh = normalise_boxes(np.array([[10, 20, 30, 60]], np.float32), w=40, h=80)
    np.testing.assert_allclose(cxcywh, [[0.5, 0.5, 0.5, 0.5]])
    assert normalise_boxes(np.zeros((0, 4)), 3, 3).shape == (0, 4)


def test_model_input_normalise_round_trip():
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(2)]
    x = to_model_input(images, 32)  # same size: no resize, exact round trip
    assert x.shape == (2, 3, 32, 32) and x.dtype == torch.float32
    assert abs(float(x.mean())) < 0.5
    assert np.array_equal(denormalise(x), np.stack(images))


def test_model_input_mixed_sizes_and_backends_agree():
    rng = np.random.default_rng(1)
    base = np.asarray(Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize(
        (64, 48), Image.BILINEAR))
    images = [base, np.ascontiguousarray(base[:40, :30])]  # different sizes in one batch
    a, b = to_model_input(images, 32), to_model_input_torch(images, 32)
    assert a.shape == b.shape == (2, 3, 32, 32)
    assert float((a - b).abs().mean()) < 0.05  # both bilinear + antialias
