"""Multi-scale deformable attention (Deformable DETR) in plain PyTorch via ``grid_sample``.

Reference boxes are normalised cxcywh in [0, 1] of the feature map (top-left 0, bottom-right 1);
each head samples ``n_points`` per level around the box centre, offsets scaled by the box size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def sample_and_combine(value: Tensor, spatial_shapes: list[tuple[int, int]],
                       locations: Tensor, weights: Tensor) -> Tensor:
    """Bilinear samples of ``value`` at ``locations``, summed with ``weights``.

    value (B, heads, head_dim, S); locations (B, Q, heads, L, P, 2) in [0, 1] xy;
    weights (B, Q, heads, L*P) -> (B, Q, heads*head_dim).
    """
    b, heads, head_dim, _ = value.shape
    _, q, _, levels, points, _ = locations.shape
    per_level = value.split([h * w for h, w in spatial_shapes], dim=3)
    grids = 2 * locations - 1  # grid_sample wants [-1, 1]
    sampled = []
    for lvl, (h, w) in enumerate(spatial_shapes):
        v = per_level[lvl].reshape(b * heads, head_dim, h, w)
        g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)  # (B*heads, Q, P, 2)
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros",
                                     align_corners=False))  # (B*heads, head_dim, Q, P)
    weights = weights.transpose(1, 2).reshape(b * heads, 1, q, levels * points)
    stacked = torch.stack(sampled, dim=-2).flatten(-2)  # (B*heads, head_dim, Q, L*P)
    out = (stacked * weights).sum(-1).view(b, heads * head_dim, q)
    return out.transpose(1, 2).contiguous()


class MSDeformAttn(nn.Module):
    def __init__(self, d_model: int, n_levels: int, n_heads: int, n_points: int) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model {d_model} must be divisible by n_heads {n_heads}")
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Deformable DETR's init: zero offsets/weights, bias points each head in its own
        # direction (ring of n_heads angles), the i-th point i+1 steps out.
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        dirs = torch.stack([angles.cos(), angles.sin()], -1)
        dirs = dirs / dirs.abs().max(-1, keepdim=True)[0]
        steps = torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        bias = dirs.view(self.n_heads, 1, 1, 2).repeat(1, self.n_levels, self.n_points, 1) * steps
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(bias.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(self, query: Tensor, ref_boxes: Tensor, memory: Tensor,
                spatial_shapes: list[tuple[int, int]]) -> Tensor:
        """query (B, Q, D); ref_boxes (B, Q, L, 4) cxcywh; memory (B, S, D) -> (B, Q, D)."""
        b, q, _ = query.shape
        s = memory.shape[1]
        value = self.value_proj(memory)
        offsets = self.sampling_offsets(query).view(
            b, q, self.n_heads, self.n_levels, self.n_points, 2)
        weights = self.attention_weights(query).view(b, q, self.n_heads,
                                                     self.n_levels * self.n_points)
        centres = ref_boxes[:, :, None, :, None, :2]
        sizes = ref_boxes[:, :, None, :, None, 2:]
        # Offsets are in units of half the box size per point step.
        locations = centres + offsets / self.n_points * sizes * 0.5
        weights = F.softmax(weights, -1)
        value = value.transpose(1, 2).contiguous().view(
            b, self.n_heads, self.d_model // self.n_heads, s)
        return self.output_proj(sample_and_combine(value, spatial_shapes, locations, weights))
