"""RF-DETR's training augmentation: for fixed draws, the sizes, boxes, masks and dropped
instances its transforms (rf-detr 1.4.1 datasets/transforms.py) give, derived by hand from its
code: flip (W - x2, y1, W - x1, y2); resize of the shorter side with the longer one truncated;
crop = shift, min with (w, h), clamp at 0, keep iff x2 > x1 and y2 > y1; square resize scaling
boxes by (S/W, S/H); masks nearest then > 0.5."""

import numpy as np
import pytest
import torch

from raydetr.config import DataConfig, load_config
from raydetr.data import rfdetr_augment as A
from raydetr.data.collate import collate, rfdetr_scales


def _sample(h=300, w=400, masks=False):
    image = np.arange(h * w * 3, dtype=np.int64).reshape(h, w, 3).astype(np.uint8)
    boxes = np.array([[10, 20, 110, 220], [350, 10, 390, 50], [0, 250, 50, 300]], np.float32)
    m = None
    if masks:
        m = np.zeros((3, h, w), bool)
        for k, (x1, y1, x2, y2) in enumerate(boxes.astype(int)):
            m[k, y1:y2, x1:x2] = True
    return A.Sample(image, boxes, np.array([1, 2, 3], np.int64), m)


def test_shorter_side_resize_size_truncates_the_longer_side():
    assert A.shorter_side_size(300, 400, 500) == (500, 666)   # int(500 * 400 / 300)
    assert A.shorter_side_size(400, 300, 600) == (800, 600)
    assert A.shorter_side_size(500, 700, 500) == (500, 700)   # shorter side already 500
    assert A.shorter_side_size(450, 450, 400) == (400, 400)


def test_branch_b_flip_resize_crop_resize_drops_the_cropped_away_instance():
    d = A.Draws(flip=True, square=False, shorter=500, crop_w=400, crop_h=384, top=100, left=250)
    out = A.apply(_sample(masks=True), d, 544)
    assert out.image.shape == (544, 544, 3) and out.masks.shape == (2, 544, 544)
    # flipped at W=400: (290,20,390,220), (10,10,50,50), (350,250,400,300); resized to
    # 500 x 666 (x * 666/400, y * 500/300); cropped at (left 250, top 100) to 400 x 384: the
    # second box lies left of the crop and is dropped, the others are clipped; then x 544/400,
    # y 544/384.
    rw, rh = 666 / 400, 500 / 300
    sx, sy = 544 / 400, 544 / 384
    expected = np.array([
        [(290 * rw - 250) * sx, 0.0, (390 * rw - 250) * sx, (220 * rh - 100) * sy],
        [(350 * rw - 250) * sx, (250 * rh - 100) * sy, 400 * sx, 384 * sy],
    ], np.float32)
    np.testing.assert_allclose(out.boxes_xyxy, expected, rtol=1e-5)
    assert out.labels.tolist() == [1, 3]
    # masks follow: the kept instances' masks are non-empty and lie inside their boxes
    for m, (x1, y1, x2, y2) in zip(out.masks, out.boxes_xyxy):
        ys, xs = np.nonzero(m)
        assert len(xs) and xs.min() >= int(x1) - 1 and xs.max() <= x2 + 1
        assert ys.min() >= int(y1) - 1 and ys.max() <= y2 + 1


def test_branch_a_square_resize_without_flip():
    out = A.apply(_sample(), A.Draws(flip=False, square=True), 544)
    assert out.image.shape == (544, 544, 3)
    scale = np.array([544 / 400, 544 / 300] * 2, np.float32)
    np.testing.assert_allclose(out.boxes_xyxy, _sample().boxes_xyxy * scale, rtol=1e-6)
    assert out.labels.tolist() == [1, 2, 3]


