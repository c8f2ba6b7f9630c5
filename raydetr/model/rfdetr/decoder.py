"""LW-DETR decoder with "lite" reference refinement, as RF-DETR configures it.

The reference boxes (normalised cxcywh) are fixed for all layers, so one query position
embedding is computed once and shared. Layers are post-norm: self-attention (restricted to each
300-query group in training), deformable cross-attention, FFN.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from raydetr.model.rfdetr.deformable import MSDeformAttn


class MLP(nn.Module):
    """Linear layers with ReLU between them (``layers.<i>`` as in RF-DETR's checkpoints)."""

    def __init__(self, d_in: int, d_hidden: int, d_out: int, num_layers: int) -> None:
        super().__init__()
        dims = [d_in] + [d_hidden] * (num_layers - 1) + [d_out]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: Tensor) -> Tensor:
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == last else F.relu(layer(x))
        return x


def sine_embed_boxes(boxes_cxcywh: Tensor, feats_per_coord: int = 128) -> Tensor:
    """(B, Q, 4) -> (B, Q, 4*feats): interleaved sin/cos of 2*pi*coord / 10000^(2*floor(i/2)/F).

    Order of the four blocks is (cy, cx, w, h), as Conditional/DAB-DETR's decoders expect.
    """
    dim_t = torch.arange(feats_per_coord, dtype=boxes_cxcywh.dtype, device=boxes_cxcywh.device)
    dim_t = 10000 ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / feats_per_coord)
    scale = 2 * math.pi

    def embed(coord: Tensor) -> Tensor:
        pos = (coord * scale)[:, :, None] / dim_t
        return torch.stack((pos[:, :, 0::2].sin(), pos[:, :, 1::2].cos()), dim=3).flatten(2)

    cx, cy, w, h = (boxes_cxcywh[:, :, i] for i in range(4))
    return torch.cat((embed(cy), embed(cx), embed(w), embed(h)), dim=2)


class DecoderLayer(nn.Module):
    def __init__(self, d_model: int, sa_heads: int, ca_heads: int, ffn_dim: int,
                 n_levels: int, n_points: int, group_detr: int) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, sa_heads, dropout=0.0, batch_first=True)
        self.norm1 = nn.LayerNorm(d_model)
        self.cross_attn = MSDeformAttn(d_model, n_levels, ca_heads, n_points)
        self.linear1 = nn.Linear(d_model, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.group_detr = group_detr

    def forward(self, tgt: Tensor, query_pos: Tensor, ref_boxes: Tensor, memory: Tensor,
                spatial_shapes: list[tuple[int, int]]) -> Tensor:
        bs, nq, _ = tgt.shape
        q = k = tgt + query_pos
        v = tgt
        if self.training:
            # Group DETR: each group of queries attends only to itself -> groups go to batch.
            size = nq // self.group_detr
            q = torch.cat(q.split(size, dim=1), dim=0)
            k = torch.cat(k.split(size, dim=1), dim=0)
            v = torch.cat(v.split(size, dim=1), dim=0)
        attn = self.self_attn(q, k, v, need_weights=False)[0]
        if self.training:
            attn = torch.cat(attn.split(bs, dim=0), dim=1)
        tgt = self.norm1(tgt + attn)
        tgt = self.norm2(tgt + self.cross_attn(tgt + query_pos, ref_boxes, memory, spatial_shapes))
        return self.norm3(tgt + self.linear2(F.relu(self.linear1(tgt))))


class Decoder(nn.Module):
    def __init__(self, num_layers: int, d_model: int, sa_heads: int, ca_heads: int,
                 ffn_dim: int, n_levels: int, n_points: int, group_detr: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            DecoderLayer(d_model, sa_heads, ca_heads, ffn_dim, n_levels, n_points, group_detr)
            for _ in range(num_layers))
        self.norm = nn.LayerNorm(d_model)
        self.ref_point_head = MLP(2 * d_model, d_model, d_model, 2)
        self.d_model = d_model

    def forward(self, tgt: Tensor, ref_boxes_cxcywh: Tensor, memory: Tensor,
                spatial_shapes: list[tuple[int, int]]) -> Tensor:
        """-> (num_layers, B, Q, D): every layer's output through the shared final norm."""
        query_pos = self.ref_point_head(sine_embed_boxes(ref_boxes_cxcywh, self.d_model // 2))
        # Same reference box on every level (single image, no padding: valid ratios are 1).
        ref_per_level = ref_boxes_cxcywh[:, :, None].expand(-1, -1, len(spatial_shapes), -1)
        outs = []
        for layer in self.layers:
            tgt = layer(tgt, query_pos, ref_per_level, memory, spatial_shapes)
            outs.append(self.norm(tgt))
        return torch.stack(outs)
