"""Hungarian matching between predictions and ground truth (scipy linear_sum_assignment).

The cost of the whole batch is computed at once ([B*Q, sum N]) and split per image, as in
DETR: cost = cost_class * focal class cost + cost_bbox * L1(cxcywh) - cost_giou * GIoU.
With mask costs set (RF-DETR Seg) and masks in both outputs and targets, the point-sampled mask
BCE and dice costs are added (raydetr.loss.masks.mask_cost).
With ``groups`` > 1 (group DETR, the RF-DETR family in training) the Q queries are G blocks of
Q/G and each block is matched to all targets independently; indices are in the full Q range.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from raydetr.loss.masks import mask_cost
from raydetr.ops.boxes import box_cxcywh_to_xyxy, generalized_box_iou


class HungarianMatcher(nn.Module):
    """forward(outputs, targets) -> list of (pred_idx int64[K], target_idx int64[K]) per image.

    outputs: pred_logits [B,Q,C] (sigmoid logits), pred_boxes [B,Q,4] cxcywh normalised.
    targets: list of dict(labels int64[N], boxes float[N,4] cxcywh normalised).
    K = min(Q, N); an image with no targets gets two empty index tensors.
    With ``masks=True``: outputs also carry pred_masks and targets masks bool[N,H,W].
    """

    def __init__(self, cost_class: float = 2.0, cost_bbox: float = 5.0, cost_giou: float = 2.0,
                 alpha: float = 0.25, gamma: float = 2.0, *, masks: bool = False,
                 cost_mask_ce: float = 5.0, cost_mask_dice: float = 5.0,
                 mask_point_sample_ratio: int = 16) -> None:
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("loss.cost_class, cost_bbox and cost_giou cannot all be 0")
        self.cost_class, self.cost_bbox, self.cost_giou = cost_class, cost_bbox, cost_giou
        self.alpha, self.gamma = alpha, gamma
        self.masks = masks
        self.cost_mask_ce, self.cost_mask_dice = cost_mask_ce, cost_mask_dice
        self.mask_point_sample_ratio = mask_point_sample_ratio

    @torch.no_grad()
    def cost_matrix(self, outputs: dict, targets: list[dict[str, Tensor]]) -> Tensor:
        """[B, Q, sum N] cost of the whole batch (float32, on the outputs' device)."""
        b, q, _ = outputs["pred_logits"].shape
        logits = outputs["pred_logits"].flatten(0, 1).float()  # [B*Q, C]
        prob = logits.sigmoid()
        boxes = outputs["pred_boxes"].flatten(0, 1).float()  # [B*Q, 4]
        tgt_ids = torch.cat([t["labels"] for t in targets]).long()
        tgt_boxes = torch.cat([t["boxes"] for t in targets]).float().to(boxes.device)
        p, x = prob[:, tgt_ids], logits[:, tgt_ids]
        # log(1 - p) = logsigmoid(-x): finite for saturated logits, unlike log(1 - p + eps)
        neg = (1 - self.alpha) * p.pow(self.gamma) * -F.logsigmoid(-x)
        pos = self.alpha * (1 - p).pow(self.gamma) * -F.logsigmoid(x)
        cost_class = pos - neg
        cost_bbox = torch.cdist(boxes, tgt_boxes, p=1)
        cost_giou = -generalized_box_iou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(tgt_boxes))
        cost = self.cost_bbox * cost_bbox + self.cost_class * cost_class + self.cost_giou * cost_giou
        if self.masks and "pred_masks" in outputs and "masks" in targets[0]:
            tgt_masks = torch.cat([t["masks"] for t in targets]).to(boxes.device)
            cost_ce, cost_dice = mask_cost(outputs["pred_masks"], tgt_masks,
                                           self.mask_point_sample_ratio)
            cost = cost + self.cost_mask_ce * cost_ce.float() + self.cost_mask_dice * cost_dice.float()
        return cost.view(b, q, -1)

    @torch.no_grad()
    def forward(self, outputs: dict, targets: list[dict[str, Tensor]], groups: int = 1
                ) -> list[tuple[Tensor, Tensor]]:
        sizes = [len(t["labels"]) for t in targets]
        empty = torch.empty(0, dtype=torch.int64)
        if sum(sizes) == 0:
            return [(empty, empty) for _ in sizes]
        q = outputs["pred_logits"].shape[1]
        if groups < 1 or q % groups:
            raise ValueError(f"{q} queries cannot be split into {groups} equal groups")
        per_group = q // groups
        cost = self.cost_matrix(outputs, targets).cpu()
        cost = torch.nan_to_num(cost, nan=1e6, posinf=1e6, neginf=-1e6)
        indices = []
        for i, c in enumerate(cost.split(sizes, -1)):
            if sizes[i] == 0:
                indices.append((empty, empty))
                continue
            rows_all, cols_all = [], []
            for g, block in enumerate(c[i].split(per_group, 0)):
                rows, cols = linear_sum_assignment(block.numpy())
                rows_all.append(rows + g * per_group)
                cols_all.append(cols)
            indices.append((torch.as_tensor(np.concatenate(rows_all), dtype=torch.int64),
                            torch.as_tensor(np.concatenate(cols_all), dtype=torch.int64)))
        return indices
