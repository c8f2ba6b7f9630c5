"""RF-DETR's own model, criterion, parameter groups, LR schedule and EMA, built from RF-DETR's
source for raydetr's comparisons (bench/rfdetr_step.py, bench/rfdetr_trajectory.py).

Nothing of RF-DETR is in this repository: this module imports it from a source directory you
point to, inside a scratch virtual environment outside the repository. Set-up (see the README,
"Comparing with RF-DETR's own code"):

    make rfdetr-reference RFDETR_REPO=/path/to/rf-detr-clone    # -> /tmp/rfdetr-ref/{src,venv}

which runs ``git -C $RFDETR_REPO archive 35ac6ab rfdetr`` into /tmp/rfdetr-ref/src and makes
/tmp/rfdetr-ref/venv with torch==2.13.0, transformers<5, peft, pydantic, numpy, scipy,
safetensors. torchvision does not load against this torch build, so :func:`import_rfdetr`
puts stand-ins in ``sys.modules`` first: the model and loss use only
``torchvision.ops.boxes.box_area`` and ``torchvision._is_tracing`` (given real bodies here);
PIL, pycocotools, supervision, ... are imported by RF-DETR's data and eval modules, which this
harness never calls, so any attribute of theirs is an inert placeholder.

Run with the scratch venv's interpreter (this file needs only torch and the standard library):

    /tmp/rfdetr-ref/venv/bin/python bench/rfdetr_reference.py --source /tmp/rfdetr-ref/src check
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.machinery
import math
import sys
import types
from pathlib import Path
from typing import Any

import torch

DEFAULT_SOURCE = Path("/tmp/rfdetr-ref/src")
# raydetr preset -> RF-DETR config class (rfdetr/config.py)
CONFIG_CLASSES = {"rfdetr-nano": "RFDETRNanoConfig", "rfdetr-small": "RFDETRSmallConfig",
                  "rfdetr-medium": "RFDETRMediumConfig", "rfdetr-base": "RFDETRBaseConfig"}
_STUBBED = ("torchvision", "PIL", "pycocotools", "supervision", "matplotlib", "cv2", "wandb",
            "tensorboard", "requests", "onnx", "onnxruntime", "onnxsim")


class _Placeholder(type):
    """A class whose attributes are more placeholders and whose instances do nothing."""

    def __getattr__(cls, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return _Placeholder(name, (), {})

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        return super().__call__()


class _StubModule(types.ModuleType):
    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        full = f"{self.__name__}.{name}"
        if full in sys.modules:
            return sys.modules[full]
        return _Placeholder(name, (), {})


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):  # noqa: ANN001
        if fullname.split(".")[0] in _STUBBED:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):  # noqa: ANN001
        module = _StubModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):  # noqa: ANN001
        if module.__name__ == "torchvision":
            module.__version__ = "0.28.0"
            module._is_tracing = lambda: False  # False outside tracing, as torchvision says
        if module.__name__ == "torchvision.ops.boxes":
            def box_area(boxes: torch.Tensor) -> torch.Tensor:  # xyxy boxes
                return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
            module.box_area = box_area


def import_rfdetr(source: Path = DEFAULT_SOURCE) -> types.SimpleNamespace:
    """Import RF-DETR's modules from ``source`` (the dir holding the ``rfdetr`` package)."""
    source = Path(source).resolve()
    if not (source / "rfdetr" / "models" / "lwdetr.py").is_file():
        raise SystemExit(f"{source} does not hold RF-DETR's source (no rfdetr/models/lwdetr.py); "
                         "run `make rfdetr-reference RFDETR_REPO=...` or pass --source")
    if not any(isinstance(f, _StubFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _StubFinder())
    # rfdetr/__init__.py imports the high-level API (PIL, supervision, downloads): skip it by
    # registering the package with its path only.
    if "rfdetr" not in sys.modules:
        pkg = types.ModuleType("rfdetr")
        pkg.__path__ = [str(source / "rfdetr")]
        sys.modules["rfdetr"] = pkg
    import importlib

    names = {"config": "rfdetr.config", "main": "rfdetr.main", "engine": "rfdetr.engine",
             "models": "rfdetr.models", "param_dicts": "rfdetr.util.get_param_dicts",
             "utils": "rfdetr.util.utils", "misc": "rfdetr.util.misc"}
    return types.SimpleNamespace(**{k: importlib.import_module(v) for k, v in names.items()})


def training_args(rf: types.SimpleNamespace, preset: str = "rfdetr-nano", num_classes: int = 90,
                  **overrides: Any) -> argparse.Namespace:
    """The Namespace RF-DETR trains with: ``RFDETR.train_from_config``'s merge of the model
    config (minus keys TrainConfig also has), TrainConfig, extra kwargs and ``num_classes``,
    then ``populate_args`` (rfdetr/detr.py, rfdetr/main.py). ``num_classes`` as RF-DETR counts
    it (the class head has num_classes + 1 logits)."""
    fields = rf.config.TrainConfig.model_fields
    train_kw = {k: v for k, v in overrides.items() if k in fields}
    extra = {k: v for k, v in overrides.items() if k not in fields}
    model_config = getattr(rf.config, CONFIG_CLASSES[preset])(device="cpu").model_dump()
    train_config = rf.config.TrainConfig(dataset_dir="/nonexistent", **train_kw).model_dump()
    model_config.pop("num_classes")
    model_config.pop("class_names", None)
    for k in train_config:
        model_config.pop(k, None)
    merged = {**model_config, **train_config, **extra, "num_classes": num_classes}
    return rf.main.populate_args(**merged)


def lr_lambda(args: argparse.Namespace, steps_per_epoch: int):
    """RF-DETR's LambdaLR factor (rfdetr/main.py ``Model.train``), from its args."""
    total = steps_per_epoch * args.epochs
    warm = steps_per_epoch * args.warmup_epochs

    def factor(step: int) -> float:
        if step < warm:
            return float(step) / float(max(1, warm))
        if args.lr_scheduler == "cosine":
            progress = float(step - warm) / float(max(1, total - warm))
            return args.lr_min_factor + (1 - args.lr_min_factor) * 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0 if step < args.lr_drop * steps_per_epoch else 0.1
    return factor


def build(rf: types.SimpleNamespace, preset: str = "rfdetr-nano", num_classes: int = 90,
          steps_per_epoch: int = 1000, **overrides: Any) -> types.SimpleNamespace:
    """model, criterion, postprocess, optimizer (AdamW over ``get_param_dict``), lr_scheduler,
    ema (``ModelEma(decay, tau)``, made after any weights are loaded: call ``make_ema()``),
    args; as ``Model.__init__`` and ``Model.train`` make them."""
    args = training_args(rf, preset, num_classes, **overrides)
    model = rf.models.build_model(args)
    criterion, postprocess = rf.models.build_criterion_and_postprocessors(args)
    ref = types.SimpleNamespace(args=args, model=model, criterion=criterion, postprocess=postprocess)

    def make_optim() -> None:
        groups = [g for g in rf.param_dicts.get_param_dict(args, model) if g["params"].requires_grad]
        ref.optimizer = torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay)
        ref.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
            ref.optimizer, lr_lambda(args, steps_per_epoch))
        ref.ema = rf.utils.ModelEma(model, decay=args.ema_decay, tau=args.ema_tau) \
            if args.use_ema else None
    ref.make_optim = make_optim
    return ref


