"""Eval records of a segmentation model: masks at the original size as RLE, ground truth from the
targets' model-input masks, and the per-epoch evaluation (evaluate_matches) reporting segm next
to bbox. A fixed model whose one confident query is exactly the object: AP 1 for both; its mask
shifted off the object: bbox AP stays 1, segm AP drops to 0."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from raydetr.eval.coco import decode_rle
from raydetr.model.postprocess import PostProcessor, gt_masks_rle, masks_at_size, masks_rle
from raydetr.train.engine import predict_records
from raydetr.train.evaluation import MaskMatcher, evaluate_matches

S = 32  # model input
ORIG_HW = (48, 64)  # stretched to S x S by the data path


class FixedSegmenter(nn.Module):
    """3 queries, 2 classes; query 0 is class 0 with the box cxcywh (.5, .5, .5, .5) and a mask
    logit map (input / 4) that is +10 on that square (shifted by ``shift`` cells), -10 off it."""

    def __init__(self, shift: int = 0):
        super().__init__()
        self.shift = shift

    def forward(self, images):
        b, m = images.shape[0], S // 4
        logits = torch.full((b, 3, 2), -6.0)
        logits[:, 0, 0] = 6.0
        boxes = torch.tensor([[.5, .5, .5, .5], [.2, .2, .1, .1], [.8, .8, .1, .1]]).expand(b, 3, 4)
        masks = torch.full((b, 3, m, m), -10.0)
        masks[:, 0, 2:6, 2 + self.shift:6 + self.shift] = 10.0
        return {"pred_logits": logits, "pred_boxes": boxes, "pred_masks": masks}


def _batches(n_images=3, masks=True):
    gt = torch.zeros(1, S, S, dtype=torch.bool)
    gt[0, 8:24, 8:24] = True
    for start in range(0, n_images, 2):
        ids = range(start, min(start + 2, n_images))
        targets = []
        for i in ids:
            t = {"labels": torch.tensor([0]), "boxes": torch.tensor([[.5, .5, .5, .5]]),
                 "image_id": torch.tensor(i), "orig_size": torch.tensor(ORIG_HW)}
            if masks:
                t["masks"] = gt.clone()
            targets.append(t)
        yield {"images": torch.zeros(len(targets), 3, S, S), "targets": targets}


def test_masks_at_the_original_size_match_the_ground_truth():
    recs = predict_records({"m": FixedSegmenter()}, PostProcessor(), _batches(), "cpu",
                           top_k=6)["m"]
    assert [r["image_id"] for r in recs] == [0, 1, 2]
    for r in recs:
        assert len(r["masks"]) == len(r["scores"]) == 6 and len(r["gt_masks"]) == 1
        assert {tuple(m["size"]) for m in r["masks"] + r["gt_masks"]} == {ORIG_HW}
        gt = decode_rle(r["gt_masks"])[0]
        ys, xs = np.nonzero(gt)  # the 8:24 square of 32 px at 48 x 64: rows 12..35, cols 16..47
        assert (ys.min(), ys.max(), xs.min(), xs.max()) == (12, 35, 16, 47)
        best = decode_rle(r["masks"][:1])[0]  # bilinear: 16 corner pixels cut
        assert (best & gt).sum() / (best | gt).sum() > 0.95 and not (best & ~gt).any()
    res, seconds = evaluate_matches({"m": recs}, ["a", "b"], rank=0, world=1, segm=True)
    assert res["m"]["map"] == pytest.approx(1.0) and res["m"]["map_segm"] == pytest.approx(1.0)
    assert set(res["m"]["per_class_segm"]) == {"a", "b"}
    assert seconds["eval_match_seconds"] >= 0


def test_a_mask_off_the_object_costs_segm_not_bbox():
    recs = predict_records({"m": FixedSegmenter(shift=2)}, PostProcessor(), _batches(), "cpu",
                           top_k=6)["m"]
    res, _ = evaluate_matches({"m": recs}, ["a", "b"], rank=0, world=1, segm=True)
    assert res["m"]["map"] == pytest.approx(1.0)
    assert res["m"]["map_segm"] < 0.5  # IoU 1/3: a hit only at no threshold >= .5
    assert res["m"]["map50_segm"] == 0.0
    only_bbox, _ = evaluate_matches({"m": recs}, ["a", "b"], rank=0, world=1)
    assert "map_segm" not in only_bbox["m"] and only_bbox["m"]["map"] == pytest.approx(1.0)


def test_no_masks_without_ground_truth_masks_or_when_off():
    recs = predict_records({"m": FixedSegmenter()}, PostProcessor(), _batches(masks=False),
                           "cpu", top_k=6)["m"]
    assert all("masks" not in r for r in recs)
    recs = predict_records({"m": FixedSegmenter()}, PostProcessor(), _batches(), "cpu",
                           top_k=6, masks=False)["m"]
    assert all("masks" not in r for r in recs)
    with pytest.raises(ValueError, match="has no 'gt_masks'"):
        evaluate_matches({"m": recs}, ["a", "b"], rank=0, world=1, segm=True)


def test_rle_encoding_equals_full_size_masks_whatever_the_chunk():
    torch.manual_seed(0)
    logits = torch.randn(11, 13, 17)
    logits[[2, 3, 9]] = -logits[[2, 3, 9]].abs()  # no positive logit: empty masks, not resized
    logits[3, 5, 5] = 0.0  # zero is not positive either
    full = torch.cat(list(masks_at_size(logits, (50, 70), chunk=11))).numpy()
    assert not full[[2, 3, 9]].any() and full.any(axis=(1, 2)).sum() == 8
    for chunk in (1, 3, 8):
        np.testing.assert_array_equal(decode_rle(masks_rle(logits, (50, 70), chunk=chunk)), full)
    gt = torch.rand(5, 32, 32) > 0.5
    same = decode_rle(gt_masks_rle(gt, (32, 32)))
    np.testing.assert_array_equal(same, gt.numpy())


@pytest.mark.parametrize("shift", [0, 1, 2])
def test_masks_matched_batch_by_batch_give_the_same_metrics(shift):
    """The worker's way (MaskMatcher: each batch's masks matched as they come, the records keep
    none) equals matching every record's masks at the end."""
    model, post = FixedSegmenter(shift=shift), PostProcessor()
    whole = predict_records({"m": model, "n": model}, post, _batches(5), "cpu", top_k=6)
    matcher = MaskMatcher(["a", "b"], (1, 10, 100))
    lean = predict_records({"m": model, "n": model}, post, _batches(5), "cpu", top_k=6,
                           on_masks=matcher)
    assert all("masks" not in r and "gt_masks" not in r for r in lean["m"] + lean["n"])
    assert len(matcher.batches["m"]) == 3  # batches of 2, 2, 1 images
    want, _ = evaluate_matches(whole, ["a", "b"], rank=0, world=1, segm=True)
    got, _ = evaluate_matches(lean, ["a", "b"], rank=0, world=1, segm=True, masks=matcher)
    assert got == want
    assert 0 <= got["m"]["map_segm"] <= 1 and got["m"]["map"] == pytest.approx(1.0)
    # a rank without val images: empty matches with the same parameters
    empty, _ = evaluate_matches({"m": []}, ["a", "b"], rank=0, world=1, segm=True,
                                masks=MaskMatcher(["a", "b"], (1, 10, 100)))
    assert empty["m"]["map_segm"] == 0.0


