"""RF-DETR Seg's mask recipe: point sampling, BCE + dice on points, matcher mask costs, and the
criterion's mask terms. Values against RF-DETR's own criterion: bench/rfdetr_reference.py loss."""

from __future__ import annotations

import pytest
import torch

from raydetr.config import LossConfig, load_config
from raydetr.loss.criterion import SetCriterion
from raydetr.loss.masks import mask_cost, mask_losses, point_sample, uncertain_points
from raydetr.loss.matcher import HungarianMatcher


def test_point_sample_reads_pixel_centres_and_clamps_at_the_border():
    grid = torch.arange(12.0).view(1, 1, 3, 4)  # value = 4*row + col
    centres = torch.tensor([[[(1 + 0.5) / 4, (2 + 0.5) / 3], [(3 + 0.5) / 4, (0 + 0.5) / 3]]])
    assert point_sample(grid, centres).flatten().tolist() == pytest.approx([9.0, 3.0])
    corner = torch.tensor([[[0.0, 0.0], [1.0, 1.0]]])  # half a pixel outside: border padding
    assert point_sample(grid, corner).flatten().tolist() == pytest.approx([0.0, 11.0])
    between = torch.tensor([[[2 / 4, 0.5 / 3]]])  # between cols 1 and 2 of row 0
    assert point_sample(grid, between).item() == pytest.approx(1.5)
    assert point_sample(grid, between, mode="nearest").item() in (1.0, 2.0)


def test_uncertain_points_favour_the_mask_boundary():
    torch.manual_seed(0)
    x = torch.linspace(-8, 8, 64)
    logits = x.view(1, 1, 1, 64).expand(1, 1, 64, 64).contiguous()  # boundary at x = 0.5
    points = uncertain_points(logits, num_points=100)
    assert points.shape == (1, 100, 2)
    important = points[0, :75, 0]  # int(0.75 * 100) most uncertain of 300 candidates
    assert (important - 0.5).abs().mean() < 0.1
    assert (points[0, 75:, 0] - 0.5).abs().mean() > 0.15  # the rest is uniform


def test_mask_losses_are_small_for_the_right_mask_and_large_for_the_wrong_one():
    torch.manual_seed(0)
    target = torch.zeros(1, 64, 64, dtype=torch.bool)
    target[:, 16:48, 16:48] = True
    good = (target.float() * 2 - 1) * 20  # confident and right, at the same size
    good_small = torch.nn.functional.avg_pool2d(good[None], 4)[0]  # 16x16 logits vs 64x64 GT
    ce, dice = mask_losses(good_small, target, num_boxes=1.0)
    assert ce < 0.5 and dice < 0.1
    ce_bad, dice_bad = mask_losses(-good_small, target, num_boxes=1.0)
    # (importance sampling puts most points on the boundary, where logits interpolate to ~0)
    assert ce_bad > 10 and dice_bad > 0.7
    # two wrong masks over 2 boxes: the per-mask mean (the box count normalises)
    ce2, dice2 = mask_losses(torch.cat([-good_small] * 2), torch.cat([target] * 2), num_boxes=2.0)
    assert ce2.item() == pytest.approx(ce_bad.item(), rel=0.2)
    assert dice2.item() == pytest.approx(dice_bad.item(), rel=0.15)
    empty = mask_losses(torch.zeros(0, 16, 16), torch.zeros(0, 64, 64, dtype=torch.bool), 1.0)
    assert [float(v) for v in empty] == [0.0, 0.0]


def test_mask_cost_is_lowest_where_masks_agree():
    torch.manual_seed(0)
    masks = torch.zeros(2, 32, 32, dtype=torch.bool)
    masks[0, :, :16] = True  # left half
    masks[1, :, 16:] = True  # right half
    logits = (masks.float() * 2 - 1) * 10  # query 0 predicts the left half, query 1 the right
    ce, dice = mask_cost(logits[None], masks[[1, 0]])  # targets in the other order
    assert ce.shape == dice.shape == (2, 2)
    assert ce[0, 1] < ce[0, 0] and ce[1, 0] < ce[1, 1]
    assert dice[0, 1] < 0.05 and dice[0, 0] > 0.9
    # the training factors give the same costs as the dense logits (same points)
    spatial = torch.randn(1, 8, 32, 32)
    queries = torch.randn(1, 2, 8)
    factors = {"spatial_features": spatial, "query_features": queries, "bias": torch.tensor([0.3])}
    dense = torch.einsum("bchw,bnc->bnhw", spatial, queries) + 0.3
    torch.manual_seed(1)
    a = mask_cost(factors, masks)
    torch.manual_seed(1)
    b = mask_cost(dense, masks)
    assert torch.allclose(a[0], b[0], atol=1e-5) and torch.allclose(a[1], b[1], atol=1e-5)


def _seg_criterion(group_detr: int = 1) -> SetCriterion:
    cfg = load_config(None, ["model.preset=rfdetr-seg-nano"]).loss
    matcher = HungarianMatcher(cfg.cost_class, cfg.cost_bbox, cfg.cost_giou, masks=True,
                               cost_mask_ce=cfg.cost_mask_ce, cost_mask_dice=cfg.cost_mask_dice)
    return SetCriterion(2, matcher, cfg, group_detr=group_detr, masks=True)


