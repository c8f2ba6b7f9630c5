"""``--pretrain-weights``: find the weights a path means, then load what fits into a model.

    state_dict, description = resolve_pretrained("runs/demo")   # run dir -> its winner
    reinit = load_pretrained(model, "runs/demo/train/epoch_0003")

Accepted paths: a run dir (its ``winner/``, else its latest checkpoint), a winner or converted
dir (``model.safetensors``), an ``epoch_NNNN`` checkpoint dir or its ``state.pt``, a
``.safetensors`` file, or an RF-DETR checkpoint file (``.pth``/``.pt``, or 1.11's Lightning
``.ckpt``; read with pickle off; its EMA weights when it has them). From a checkpoint the winner of the bests it holds is taken, so the
EMA weights are used when they won (SuperGradients' ``models.get`` prefers ``ema_net`` the same
way). RF-DETR-family class heads of another class count are resized with RF-DETR's tiling rule;
other shape mismatches keep their fresh initialisation.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from raydetr.artifacts import WEIGHTS_FILE, ModelDir, RunDir, load_weights
from raydetr.errors import UserError
from raydetr.model.convert import (
    CLASS_KEY,
    ConvertError,
    checkpoint_preset,
    read_rfdetr_checkpoint,
    tile_class_head,
)
from raydetr.train.checkpoint import (
    BEST_FILES,
    BESTS_FILE,
    STATE_FILE,
    CheckpointError,
    latest_checkpoint,
    read_bests,
)


class PretrainedError(UserError, ValueError):
    """The path given as pretrained weights is not something raydetr can load."""


def _from_checkpoint(ckpt: Path) -> tuple[dict[str, torch.Tensor], str]:
    if (ckpt / BESTS_FILE).is_file():
        bests = read_bests(ckpt)
        variant = bests.winner()
        best = bests.best(variant)
        if best.epoch >= 0 and (ckpt / BEST_FILES[variant]).is_file():
            return (load_weights(ckpt / BEST_FILES[variant]),
                    f"{ckpt}: best {variant} weights of epoch {best.epoch} (mAP {best.map:.4f})")
    state = torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=True, mmap=True)
    return dict(state["model"]), f"{ckpt}: last regular weights (no bests recorded)"


def _from_rfdetr_file(p: Path, preset: str | None) -> tuple[dict[str, torch.Tensor], str]:
    try:
        ckpt = read_rfdetr_checkpoint(p)
        variant, state = ckpt.select(None)
        theirs = checkpoint_preset(ckpt, state)
    except ConvertError as exc:
        raise PretrainedError(f"--pretrain-weights {exc}") from None
    if preset is not None and theirs != preset:
        raise PretrainedError(f"--pretrain-weights {p} is an RF-DETR {theirs} checkpoint; set "
                              f"model.preset={theirs}")
    return state, f"{p}: RF-DETR {theirs} checkpoint ({variant} weights) from {ckpt.kind}"


def resolve_pretrained(path: str | Path, preset: str | None = None
                       ) -> tuple[dict[str, torch.Tensor], str]:
    """The state dict ``path`` names and a one-line description of what was taken. With
    ``preset``, an RF-DETR file of another preset is an error naming the one to set."""
    p = Path(path).expanduser()
    if not p.exists():
        raise PretrainedError(f"--pretrain-weights {p}: no such file or directory")
    if p.is_file():
        if p.name == STATE_FILE:
            return _from_checkpoint(p.parent)
        if p.suffix == ".safetensors":
            return load_weights(p), str(p)
        if p.suffix in (".pth", ".pt", ".ckpt"):  # RF-DETR's files (.ckpt: its 1.11 Lightning)
            return _from_rfdetr_file(p, preset)
        raise PretrainedError(
            f"--pretrain-weights {p}: expected an RF-DETR .pth, a .safetensors file, a state.pt, "
            "or a run / winner / epoch_NNNN directory")
    if ModelDir(p).weights_path.is_file():  # a winner or converted model dir
        return ModelDir(p).load_weights(), f"{ModelDir(p).weights_path} (stripped winner)"
    if (p / STATE_FILE).is_file():  # an epoch_NNNN checkpoint dir
        return _from_checkpoint(p)
    run = RunDir(p)
    if run.winner.weights_path.is_file():  # a run dir after post-fit
        return run.winner.load_weights(), f"{run.winner.path} (run winner)"
    if run.train.is_dir():  # a run dir whose post-fit did not happen
        try:
            return _from_checkpoint(latest_checkpoint(run.train))
        except CheckpointError as exc:
            raise PretrainedError(f"--pretrain-weights {p}: {exc}") from None
    raise PretrainedError(
        f"--pretrain-weights {p}: no {WEIGHTS_FILE}, {STATE_FILE}, winner/ or train/ in it; "
        "pass a run dir, a winner dir, an epoch_NNNN checkpoint dir, a state.pt or a "
        ".safetensors file")


def load_pretrained(model: nn.Module, path: str | Path) -> tuple[list[str], str]:
    """Load what fits. An RF-DETR-family model tiles class heads of another class count
    (RF-DETR's rule, see raydetr.model.convert.tile_class_head); other tensors whose shape
    differs keep their fresh initialisation. Returns (re-initialised keys, description)."""
    incoming, description = resolve_pretrained(path)
    own = model.state_dict()
    if hasattr(model, "reinitialize_detection_head"):  # the RF-DETR family
        rows = incoming.get(CLASS_KEY)
        if rows is not None and CLASS_KEY in own and rows.shape[0] != own[CLASS_KEY].shape[0]:
            incoming = tile_class_head(incoming, int(own[CLASS_KEY].shape[0]))
            description += (f"; class heads resized {rows.shape[0]} -> "
                            f"{own[CLASS_KEY].shape[0]} rows by RF-DETR's tiling rule")
    unknown = sorted(set(incoming) - set(own))
    if len(unknown) > len(own) // 2:
        raise PretrainedError(
            f"--pretrain-weights {path}: {len(unknown)} of its keys are not in this model "
            f"(e.g. {unknown[:3]}); is it a raydetr model of the same preset?"
        )
    reinit = [k for k, v in incoming.items() if k in own and own[k].shape != v.shape]
    usable = {k: v for k, v in incoming.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(usable, strict=False)
    return reinit, description
