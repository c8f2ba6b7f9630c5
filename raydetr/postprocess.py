"""Model outputs -> per-image detections in absolute pixels of the original image.

No NMS: a DETR predicts one box per object. Scores are sigmoid probabilities; the top-k is
taken over queries x classes, so one query may yield several (box, class) detections.

Segmentation models (``pred_masks`` in the outputs): each detection also gets its query's mask
logits at the model's mask resolution (input / 4), ``mask_logits`` float[K, h, w]; full-size
masks come from ``masks_at_size`` one detection (or a few) at a time, so a batch of full-size
float masks is never held (RF-DETR resizes all K of them at once: its OOM reports in evaluation).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from raydetr.ops.boxes import box_cxcywh_to_xyxy


class PostProcessor(nn.Module):
    """forward(outputs, orig_sizes int64[B,2] (h, w), top_k=100) -> list of dict(
    scores float[K], labels int64[K], boxes float[K,4] xyxy absolute pixels of the original
    image, clipped to it). K = min(top_k, Q*C).

    The model sees a square resize of the image (aspect not kept), so normalised x scales by
    the original width and y by the original height.
    """

    @torch.no_grad()
    def forward(self, outputs: dict, orig_sizes: Tensor, top_k: int = 100) -> list[dict[str, Tensor]]:
        logits = outputs["pred_logits"].float()
        boxes_cxcywh = outputs["pred_boxes"].float()
        # RF-DETR's boxes have no sigmoid: below ~288 px its queries beyond the two-stage
        # selection keep raw reference points, whose width can be < 0. Such a box is empty.
        boxes_cxcywh = torch.cat([boxes_cxcywh[..., :2], boxes_cxcywh[..., 2:].clamp(min=0)], -1)
        boxes = box_cxcywh_to_xyxy(boxes_cxcywh)  # [B,Q,4] normalised
        b, q, c = logits.shape
        if len(orig_sizes) != b:
            raise ValueError(f"orig_sizes has {len(orig_sizes)} rows for a batch of {b} images")
        k = min(top_k, q * c)
        scores, flat = logits.sigmoid().flatten(1).topk(k, dim=1)
        query = torch.div(flat, c, rounding_mode="floor")
        labels = flat % c
        boxes = boxes.gather(1, query[..., None].expand(-1, -1, 4))
        h, w = orig_sizes.to(boxes.device, torch.float32).unbind(-1)
        scale = torch.stack([w, h, w, h], -1)[:, None, :]
        boxes = (boxes * scale).clamp(min=0.0)
        boxes = torch.minimum(boxes, scale)
        results = [{"scores": s, "labels": lab, "boxes": bx}
                   for s, lab, bx in zip(scores, labels, boxes)]
        masks = outputs.get("pred_masks")
        if isinstance(masks, Tensor):  # (B, Q, h, w) eval-mode mask logits
            for r, m, qi in zip(results, masks, query):
                r["mask_logits"] = m[qi].float()  # (K, h, w): a query repeats per label
        return results


def masks_at_size(mask_logits: Tensor, size_hw: tuple[int, int], chunk: int = 8
                  ) -> Iterator[Tensor]:
    """bool (n, H, W) masks of the original image, ``chunk`` detections at a time: the logits
    resized bilinearly (align_corners False) straight to (H, W), then > 0, as RF-DETR does."""
    h, w = int(size_hw[0]), int(size_hw[1])
    for start in range(0, mask_logits.shape[0], chunk):
        part = mask_logits[start:start + chunk, None].float()
        yield F.interpolate(part, size=(h, w), mode="bilinear", align_corners=False)[:, 0] > 0
