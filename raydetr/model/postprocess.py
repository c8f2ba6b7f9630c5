"""Model outputs -> per-image detections in absolute pixels of the original image.

No NMS: a DETR predicts one box per object. Scores are sigmoid probabilities; the top-k is
taken over queries x classes, so one query may yield several (box, class) detections.
``decode_topk`` is the batched, size-free part (also traced into ONNX graphs by
``raydetr.serve.onnx``); ``PostProcessor`` scales its boxes to each original image.

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

from raydetr.eval.coco import encode_rle
from raydetr.ops.boxes import box_cxcywh_to_xyxy


def decode_topk(pred_logits: Tensor, pred_boxes: Tensor, top_k: int = 100) -> dict[str, Tensor]:
    """pred_logits [B,Q,C], pred_boxes [B,Q,4] normalised cxcywh -> dict(scores f32[B,K],
    labels i64[B,K], boxes_xyxy f32[B,K,4] normalised and clipped to 0..1, queries i64[B,K]),
    best first, K = min(top_k, Q*C)."""
    logits = pred_logits.float()
    boxes_cxcywh = pred_boxes.float()
    # RF-DETR's boxes have no sigmoid: below ~288 px its queries beyond the two-stage
    # selection keep raw reference points, whose width can be < 0. Such a box is empty.
    boxes_cxcywh = torch.cat([boxes_cxcywh[..., :2], boxes_cxcywh[..., 2:].clamp(min=0)], -1)
    boxes = box_cxcywh_to_xyxy(boxes_cxcywh)  # [B,Q,4] normalised
    q, c = logits.shape[1:]
    scores, flat = logits.sigmoid().flatten(1).topk(min(top_k, q * c), dim=1)
    queries = torch.div(flat, c, rounding_mode="floor")
    labels = flat % c
    boxes = boxes.gather(1, queries[..., None].expand(-1, -1, 4)).clamp(0.0, 1.0)
    return {"scores": scores, "labels": labels, "boxes_xyxy": boxes, "queries": queries}


def scale_boxes(boxes_xyxy: Tensor, orig_sizes: Tensor) -> Tensor:
    """Normalised xyxy [B,K,4] (in 0..1) -> absolute pixels of each image, orig_sizes [B,2] (h, w)."""
    h, w = orig_sizes.to(boxes_xyxy.device, torch.float32).unbind(-1)
    return boxes_xyxy * torch.stack([w, h, w, h], -1)[:, None, :]


class PostProcessor(nn.Module):
    """forward(outputs, orig_sizes int64[B,2] (h, w), top_k=100) -> list of dict(
    scores float[K], labels int64[K], boxes float[K,4] xyxy absolute pixels of the original
    image, clipped to it). K = min(top_k, Q*C).

    The model sees a square resize of the image (aspect not kept), so normalised x scales by
    the original width and y by the original height.
    """

    @torch.no_grad()
    def forward(self, outputs: dict, orig_sizes: Tensor, top_k: int = 100) -> list[dict[str, Tensor]]:
        b = outputs["pred_logits"].shape[0]
        if len(orig_sizes) != b:
            raise ValueError(f"orig_sizes has {len(orig_sizes)} rows for a batch of {b} images")
        d = decode_topk(outputs["pred_logits"], outputs["pred_boxes"], top_k)
        boxes = scale_boxes(d["boxes_xyxy"], orig_sizes)
        results = [{"scores": s, "labels": lab, "boxes": bx}
                   for s, lab, bx in zip(d["scores"], d["labels"], boxes)]
        masks = outputs.get("pred_masks")
        if isinstance(masks, Tensor):  # (B, Q, h, w) eval-mode mask logits
            for r, m, qi in zip(results, masks, d["queries"]):
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


def masks_rle(mask_logits: Tensor, size_hw: tuple[int, int], chunk: int = 8) -> list[dict]:
    """COCO RLEs (raydetr.eval.coco.encode_rle) of ``masks_at_size``: the detections' masks at
    the original size, ``chunk`` at a time (peak: ``chunk`` full-size float masks).

    The same pixels as ``masks_at_size``, less work: a logit map with no positive value gives an
    empty mask (bilinear weights are >= 0, so no output is > 0) and is not resized; the bool
    masks are transposed on the resize's device so pycocotools reads them without a copy."""
    h, w = int(size_hw[0]), int(size_hw[1])
    out: list[dict] = []
    for start in range(0, mask_logits.shape[0], chunk):
        part = mask_logits[start:start + chunk]
        positive = (part > 0).flatten(1).any(dim=1)
        masks_wh = torch.zeros((part.shape[0], w, h), dtype=torch.bool)  # [n, W, H]
        if bool(positive.any()):
            full = F.interpolate(part[positive, None].float(), size=(h, w), mode="bilinear",
                                 align_corners=False)[:, 0] > 0
            masks_wh[positive.cpu()] = full.transpose(1, 2).cpu()
            del full
        out.extend(encode_rle(masks_wh.numpy(), transposed=True))
    return out


def gt_masks_rle(masks: Tensor, size_hw: tuple[int, int], chunk: int = 8) -> list[dict]:
    """COCO RLEs of ground-truth masks bool [N, Hm, Wm] at the original size (h, w): as they are
    when already that size, else resized nearest (the model-input masks of the data path)."""
    h, w = int(size_hw[0]), int(size_hw[1])
    out: list[dict] = []
    for start in range(0, masks.shape[0], chunk):
        part = masks[start:start + chunk]
        if tuple(part.shape[-2:]) != (h, w):
            part = F.interpolate(part[:, None].float(), size=(h, w), mode="nearest")[:, 0] > 0.5
        out.extend(encode_rle(part.bool().cpu().numpy()))
    return out
