"""Teacher-box distillation for DETR students (Teach-DETR, Huang et al. 2023, TPAMI).

The teacher's predictions on the same augmented batch become a second target set: its boxes
with a (class-mapped) score >= ``score_threshold``, de-duplicated by class-aware NMS at IoU
``nms_iou`` (0.2 in Teach-DETR's released code: a duplicate would ask the student for a second
box on one object, against the ground truth's one-to-one loss), are matched one-to-one to the student's
queries by the student's own Hungarian matcher, and the student pays the usual DETR losses on
that matching, weighted by the teacher's score:

- classification: the student criterion's own classification loss (``SetCriterion.
  classification_map``: varifocal for rtdetr, IA-BCE for rfdetr, focal where chosen; Teach-DETR
  uses its student's focal loss) with the teacher's boxes and labels as the targets, per query
  weighted by the matched teacher box's score, or ``unmatched_weight`` (1, as the ground
  truth's loss weighs them; 0.5 in Teach-DETR's released code, where the term was added) for
  queries matched to no teacher box. A loss of another form than the
  student's own (a focal loss on an IoU-aware student) pulls its scores away from the IoU
  ranking the ground-truth loss teaches (measured: README);
- boxes: L1 (cxcywh) and 1 - GIoU of each matched pair, times the teacher's score;
- each term normalised by the number of teacher boxes (averaged over DDP workers) and weighted
  with the student criterion's ``weight_cls / weight_bbox / weight_giou``; on the final decoder
  layer and every auxiliary layer (each layer matched on its own).

The teacher takes ``weight`` (0 <= weight <= 1) of the decoder's class and box supervision
from the ground truth: building a DistillLoss sets the criterion's ``decoder_share`` to
``1 - weight``, so the student's decoder learns ``(1 - weight) x`` its ground-truth loss
``+ weight x`` the teacher's; the encoder, denoising and mask terms keep their full weight.
Teach-DETR adds its term on top (``+ 1 x``); here that hurt even with a perfect teacher: the
ground truth itself as the teacher set (scores 1, unmatched weight 1) is the decoder's loss
counted twice, and it outweighs the encoder and denoising terms (bench/distill.py
``--teacher-set labels --additive``, README). Shared, a teacher equal to the ground truth
leaves the loss and its gradients as they are, to float rounding
(tests/unit/loss/test_loss_distill.py), and what a teacher knows beyond the labels (scores,
its boxes) replaces part of them instead of piling on.

Where teacher and student have the same classes (``logit_weight`` > 0), the matched queries
also learn the teacher's class probabilities: binary cross-entropy against the teacher's sigmoid
probabilities (soft targets), mean over classes, summed over matches / teacher boxes.

    targets = teacher_targets(teacher_outputs, class_map, num_logits, score_threshold=0.5,
                              nms_iou=0.2)
    terms = DistillLoss(criterion, ...)(student_outputs, targets)  # terms["loss_distill"]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from raydetr.loss.criterion import SetCriterion, num_boxes_across_workers
from raydetr.ops.boxes import batched_nms, box_cxcywh_to_xyxy, generalized_box_iou


@torch.no_grad()
def teacher_targets(outputs: dict[str, Tensor], class_map: Tensor, num_logits: int, *,
                    score_threshold: float, max_boxes: int = 100, nms_iou: float = 1.0
                    ) -> list[dict[str, Tensor]]:
    """Teacher outputs -> per image dict(labels int64[N] (student ids), boxes float32[N,4]
    cxcywh normalised, scores float32[N], probs float32[N, num_logits]).

    outputs: pred_logits [B,Q,C_teacher] (sigmoid logits), pred_boxes [B,Q,4] cxcywh normalised.
    class_map: int64[C_teacher], the student class of each teacher logit, -1 for none;
    ``num_logits``: the student's class logits. A query's
    score is its highest probability among mapped classes; kept when >= ``score_threshold``
    and not overlapping a higher-scored kept box of its class by IoU > ``nms_iou`` (1.0: no
    NMS), at most ``max_boxes`` per image (highest first).
    """
    logits = outputs["pred_logits"].float()
    boxes = outputs["pred_boxes"].float()
    b, q, _ = logits.shape
    class_map = class_map.to(logits.device)
    if len(class_map) != logits.shape[-1]:
        raise ValueError(f"class_map has {len(class_map)} entries for {logits.shape[-1]} "
                         "teacher logits")
    keep_cls = class_map >= 0
    probs = torch.zeros(b, q, num_logits, device=logits.device)
    probs[..., class_map[keep_cls]] = logits.sigmoid()[..., keep_cls]
    out = []
    for i in range(b):
        score, label = probs[i].max(-1)
        idx = torch.nonzero(score >= score_threshold).flatten()
        if nms_iou < 1.0 and idx.numel() > 1:
            idx = idx[batched_nms(box_cxcywh_to_xyxy(boxes[i, idx]), score[idx], label[idx],
                                  nms_iou)]
        if idx.numel() > max_boxes:
            idx = idx[score[idx].topk(max_boxes).indices]
        out.append({"labels": label[idx].long(), "boxes": boxes[i, idx],
                    "scores": score[idx], "probs": probs[i, idx]})
    return out


class DistillLoss(nn.Module):
    """forward(student_outputs, teacher_targets) -> {"loss_distill": weighted total (grad),
    "loss_distill_cls" / "_bbox" / "_giou" / "_logit": detached, unweighted, final layer}."""

    def __init__(self, criterion: SetCriterion, *, weight: float = 0.5,
                 logit_weight: float = 0.0, unmatched_weight: float = 1.0) -> None:
        """The student's criterion gives the matcher, the classification loss, the loss weights
        (``loss_cls / loss_bbox / loss_giou``) and ``group_detr``; its ``decoder_share``
        becomes ``1 - weight`` (the teacher's share of the decoder's supervision)."""
        super().__init__()
        if not 0.0 <= weight <= 1.0:
            raise ValueError(f"distill.weight={weight}: the teacher's share of the decoder's "
                             "supervision must lie in [0, 1]")
        criterion.decoder_share = 1.0 - weight
        self.matcher = criterion.matcher
        self.classification = criterion.classification_map  # a bound method: no submodule
        w = criterion.weight_dict
        self.weights = {"cls": w["loss_cls"], "bbox": w["loss_bbox"], "giou": w["loss_giou"]}
        self.weight, self.logit_weight = weight, logit_weight
        self.unmatched_weight = unmatched_weight
        self.group_detr = criterion.group_detr

    def _layer(self, out: dict, targets: list[dict], groups: int, num_boxes: float,
               with_logits: bool) -> dict[str, Tensor]:
        logits, boxes = out["pred_logits"].float(), out["pred_boxes"].float()
        b, q, _ = logits.shape
        indices = [(s.to(logits.device), j.to(logits.device))
                   for s, j in self.matcher(out, targets, groups)]
        batch_idx = torch.cat([torch.full_like(s, i) for i, (s, _) in enumerate(indices)])
        src_idx = torch.cat([s for s, _ in indices])
        scores = torch.cat([t["scores"][j] for t, (_, j) in zip(targets, indices)])
        query_w = torch.full((b, q), self.unmatched_weight, device=logits.device)
        query_w[batch_idx, src_idx] = scores
        cls = (self.classification(logits, boxes, targets, indices) * query_w[..., None]).sum()
        src = boxes[batch_idx, src_idx]
        tgt = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)]).float()
        l1 = (F.l1_loss(src, tgt, reduction="none").sum(-1) * scores).sum()
        giou = torch.diag(generalized_box_iou(box_cxcywh_to_xyxy(src), box_cxcywh_to_xyxy(tgt)))
        giou_loss = ((1 - giou) * scores).sum()
        if src.numel() == 0:  # keep every output in the graph (DDP)
            l1 = l1 + boxes.sum() * 0.0
            giou_loss = giou_loss + boxes.sum() * 0.0
        terms = {"cls": cls / num_boxes, "bbox": l1 / num_boxes, "giou": giou_loss / num_boxes}
        if with_logits:
            soft = torch.cat([t["probs"][j] for t, (_, j) in zip(targets, indices)]).float()
            bce = F.binary_cross_entropy_with_logits(logits[batch_idx, src_idx], soft,
                                                     reduction="none").mean(-1)
            terms["logit"] = bce.sum() / num_boxes + logits.sum() * 0.0
        return terms

    def forward(self, outputs: dict, targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        device = outputs["pred_logits"].device
        targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
        groups = self.group_detr if self.training else 1
        num_boxes = num_boxes_across_workers(targets, device, groups)
        layers = [outputs, *(outputs.get("aux_outputs") or [])]
        total = outputs["pred_logits"].new_zeros((), dtype=torch.float32)
        final: dict[str, Tensor] = {}
        for i, layer in enumerate(layers):
            with_logits = i == 0 and self.logit_weight > 0
            terms = self._layer(layer, targets, groups, num_boxes, with_logits)
            total = total + sum(self.weights[k] * v for k, v in terms.items() if k != "logit")
            if with_logits:
                total = total + self.logit_weight * terms["logit"]
            if i == 0:
                final = terms
        result = {"loss_distill": self.weight * total}
        result.update({f"loss_distill_{k}": v.detach() for k, v in final.items()})
        return result
