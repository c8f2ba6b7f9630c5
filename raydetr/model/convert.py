"""RF-DETR checkpoint files -> raydetr: winner-format model dirs and fine-tuning start points.

    raydetr convert-checkpoint checkpoint_best_total.pth out/ [--preset rfdetr-nano] [--variant ema]
    meta = convert_checkpoint("rf-detr-base-coco.pth", "models/rfdetr-base-coco")
    (train --pretrain-weights rf-detr-nano.pth: raydetr.train.pretrained reads it with this module)

Files read (the EMA weights by default whenever the file has them):
- RF-DETR <= 1.10 (``engine.py`` trainer): ``{'model': state_dict, 'args': argparse.Namespace,
  ...}``, + ``ema_model`` when its trainer kept an EMA.
- RF-DETR 1.11 best ``.pth`` (its Lightning trainer's ``BestModelCallback``): ``model`` and
  ``state_dict`` (the same weights, ``model.``-prefixed), ``args`` a plain dict, ``model_name``,
  ``rfdetr_version``, and the EMA in ``callbacks['RFDETREMACallback']['average_model_state_dict']``
  (keys ``module.model.<key>``, + ``n_averaged``).
- RF-DETR 1.11 Lightning ``.ckpt`` (``last.ckpt``, ``checkpoint_<epoch>.ckpt``): no ``model``
  key; ``state_dict`` (``model.``-prefixed, ``model._orig_mod.`` after torch.compile) + the
  same callbacks and description keys. A ``.ckpt`` made by 1.11's
  ``convert_legacy_checkpoint`` has ``hyper_parameters`` for ``args`` and the old EMA as
  ``legacy_ema_state_dict``.
1.11's model also carries a ``_kp_active_mask`` buffer (a keypoint schema; empty for detection
and segmentation models), dropped here; a file with keypoints is refused by name.
Files are read with ``torch.load(weights_only=True)`` and only ``argparse.Namespace``
allow-listed: nothing else is ever unpickled. The preset is inferred from the keys and shapes
(patch size, position-embedding grid, decoder depth, mask head), the key set must equal the
model's exactly, and the class head's logit index is the class id: for RF-DETR's COCO models
that is the COCO category id (index i -> COCO name of id i, placeholders for unused ids).
"""

from __future__ import annotations

import argparse
import math
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from raydetr.artifacts import ModelDir, ModelMeta
from raydetr.config import ModelConfig
from raydetr.config.presets import resolution_multiple
from raydetr.data.coco_categories import coco_class_list, unused_name
from raydetr.errors import UserError
from raydetr.model.rfdetr import build_rfdetr
from raydetr.model.rfdetr.presets import RFDETR_PRESETS

_PATCH_KEY = "backbone.0.encoder.encoder.embeddings.patch_embeddings.projection.weight"
_POS_KEY = "backbone.0.encoder.encoder.embeddings.position_embeddings"
CLASS_KEY = "class_embed.bias"
_DEC_LAYER = re.compile(r"^transformer\.decoder\.layers\.(\d+)\.")
_SEG_PREFIX = "segmentation_head."
_KEYPOINT_MASK = "_kp_active_mask"  # RF-DETR 1.11's keypoint-schema buffer
_EMA_CALLBACK_ENTRY = "average_model_state_dict"
# RF-DETR's model class names (1.11's ``model_name``) -> our presets.
MODEL_NAMES = {"RFDETRNano": "rfdetr-nano", "RFDETRSmall": "rfdetr-small",
               "RFDETRMedium": "rfdetr-medium", "RFDETRBase": "rfdetr-base",
               "RFDETRLarge": "rfdetr-large", "RFDETRSegPreview": "rfdetr-seg-preview",
               "RFDETRSegNano": "rfdetr-seg-nano", "RFDETRSegSmall": "rfdetr-seg-small",
               "RFDETRSegMedium": "rfdetr-seg-medium", "RFDETRSegLarge": "rfdetr-seg-large",
               "RFDETRSegXLarge": "rfdetr-seg-xlarge", "RFDETRSeg2XLarge": "rfdetr-seg-2xlarge"}
# The class heads RF-DETR's reinitialize_detection_head resizes (final + 13 two-stage heads).
_CLASS_HEAD = re.compile(r"^(class_embed|transformer\.enc_out_class_embed\.\d+)\.(weight|bias)$")

Variant = Literal["ema", "regular"]