def step(ref: types.SimpleNamespace, images: torch.Tensor, targets: list[dict]) -> float:
    """One optimizer step in the order of RF-DETR's ``train_one_epoch`` (grad_accum 1, no AMP on
    CPU): forward + criterion, weighted sum, backward, clip_grad_norm_(model.parameters(),
    clip_max_norm), AdamW step, scheduler step, zero_grad, EMA update. Returns the loss."""
    args = ref.args
    losses = ref.criterion(ref.model(images, targets), targets)
    weights = ref.criterion.weight_dict
    loss = sum(losses[k] * weights[k] for k in losses if k in weights)
    loss.backward()
    if args.clip_max_norm > 0:
        torch.nn.utils.clip_grad_norm_(ref.model.parameters(), args.clip_max_norm)
    ref.optimizer.step()
    ref.lr_scheduler.step()
    ref.optimizer.zero_grad()
    if ref.ema is not None:
        ref.ema.update(ref.model)
    return float(loss.detach())


class _LossRecorder(torch.nn.Module):
    """RF-DETR's criterion, recording the weighted total of every call (what its
    ``train_one_epoch`` backpropagates with grad_accum 1)."""

    def __init__(self, criterion: torch.nn.Module) -> None:
        super().__init__()
        self.criterion = criterion
        self.weight_dict = criterion.weight_dict
        self.totals: list[float] = []

    def forward(self, outputs: dict, targets: list[dict]) -> dict:
        losses = self.criterion(outputs, targets)
        total = sum(losses[k] * self.weight_dict[k] for k in losses if k in self.weight_dict)
        self.totals.append(float(total.detach()))
        return losses


