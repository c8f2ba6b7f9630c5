"""Distillation for DETR students: the teacher's boxes (Teach-DETR, Huang et al. 2023, TPAMI),
its class probabilities, and its encoder features (PKD, Cao et al. 2022; below).

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

Feature term (``feature_weight`` > 0; PKD, Cao et al., NeurIPS 2022): the student's encoder
output maps (what its decoder attends to: RT-DETR's three levels, RF-DETR's projector map) learn
the teacher's: each map normalised per channel to zero mean and unit variance over the batch
and its positions, half their mean squared difference (PKD's form), which is 1 - the Pearson
correlation of each channel, averaged over the student's levels, times ``feature_weight``
(raydetr.train.teacher.feature_weight: 64 for a trained teacher, 0 for ``ema``). Each student
level is paired with the teacher level of the nearest stride (sizes relative to each model's
input, so a teacher at another resolution pairs by what the maps cover), the teacher's map
resized bilinearly to the student's. Where the widths differ (rtdetr-r18: 128; the other
presets: 256) the teacher's map is projected onto the student's width by a fixed orthonormal
matrix (no trained adapter, so nothing joins the student's weights, checkpoints or DDP). This
term has no ground-truth counterpart: it is added, and it carries what labels cannot (the
teacher's representation); measured: README.

    targets = teacher_targets(teacher_outputs, class_map, num_logits, score_threshold=0.5,
                              nms_iou=0.2)
    terms = DistillLoss(criterion, ...)(student_outputs, targets)  # terms["loss_distill"]
"""

from __future__ import annotations

import math

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


_PROJECTIONS: dict[tuple[int, int, str], Tensor] = {}


def width_projection(teacher_width: int, student_width: int,
                     device: torch.device | str = "cpu") -> Tensor:
    """A fixed (teacher_width, student_width) matrix with orthonormal columns (teacher wider)
    or rows (student wider): QR of a Gaussian drawn from a generator seeded 0, the same on
    every worker and after a restart; no parameters to train, checkpoint or publish. Kept per
    device, so the training step does not copy it to the GPU every time."""
    key = (teacher_width, student_width, str(device))
    if key not in _PROJECTIONS:
        g = torch.Generator().manual_seed(0)
        big, small = max(key[:2]), min(key[:2])
        q, _ = torch.linalg.qr(torch.randn(big, small, generator=g, dtype=torch.float64))
        _PROJECTIONS[key] = (q if teacher_width >= student_width else q.T).float().to(device)
    return _PROJECTIONS[key]


def align_features(student: list[Tensor], student_hw: tuple[int, int], teacher: list[Tensor],
                   teacher_hw: tuple[int, int]) -> list[Tensor]:
    """The teacher's maps, one per student map: the teacher level whose size relative to its
    input (``teacher_hw``) is nearest the student map's relative to ``student_hw`` (log scale),
    resized bilinearly to the student map's size and, where the widths differ (rtdetr-r18's
    maps are 128 wide, the other presets' 256), projected onto the student's width by
    :func:`width_projection`. Maps are (B, C, h, w)."""
    if not student or not teacher:
        raise ValueError("feature distillation needs feature maps from student and teacher "
                         f"(got {len(student)} and {len(teacher)})")
    t_scale = [math.log(t.shape[-2] / teacher_hw[0]) for t in teacher]
    out = []
    for s in student:
        scale = math.log(s.shape[-2] / student_hw[0])
        t = teacher[min(range(len(teacher)), key=lambda i: abs(t_scale[i] - scale))]
        if t.shape[-2:] != s.shape[-2:]:
            t = F.interpolate(t.float(), size=tuple(s.shape[-2:]), mode="bilinear",
                              align_corners=False)
        if t.shape[1] != s.shape[1]:
            t = torch.einsum("bchw,cd->bdhw", t.float(),
                             width_projection(t.shape[1], s.shape[1], t.device))
        out.append(t)
    return out


def _channel_normalised(x: Tensor) -> Tensor:
    """(B, C, h, w) -> zero mean, unit variance per channel over the batch and positions."""
    x = x.float()
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    std = x.std(dim=(0, 2, 3), keepdim=True)
    return (x - mean) / (std + 1e-6)


def pearson_feature_loss(student: list[Tensor], teacher: list[Tensor]) -> Tensor:
    """PKD's loss, averaged over pairs: MSE / 2 of the channel-normalised maps, which is
    (1 - r) (n - 1) / n for r the per-channel Pearson correlation over n = B h w values (the
    std is the unbiased one); ``teacher`` aligned one-to-one with ``student``
    (align_features), no gradient into it."""
    terms = [F.mse_loss(_channel_normalised(s), _channel_normalised(t.detach())) / 2
             for s, t in zip(student, teacher, strict=True)]
    return torch.stack(terms).mean()


class DistillLoss(nn.Module):
    """forward(student_outputs, teacher_targets, teacher_features=None) -> {"loss_distill":
    weighted total (grad), "loss_distill_cls" / "_bbox" / "_giou" / "_logit" / "_feat":
    detached, unweighted, final layer}. ``teacher_features``: the teacher's maps aligned to
    ``student_outputs["features"]`` (align_features), for ``feature_weight`` > 0."""

    def __init__(self, criterion: SetCriterion, *, weight: float = 0.5,
                 logit_weight: float = 0.0, unmatched_weight: float = 1.0,
                 feature_weight: float = 0.0) -> None:
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
        if feature_weight < 0:
            raise ValueError(f"distill.feature_weight={feature_weight} must be >= 0")
        self.weight, self.logit_weight = weight, logit_weight
        self.unmatched_weight, self.feature_weight = unmatched_weight, feature_weight
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

    def forward(self, outputs: dict, targets: list[dict[str, Tensor]],
                teacher_features: list[Tensor] | None = None) -> dict[str, Tensor]:
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
        total = self.weight * total
        if self.feature_weight > 0:
            if teacher_features is None or "features" not in outputs:
                raise ValueError("distill.feature_weight > 0 needs the student's and the "
                                 "teacher's feature maps (model.return_features)")
            feat = pearson_feature_loss(outputs["features"], teacher_features)
            total = total + self.feature_weight * feat
            final = {**final, "feat": feat}
        result = {"loss_distill": total}
        result.update({f"loss_distill_{k}": v.detach() for k, v in final.items()})
        return result