class ConvertError(UserError, ValueError):
    """A checkpoint that cannot be converted; the message names the file and what to do."""


@dataclass
class RFDETRCheckpoint:
    """What raydetr reads from an RF-DETR checkpoint file."""

    path: Path
    weights: dict[str, Tensor]  # checkpoint['model'] (or 1.11's 'state_dict', unprefixed)
    ema_weights: dict[str, Tensor] | None  # 'ema_model', or 1.11's EMA callback state
    args: dict[str, Any] = field(default_factory=dict)  # vars(checkpoint['args']) / the dict
    kind: str = "RF-DETR .pth"  # what the file was recognised as (named in meta and errors)
    weights_entry: str = "model"
    ema_entry: str | None = None
    model_name: str | None = None  # RF-DETR >= 1.11 records its model class
    rfdetr_version: str | None = None

    def select(self, variant: Variant | None) -> tuple[Variant, dict[str, Tensor]]:
        """EMA weights by default when the file has them (as SuperGradients prefers ema_net)."""
        if variant is None:
            variant = "ema" if self.ema_weights is not None else "regular"
        if variant == "ema":
            if self.ema_weights is None:
                raise ConvertError(f"{self.path}: {self.kind} with no EMA weights (no 'ema_model', "
                                   "no EMA callback state); use --variant regular (in "
                                   "checkpoint_best_ema.pth, 'model' already holds the EMA)")
            return "ema", self.ema_weights
        return "regular", self.weights


def load_torch_file(path: str | Path) -> Any:
    """``torch.load`` with pickle disabled except for ``argparse.Namespace``."""
    path = Path(path)
    if not path.is_file():
        raise ConvertError(f"checkpoint file not found: {path}")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL (\S+)", str(exc))
        what = found.group(1) if found else "a pickled object"
        raise ConvertError(
            f"{path}: refused to load: it holds {what}, and only tensors, plain containers and "
            "argparse.Namespace are read (no arbitrary unpickling). Re-save the file with "
            "torch.save({'model': state_dict, 'args': args}) from a trusted environment."
        ) from None
    except Exception as exc:  # zip/format errors: the message is torch's, the file is ours
        raise ConvertError(f"{path}: not a readable PyTorch checkpoint ({type(exc).__name__}: "
                           f"{str(exc).splitlines()[0]})") from None


def _state_dict(obj: Any, path: Path, entry: str, prefix: str = "") -> dict[str, Tensor]:
    """Tensors of ``obj`` whose key starts with ``prefix``, the prefix and any DDP ('module.') or
    torch.compile ('_orig_mod.') wrapper prefix removed; 1.11's model-less buffers dropped."""
    if not isinstance(obj, dict):
        raise ConvertError(f"{path}: '{entry}' is not a state_dict (name -> tensor)")
    out: dict[str, Tensor] = {}
    for key, value in obj.items():
        if not isinstance(key, str) or not key.startswith(prefix):
            continue
        if not isinstance(value, Tensor):
            raise ConvertError(f"{path}: '{entry}' is not a state_dict (name -> tensor): "
                               f"{key!r} holds a {type(value).__name__}")
        name = key[len(prefix):].removeprefix("module.").removeprefix("_orig_mod.")
        if name.endswith("._extra_state"):  # Transformer Engine FP8 bookkeeping, not weights
            continue
        out[name] = value
    if not out:
        raise ConvertError(f"{path}: '{entry}' holds no weights"
                           + (f" with the '{prefix}' prefix" if prefix else ""))
    mask = out.pop(_KEYPOINT_MASK, None)
    if mask is not None and mask.numel() and bool(mask.any()):
        raise ConvertError(f"{path}: '{entry}' is an RF-DETR keypoint model ({_KEYPOINT_MASK} "
                           f"{tuple(mask.shape)}); raydetr converts detection and segmentation "
                           "models only")
    return out


def _ema_from_callbacks(callbacks: Any, path: Path) -> tuple[dict[str, Tensor] | None, str | None]:
    """RF-DETR 1.11's EMA: the averaged model in its EMA callback's state (an AveragedModel of
    the LightningModule, so keys are 'module.model.<key>' beside 'n_averaged')."""
    if not isinstance(callbacks, dict):
        return None, None
    for name, state in callbacks.items():
        if isinstance(state, dict) and isinstance(state.get(_EMA_CALLBACK_ENTRY), dict):
            entry = f"callbacks[{name!r}][{_EMA_CALLBACK_ENTRY!r}]"
            return _state_dict(state[_EMA_CALLBACK_ENTRY], path, entry, "module.model."), entry
    return None, None


