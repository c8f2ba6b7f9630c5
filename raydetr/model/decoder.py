"""Deformable-attention decoder with iterative box refinement (RT-DETR / Deformable-DETR).

Multi-scale deformable attention is the pure-PyTorch reference of Deformable-DETR
(``ms_deform_attn_core_pytorch``: one ``F.grid_sample`` per level), so it runs anywhere.
Boxes are normalised cxcywh in [0, 1] of the (square, resized) model input throughout.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from raydetr.ops.boxes import inverse_sigmoid


class MLP(nn.Module):
    """Linear layers with ReLU in between: [..., in] -> [..., out]."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


def ms_deform_attn(value: Tensor, spatial_shapes: list[tuple[int, int]], locations: Tensor,
                   weights: Tensor) -> Tensor:
    """Multi-scale deformable attention core (pure PyTorch).

    value [B,S,H,Dh] (S = sum h*w over levels, row-major per level); locations [B,Q,H,L,P,2]
    normalised (x, y) in [0, 1]; weights [B,Q,H,L,P] (softmaxed over L*P) -> [B,Q,H*Dh].
    """
    b, _, heads, dh = value.shape
    _, q, _, levels, points, _ = locations.shape
    # sampling runs in float32 (bf16 sampling positions would be off by up to ~0.5% of the map)
    per_level = value.float().split([h * w for h, w in spatial_shapes], dim=1)
    grids = 2 * locations.float() - 1
    sampled = []
    for lvl, (h, w) in enumerate(spatial_shapes):
        v = per_level[lvl].flatten(2).transpose(1, 2).reshape(b * heads, dh, h, w)
        g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)  # [B*H, Q, P, 2]
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    attn = weights.float().transpose(1, 2).reshape(b * heads, 1, q, levels * points)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * attn).sum(-1)  # [B*H, Dh, Q]
    return out.view(b, heads * dh, q).transpose(1, 2).to(value.dtype)


class MSDeformableAttention(nn.Module):
    """forward(query [B,Q,D], ref_boxes [B,Q,1,4] cxcywh, value [B,S,D], shapes) -> [B,Q,D]."""

    def __init__(self, dim: int, n_heads: int = 8, n_levels: int = 3, n_points: int = 4) -> None:
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"hidden_dim {dim} must be divisible by the {n_heads} heads")
        self.n_heads, self.n_levels, self.n_points = n_heads, n_levels, n_points
        self.sampling_offsets = nn.Linear(dim, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(dim, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim)
        self._reset()

    def _reset(self) -> None:
        nn.init.zeros_(self.sampling_offsets.weight)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = grid / grid.abs().max(-1, keepdim=True).values
        grid = grid.view(self.n_heads, 1, 1, 2).repeat(1, self.n_levels, self.n_points, 1)
        for i in range(self.n_points):
            grid[:, :, i, :] *= i + 1
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(self, query: Tensor, ref_boxes: Tensor, value: Tensor,
                spatial_shapes: list[tuple[int, int]]) -> Tensor:
        b, q, _ = query.shape
        h, lv, p = self.n_heads, self.n_levels, self.n_points
        v = self.value_proj(value).view(b, value.shape[1], h, -1)
        offsets = self.sampling_offsets(query).view(b, q, h, lv, p, 2)
        weights = self.attention_weights(query).view(b, q, h, lv * p).softmax(-1)
        weights = weights.view(b, q, h, lv, p)
        # offsets are relative to the reference box size (Deformable-DETR's 4-d reference)
        centre = ref_boxes[:, :, None, :, None, :2]
        half_wh = ref_boxes[:, :, None, :, None, 2:]
        locations = centre + offsets / p * half_wh * 0.5
        return self.output_proj(ms_deform_attn(v, spatial_shapes, locations, weights))


class DecoderLayer(nn.Module):
    """Self-attention (with the denoising mask) -> deformable cross-attention -> FFN."""

    def __init__(self, dim: int, nhead: int, ffn_dim: int, n_levels: int, n_points: int) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, nhead, batch_first=True)
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn = MSDeformableAttention(dim, nhead, n_levels, n_points)
        self.norm2 = nn.LayerNorm(dim)
        self.linear1 = nn.Linear(dim, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, tgt: Tensor, ref_boxes: Tensor, memory: Tensor, query_pos: Tensor,
                attn_mask: Tensor | None, spatial_shapes: list[tuple[int, int]]) -> Tensor:
        q = k = tgt + query_pos
        tgt = self.norm1(tgt + self.self_attn(q, k, tgt, attn_mask=attn_mask, need_weights=False)[0])
        tgt = self.norm2(tgt + self.cross_attn(tgt + query_pos, ref_boxes, memory, spatial_shapes))
        return self.norm3(tgt + self.linear2(F.relu(self.linear1(tgt))))


class Decoder(nn.Module):
    """Decoder stack with per-layer class / box heads and iterative box refinement.

    forward(tgt [B,Q,D], ref_unact [B,Q,4] (inverse-sigmoid cxcywh), memory [B,S,D], shapes,
    attn_mask [Q,Q] bool (True = blocked) | None)
      -> (logits [L,B,Q,C], boxes [L,B,Q,4] cxcywh normalised), one entry per decoder layer.
    Each layer refines the previous layer's (detached) boxes; the un-detached previous box is
    used for the loss of layers > 0, as in RT-DETR.
    """

    def __init__(self, dim: int, nhead: int, ffn_dim: int, num_layers: int, num_classes: int,
                 n_levels: int = 3, n_points: int = 4, gradient_checkpointing: bool = False):
        super().__init__()
        self.layers = nn.ModuleList(
            DecoderLayer(dim, nhead, ffn_dim, n_levels, n_points) for _ in range(num_layers)
        )
        self.query_pos_head = MLP(4, 2 * dim, dim, 2)
        self.score_heads = nn.ModuleList(nn.Linear(dim, num_classes) for _ in range(num_layers))
        self.bbox_heads = nn.ModuleList(MLP(dim, dim, 4, 3) for _ in range(num_layers))
        self.gradient_checkpointing = gradient_checkpointing
        prior_bias = -math.log((1 - 0.01) / 0.01)
        for head in self.score_heads:
            nn.init.constant_(head.bias, prior_bias)
        for head in self.bbox_heads:
            nn.init.zeros_(head.layers[-1].weight)
            nn.init.zeros_(head.layers[-1].bias)

    def forward(self, tgt: Tensor, ref_unact: Tensor, memory: Tensor,
                spatial_shapes: list[tuple[int, int]], attn_mask: Tensor | None
                ) -> tuple[Tensor, Tensor]:
        ref_detached = ref_unact.sigmoid().detach()
        ref_prev = ref_detached
        logits, boxes = [], []
        for i, layer in enumerate(self.layers):
            query_pos = self.query_pos_head(ref_detached)
            args = (tgt, ref_detached.unsqueeze(2), memory, query_pos, attn_mask)
            if self.gradient_checkpointing and self.training:
                tgt = checkpoint(layer, *args, spatial_shapes, use_reentrant=False)
            else:
                tgt = layer(*args, spatial_shapes)
            delta = self.bbox_heads[i](tgt)
            ref_new = (delta + inverse_sigmoid(ref_detached)).sigmoid()
            boxes.append(ref_new if i == 0 else (delta + inverse_sigmoid(ref_prev)).sigmoid())
            logits.append(self.score_heads[i](tgt))
            ref_prev = ref_new
            ref_detached = ref_new.detach()
        return torch.stack(logits), torch.stack(boxes)