def test_seg_evaluation_without_masks_in_the_targets_says_so():
    matcher = MaskMatcher(["a", "b"], (1, 10, 100))
    recs = predict_records({"m": FixedSegmenter()}, PostProcessor(), _batches(masks=False), "cpu",
                           top_k=6, on_masks=matcher)
    with pytest.raises(ValueError, match="none of this rank's 3 val images came with masks"):
        evaluate_matches(recs, ["a", "b"], rank=0, world=1, segm=True, masks=matcher)


def test_stored_rles_are_the_ground_truth_as_they_are():
    """The data path's evaluation targets carry the stored RLE at the original size
    ("masks_rle"): evaluation takes it bit for bit, not the model-input mask resized back."""
    from raydetr.data import masks as mk

    yy, xx = np.mgrid[:ORIG_HW[0], :ORIG_HW[1]]
    disc = ((yy - 23.5) ** 2 + (xx - 31.5) ** 2) < 13.3 ** 2  # no 32 px mask resizes to this
    stored = mk.encode(disc[None])
    batches = list(_batches(3))
    for batch in batches:
        for t in batch["targets"]:
            t["masks_rle"] = list(stored)
    recs = predict_records({"m": FixedSegmenter()}, PostProcessor(), iter(batches), "cpu",
                           top_k=6)["m"]
    for r in recs:
        assert r["gt_masks"][0]["counts"] == stored[0]
        np.testing.assert_array_equal(decode_rle(r["gt_masks"])[0], disc)
    batches[0]["targets"][0]["masks_rle"] = []  # a stored mask per box, or a clear error
    with pytest.raises(ValueError, match="image 0: 0 stored masks for 1 boxes"):
        predict_records({"m": FixedSegmenter()}, PostProcessor(), iter(batches[:1]), "cpu")