def test_tiny_mask_flip_and_nearest_square_resize():
    image = np.zeros((4, 6, 3), np.uint8)
    mask = np.zeros((1, 4, 6), bool)
    mask[0, 1, 0] = mask[0, 3, 1] = True
    s = A.Sample(image, np.array([[0, 1, 2, 4]], np.float32), np.array([7]), mask)
    out = A.apply(s, A.Draws(flip=True, square=True), 8)
    # flip: columns 0, 1 -> 5, 4; nearest 4x6 -> 8x8 reads row i // 2, column floor(0.75 j)
    rows, cols = [i // 2 for i in range(8)], [int(0.75 * j) for j in range(8)]
    flipped = mask[0][:, ::-1]
    np.testing.assert_array_equal(out.masks[0], flipped[np.ix_(rows, cols)])
    assert out.masks[0].sum() == 4  # rows 2,3 x column 7 (from 5) and rows 6,7 x column 6 (from 4)
    np.testing.assert_allclose(out.boxes_xyxy, [[4 * 8 / 6, 8 / 4 * 1, 6 * 8 / 6, 4 * 2]])


def test_crop_keeps_boxes_touching_and_drops_degenerate():
    s = A.Sample(np.zeros((10, 10, 3), np.uint8),
                 np.array([[0, 0, 5, 5], [5, 5, 9, 9], [2, 6, 4, 8]], np.float32),
                 np.array([0, 1, 2]))
    out = A.crop(s, top=0, left=0, h=5, w=5)
    # box 1 collapses to (5,5,5,5) and box 2 to (2,5,4,5): no height -> dropped
    assert out.labels.tolist() == [0]
    np.testing.assert_array_equal(out.boxes_xyxy, [[0, 0, 5, 5]])
    assert out.image.shape == (5, 5, 3)


def test_draws_are_in_rfdetrs_ranges_and_seeded():
    seen_square, seen_crop = 0, 0
    for seed in range(200):
        d = A.draw(np.random.default_rng(seed), 300, 400)
        assert d == A.draw(np.random.default_rng(seed), 300, 400)
        if d.square:
            seen_square += 1
            continue
        seen_crop += 1
        rh, rw = A.shorter_side_size(300, 400, d.shorter)
        assert d.shorter in (400, 500, 600)
        assert 384 <= d.crop_w <= min(rw, 600) and 384 <= d.crop_h <= min(rh, 600)
        assert 0 <= d.top <= rh - d.crop_h and 0 <= d.left <= rw - d.crop_w
    assert seen_square > 60 and seen_crop > 60


def test_batch_resize_is_bilinear_without_antialias():
    x = torch.arange(16.0).view(1, 1, 4, 4).repeat(1, 3, 1, 1)
    y = A.batch_resize(x, 2)
    # align_corners False, factor 2: samples at 1.5 -> mean of the 2x2 centre-of-block pixels
    assert y.shape == (1, 3, 2, 2)
    assert torch.allclose(y[0, 0], torch.tensor([[2.5, 4.5], [10.5, 12.5]]))
    assert A.batch_resize(x, 4) is x


def _rows(n=3, h=120, w=160):
    import io

    from PIL import Image

    rng = np.random.default_rng(0)
    imgs = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
        imgs.append(buf.getvalue())
    rows = {"image_id": np.arange(n), "width": np.full(n, w), "height": np.full(n, h)}
    for key, vals in (("image", imgs),
                      ("boxes", [np.array([10, 10, 60, 50], np.float32)] * n),
                      ("labels", [np.array([1])] * n)):
        arr = np.empty(n, dtype=object)
        arr[:] = vals
        rows[key] = arr
    return rows


def test_collate_rfdetr_resizes_the_batch_per_step_and_is_seeded():
    cfg = DataConfig(augment="rfdetr")
    scales = rfdetr_scales(96, 32)
    batches = [collate(_rows(), train=True, resolution=96, data_cfg=cfg,
                       rng=np.random.default_rng([7, 1]), scales=scales) for _ in range(2)]
    a, b = batches
    assert torch.equal(a["images"], b["images"])  # same generator seed -> same batch
    side = a["images"].shape[-1]
    assert a["images"].shape[-2] == side and side in scales
    for t in a["targets"]:
        assert (t["boxes"] >= 0).all() and (t["boxes"] <= 1).all()
        assert t["orig_size"].tolist() == [120, 160]
    sizes = {collate(_rows(1), train=True, resolution=96, data_cfg=cfg,
                     rng=np.random.default_rng(s), scales=scales)["images"].shape[-1]
             for s in range(20)}
    assert len(sizes) > 2


@pytest.mark.parametrize("preset, expected", [("rfdetr-nano", "rfdetr"),
                                              ("rtdetr-r18", "raydetr")])
def test_family_default_augmentation(preset, expected):
    assert load_config(None, [f"model.preset={preset}"]).data.augment == expected
    assert load_config(None, [f"model.preset={preset}", "data.augment=none"]).data.augment == "none"


# ---- more fixed-draw cases, each derived by hand from rf-detr 1.4.1 datasets/transforms.py ----

def _nearest_index(n_out: int, n_in: int) -> np.ndarray:
    """torch's nearest rule (what RF-DETR's mask ``interpolate`` uses): source index
    floor(dst * (in / out)) in float32, identity at equal sizes."""
    if n_out == n_in:
        return np.arange(n_out)
    scale = np.float32(n_in) / np.float32(n_out)
    return np.minimum(np.floor(np.arange(n_out, dtype=np.float32) * scale).astype(int), n_in - 1)


def test_branch_b_portrait_flip_clips_two_edges_drops_one_and_masks_follow_exactly():
    h, w = 500, 300
    boxes = np.array([[20, 40, 120, 240], [200, 420, 290, 490], [0, 0, 30, 30]], np.float32)
    masks = np.zeros((3, h, w), bool)
    for k, (x1, y1, x2, y2) in enumerate(boxes.astype(int)):
        masks[k, y1:y2, x1:x2] = True
    s = A.Sample(np.zeros((h, w, 3), np.uint8), boxes, np.array([1, 2, 3]), masks)
    d = A.Draws(flip=True, square=False, shorter=400, crop_w=384, crop_h=500, top=100, left=16)
    out = A.apply(s, d, 448)
    # flip at W=300: (180,40,280,240), (10,420,100,490), (270,0,300,30).
    # RandomResize(400), portrait: ow = 400, oh = int(400 * 500 / 300) = 666; x * 400/300,
    # y * 666/500. Crop at (top 100, left 16), 500 x 384: box 0 clipped at y1 = 0; box 1
    # clipped at x1 = 0 and y2 = 500; box 2 ends up (344, 0, 384, 0): no height -> dropped.
    # SquareResize(448): x * 448/384, y * 448/500.
    rx, ry, sx, sy = 400 / 300, 666 / 500, 448 / 384, 448 / 500
    expected = np.array([
        [(180 * rx - 16) * sx, 0.0, (280 * rx - 16) * sx, (240 * ry - 100) * sy],
        [0.0, (420 * ry - 100) * sy, (100 * rx - 16) * sx, 500 * sy],
    ], np.float32)
    assert out.image.shape == (448, 448, 3)
    np.testing.assert_allclose(out.boxes_xyxy, expected, rtol=1e-5, atol=1e-4)
    assert out.labels.tolist() == [1, 2]
    # masks: mirrored, nearest to 666 x 400, sliced [100:600, 16:400], nearest to 448 x 448
    rows = _nearest_index(666, 500)[100:600][_nearest_index(448, 500)]
    cols = _nearest_index(400, 300)[16:400][_nearest_index(448, 384)]
    flipped = masks[:2, :, ::-1]
    np.testing.assert_array_equal(out.masks, flipped[:, rows][:, :, cols])


def test_branch_b_shorter_side_already_s_and_whole_image_crop_keeps_everything():
    # 400 x 500 with s = 400: RandomResize leaves it alone; a 400 x 500 crop is the whole
    # image (torchvision's get_params gives (0, 0, h, w)); only SquareResize(544) scales.
    s = _sample(h=400, w=500)
    d = A.Draws(flip=False, square=False, shorter=400, crop_w=500, crop_h=400, top=0, left=0)
    out = A.apply(s, d, 544)
    np.testing.assert_allclose(out.boxes_xyxy,
                               s.boxes_xyxy * np.array([544 / 500, 544 / 400] * 2, np.float32),
                               rtol=1e-6)
    assert out.labels.tolist() == [1, 2, 3]


@pytest.mark.parametrize("flip, boundary", [(False, None), (True, 184)])
def test_crop_offset_is_top_row_left_column_of_the_flipped_image(flip, boundary):
    # 400 x 600, columns < 200 dark, the rest bright. s = 400 leaves it; a 384 x 384 crop at
    # (top 16, left 216) and S = 384 need no resize, so pixels are exact. Unflipped: columns
    # 216.. are all bright. Flipped: the dark band is columns 400..599, i.e. crop column 184.
    image = np.full((400, 600, 3), 200, np.uint8)
    image[:, :200] = 10
    image[:16] = 99  # rows above the crop never appear
    s = A.Sample(image, np.zeros((0, 4), np.float32), np.zeros(0, np.int64))
    d = A.Draws(flip=flip, square=False, shorter=400, crop_w=384, crop_h=384, top=16, left=216)
    out = A.apply(s, d, 384)
    assert out.image.shape == (384, 384, 3) and not (out.image == 99).any()
    if boundary is None:
        assert (out.image == 200).all()
    else:
        assert (out.image[:, :boundary] == 200).all() and (out.image[:, boundary:] == 10).all()


def test_branch_a_with_flip():
    out = A.apply(_sample(), A.Draws(flip=True, square=True), 544)
    # flip at W=400, then x * 544/400, y * 544/300
    sx, sy = 544 / 400, 544 / 300
    expected = np.array([[290 * sx, 20 * sy, 390 * sx, 220 * sy],
                         [10 * sx, 10 * sy, 50 * sx, 50 * sy],
                         [350 * sx, 250 * sy, 400 * sx, 300 * sy]], np.float32)
    np.testing.assert_allclose(out.boxes_xyxy, expected, rtol=1e-6)
    assert out.labels.tolist() == [1, 2, 3]


def test_square_resize_is_antialiased_when_shrinking_as_torchvisions_pil_resize():
    # every 4th column bright: PIL's bilinear filter widens with the shrink factor, so the
    # 4x shrink averages to ~255/4; a plain bilinear sample at 4d + 1.5 would read 0.
    image = np.zeros((400, 400, 3), np.uint8)
    image[:, ::4] = 255
    out = A.apply(A.Sample(image, np.zeros((0, 4), np.float32), np.zeros(0, np.int64)),
                  A.Draws(flip=False, square=True), 100)
    assert abs(float(out.image[:, 1:-1].mean()) - 255 / 4) < 3


@pytest.mark.parametrize("resolution, step, sizes", [
    (384, 32, range(224, 545, 32)),   # nano: S = 544
    (512, 32, range(352, 673, 32)),   # small: S = 672
    (312, 12, range(252, 373, 12)),   # seg-nano: S = 372
    (432, 24, range(312, 553, 24)),   # seg-preview / seg-medium: S = 552
])
def test_per_step_sizes_and_dataset_size_per_preset(resolution, step, sizes):
    """SEGMENTATION_AND_AUGMENTATION.md section 6's table (measured from RF-DETR's code)."""
    assert rfdetr_scales(resolution, step) == tuple(sizes)


def test_collate_rfdetr_without_multi_scale_is_the_per_image_transform_at_resolution():
    """No batch resize: every image goes to ``resolution`` and the targets are its boxes
    normalised as RF-DETR's Normalize does (cxcywh / S, unclamped)."""
    cfg = DataConfig(augment="rfdetr", multi_scale=False)
    rows = _rows(2)
    batch = collate(rows, train=True, resolution=96, data_cfg=cfg,
                    rng=np.random.default_rng(3), scales=rfdetr_scales(96, 32))
    assert batch["images"].shape == (2, 3, 96, 96)
    rng = np.random.default_rng(3)
    for t in batch["targets"]:
        d = A.draw(rng, 120, 160)
        boxes = A.apply(A.Sample(np.zeros((120, 160, 3), np.uint8),
                                 np.array([[10, 10, 60, 50]], np.float32), np.array([1])),
                        d, 96).boxes_xyxy
        x1, y1, x2, y2 = boxes[0] / 96
        np.testing.assert_allclose(t["boxes"][0].numpy(),
                                   [(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], rtol=1e-5)
