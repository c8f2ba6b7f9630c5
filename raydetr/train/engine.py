"""Pure training / evaluation loops: every dependency is an argument (DETR's engine style).

    stats = train_one_epoch(model, criterion, batches, optimizer, scheduler, device=dev,
                            epoch=e, grad_accum_steps=2, ema=ema)
    metrics = evaluate({"regular": model, "ema": ema_model}, postprocessor, val_batches,
                       classes, dev)   # -> {"regular": {...}, "ema": {...}}
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from raydetr.eval.coco import coco_metrics  # written separately; imported when needed
from raydetr.model.postprocess import gt_masks_rle, masks_rle
from raydetr.ops.boxes import box_cxcywh_to_xyxy
from raydetr.train.memory import release_freed_memory

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN / inf; training stops instead of continuing on garbage."""


def _to_device(batch: dict, device: torch.device) -> tuple[Tensor, list[dict[str, Tensor]]]:
    images = batch["images"].to(device, non_blocking=True)
    targets = [{k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in t.items()}
               for t in batch["targets"]]
    return images, targets


def _autocast(device: torch.device, amp_dtype: torch.dtype | None):
    """Autocast on the model's device when ``amp_dtype`` is set (the worker sets bf16 on CUDA
    only; on CPU it exists so the GPU path's dtype handling can be tested without a GPU)."""
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


def _image_ids(batch: dict) -> list[int]:
    return [int(t["image_id"]) for t in batch["targets"] if "image_id" in t]


def _grouped(batches: Iterable[dict], n: int) -> Iterator[list[dict]]:
    group: list[dict] = []
    for batch in batches:
        group.append(batch)
        if len(group) == n:
            yield group
            group = []
    if group:  # final partial accumulation still steps
        yield group


def train_one_epoch(model: nn.Module, criterion: nn.Module, batches: Iterable[dict],
                    optimizer: torch.optim.Optimizer, lr_scheduler: Any, *, device: torch.device | str,
                    epoch: int, grad_accum_steps: int = 1, clip_max_norm: float = 0.1,
                    ema: Any = None, amp_dtype: torch.dtype | None = None, log_every: int = 0,
                    on_step: Callable[[nn.Module, int, Tensor | None], None] | None = None,
                    distill: Callable[[Tensor, dict], dict[str, Tensor]] | None = None
                    ) -> dict[str, float]:
    """One pass over ``batches`` (Batch dicts, see raydetr.data.loader).

    Gradients of ``grad_accum_steps`` micro-batches are summed (each loss scaled by 1/n, n =
    size of that accumulation group) before one optimizer step; under DDP the non-final
    micro-steps run in ``model.no_sync()``. After each optimizer step: ``lr_scheduler.step()``
    then ``ema.update(model)``, then ``on_step(model, steps_this_epoch, grads_finite)``
    (e.g. the post-hoc EMA tracker; ``grads_finite`` is the clipping norm's verdict or None).
    ``distill(images, outputs)`` (raydetr.train.teacher.Teacher) adds ``loss_distill`` to the
    loss of every micro-batch.
    ``epoch`` is the epoch's number (from 1), for messages only. Raises NonFiniteLossError
    (epoch, step, image ids, loss terms) on a NaN / inf loss. Returns train_loss (mean over
    micro-batches), steps (optimizer steps), images, seconds, images_per_s, lr (first group's
    lr after the epoch).
    """
    device = torch.device(device)
    model.train()
    criterion.train()
    start = time.perf_counter()
    total_loss, total_distill, micro, steps, images = 0.0, 0.0, 0, 0, 0
    params = [p for g in optimizer.param_groups for p in g["params"]]
    optimizer.zero_grad(set_to_none=True)
    for group in _grouped(batches, max(grad_accum_steps, 1)):
        for i, batch in enumerate(group):
            imgs, targets = _to_device(batch, device)
            final = i == len(group) - 1
            sync = contextlib.nullcontext()
            if not final and hasattr(model, "no_sync"):
                sync = model.no_sync()
            with sync:
                with _autocast(device, amp_dtype):
                    outputs = model(imgs, targets)
                losses = criterion(outputs, targets)
                if distill is not None:
                    extra = distill(imgs, outputs)
                    losses = {**losses, **extra, "loss": losses["loss"] + extra["loss_distill"]}
                    total_distill += float(extra["loss_distill"].detach())
                loss = losses["loss"]
                if not torch.isfinite(loss):
                    terms = {k: round(float(v.detach()), 4) for k, v in losses.items()}
                    raise NonFiniteLossError(
                        f"non-finite loss {float(loss.detach())} at epoch {epoch}, optimizer step {steps}, "
                        f"micro-batch {micro}; image ids {_image_ids(batch)}; loss terms {terms}. "
                        "Try a lower optim.lr, clipping (optim.clip_max_norm) or check those images."
                    )
                (loss / len(group)).backward()
            total_loss += float(loss.detach())
            micro += 1
            images += imgs.shape[0]
        grads_finite = None
        if clip_max_norm > 0:
            total_norm = torch.nn.utils.clip_grad_norm_(params, clip_max_norm)
            grads_finite = torch.isfinite(total_norm)  # a tensor: no device sync here
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        steps += 1
        if lr_scheduler is not None:
            lr_scheduler.step()
        if ema is not None:
            # The clipping norm already tells whether the step kept the weights finite; the
            # EMA's own guard (a pass over every weight) runs only when clipping is off.
            ema.update(model, finite=grads_finite)
        if on_step is not None:
            on_step(model, steps, grads_finite)
        if log_every and steps % log_every == 0:
            log.info("epoch %d step %d loss %.4f lr %.2e", epoch, steps, total_loss / micro,
                     optimizer.param_groups[0]["lr"])
    seconds = time.perf_counter() - start
    stats = {"train_loss": total_loss / max(micro, 1), "steps": steps, "images": images,
             "seconds": seconds, "images_per_s": images / max(seconds, 1e-9),
             "lr": float(optimizer.param_groups[0]["lr"])}
    if distill is not None:
        stats["distill_loss"] = total_distill / max(micro, 1)
    return stats