def read_rfdetr_checkpoint(path: str | Path) -> RFDETRCheckpoint:
    path = Path(path)
    obj = load_torch_file(path)
    if not isinstance(obj, dict):
        raise ConvertError(f"{path}: not an RF-DETR checkpoint (expected a dict with 'model' or "
                           f"'state_dict'; found a {type(obj).__name__})")
    if isinstance(obj.get("model"), dict):
        weights, entry = _state_dict(obj["model"], path, "model"), "model"
        kind = "RF-DETR 1.11 .pth" if "rfdetr_version" in obj or "callbacks" in obj else \
            "RF-DETR .pth"
    elif isinstance(obj.get("state_dict"), dict):  # 1.11's Lightning .ckpt
        weights = _state_dict(obj["state_dict"], path, "state_dict", "model.")
        entry, kind = "state_dict", "RF-DETR 1.11 Lightning .ckpt"
    else:
        raise ConvertError(f"{path}: not an RF-DETR checkpoint: expected 'model' (RF-DETR .pth) or "
                           f"'state_dict' (its Lightning .ckpt); found keys {sorted(map(str, obj))[:12]}")
    for entry_name in ("ema_model", "legacy_ema_state_dict"):
        if obj.get(entry_name):
            ema, ema_entry = _state_dict(obj[entry_name], path, entry_name), entry_name
            break
    else:
        ema, ema_entry = _ema_from_callbacks(obj.get("callbacks"), path)
    args = obj.get("args", obj.get("hyper_parameters"))
    if isinstance(args, argparse.Namespace):
        args_dict = vars(args)
    elif isinstance(args, dict) or args is None:
        args_dict = dict(args or {})
    else:
        raise ConvertError(f"{path}: 'args' is a {type(args).__name__}; expected RF-DETR's "
                           "argparse.Namespace or (1.11) a dict")
    name = obj.get("model_name")
    version = obj.get("rfdetr_version")
    return RFDETRCheckpoint(path=path, weights=weights, ema_weights=ema, args=args_dict, kind=kind,
                            weights_entry=entry, ema_entry=ema_entry,
                            model_name=name if isinstance(name, str) else None,
                            rfdetr_version=str(version) if version is not None else None)


def infer_preset(state: dict[str, Tensor], where: str = "checkpoint") -> str:
    """The RF-DETR preset whose patch size, position grid and decoder depth the keys show."""
    if _PATCH_KEY not in state or _POS_KEY not in state:
        raise ConvertError(f"{where}: no RF-DETR backbone keys ({_PATCH_KEY}); not an RF-DETR "
                           "detection checkpoint")
    patch = int(state[_PATCH_KEY].shape[-1])
    grid = math.isqrt(int(state[_POS_KEY].shape[1]) - 1)
    layers = {int(m.group(1)) for k in state if (m := _DEC_LAYER.match(k))}
    depth = max(layers) + 1 if layers else 0
    seg = any(k.startswith(_SEG_PREFIX) for k in state)
    for name, arch in RFDETR_PRESETS.items():
        if (arch["patch_size"], arch["positional_encoding_size"], arch["dec_layers"],
                arch["segmentation_head"]) == (patch, grid, depth, seg):
            return name
    raise ConvertError(f"{where}: patch size {patch}, position grid {grid}x{grid}, {depth} "
                       f"decoder layers, {'a' if seg else 'no'} mask head match no preset of "
                       f"{sorted(RFDETR_PRESETS)}")


def checkpoint_preset(ckpt: RFDETRCheckpoint, state: dict[str, Tensor]) -> str:
    """The preset the weights show; a 1.11 file's ``model_name`` must agree with it."""
    try:
        inferred = infer_preset(state, f"{ckpt.path} ({ckpt.kind})")
    except ConvertError as exc:
        if ckpt.model_name and ckpt.model_name not in MODEL_NAMES:
            raise ConvertError(f"{ckpt.path}: an RF-DETR {ckpt.model_name} checkpoint"
                               f"{' (rfdetr ' + ckpt.rfdetr_version + ')' if ckpt.rfdetr_version else ''}; "
                               f"raydetr converts {sorted(MODEL_NAMES)} ({exc})") from None
        raise
    named = MODEL_NAMES.get(ckpt.model_name or "")
    if ckpt.model_name and named != inferred:
        raise ConvertError(f"{ckpt.path}: model_name {ckpt.model_name!r} but the weights are those "
                           f"of {inferred}; the file is inconsistent")
    return inferred


