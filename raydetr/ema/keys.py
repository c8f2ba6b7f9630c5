"""Model wrappers and state-dict keys: DDP (``module.``) and torch.compile (``_orig_mod.``)."""

from __future__ import annotations

from typing import Any

from torch import nn

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DistributedDataParallel / DataParallel (``.module``) and torch.compile
    (``._orig_mod``) wrappers, in any nesting order."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def clean_key(key: str) -> str:
    """``module._orig_mod.backbone._orig_mod.conv.weight`` -> ``backbone.conv.weight``.

    Leading ``module.`` / ``_orig_mod.`` are wrappers; ``_orig_mod.`` inside a key comes from a
    compiled submodule. A submodule really named ``module`` inside the model is kept.
    """
    while key.startswith(_WRAPPER_PREFIXES):
        key = key.split(".", 1)[1]
    return key.replace("._orig_mod.", ".")


def clean_state_dict(state: dict[str, Any]) -> dict[str, Any]:
    """State dict with wrapper prefixes removed from every key (see :func:`clean_key`)."""
    out: dict[str, Any] = {}
    for key, value in state.items():
        new = clean_key(key)
        if new in out:
            raise KeyError(f"state dict keys '{key}' and another both clean to '{new}'")
        out[new] = value
    return out
