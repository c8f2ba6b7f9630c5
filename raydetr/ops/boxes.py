"""Box formats, IoU and generalized IoU in plain torch (no torchvision).

Frames: ``cxcywh`` = (centre x, centre y, width, height); ``xyxy`` = (x0, y0, x1, y1). Both
work in any unit (normalised [0, 1] or absolute pixels) as long as inputs share one.
"""

from __future__ import annotations

import torch
from torch import Tensor


def box_cxcywh_to_xyxy(boxes_cxcywh: Tensor) -> Tensor:
    """[..., 4] cxcywh -> [..., 4] xyxy (same unit). A negative width or height counts as 0
    (a point or line at the centre), as in RF-DETR's ``box_ops``: its raw learned reference
    boxes (queries beyond the cells of a small image) can have negative sides, and the loss,
    matcher and post-processing must see the same boxes RF-DETR's do. Sigmoid boxes are
    never negative, so this changes nothing for them."""
    cx, cy, w, h = boxes_cxcywh.unbind(-1)
    w, h = w.clamp(min=0.0), h.clamp(min=0.0)
    return torch.stack((cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h), dim=-1)


def box_xyxy_to_cxcywh(boxes_xyxy: Tensor) -> Tensor:
    """[..., 4] xyxy -> [..., 4] cxcywh (same unit)."""
    x0, y0, x1, y1 = boxes_xyxy.unbind(-1)
    return torch.stack(((x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0), dim=-1)


def box_area(boxes_xyxy: Tensor) -> Tensor:
    """[..., 4] xyxy -> [...] area (0 for degenerate boxes)."""
    wh = (boxes_xyxy[..., 2:] - boxes_xyxy[..., :2]).clamp(min=0)
    return wh[..., 0] * wh[..., 1]


def box_iou(boxes1_xyxy: Tensor, boxes2_xyxy: Tensor) -> tuple[Tensor, Tensor]:
    """Pairwise IoU. [N,4], [M,4] xyxy -> (iou [N,M], union [N,M])."""
    area1 = box_area(boxes1_xyxy)
    area2 = box_area(boxes2_xyxy)
    lt = torch.max(boxes1_xyxy[:, None, :2], boxes2_xyxy[None, :, :2])
    rb = torch.min(boxes1_xyxy[:, None, 2:], boxes2_xyxy[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area1[:, None] + area2[None, :] - inter
    return inter / union.clamp(min=1e-9), union


def generalized_box_iou(boxes1_xyxy: Tensor, boxes2_xyxy: Tensor) -> Tensor:
    """Pairwise generalized IoU in [-1, 1]. [N,4], [M,4] xyxy -> [N,M].

    GIoU = IoU - (|C| - |A u B|) / |C| with C the smallest enclosing box (Rezatofighi et al.).
    Degenerate (zero-area) boxes are allowed: the small epsilon keeps the result finite.
    """
    iou, union = box_iou(boxes1_xyxy, boxes2_xyxy)
    lt = torch.min(boxes1_xyxy[:, None, :2], boxes2_xyxy[None, :, :2])
    rb = torch.max(boxes1_xyxy[:, None, 2:], boxes2_xyxy[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    enclosing = wh[..., 0] * wh[..., 1]
    return iou - (enclosing - union) / enclosing.clamp(min=1e-9)


def elementwise_box_iou(boxes1_xyxy: Tensor, boxes2_xyxy: Tensor) -> Tensor:
    """IoU of matching pairs. [N,4], [N,4] xyxy -> [N]."""
    lt = torch.max(boxes1_xyxy[:, :2], boxes2_xyxy[:, :2])
    rb = torch.min(boxes1_xyxy[:, 2:], boxes2_xyxy[:, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[:, 0] * wh[:, 1]
    union = box_area(boxes1_xyxy) + box_area(boxes2_xyxy) - inter
    return inter / union.clamp(min=1e-9)


def batched_nms(boxes_xyxy: Tensor, scores: Tensor, labels: Tensor, iou_threshold: float
                ) -> Tensor:
    """Greedy class-aware non-maximum suppression: int64 indices of the kept boxes, highest
    score first. A box is dropped when a higher-scored kept box of the same label overlaps it
    by IoU > ``iou_threshold``. [N,4] xyxy, [N], [N]; O(N^2), meant for N in the hundreds."""
    order = scores.argsort(descending=True)
    n = order.numel()
    if n == 0:
        return order
    boxes, labels = boxes_xyxy[order], labels[order]
    iou, _ = box_iou(boxes, boxes)
    suppress = ((iou > iou_threshold) & (labels[:, None] == labels[None, :])).triu(1)
    keep = torch.ones(n, dtype=torch.bool, device=boxes.device)
    for i in range(n - 1):
        if keep[i]:
            keep &= ~suppress[i]
    return order[keep]


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    """logit(x) with x clamped to [eps, 1 - eps] so it stays finite."""
    x = x.clamp(min=0.0, max=1.0)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))