def check_keys(state: dict[str, Tensor], model: nn.Module, where: str) -> None:
    """Zero missing, zero unexpected keys and equal shapes, or a ConvertError listing them."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise ConvertError(
            f"{where}: does not match the model: {len(missing)} missing {missing[:4]}, "
            f"{len(unexpected)} unexpected {unexpected[:4]}, {len(shapes)} shape mismatches "
            f"{shapes[:3]}; pass the right --preset or check the file")


def tile_class_head(state: dict[str, Tensor], num_classes: int) -> dict[str, Tensor]:
    """RF-DETR's class-head resize on a state dict: rows repeat ceil(n/old) times, truncated to
    n (91 -> 3 keeps rows 0..2; 91 -> 100 gives rows 0..90 then 0..8). Other keys unchanged."""
    out = dict(state)
    for key, value in state.items():
        if _CLASS_HEAD.match(key) and value.shape[0] != num_classes:
            reps = math.ceil(num_classes / value.shape[0])
            tiled = value.repeat(reps, *([1] * (value.ndim - 1)))
            out[key] = tiled[:num_classes].clone()
    return out


def class_names_for(ckpt: RFDETRCheckpoint, num_logits: int) -> list[str]:
    """One name per logit. A fine-tune's ``args.class_names`` map as RF-DETR's ``class_names``
    does (logit i+1 -> names[i], logit 0 is its dataset's super-category), or from logit 0 when
    the head has exactly one row per name (its YOLO datasets); without names: COCO ids."""
    names = ckpt.args.get("class_names")
    if not names:
        return coco_class_list(num_logits)
    names = [str(n) for n in names]
    if len(names) == num_logits:
        return names
    if len(names) + 1 <= num_logits:
        padded = [unused_name(i) for i in range(num_logits)]
        padded[1:len(names) + 1] = names
        return padded
    raise ConvertError(f"{ckpt.path}: args.class_names has {len(names)} names but the class head "
                       f"has {num_logits} logits; the file is inconsistent")


def _resolution(ckpt: RFDETRCheckpoint, preset: str) -> int:
    res = ckpt.args.get("resolution")
    step = resolution_multiple(preset)
    if isinstance(res, int) and res >= 2 * step and res % step == 0:
        return res  # the fine-tune's own training resolution
    return int(RFDETR_PRESETS[preset]["resolution"])


def convert_checkpoint(src: str | Path, out_dir: str | Path, *, preset: str | None = None,
                       variant: Variant | None = None) -> ModelMeta:
    """Write ``out_dir`` as a model dir (``raydetr.artifacts.ModelDir``); returns its meta."""
    ckpt = read_rfdetr_checkpoint(src)
    variant, state = ckpt.select(variant)
    inferred = checkpoint_preset(ckpt, state)
    if preset is not None and preset != inferred:
        raise ConvertError(f"{ckpt.path}: --preset {preset} given but the keys and shapes are "
                           f"those of {inferred}")
    num_logits = int(state[CLASS_KEY].shape[0])
    check_keys(state, build_rfdetr(inferred, num_classes=num_logits), str(ckpt.path))
    classes = class_names_for(ckpt, num_logits)
    resolution = _resolution(ckpt, inferred)
    model_cfg = ModelConfig(preset=inferred, resolution=resolution, num_denoising=0)
    meta = ModelMeta(
        classes=classes, model=model_cfg.model_dump(mode="json"), resolution=resolution,
        variant=variant, dataset=f"converted from RF-DETR checkpoint {ckpt.path.name}",
        source={"converted_from": {
            "file": str(ckpt.path), "kind": ckpt.kind,
            "entry": ckpt.ema_entry if variant == "ema" else ckpt.weights_entry,
            "has_ema": ckpt.ema_weights is not None,
            "model_name": ckpt.model_name, "rfdetr_version": ckpt.rfdetr_version,
            "class_names_from": "args.class_names" if ckpt.args.get("class_names")
            else "COCO category ids"}},
    )  # epoch -1, epochs_run 0: no raydetr epochs
    ModelDir.write(out_dir, state, meta)
    return meta
