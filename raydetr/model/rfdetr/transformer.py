"""Two-stage query selection + LW-DETR decoder (RF-DETR's ``transformer``).

Frames: memory (B, S, D) is the projector map flattened row-major; every box is normalised
cxcywh in [0, 1] of the input image. RF-DETR's ``bbox_reparam`` applies throughout: a box delta
(dx, dy, dw, dh) on a box (x, y, w, h) gives (dx*w + x, dy*h + y, exp(dw)*w, exp(dh)*h).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from raydetr.model.rfdetr.decoder import Decoder
from raydetr.model.rfdetr.deformable import MSDeformAttn


def apply_box_delta(delta: Tensor, boxes_cxcywh: Tensor) -> Tensor:
    xy = delta[..., :2] * boxes_cxcywh[..., 2:] + boxes_cxcywh[..., :2]
    wh = delta[..., 2:].exp() * boxes_cxcywh[..., 2:]
    return torch.cat([xy, wh], dim=-1)


def grid_proposals(spatial_shapes: list[tuple[int, int]], device: torch.device
                   ) -> tuple[Tensor, Tensor]:
    """One proposal per cell: (S, 4) cxcywh with side 0.05 * 2**level, and (S, 1) validity.

    Proposals touching the border band (any value outside (0.01, 0.99)) are invalid; they and
    their memory rows are zeroed, as in RF-DETR.
    """
    out = []
    for lvl, (h, w) in enumerate(spatial_shapes):
        ys = torch.linspace(0, h - 1, h, dtype=torch.float32, device=device)
        xs = torch.linspace(0, w - 1, w, dtype=torch.float32, device=device)
        gy, gx = torch.meshgrid(ys, xs, indexing="ij")
        scale = torch.tensor([w, h], dtype=torch.float32, device=device)
        centre = (torch.stack([gx, gy], -1) + 0.5) / scale
        wh = torch.ones_like(centre) * 0.05 * (2.0 ** lvl)
        out.append(torch.cat([centre, wh], -1).view(-1, 4))
    proposals = torch.cat(out, 0)
    valid = ((proposals > 0.01) & (proposals < 0.99)).all(-1, keepdim=True)
    return proposals.masked_fill(~valid, 0.0), valid


class Transformer(nn.Module):
    def __init__(self, d_model: int, sa_heads: int, ca_heads: int, num_queries: int,
                 dec_layers: int, ffn_dim: int, group_detr: int, n_levels: int,
                 n_points: int) -> None:
        super().__init__()
        self.decoder = Decoder(dec_layers, d_model, sa_heads, ca_heads, ffn_dim, n_levels,
                               n_points, group_detr)
        self.enc_output = nn.ModuleList(nn.Linear(d_model, d_model) for _ in range(group_detr))
        self.enc_output_norm = nn.ModuleList(nn.LayerNorm(d_model) for _ in range(group_detr))
        # RF-DETR: xavier on every matrix of the transformer, then the deformable init.
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m.reset_parameters()
        # Filled by LWDETR with copies of its heads (names as in RF-DETR's checkpoints).
        self.enc_out_bbox_embed = nn.ModuleList()
        self.enc_out_class_embed = nn.ModuleList()
        self.num_queries = num_queries
        self.group_detr = group_detr
        self.d_model = d_model

    def select(self, memory: Tensor, spatial_shapes: list[tuple[int, int]]
               ) -> tuple[Tensor, Tensor, Tensor]:
        """Per group: top-k cells by max class logit.

        -> (initial boxes, detached) (B, G*k, 4), selected features (B, G*k, D), selected boxes
        with grad (B, G*k, 4); G = group_detr in training, 1 in eval.

        The scores of every cell only pick the top k (``topk`` passes no gradient to them), so
        under autograd they are computed without it and the k selected cells' features are
        computed again with it: the backward then runs over G*k rows instead of G*S. Both are
        the same per-row linear + LayerNorm, so the selected features equal the scored ones.
        """
        proposals, valid = grid_proposals(spatial_shapes, memory.device)
        memory = memory.masked_fill(~valid[None], 0.0)
        groups = self.group_detr if self.training else 1
        k = min(self.num_queries, memory.shape[1])
        recompute = torch.is_grad_enabled()
        boxes_sel, feats_sel = [], []
        for g in range(groups):
            with torch.set_grad_enabled(not recompute):
                feats = self.enc_output_norm[g](self.enc_output[g](memory))
                logits = self.enc_out_class_embed[g](feats)
            idx = torch.topk(logits.max(-1)[0], k, dim=1)[1]  # (B, k), descending score
            rows = idx.unsqueeze(-1).repeat(1, 1, self.d_model)
            if recompute:
                sel = self.enc_output_norm[g](self.enc_output[g](torch.gather(memory, 1, rows)))
            else:
                sel = torch.gather(feats, 1, rows)
            # The box head runs on the k selected cells only (RF-DETR runs it on every cell,
            # then gathers; the head is per row, so the selected boxes are the same).
            # indexing, not expand(len(idx), ...): len() is a Python int that an ONNX
            # trace would bake in, so a dynamic-batch graph failed above the traced batch
            props = proposals[idx]  # (B, k, 4)
            boxes_sel.append(apply_box_delta(self.enc_out_bbox_embed[g](sel), props))
            feats_sel.append(sel)
        boxes_all = torch.cat(boxes_sel, dim=1)
        return boxes_all.detach(), torch.cat(feats_sel, dim=1), boxes_all

    def forward(self, feature_map: Tensor, refpoint_embed: Tensor, query_feat: Tensor
                ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """feature_map (B, D, H, W); refpoint_embed (Q, 4), query_feat (Q, D).

        -> decoder states (L, B, Q, D), reference boxes (B, Q, 4), selected encoder features
        (B, Q, D), selected encoder boxes (B, Q, 4).
        """
        bs, _, h, w = feature_map.shape
        spatial_shapes = [(h, w)]
        memory = feature_map.flatten(2).transpose(1, 2)
        init_boxes, enc_feats, enc_boxes = self.select(memory, spatial_shapes)
        tgt = query_feat.unsqueeze(0).repeat(bs, 1, 1)
        refpoints = refpoint_embed.unsqueeze(0).repeat(bs, 1, 1)
        n_sel = init_boxes.shape[1]
        # Slot i's learned refpoint is a box delta on the i-th selected proposal.
        ref_boxes = torch.cat([apply_box_delta(refpoints[:, :n_sel], init_boxes),
                               refpoints[:, n_sel:]], dim=1)
        hs = self.decoder(tgt, ref_boxes, memory, spatial_shapes)
        return hs, ref_boxes, enc_feats, enc_boxes