def trajectory(source: Path, weights: Path, batches: Path, out: Path, threads: int) -> None:
    """N optimizer steps of RF-DETR's own ``engine.train_one_epoch`` (its criterion, AdamW over
    ``get_param_dict``, clipping, LambdaLR, ``ModelEma``) from ``weights`` over ``batches``
    (a list of (images, targets)); augmentation and multi-scale off, grad_accum 1. Saves the
    per-step losses and the final regular and EMA state dicts to ``out``."""
    import collections
    import contextlib
    import io

    torch.set_num_threads(threads)
    rf = import_rfdetr(source)
    data = torch.load(batches, weights_only=True)
    images0 = data["batches"][0]["images"]
    torch.manual_seed(0)
    ref = build(rf, "rfdetr-nano", num_classes=data["num_logits"] - 1,
                resolution=images0.shape[-1], batch_size=images0.shape[0], grad_accum_steps=1,
                multi_scale=False, steps_per_epoch=data["steps_per_epoch"])
    ref.model.load_state_dict(torch.load(weights, weights_only=True))
    ref.make_optim()
    recorder = _LossRecorder(ref.criterion)
    loader = []
    for b in data["batches"]:
        mask = torch.zeros(b["images"].shape[0], *b["images"].shape[-2:], dtype=torch.bool)
        loader.append((rf.misc.NestedTensor(b["images"], mask), b["targets"]))
    callbacks = collections.defaultdict(list)
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        rf.engine.train_one_epoch(
            ref.model, recorder, ref.lr_scheduler, loader, ref.optimizer, torch.device("cpu"),
            0, images0.shape[0], max_norm=ref.args.clip_max_norm, ema_m=ref.ema,
            num_training_steps_per_epoch=len(loader), args=ref.args, callbacks=callbacks)
    torch.save({"losses": recorder.totals, "model": ref.model.state_dict(),
                "ema": ref.ema.module.state_dict(), "ema_updates": ref.ema.updates,
                "lr": [g["lr"] for g in ref.optimizer.param_groups]}, out)
    print(f"RF-DETR: {len(recorder.totals)} steps, losses {recorder.totals[0]:.4f} .. "
          f"{recorder.totals[-1]:.4f}")


def _check(source: Path) -> None:
    rf = import_rfdetr(source)
    torch.manual_seed(0)
    ref = build(rf, "rfdetr-nano")
    ref.make_optim()
    n = sum(p.numel() for p in ref.model.parameters())
    print(f"RF-DETR from {source}: nano built, {n} parameters, "
          f"{len(ref.optimizer.param_groups)} param groups, num_select {ref.args.num_select}, "
          f"eval_max_dets {ref.args.eval_max_dets}, clip {ref.args.clip_max_norm}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", type=Path, default=DEFAULT_SOURCE)
    sub = p.add_subparsers(dest="what", required=True)
    sub.add_parser("check", help="build nano and print what was built")
    t = sub.add_parser("trajectory", help="RF-DETR's train_one_epoch over saved batches")
    t.add_argument("--weights", type=Path, required=True)
    t.add_argument("--batches", type=Path, required=True)
    t.add_argument("--out", type=Path, required=True)
    t.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    if a.what == "check":
        _check(a.source)
    else:
        trajectory(a.source, a.weights, a.batches, a.out, a.threads)
