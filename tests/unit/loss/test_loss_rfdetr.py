"""RF-DETR's recipe in the criterion: IA-BCE against a hand computation, per-group matching."""

from __future__ import annotations

import math

import pytest
import torch

from raydetr.config import LossConfig
from raydetr.loss.criterion import SetCriterion
from raydetr.loss.matcher import HungarianMatcher


def _criterion(group_detr: int = 1) -> SetCriterion:
    cfg = LossConfig(cls_loss="ia_bce")
    matcher = HungarianMatcher(cfg.cost_class, cfg.cost_bbox, cfg.cost_giou)
    return SetCriterion(2, matcher, cfg, group_detr=group_detr)


def _sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_ia_bce_matches_hand_computation():
    logits = [[0.3, 1.2], [-0.5, -2.0]]  # query 0 is the good one (class 1, near the target)
    outputs = {"pred_logits": torch.tensor([logits]),
               "pred_boxes": torch.tensor([[[0.5, 0.5, 0.2, 0.25], [0.1, 0.1, 0.05, 0.05]]])}
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}]
    out = _criterion().train()(outputs, targets)

    # query 0 <-> target 0; IoU = (0.2*0.2) / (0.2*0.25) = 0.8, and the enclosing box is the
    # predicted box, so GIoU = IoU = 0.8; L1 = |0.25 - 0.2| = 0.05; num_boxes = 1.
    iou = 0.8
    expected_cls = 0.0
    for q in range(2):
        for c in range(2):
            p = _sig(logits[q][c])
            if (q, c) == (0, 1):
                t = max(p ** 0.25 * iou ** 0.75, 0.01)
                expected_cls += -t * math.log(p) - (1 - t) * math.log(1 - p)
            else:
                expected_cls += -(p ** 2) * math.log(1 - p)
    assert out["loss_cls"].item() == pytest.approx(expected_cls, rel=1e-5)
    assert out["loss_bbox"].item() == pytest.approx(0.05, rel=1e-5)
    assert out["loss_giou"].item() == pytest.approx(0.2, rel=1e-5)
    assert out["loss"].item() == pytest.approx(expected_cls + 5 * 0.05 + 2 * 0.2, rel=1e-5)


def test_ia_bce_negative_weight_keeps_its_gradient():
    # RF-DETR leaves p^2 (the unmatched entries' weight) in the graph: d/dx[-p^2 log(1-p)]
    # = p^2 * p (from -log(1-p)) + 2 p^2 (1-p) * (-log(1-p)) (from p^2)
    x = 0.7
    logits = torch.tensor([[[x, -9.0]]], requires_grad=True)
    outputs = {"pred_logits": logits, "pred_boxes": torch.tensor([[[0.5, 0.5, 0.2, 0.2]]])}
    empty = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}]
    _criterion().train()(outputs, empty)["loss"].backward()
    p = _sig(x)
    expected = p ** 3 + 2 * p ** 2 * (1 - p) * -math.log(1 - p)
    assert logits.grad[0, 0, 0].item() == pytest.approx(expected, rel=1e-5)


def test_each_group_is_matched_independently_and_counts_in_num_boxes():
    torch.manual_seed(0)
    q_per_group, groups = 5, 3
    logits = torch.randn(2, q_per_group * groups, 2)
    boxes = torch.rand(2, q_per_group * groups, 4) * 0.3 + 0.2
    targets = [{"labels": torch.tensor([0, 1]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2],
                                                                      [0.6, 0.6, 0.1, 0.3]])},
               {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.4, 0.3, 0.2]])}]
    matcher = HungarianMatcher(2.0, 5.0, 2.0)
    outputs = {"pred_logits": logits, "pred_boxes": boxes}
    indices = matcher(outputs, targets, groups=groups)
    for (rows, _cols), t in zip(indices, targets):
        n = len(t["labels"])
        assert len(rows) == n * groups
        for g in range(groups):
            block = (rows >= g * q_per_group) & (rows < (g + 1) * q_per_group)
            assert block.sum() == n  # every group matches every target once
    # ... exactly as matching that group's queries alone would
    for g in range(groups):
        sl = slice(g * q_per_group, (g + 1) * q_per_group)
        alone = matcher({"pred_logits": logits[:, sl], "pred_boxes": boxes[:, sl]}, targets)
        for (rows, cols), (r1, c1) in zip(indices, alone):
            block = (rows >= sl.start) & (rows < sl.stop)
            assert torch.equal(rows[block] - sl.start, r1) and torch.equal(cols[block], c1)

    # num_boxes = targets x groups in training; one group (no multiplier) in eval
    crit = _criterion(group_detr=groups)
    train_out = crit.train()(outputs, targets)
    crit_one = _criterion(group_detr=1).train()
    summed = 0.0
    for g in range(groups):
        sl = slice(g * q_per_group, (g + 1) * q_per_group)
        summed += crit_one({"pred_logits": logits[:, sl], "pred_boxes": boxes[:, sl]},
                           targets)["loss_bbox"].item()
    assert train_out["loss_bbox"].item() == pytest.approx(summed / groups, rel=1e-5)
    eval_out = crit.eval()(outputs, targets)  # eval: one group over all queries
    whole = crit_one(outputs, targets)
    assert eval_out["loss_bbox"].item() == pytest.approx(whole["loss_bbox"].item(), rel=1e-6)
    with pytest.raises(ValueError, match="equal groups"):
        matcher({"pred_logits": logits[:, :7], "pred_boxes": boxes[:, :7]}, targets, groups=groups)