def test_seg_presets_get_rfdetrs_seg_weights():
    cfg = load_config(None, ["model.preset=rfdetr-seg-nano"]).loss
    assert (cfg.cls_loss, cfg.weight_cls, cfg.weight_bbox, cfg.weight_giou) == ("ia_bce", 5, 5, 2)
    assert (cfg.weight_mask_ce, cfg.weight_mask_dice, cfg.cost_mask_ce, cfg.cost_mask_dice,
            cfg.mask_point_sample_ratio) == (5, 5, 5, 5, 16)
    assert load_config(None, ["model.preset=rfdetr-nano"]).loss.weight_cls == 1
    assert load_config(None, ["model.preset=rfdetr-seg-nano", "loss.weight_cls=2"]
                       ).loss.weight_cls == 2  # explicit values win
    criterion = _seg_criterion()
    assert criterion.weight_dict == {"loss_cls": 5.0, "loss_bbox": 5.0, "loss_giou": 2.0,
                                     "loss_mask_ce": 5.0, "loss_mask_dice": 5.0}


def test_matcher_uses_the_masks_when_boxes_and_classes_tie():
    masks = torch.zeros(1, 32, 32, dtype=torch.bool)
    masks[0, :, :16] = True
    pred = torch.stack([masks[0].float() * -20 + 10, masks[0].float() * 20 - 10])  # q1 is right
    outputs = {"pred_logits": torch.zeros(1, 2, 2), "pred_boxes": torch.full((1, 2, 4), 0.5),
               "pred_masks": pred[None]}
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.5, 0.5]]),
                "masks": masks}]
    torch.manual_seed(0)
    (src, tgt), = _seg_criterion().matcher(outputs, targets)
    assert src.tolist() == [1] and tgt.tolist() == [0]
    boxes_only = HungarianMatcher(masks=False)
    assert boxes_only(outputs, targets)[0][0].tolist() == [0]  # a tie: the first query


def test_criterion_mask_terms_on_every_output_and_their_gradient():
    from raydetr.model.rfdetr import build_rfdetr

    torch.manual_seed(0)
    model = build_rfdetr("rfdetr-seg-nano", num_classes=2).train()
    images = torch.randn(2, 3, 48, 48)
    masks = torch.zeros(2, 48, 48, dtype=torch.bool)
    masks[0, 10:30, 5:25] = True
    masks[1, 20:40, 20:44] = True
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.31, 0.42, 0.42, 0.42]]),
                "masks": masks[:1]},
               {"labels": torch.tensor([0]), "boxes": torch.tensor([[0.67, 0.63, 0.5, 0.42]]),
                "masks": masks[1:]}]
    criterion = _seg_criterion(group_detr=13).train()
    out = criterion(model(images), targets)
    for suffix in ("", "_aux0", "_aux1", "_aux2", "_enc"):
        for term in ("loss_mask_ce", "loss_mask_dice"):
            assert torch.isfinite(out[term + suffix]) and out[term + suffix] > 0
    out["loss"].backward()
    head = model.segmentation_head
    for p in (head.bias, head.blocks[0].dwconv.weight, head.query_features_proj.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="needs 'masks'"):
        criterion(model(images), [{k: v for k, v in t.items() if k != "masks"} for t in targets])


def test_no_targets_give_zero_mask_losses():
    criterion = _seg_criterion()
    outputs = {"pred_logits": torch.zeros(1, 3, 2), "pred_boxes": torch.full((1, 3, 4), 0.5),
               "pred_masks": torch.zeros(1, 3, 8, 8)}
    out = criterion(outputs, [{"labels": torch.zeros(0, dtype=torch.long),
                               "boxes": torch.zeros(0, 4),
                               "masks": torch.zeros(0, 32, 32, dtype=torch.bool)}])
    assert out["loss_mask_ce"].item() == 0.0 and out["loss_mask_dice"].item() == 0.0
    assert LossConfig().weight_mask_ce == 5.0


def test_a_teachers_share_leaves_the_mask_terms_whole():
    """distill.weight hands part of the decoder's class and box terms to a teacher
    (decoder_share); no teacher gives masks, so the mask terms, like the encoder's, keep their
    weight."""
    from raydetr.model.rfdetr import build_rfdetr

    torch.manual_seed(0)
    model = build_rfdetr("rfdetr-seg-nano", num_classes=2).train()
    masks = torch.zeros(1, 48, 48, dtype=torch.bool)
    masks[0, 10:30, 5:25] = True
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.31, 0.42, 0.42, 0.42]]),
                "masks": masks}]
    with torch.no_grad():
        outputs = model(torch.randn(1, 3, 48, 48))
    criterion = _seg_criterion().train()
    torch.manual_seed(1)
    whole = criterion(outputs, targets)
    criterion.decoder_share = 0.4
    torch.manual_seed(1)
    shared = criterion(outputs, targets)
    w = criterion.weight_dict
    handed = sum(w[t] * whole[t + s] for t in ("loss_cls", "loss_bbox", "loss_giou")
                 for s in ("", "_aux0", "_aux1", "_aux2"))
    assert shared["loss"].item() == pytest.approx((whole["loss"] - 0.6 * handed).item(), rel=1e-5)
    assert whole["loss_mask_ce"] > 0 and whole["loss_cls_enc"] > 0
