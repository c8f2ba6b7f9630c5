import pytest
import torch

from raydetr.ops.boxes import (
    batched_nms,
    box_cxcywh_to_xyxy,
    box_iou,
    box_xyxy_to_cxcywh,
    elementwise_box_iou,
    generalized_box_iou,
    inverse_sigmoid,
)


def test_round_trip_cxcywh_xyxy():
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(50, 2, generator=g) * 100
    wh = torch.rand(50, 2, generator=g) * 50 + 1
    xyxy = torch.cat([xy, xy + wh], 1)
    assert torch.allclose(box_cxcywh_to_xyxy(box_xyxy_to_cxcywh(xyxy)), xyxy, atol=1e-4)
    assert torch.allclose(box_xyxy_to_cxcywh(torch.tensor([[0.0, 0, 4, 2]])),
                          torch.tensor([[2.0, 1, 4, 2]]))


def test_negative_sides_count_as_zero():
    # RF-DETR's box_ops: a negative width/height is a zero-size box at the centre (its raw
    # reference boxes can be negative), with no gradient through the clamped side.
    boxes = torch.tensor([[0.5, 0.4, -0.2, 0.1], [0.3, 0.3, 0.2, -0.4]], requires_grad=True)
    xyxy = box_cxcywh_to_xyxy(boxes)
    assert torch.allclose(xyxy, torch.tensor([[0.5, 0.35, 0.5, 0.45], [0.2, 0.3, 0.4, 0.3]]))
    xyxy.sum().backward()
    assert boxes.grad[0, 2] == 0 and boxes.grad[1, 3] == 0


def test_iou_and_giou_known_values():
    a = torch.tensor([[0.0, 0, 2, 2]])
    b = torch.tensor([[1.0, 1, 3, 3], [0, 0, 2, 2], [4, 0, 6, 2]])
    iou, union = box_iou(a, b)
    # overlap 1, union 7; identical; disjoint
    assert torch.allclose(iou, torch.tensor([[1 / 7, 1.0, 0.0]]))
    assert torch.allclose(union, torch.tensor([[7.0, 4.0, 8.0]]))
    giou = generalized_box_iou(a, b)
    # enclosing boxes: 3x3=9 -> 1/7 - 2/9 ; identical -> 1 ; 6x2=12 -> 0 - 4/12
    assert torch.allclose(giou, torch.tensor([[1 / 7 - 2 / 9, 1.0, -1 / 3]]), atol=1e-6)
    assert torch.allclose(elementwise_box_iou(a.expand(3, 4), b), iou[0])


def test_giou_degenerate_box_is_finite():
    a = torch.tensor([[1.0, 1, 1, 1]])
    g = generalized_box_iou(a, a)
    assert torch.isfinite(g).all()


def test_inverse_sigmoid():
    x = torch.tensor([0.1, 0.5, 0.9])
    assert torch.allclose(inverse_sigmoid(x).sigmoid(), x, atol=1e-5)
    assert torch.isfinite(inverse_sigmoid(torch.tensor([0.0, 1.0]))).all()


@pytest.mark.parametrize("shape", [(4,), (2, 3, 4)])
def test_conversion_keeps_leading_dims(shape):
    x = torch.rand(shape)
    assert box_cxcywh_to_xyxy(x).shape == x.shape


def test_batched_nms_drops_same_class_overlaps_only():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0],    # a, score 0.9
                          [1.0, 1.0, 11.0, 11.0],    # IoU 0.68 with a, same class: dropped
                          [1.0, 1.0, 11.0, 11.0],    # same box, other class: kept
                          [20.0, 20.0, 30.0, 30.0],  # far away: kept
                          [0.0, 0.0, 10.0, 5.0]])    # IoU 0.5 with a: dropped at 0.4, kept at 0.6
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5])
    labels = torch.tensor([0, 0, 1, 0, 0])
    assert batched_nms(boxes, scores, labels, 0.4).tolist() == [0, 2, 3]
    assert batched_nms(boxes, scores, labels, 0.6).tolist() == [0, 2, 3, 4]
    # a dropped box suppresses nothing: b (dropped by a) would otherwise drop c2
    chain = torch.tensor([[0.0, 0.0, 10.0, 10.0], [3.0, 0.0, 13.0, 10.0], [6.0, 0.0, 16.0, 10.0]])
    assert batched_nms(chain, torch.tensor([0.9, 0.8, 0.7]), torch.zeros(3), 0.3).tolist() == [0, 2]
    assert batched_nms(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0), 0.5).tolist() == []
