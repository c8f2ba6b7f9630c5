"""RF-DETR Seg's mask recipe: point-sampled sigmoid BCE + dice losses and the matcher's mask costs.

Coordinates are normalised (x, y) in [0, 1] of the image, so predicted logits (input / 4) and
ground-truth masks (any size, e.g. the image's) are compared without resizing either:
predictions are sampled bilinearly with border padding, targets with nearest (PointRend's
``point_sample``, align_corners False).

Loss (per matched mask, then summed and divided by the box count):
    P = max(h, h*w // ratio)   with (h, w) the logit map, ratio = mask_point_sample_ratio (16)
    points = the int(0.75 P) most uncertain (-|logit|) of 3P uniform points + the rest uniform
    loss_mask_ce   = mean over points of BCE-with-logits
    loss_mask_dice = 1 - (2 sum(sigmoid(x) t) + 1) / (sum sigmoid(x) + sum t + 1)
Matcher (one point set for the whole batch, h*w // ratio uniform points, no importance):
    cost_mask_ce[i, j]   = mean over points of BCE(x_i, t_j)
    cost_mask_dice[i, j] = the dice loss above for prediction i against target j

Random points come from torch's global RNG in RF-DETR's order (matcher: one ``rand``; loss: the
oversampled set, then the uniform rest), so a seeded run reproduces RF-DETR's values.
``pred_masks`` may be dense logits (B, Q, h, w) (eval) or the head's training factors
{spatial_features (B, D, h, w), query_features (B, Q, D), bias (1,)}.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

MaskOutput = Tensor | dict[str, Tensor]


def point_sample(maps: Tensor, points_xy: Tensor, mode: str = "bilinear") -> Tensor:
    """maps (N, C, H, W), points (N, P, 2) normalised xy in [0, 1] -> (N, C, P)."""
    grid = (2.0 * points_xy - 1.0).unsqueeze(2)  # (N, P, 1, 2) in grid_sample's [-1, 1]
    out = F.grid_sample(maps, grid, mode=mode, padding_mode="border", align_corners=False)
    return out.squeeze(3)


def uncertain_points(logits: Tensor, num_points: int, oversample: int = 3,
                     importance: float = 0.75) -> Tensor:
    """PointRend's importance sampling: logits (N, 1, h, w) -> points (N, num_points, 2)."""
    n = logits.shape[0]
    candidates = torch.rand(n, num_points * oversample, 2, device=logits.device)
    uncertainty = -point_sample(logits, candidates).abs()  # (N, 1, 3P); 0 at the boundary
    k = int(importance * num_points)
    idx = uncertainty[:, 0].topk(k, dim=1)[1]
    chosen = torch.gather(candidates, 1, idx[..., None].expand(-1, -1, 2))
    rest = num_points - k
    if rest > 0:
        chosen = torch.cat([chosen, torch.rand(n, rest, 2, device=logits.device)], dim=1)
    return chosen


def map_size(pred_masks: MaskOutput) -> tuple[int, int]:
    m = pred_masks if isinstance(pred_masks, Tensor) else pred_masks["spatial_features"]
    return int(m.shape[-2]), int(m.shape[-1])


def matched_logits(pred_masks: MaskOutput, batch_idx: Tensor, src_idx: Tensor) -> Tensor:
    """(N, h, w) mask logits of the matched (image, query) pairs, in the order given (sorted by
    image). From the training factors only these N maps are ever formed."""
    if isinstance(pred_masks, Tensor):
        return pred_masks[batch_idx, src_idx]
    spatial, queries = pred_masks["spatial_features"], pred_masks["query_features"]
    if batch_idx.numel() == 0:
        return spatial.new_zeros(0, *spatial.shape[-2:])
    out = []
    for b in batch_idx.unique(sorted=True).tolist():
        rows = src_idx[batch_idx == b]
        out.append(torch.einsum("chw,nc->nhw", spatial[b], queries[b, rows])
                   + pred_masks["bias"])
    return torch.cat(out)


def mask_losses(src_logits: Tensor, target_masks: Tensor, num_boxes: float,
                sample_ratio: int = 16) -> tuple[Tensor, Tensor]:
    """src_logits (N, h, w) and their targets (N, H, W) bool -> (loss_mask_ce, loss_mask_dice)."""
    if src_logits.numel() == 0:
        zero = src_logits.sum()
        return zero, zero
    logits = src_logits.unsqueeze(1)
    targets = target_masks.unsqueeze(1).to(logits.dtype)
    h, w = logits.shape[-2:]
    num_points = max(h, h * w // sample_ratio)
    with torch.no_grad():
        points = uncertain_points(logits, num_points)
        labels = point_sample(targets, points, mode="nearest").squeeze(1)
    x = point_sample(logits, points).squeeze(1)  # (N, P)
    ce = F.binary_cross_entropy_with_logits(x, labels, reduction="none").mean(1).sum() / num_boxes
    p = x.sigmoid()
    dice = 1 - (2 * (p * labels).sum(-1) + 1) / (p.sum(-1) + labels.sum(-1) + 1)
    return ce, dice.sum() / num_boxes


@torch.no_grad()
def mask_cost(pred_masks: MaskOutput, target_masks: Tensor, sample_ratio: int = 16
              ) -> tuple[Tensor, Tensor]:
    """Pairwise (B*Q, T) mask BCE and dice costs on one shared set of uniform points.

    target_masks (T, H, W): the batch's masks concatenated (one size for the batch).
    """
    h, w = map_size(pred_masks)
    num_points = h * w // sample_ratio
    if isinstance(pred_masks, Tensor):
        flat = pred_masks.flatten(0, 1).unsqueeze(1)  # (B*Q, 1, h, w)
        points = torch.rand(1, num_points, 2, device=flat.device)
        x = point_sample(flat, points.repeat(flat.shape[0], 1, 1)).squeeze(1)
    else:
        spatial = pred_masks["spatial_features"]
        points = torch.rand(1, num_points, 2, device=spatial.device)
        sampled = point_sample(spatial, points.repeat(spatial.shape[0], 1, 1))  # (B, D, P)
        x = torch.einsum("bcp,bnc->bnp", sampled, pred_masks["query_features"])
        x = (x + pred_masks["bias"]).flatten(0, 1)
    t = target_masks.to(x.dtype).unsqueeze(1)
    t = point_sample(t, points.repeat(t.shape[0], 1, 1), mode="nearest").squeeze(1)  # (T, P)
    pos = F.binary_cross_entropy_with_logits(x, torch.ones_like(x), reduction="none")
    neg = F.binary_cross_entropy_with_logits(x, torch.zeros_like(x), reduction="none")
    cost_ce = (torch.einsum("nc,mc->nm", pos, t)
               + torch.einsum("nc,mc->nm", neg, 1 - t)) / x.shape[1]
    p = x.sigmoid()
    numerator = 2 * torch.einsum("nc,mc->nm", p, t)
    denominator = p.sum(-1)[:, None] + t.sum(-1)[None, :]
    cost_dice = 1 - (numerator + 1) / (denominator + 1)
    return cost_ce, cost_dice