def _gt_masks(target: dict, size_hw: tuple[int, int]) -> list[dict] | None:
    """The target's ground-truth masks as RLEs at the original size; None without masks (an
    image without objects needs none).

    The data path's evaluation targets carry the stored RLEs at the original size
    ("masks_rle"): used as they are, so segm ground truth is exact. Targets without them (built
    from tensors) have their model-input masks resized nearest to the original size."""
    stored = target.get("masks_rle")
    if stored is not None:
        if len(stored) != len(target["labels"]):
            raise ValueError(f"image {int(target['image_id'])}: {len(stored)} stored masks for "
                             f"{len(target['labels'])} boxes")
        h, w = int(size_hw[0]), int(size_hw[1])
        return [{"size": [h, w], "counts": bytes(c)} for c in stored]
    masks = target.get("masks")
    if masks is None:
        return [] if len(target["labels"]) == 0 else None
    return gt_masks_rle(torch.as_tensor(masks), size_hw)


@torch.no_grad()
def predict_records(models: dict[str, nn.Module], postprocessor: nn.Module, batches: Iterable[dict],
                    device: torch.device | str, amp_dtype: torch.dtype | None = None,
                    top_k: int = 100, before: Callable[[str], None] | None = None,
                    masks: bool = True,
                    on_masks: Callable[[str, list[dict]], None] | None = None
                    ) -> dict[str, list[dict]]:
    """Eval records per model variant (see the contract); each batch is moved once and run
    through every variant. ``before(name)`` runs before each variant's forward: several
    variants can share one module whose weights it swaps in (one eval model for every EMA
    shadow). Ground truth comes from the batch targets (cxcywh normalised ->
    xyxy absolute pixels of orig_size); predictions are in the same frame.

    Masks (``masks`` True, a model that outputs ``pred_masks`` and targets with ``masks``):
    records also get ``masks`` / ``gt_masks``, COCO RLEs at the original size, encoded image by
    image a few masks at a time (raydetr.model.postprocess.masks_rle). ``on_masks(variant,
    records)``: called with each batch's records of each variant that carry masks, which then
    drop them (the caller has matched them: the RLEs of one batch are held, not a split's).
    """
    device = torch.device(device)
    for m in models.values():
        m.eval()
    records: dict[str, list[dict]] = {name: [] for name in models}
    for batch in batches:
        images = batch["images"].to(device, non_blocking=True)
        targets = batch["targets"]
        sizes = torch.stack([torch.as_tensor(t["orig_size"]) for t in targets]).long()
        gts, encoded = [], False
        for t in targets:
            h, w = (int(v) for v in t["orig_size"])
            scale = torch.tensor([w, h, w, h], dtype=torch.float32)
            gt = box_cxcywh_to_xyxy(t["boxes"].float().cpu()) * scale
            gts.append((int(t["image_id"]), w, h, gt.numpy().astype(np.float32),
                        t["labels"].cpu().numpy().astype(np.int64),
                        _gt_masks(t, (h, w)) if masks else None))
        for name, model in models.items():
            if before is not None:
                before(name)
            with _autocast(device, amp_dtype):
                outputs = model(images)
            dets = postprocessor(outputs, sizes.to(device), top_k=top_k)
            for (image_id, w, h, gt_boxes, gt_labels, gt_masks), det in zip(gts, dets):
                rec = {
                    "image_id": image_id, "width": w, "height": h,
                    "gt_boxes": gt_boxes, "gt_labels": gt_labels,
                    "scores": det["scores"].float().cpu().numpy().astype(np.float32),
                    "labels": det["labels"].cpu().numpy().astype(np.int64),
                    "boxes": det["boxes"].float().cpu().numpy().astype(np.float32),
                }
                if gt_masks is not None and "mask_logits" in det:
                    rec["masks"] = masks_rle(det["mask_logits"], (h, w))
                    rec["gt_masks"] = gt_masks
                    encoded = True
                records[name].append(rec)
            if encoded and on_masks is not None:
                batch_records = records[name][-len(gts):]
                on_masks(name, batch_records)
                for rec in batch_records:
                    del rec["masks"], rec["gt_masks"]
        if encoded:  # full-size temporaries freed between the kept RLEs: give the pages back
            release_freed_memory()
    return records


def evaluate(models: dict[str, nn.Module], postprocessor: nn.Module, batches: Iterable[dict],
             classes: list[str], device: torch.device | str, amp_dtype: torch.dtype | None = None
             ) -> dict[str, dict]:
    """COCO metrics per variant: {variant: coco_metrics(records, classes)}."""

    records = predict_records(models, postprocessor, batches, device, amp_dtype)
    return {name: coco_metrics(recs, classes) for name, recs in records.items()}
