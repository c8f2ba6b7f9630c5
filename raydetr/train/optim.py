"""AdamW with backbone / rest learning rates and no weight decay on norms, biases, embeddings;
warmup then cosine (to ``lr_min_ratio``) or step schedule, stepped once per optimizer step.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from raydetr.config import OptimConfig

_NORM_TYPES = (nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.Embedding)


def _no_decay_names(model: nn.Module) -> set[str]:
    """Parameters of norm layers and embeddings, plus every bias / 1-d parameter."""
    names: set[str] = set()
    for mod_name, module in model.named_modules():
        for p_name, p in module.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if isinstance(module, _NORM_TYPES) or p.ndim <= 1 or p_name.endswith("bias"):
                names.add(full)
    return names


def param_groups(model: nn.Module, optim_cfg: OptimConfig) -> list[dict]:
    """Four groups: {backbone, rest} x {decay, no decay}; empty groups are dropped.

    The backbone is every parameter whose name starts with ``backbone.`` (after stripping a
    DDP ``module.`` / compile ``_orig_mod.`` prefix); it gets ``optim_cfg.lr_encoder``.
    """
    no_decay = _no_decay_names(model)
    groups: dict[tuple[bool, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        clean = name.removeprefix("module.").removeprefix("_orig_mod.")
        is_backbone = clean.startswith("backbone.")
        decay = name not in no_decay
        key = (is_backbone, decay)
        if key not in groups:
            groups[key] = {
                "params": [], "names": [],
                "lr": optim_cfg.lr_encoder if is_backbone else optim_cfg.lr,
                "weight_decay": optim_cfg.weight_decay if decay else 0.0,
                "group_name": ("backbone" if is_backbone else "head") + ("" if decay else "_no_decay"),
            }
        groups[key]["params"].append(p)
        groups[key]["names"].append(clean)
    return [groups[k] for k in sorted(groups)]


def build_optimizer(model: nn.Module, optim_cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups` (each group keeps ``names`` and ``group_name``)."""
    groups = param_groups(model, optim_cfg)
    if not groups:
        raise ValueError("model has no trainable parameters")
    # fused: one kernel per parameter group; ~4x faster than the default step on CPU
    # (bench/ notes: 74 ms -> ~20 ms per step for nano) and the fast path on CUDA.
    return torch.optim.AdamW(groups, lr=optim_cfg.lr, weight_decay=optim_cfg.weight_decay,
                             fused=True)


def lr_factor(step: int, optim_cfg: OptimConfig, steps_per_epoch: int) -> float:
    """Multiplier of each group's base lr at optimizer step ``step`` (0-based).

    Linear warmup over ``warmup_steps`` from ~0 to 1; then cosine from 1 to ``lr_min_ratio`` at
    the end of ``epochs * steps_per_epoch``, or step schedule: x0.1 at each ``lr_drop_epochs``.
    """
    warmup = optim_cfg.warmup_steps
    if warmup and step < warmup:
        return (step + 1) / warmup
    if optim_cfg.schedule == "step":
        epoch = step // max(steps_per_epoch, 1)
        return 0.1 ** sum(epoch >= e for e in optim_cfg.lr_drop_epochs)
    total = max(optim_cfg.epochs * steps_per_epoch - warmup, 1)
    progress = min(max(step - warmup, 0) / total, 1.0)
    m = optim_cfg.lr_min_ratio
    return m + (1 - m) * 0.5 * (1 + math.cos(math.pi * progress))


def build_lr_scheduler(optimizer: torch.optim.Optimizer, optim_cfg: OptimConfig,
                       steps_per_epoch: int) -> LambdaLR:
    """LambdaLR over :func:`lr_factor`; call ``.step()`` after every optimizer step.

    ``steps_per_epoch`` counts optimizer steps (micro-batches / grad_accum_steps, rounded up).
    """
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
    return LambdaLR(optimizer, lambda step: lr_factor(step, optim_cfg, steps_per_epoch))
