"""The detector: backbone -> hybrid encoder -> query selection (+ denoising) -> decoder.

Coordinate frame of every box here: normalised cxcywh in [0, 1] of the model input image.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from raydetr.model.backbone import ResNet
from raydetr.model.decoder import MLP, Decoder
from raydetr.model.encoder import HybridEncoder
from raydetr.ops.boxes import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh, inverse_sigmoid


def make_anchors(spatial_shapes: list[tuple[int, int]], grid_size: float = 0.05,
                 device: torch.device | None = None) -> Tensor:
    """[1, S, 4] inverse-sigmoid cxcywh anchors: cell centres, size grid_size * 2**level."""
    out = []
    for lvl, (h, w) in enumerate(spatial_shapes):
        gy, gx = torch.meshgrid(torch.arange(h, device=device, dtype=torch.float32),
                                torch.arange(w, device=device, dtype=torch.float32),
                                indexing="ij")
        centre = torch.stack([(gx + 0.5) / w, (gy + 0.5) / h], -1).reshape(-1, 2)
        wh = torch.full_like(centre, grid_size * 2.0**lvl)
        out.append(torch.cat([centre, wh], -1))
    return inverse_sigmoid(torch.cat(out, 0)[None].clamp(0.01, 0.99))


def denoising_group(targets: list[dict[str, Tensor]], num_classes: int, num_queries: int,
                    label_embed: nn.Embedding, num_denoising: int, label_noise_ratio: float = 0.5,
                    box_noise_scale: float = 1.0) -> tuple[Tensor, Tensor, Tensor, dict] | None:
    """Contrastive denoising queries (DINO / RT-DETR).

    Each group holds every ground truth twice: a positive (small box noise, must reconstruct
    the box) and a negative (larger noise, must predict "no object"). Returns
    (dn_embed [B,Nd,D], dn_ref_unact [B,Nd,4], attn_mask [Nd+Q, Nd+Q] bool, meta) or None when
    there are no boxes in the batch or ``num_denoising`` is 0.
    """
    num_gts = [len(t["labels"]) for t in targets]
    max_gt = max(num_gts, default=0)
    if num_denoising <= 0 or max_gt == 0:
        return None
    groups = max(1, num_denoising // max_gt)
    bs = len(targets)
    device = targets[0]["boxes"].device
    cls = torch.full((bs, max_gt), num_classes, dtype=torch.long, device=device)
    box = torch.zeros(bs, max_gt, 4, device=device)
    pad = torch.zeros(bs, max_gt, dtype=torch.bool, device=device)
    for i, t in enumerate(targets):
        n = num_gts[i]
        if n:
            cls[i, :n] = t["labels"]
            box[i, :n] = t["boxes"].float()
            pad[i, :n] = True
    cls = cls.repeat(1, 2 * groups)
    box = box.repeat(1, 2 * groups, 1)
    pad = pad.repeat(1, 2 * groups)
    negative = torch.zeros(bs, 2 * max_gt, 1, device=device)
    negative[:, max_gt:] = 1
    negative = negative.repeat(1, groups, 1)
    positive = (1 - negative.squeeze(-1)) * pad
    positive_idx = torch.nonzero(positive)[:, 1].split([n * groups for n in num_gts])
    num_dn = 2 * max_gt * groups

    if label_noise_ratio > 0:
        flip = torch.rand(cls.shape, device=device) < label_noise_ratio * 0.5
        noise = torch.randint_like(cls, 0, num_classes)
        cls = torch.where(flip & pad, noise, cls)
    if box_noise_scale > 0:
        xyxy = box_cxcywh_to_xyxy(box)
        diff = box[..., 2:].repeat(1, 1, 2) * 0.5 * box_noise_scale
        sign = torch.randint_like(box, 0, 2) * 2.0 - 1.0
        part = torch.rand_like(box)
        part = ((part + 1.0) * negative + part * (1 - negative)) * sign
        box = box_xyxy_to_cxcywh((xyxy + part * diff).clamp(0.0, 1.0))
    embed = label_embed(cls)

    size = num_dn + num_queries
    mask = torch.zeros(size, size, dtype=torch.bool, device=device)
    mask[num_dn:, :num_dn] = True  # matching queries must not see the answers
    g = 2 * max_gt
    for i in range(groups):  # groups must not see each other
        mask[i * g:(i + 1) * g, :i * g] = True
        mask[i * g:(i + 1) * g, (i + 1) * g:num_dn] = True
    meta = {"positive_idx": list(positive_idx), "num_groups": groups, "split": [num_dn, num_queries]}
    return embed, inverse_sigmoid(box), mask, meta


class DETR(nn.Module):
    """RT-DETR-style detector.

    forward(images [B,3,H,W] float32 normalised, targets list[dict] | None) -> dict:
      pred_logits [B,Q,C] (sigmoid logits, no no-object class), pred_boxes [B,Q,4] cxcywh in
      [0,1], aux_outputs (earlier decoder layers), enc_outputs (top-k encoder proposals), and in
      training with targets and num_denoising > 0: dn_outputs, dn_aux_outputs, dn_meta.
      With ``return_features`` set (distillation's feature term): features, the encoder's
      three output maps [B,D,H/s,W/s] (s = 8, 16, 32) that the decoder attends to.
    """

    def __init__(self, num_classes: int, backbone: str = "resnet18", hidden_dim: int = 256,
                 num_queries: int = 300, num_decoder_layers: int = 3, nhead: int = 8,
                 encoder_ffn_dim: int = 1024, decoder_ffn_dim: int = 1024, csp_blocks: int = 3,
                 num_points: int = 4, num_denoising: int = 100, label_noise_ratio: float = 0.5,
                 box_noise_scale: float = 1.0, gradient_checkpointing: bool = False) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.num_queries = num_queries
        self.num_denoising = num_denoising
        self.label_noise_ratio = label_noise_ratio
        self.box_noise_scale = box_noise_scale
        self.backbone = ResNet(backbone, gradient_checkpointing)
        self.encoder = HybridEncoder(self.backbone.out_channels, hidden_dim, nhead,
                                     encoder_ffn_dim, 1, csp_blocks, gradient_checkpointing)
        self.memory_proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(hidden_dim, hidden_dim, 1, bias=False), nn.BatchNorm2d(hidden_dim))
            for _ in range(3)
        )
        self.enc_output = nn.Sequential(nn.Linear(hidden_dim, hidden_dim), nn.LayerNorm(hidden_dim))
        self.enc_score_head = nn.Linear(hidden_dim, num_classes)
        self.enc_bbox_head = MLP(hidden_dim, hidden_dim, 4, 3)
        self.denoising_class_embed = nn.Embedding(num_classes + 1, hidden_dim, padding_idx=num_classes)
        self.decoder = Decoder(hidden_dim, nhead, decoder_ffn_dim, num_decoder_layers, num_classes,
                               3, num_points, gradient_checkpointing)
        nn.init.constant_(self.enc_score_head.bias, -math.log((1 - 0.01) / 0.01))
        nn.init.zeros_(self.enc_bbox_head.layers[-1].weight)
        nn.init.zeros_(self.enc_bbox_head.layers[-1].bias)
        self._anchor_cache: dict[tuple, Tensor] = {}
        self.return_features = False  # set by the distillation teacher (raydetr.train.teacher)

    def _anchors(self, shapes: list[tuple[int, int]], device: torch.device) -> Tensor:
        key = (tuple(shapes), str(device))
        if key not in self._anchor_cache:
            self._anchor_cache[key] = make_anchors(shapes, device=device)
        return self._anchor_cache[key]

    def forward(self, images: Tensor, targets: list[dict[str, Tensor]] | None = None) -> dict:
        feats = self.encoder(self.backbone(images))
        feats = [p(f) for p, f in zip(self.memory_proj, feats)]
        shapes = [(f.shape[2], f.shape[3]) for f in feats]
        memory = torch.cat([f.flatten(2).transpose(1, 2) for f in feats], 1)  # [B,S,D]

        dn = None
        if self.training and targets is not None:
            dn = denoising_group(targets, self.num_classes, self.num_queries,
                                 self.denoising_class_embed, self.num_denoising,
                                 self.label_noise_ratio, self.box_noise_scale)

        # query selection: top-k encoder tokens by best class score become the queries
        anchors = self._anchors(shapes, memory.device).to(memory.dtype)
        enc_memory = self.enc_output(memory)
        enc_logits = self.enc_score_head(enc_memory)
        enc_coord_unact = self.enc_bbox_head(enc_memory) + anchors
        k = min(self.num_queries, memory.shape[1])
        topk = enc_logits.max(-1).values.topk(k, dim=1).indices  # [B,k]
        ref_unact = enc_coord_unact.gather(1, topk[..., None].expand(-1, -1, 4))
        enc_topk_logits = enc_logits.gather(1, topk[..., None].expand(-1, -1, self.num_classes))
        tgt = enc_memory.gather(1, topk[..., None].expand(-1, -1, memory.shape[-1])).detach()
        out: dict = {"enc_outputs": {"pred_logits": enc_topk_logits,
                                     "pred_boxes": ref_unact.sigmoid()}}
        ref_unact = ref_unact.detach()
        attn_mask = None
        if dn is not None:
            dn_embed, dn_ref, attn_mask, meta = dn
            if k != self.num_queries:  # fewer tokens than queries: shrink the mask
                keep = meta["split"][0] + k
                attn_mask = attn_mask[:keep, :keep]
                meta["split"] = [meta["split"][0], k]
            tgt = torch.cat([dn_embed.to(tgt.dtype), tgt], 1)
            ref_unact = torch.cat([dn_ref.to(ref_unact.dtype), ref_unact], 1)
        elif self.training:  # keep every parameter in the graph (DDP without unused-param search)
            tgt = tgt + 0.0 * self.denoising_class_embed.weight[0].sum()
        logits, boxes = self.decoder(tgt, ref_unact, memory, shapes, attn_mask)
        if dn is not None:
            num_dn = meta["split"][0]
            dn_logits, logits = logits[:, :, :num_dn], logits[:, :, num_dn:]
            dn_boxes, boxes = boxes[:, :, :num_dn], boxes[:, :, num_dn:]
            out["dn_outputs"] = {"pred_logits": dn_logits[-1], "pred_boxes": dn_boxes[-1]}
            out["dn_aux_outputs"] = [{"pred_logits": a, "pred_boxes": b}
                                     for a, b in zip(dn_logits[:-1], dn_boxes[:-1])]
            out["dn_meta"] = meta
        out["pred_logits"] = logits[-1]
        out["pred_boxes"] = boxes[-1]
        out["aux_outputs"] = [{"pred_logits": a, "pred_boxes": b}
                              for a, b in zip(logits[:-1], boxes[:-1])]
        if self.return_features:
            out["features"] = feats
        return out
