"""SetCriterion: Hungarian-matched classification + L1 + GIoU losses (RT-DETR and RF-DETR recipes).

Classification: varifocal (target = IoU of the matched box, default), sigmoid focal, or
RF-DETR's IA-BCE (``ia_bce``). ``group_detr`` > 1 (RF-DETR in training): each block of
Q / group_detr queries is matched on its own and the box count is multiplied by group_detr.
Terms: final decoder layer, every auxiliary layer (suffix ``_aux{i}``), the encoder's top-k
proposals (``_enc``) and denoising queries (``_dn``, ``_dn_aux{i}``; their matching is known).
Every term is normalised by the number of target boxes, averaged over DDP workers.
With ``masks=True`` (RF-DETR Seg) every output set with ``pred_masks`` also gets RF-DETR's
point-sampled ``loss_mask_ce`` and ``loss_mask_dice`` (raydetr.loss.masks); targets must then
carry ``masks`` bool[N, H, W] (one H x W per batch, e.g. the square-resized input's).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from raydetr.config import LossConfig
from raydetr.loss.masks import mask_losses, matched_logits
from raydetr.loss.matcher import HungarianMatcher
from raydetr.ops.boxes import box_cxcywh_to_xyxy, elementwise_box_iou, generalized_box_iou

Indices = list[tuple[Tensor, Tensor]]
_SHARED = ("loss_cls", "loss_bbox", "loss_giou")  # the decoder terms a teacher can share


def num_boxes_across_workers(targets: list[dict[str, Tensor]], device: torch.device,
                             groups: int = 1) -> float:
    """Boxes x groups per worker, averaged over the DDP group (>= 1); plain count without DDP."""
    n = torch.tensor([float(groups * sum(len(t["labels"]) for t in targets))], device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(n)
        n = n / dist.get_world_size()
    return max(n.item(), 1.0)


class SetCriterion(nn.Module):
    """forward(outputs, targets) -> {"loss": weighted total (grad), "loss_cls": .., ...detached}.

    targets: list of dict(labels int64[N], boxes float[N,4] cxcywh normalised); N may be 0.
    With ``masks``: also masks bool[N,H,W], and the result has loss_mask_ce / loss_mask_dice.
    """

    def __init__(self, num_classes: int, matcher: HungarianMatcher, loss_cfg: LossConfig,
                 vfl_alpha: float = 0.75, group_detr: int = 1, masks: bool = False) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.group_detr = group_detr
        self.matcher = matcher
        self.cls_loss = loss_cfg.cls_loss
        self.focal_alpha, self.focal_gamma = loss_cfg.focal_alpha, loss_cfg.focal_gamma
        self.vfl_alpha = vfl_alpha  # RT-DETR's varifocal alpha (focal_alpha is focal's)
        self.weight_dict = {"loss_cls": loss_cfg.weight_cls, "loss_bbox": loss_cfg.weight_bbox,
                            "loss_giou": loss_cfg.weight_giou}
        self.masks = masks
        # the share of the final and auxiliary decoder layers' class and box terms in the
        # training loss; a distillation teacher (raydetr.loss.distill.DistillLoss) takes the
        # rest. Mask, encoder and denoising terms keep their weight (no teacher gives them).
        self.decoder_share = 1.0
        if masks:
            self.weight_dict.update(loss_mask_ce=loss_cfg.weight_mask_ce,
                                    loss_mask_dice=loss_cfg.weight_mask_dice)
            self.mask_point_sample_ratio = loss_cfg.mask_point_sample_ratio

    def _classification(self, logits: Tensor, boxes: Tensor, targets: list[dict], indices: Indices,
                        num_boxes: float) -> Tensor:
        loss = self.classification_map(logits, boxes, targets, indices)
        return loss.mean(1).sum() * logits.shape[1] / num_boxes

    def classification_map(self, logits: Tensor, boxes: Tensor, targets: list[dict],
                           indices: Indices) -> Tensor:
        """This criterion's classification loss of a matching, per (image, query, class) entry,
        float32, not reduced (the distillation loss weighs it per query)."""
        b, q, c = logits.shape
        batch_idx = torch.cat([torch.full_like(s, i) for i, (s, _) in enumerate(indices)])
        src_idx = torch.cat([s for s, _ in indices])
        tgt_labels = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)])
        onehot = torch.zeros(b, q, c, device=logits.device, dtype=logits.dtype)
        onehot[batch_idx, src_idx, tgt_labels] = 1.0
        logits = logits.float()
        onehot = onehot.float()
        if self.cls_loss == "varifocal":
            tgt_boxes = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)])
            iou = elementwise_box_iou(box_cxcywh_to_xyxy(boxes[batch_idx, src_idx].float()),
                                      box_cxcywh_to_xyxy(tgt_boxes.float())).detach()
            score = torch.zeros(b, q, device=logits.device)
            score[batch_idx, src_idx] = iou
            target = score[..., None] * onehot
            pred = logits.sigmoid().detach()
            weight = self.vfl_alpha * pred.pow(self.focal_gamma) * (1 - onehot) + target
            loss = F.binary_cross_entropy_with_logits(logits, target, weight=weight, reduction="none")
        elif self.cls_loss == "ia_bce":
            loss = self._ia_bce(logits, boxes, targets, indices, batch_idx, src_idx, tgt_labels)
        else:
            prob = logits.sigmoid()
            ce = F.binary_cross_entropy_with_logits(logits, onehot, reduction="none")
            p_t = prob * onehot + (1 - prob) * (1 - onehot)
            loss = ce * (1 - p_t).pow(self.focal_gamma)
            if self.focal_alpha >= 0:
                loss = loss * (self.focal_alpha * onehot + (1 - self.focal_alpha) * (1 - onehot))
        return loss

    def _ia_bce(self, logits: Tensor, boxes: Tensor, targets: list[dict], indices: Indices,
                batch_idx: Tensor, src_idx: Tensor, tgt_labels: Tensor) -> Tensor:
        """RF-DETR's IoU-aware BCE, per (query, class) entry, un-normalised.

        Matched entry: positive weight t = max(p^alpha * IoU^(1-alpha), 0.01) (detached),
        negative weight 1 - t. Every other entry: positive 0, negative p^gamma, which RF-DETR
        leaves attached to the graph (so do we: its gradient is part of the recipe).
        """
        prob = logits.sigmoid()
        neg = prob.pow(self.focal_gamma)
        pos = torch.zeros_like(logits)
        tgt_boxes = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)])
        iou = elementwise_box_iou(box_cxcywh_to_xyxy(boxes[batch_idx, src_idx].detach().float()),
                                  box_cxcywh_to_xyxy(tgt_boxes.float()))
        t = (prob[batch_idx, src_idx, tgt_labels].pow(self.focal_alpha)
             * iou.pow(1 - self.focal_alpha)).clamp(min=0.01).detach()
        pos = pos.index_put((batch_idx, src_idx, tgt_labels), t)
        neg = neg.index_put((batch_idx, src_idx, tgt_labels), 1 - t)
        # -pos*log(p) - neg*log(1-p), with log(1-p) = logsigmoid(x) - x for stability
        return neg * logits - F.logsigmoid(logits) * (pos + neg)

    def _boxes(self, boxes: Tensor, targets: list[dict], indices: Indices, num_boxes: float
               ) -> tuple[Tensor, Tensor]:
        batch_idx = torch.cat([torch.full_like(s, i) for i, (s, _) in enumerate(indices)])
        src_idx = torch.cat([s for s, _ in indices])
        src = boxes[batch_idx, src_idx].float()
        tgt = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)]).float()
        loss_bbox = F.l1_loss(src, tgt, reduction="sum") / num_boxes
        giou = torch.diag(generalized_box_iou(box_cxcywh_to_xyxy(src), box_cxcywh_to_xyxy(tgt)))
        loss_giou = (1 - giou).sum() / num_boxes
        if src.numel() == 0:  # keep the graph connected (DDP wants every output used)
            loss_bbox = loss_bbox + boxes.sum() * 0.0
            loss_giou = loss_giou + boxes.sum() * 0.0
        return loss_bbox, loss_giou

    def _terms(self, out: dict, targets: list[dict], indices: Indices, num_boxes: float
               ) -> dict[str, Tensor]:
        loss_bbox, loss_giou = self._boxes(out["pred_boxes"], targets, indices, num_boxes)
        terms = {"loss_cls": self._classification(out["pred_logits"], out["pred_boxes"], targets,
                                                  indices, num_boxes),
                 "loss_bbox": loss_bbox, "loss_giou": loss_giou}
        if self.masks and "pred_masks" in out:
            batch_idx = torch.cat([torch.full_like(s, i) for i, (s, _) in enumerate(indices)])
            src_idx = torch.cat([s for s, _ in indices])
            logits = matched_logits(out["pred_masks"], batch_idx, src_idx)
            tgt = torch.cat([t["masks"][j] for t, (_, j) in zip(targets, indices)])
            terms["loss_mask_ce"], terms["loss_mask_dice"] = mask_losses(
                logits, tgt, num_boxes, self.mask_point_sample_ratio)
        return terms

    @staticmethod
    def _dn_indices(meta: dict, targets: list[dict]) -> Indices:
        groups = meta["num_groups"]
        out = []
        for pos, t in zip(meta["positive_idx"], targets):
            n = len(t["labels"])
            gt = torch.arange(n, device=pos.device).repeat(groups)
            out.append((pos.long().cpu(), gt.cpu()))
        return out

    def forward(self, outputs: dict, targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        device = outputs["pred_logits"].device
        if self.masks and "pred_masks" in outputs and any("masks" not in t for t in targets):
            raise ValueError("this segmentation model's loss needs 'masks' (bool [N, H, W]) in "
                             "every target; the dataset gave boxes only")
        targets = [{"labels": t["labels"].to(device), "boxes": t["boxes"].to(device),
                    **({"masks": t["masks"].to(device)} if self.masks and "masks" in t else {})}
                   for t in targets]
        # group DETR: every group is matched to every target, so there are G x as many matches
        groups = self.group_detr if self.training else 1
        num_boxes = num_boxes_across_workers(targets, device, groups)
        terms: dict[str, Tensor] = {}

        def add(out: dict, indices: Indices, suffix: str, norm: float) -> None:
            indices = [(s.to(device), j.to(device)) for s, j in indices]
            for k, v in self._terms(out, targets, indices, norm).items():
                terms[k + suffix] = v

        add(outputs, self.matcher(outputs, targets, groups), "", num_boxes)
        for i, aux in enumerate(outputs.get("aux_outputs") or []):
            add(aux, self.matcher(aux, targets, groups), f"_aux{i}", num_boxes)
        if outputs.get("enc_outputs"):
            enc = outputs["enc_outputs"]
            add(enc, self.matcher(enc, targets, groups), "_enc", num_boxes)
        if "dn_outputs" in outputs:
            meta = outputs["dn_meta"]
            dn_idx = self._dn_indices(meta, targets)
            dn_norm = num_boxes * meta["num_groups"]
            add(outputs["dn_outputs"], dn_idx, "_dn", dn_norm)
            for i, aux in enumerate(outputs.get("dn_aux_outputs", [])):
                add(aux, dn_idx, f"_dn_aux{i}", dn_norm)

        share = self.decoder_share if self.training else 1.0

        def weight(k: str) -> float:
            base = k.split("_aux")[0].split("_enc")[0].split("_dn")[0]
            shared = base in _SHARED and "_enc" not in k and "_dn" not in k
            return self.weight_dict[base] * share if shared else self.weight_dict[base]

        total = sum(weight(k) * v for k, v in terms.items())
        result = {"loss": total}
        result.update({k: v.detach() for k, v in terms.items()})
        return result
