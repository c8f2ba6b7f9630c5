"""raydetr's RF-DETR models against RF-DETR's own, built from its source in a scratch env.

One harness for every comparison with RF-DETR's code: ``keys`` / ``compare`` / ``loss`` (the
model, its outputs and its criterion), ``check`` and ``trajectory`` (its training step: model,
criterion, ``get_param_dict``, AdamW, LambdaLR, ``ModelEma``; used by bench/rfdetr_step.py,
bench/rfdetr_trajectory.py and bench/rfdetr_profile.py). ``make rfdetr-reference
RFDETR_REPO=/path/to/rf-detr-clone`` makes the scratch env (bench/setup_rfdetr_reference.sh:
/tmp/rfdetr-ref/src and /tmp/rfdetr-ref/venv, the default ``--rfdetr-src``).

    # a scratch env OUTSIDE the repo (RF-DETR's code never enters it):
    #   python -m venv /tmp/rf/venv && /tmp/rf/venv/bin/pip install torch==2.13.0 \
    #       "transformers>4,<5" peft pydantic numpy scipy safetensors pyyaml
    #   git archive 35ac6ab rfdetr | tar -x -C /tmp/rf/src      (github roboflow/rf-detr, 1.4.1)
    /tmp/rf/venv/bin/python bench/rfdetr_reference.py --rfdetr-src /tmp/rf/src keys rfdetr-large \
        --out tests/unit/model/data/keys_large.json
    /tmp/rf/venv/bin/python bench/rfdetr_reference.py --rfdetr-src /tmp/rf/src compare \
        rfdetr-seg-nano rfdetr-seg-preview rfdetr-large
    /tmp/rf/venv/bin/python bench/rfdetr_reference.py --rfdetr-src /tmp/rf/src loss rfdetr-seg-nano
    # RF-DETR 1.11's model (its wheel unpacked; a venv with transformers>=5.1): keys only
    /tmp/rf111/venv/bin/python bench/rfdetr_reference.py --rfdetr-src /tmp/rf111/whl keys \
        rfdetr-seg-nano --out tests/unit/model/data/keys_seg_nano_rfdetr111.json

``keys``: RF-DETR's model for the preset's config, its ``state_dict`` as ``[key, shape, dtype]``
in order (the format of ../shared/reference/rfdetr/keys_*.json). ``compare``: both models with
the same non-trivial weights (RF-DETR's init + noise on every tensor, loaded into ours key for
key), eval forward on the same seeded images; max |diff| of logits, boxes and masks (final, aux
and encoder outputs). ``loss``: RF-DETR's criterion (its training args for the preset) and ours
on the same train-mode outputs, targets and torch RNG state; |diff| per loss term.

RF-DETR is imported from ``--rfdetr-src`` (a dir holding its ``rfdetr/`` package) without its
``rfdetr/__init__.py`` (the high-level API). torchvision does not load against this torch build,
and the model path needs only ``box_area`` and ``_is_tracing`` from it: both are provided here;
other data-side imports (PIL, pycocotools, supervision, ...) get inert stand-ins.
Prints the numbers and writes them to bench/results/rfdetr_reference_<command>.json.
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.machinery
import json
import math
import sys
import time
import types
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = Path("/tmp/rfdetr-ref/src")  # bench/setup_rfdetr_reference.sh's
RESULTS = REPO / "bench" / "results"
sys.path.insert(0, str(REPO))

from raydetr.model.rfdetr import RFDETR_PRESETS, build_rfdetr  # noqa: E402

# Our preset -> RF-DETR's config class (rfdetr/config.py).
CONFIG_CLASS = {
    "rfdetr-nano": "RFDETRNanoConfig", "rfdetr-small": "RFDETRSmallConfig",
    "rfdetr-medium": "RFDETRMediumConfig", "rfdetr-base": "RFDETRBaseConfig",
    "rfdetr-large": "RFDETRLargeConfig",
    "rfdetr-seg-preview": "RFDETRSegPreviewConfig", "rfdetr-seg-nano": "RFDETRSegNanoConfig",
    "rfdetr-seg-small": "RFDETRSegSmallConfig", "rfdetr-seg-medium": "RFDETRSegMediumConfig",
    "rfdetr-seg-large": "RFDETRSegLargeConfig", "rfdetr-seg-xlarge": "RFDETRSegXLargeConfig",
    "rfdetr-seg-2xlarge": "RFDETRSeg2XLargeConfig",
}
_INERT = ("PIL", "pycocotools", "supervision", "cv2", "roboflow", "matplotlib", "tqdm",
          "requests", "onnx", "onnxsim", "onnxruntime", "polygraphy", "open_clip", "rf100vl")


class _InertMeta(type):
    def __getattr__(cls, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return _inert_class(name)


def _inert_class(name: str) -> type:
    """Callable, subclassable, and any attribute of it is another such class."""
    return _InertMeta(name, (), {"__init__": lambda self, *a, **k: None,
                                 "__call__": lambda self, *a, **k: None})


class _Inert(types.ModuleType):
    """A stand-in module: any attribute is an inert class."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return _inert_class(name)


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname.split(".")[0] in _INERT + ("torchvision",):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec: Any) -> types.ModuleType:
        module = _Inert(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        if module.__name__ == "torchvision":
            module._is_tracing = lambda: False  # type: ignore[attr-defined]
            module.__version__ = "0.28.0"  # RF-DETR's util/misc.py reads the minor version
        if module.__name__ == "torchvision.ops.boxes":
            module.box_area = lambda b: (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])  # type: ignore


def import_rfdetr(src: Path) -> types.SimpleNamespace:
    """RF-DETR's config, main and models modules from ``src/rfdetr`` (its API __init__ skipped)."""
    if not (src / "rfdetr" / "models").is_dir():
        raise SystemExit(f"--rfdetr-src {src}: no rfdetr/models in it; pass the dir that holds "
                         "RF-DETR's rfdetr/ package (e.g. `git archive 35ac6ab rfdetr | tar -x`)")
    sys.meta_path.insert(0, _Finder())
    package = types.ModuleType("rfdetr")
    package.__path__ = [str(src / "rfdetr")]
    sys.modules["rfdetr"] = package
    import importlib

    # 1.4's rfdetr/main.py builds from populate_args; 1.11 has no main.py and builds from its
    # config objects (rfdetr.models.build_model_from_config).
    main = (importlib.import_module("rfdetr.main") if (src / "rfdetr" / "main.py").is_file()
            else None)
    rf = types.SimpleNamespace(config=importlib.import_module("rfdetr.config"), main=main,
                               models=importlib.import_module("rfdetr.models"))
    if main is not None:  # 1.4's training pieces (check, trajectory, the step benchmarks)
        rf.engine = importlib.import_module("rfdetr.engine")
        rf.param_dicts = importlib.import_module("rfdetr.util.get_param_dicts")
        rf.utils = importlib.import_module("rfdetr.util.utils")
        rf.misc = importlib.import_module("rfdetr.util.misc")
    return rf


def rfdetr_args(rf: types.SimpleNamespace, preset: str, training: bool) -> argparse.Namespace:
    """populate_args of the preset's config; ``training`` merges TrainConfig as RF-DETR's
    ``train()`` does (seg: cls_loss_coef 5, mask loss coefficients)."""
    cfg = getattr(rf.config, CONFIG_CLASS[preset])(device="cpu", pretrain_weights=None)
    values = cfg.model_dump()
    if training:
        train_cls = (rf.config.SegmentationTrainConfig if values.get("segmentation_head")
                     else rf.config.TrainConfig)
        train = train_cls(dataset_dir="/nonexistent", output_dir="/tmp").model_dump()
        values = {k: v for k, v in values.items() if k not in train} | train
    return rf.main.populate_args(**values)


def build_reference(rf: types.SimpleNamespace, preset: str, training: bool = False) -> Any:
    if rf.main is None:  # RF-DETR >= 1.11
        if training:
            raise SystemExit("compare/loss use RF-DETR 1.4's source; 1.11 is for `keys`")
        cfg = getattr(rf.config, CONFIG_CLASS[preset])(device="cpu", pretrain_weights=None)
        torch.manual_seed(0)
        return rf.models.build_model_from_config(cfg), argparse.Namespace(**cfg.model_dump())
    args = rfdetr_args(rf, preset, training)
    torch.manual_seed(0)
    return rf.models.build_model(args), args


def key_list(model: torch.nn.Module) -> list[list[Any]]:
    return [[k, list(v.shape), str(v.dtype).removeprefix("torch.")]
            for k, v in model.state_dict().items()]


def cmd_keys(rf: types.SimpleNamespace, presets: list[str], out: Path | None) -> dict:
    result = {}
    for preset in presets:
        model, args = build_reference(rf, preset)
        keys = key_list(model)
        result[preset] = {
            "source": f"RF-DETR source at {args_source(rf)}, config {CONFIG_CLASS[preset]}, "
                      "built by bench/rfdetr_reference.py keys",
            "config_class": CONFIG_CLASS[preset],
            "config": {k: v for k, v in vars(args).items()
                       if isinstance(v, (int, float, str, bool, list, type(None)))},
            "num_parameters": sum(p.numel() for p in model.parameters()),
            "num_state_dict_entries": len(keys),
            "state_dict": keys,
        }
        print(f"{preset}: {len(keys)} state_dict entries, "
              f"{result[preset]['num_parameters']:,} parameters")
    if out is not None:
        if len(presets) != 1:
            raise SystemExit("--out takes one preset")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result[presets[0]], indent=1) + "\n")
        print(f"wrote {out}")
    return result


def args_source(rf: types.SimpleNamespace) -> str:
    return str(Path(rf.config.__file__).resolve().parents[1])


def noisy_pair(rf: types.SimpleNamespace, preset: str, training: bool = False, seed: int = 0
               ) -> tuple[torch.nn.Module, torch.nn.Module, argparse.Namespace]:
    """RF-DETR's model with noise on every tensor, and ours loaded with the same weights."""
    ref, args = build_reference(rf, preset, training)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for v in ref.state_dict().values():
            v.add_(0.02 * torch.randn(v.shape, generator=gen, dtype=v.dtype))
    ours = build_rfdetr(preset, num_classes=int(ref.class_embed.out_features))
    missing, unexpected = ours.load_state_dict(ref.state_dict(), strict=True)
    assert not missing and not unexpected
    return ref, ours, args


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        raise SystemExit(f"shape mismatch {tuple(a.shape)} vs {tuple(b.shape)}")
    return float((a.double() - b.double()).abs().max())


def cmd_compare(rf: types.SimpleNamespace, presets: list[str], batch: int,
                resolution: int | None) -> dict:
    result = {}
    for preset in presets:
        ref, ours, _ = noisy_pair(rf, preset)
        ref.eval()
        ours.eval()
        res = resolution or int(RFDETR_PRESETS[preset]["resolution"])
        images = torch.randn(batch, 3, res, res, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            t0 = time.perf_counter()
            out_ref = ref(images)
            t_ref = time.perf_counter() - t0
            t0 = time.perf_counter()
            out_ours = ours(images)
            t_ours = time.perf_counter() - t0
        row: dict[str, Any] = {"resolution": res, "batch": batch,
                               "forward_s": {"rfdetr": t_ref, "raydetr": t_ours}}
        sets = [("final", out_ref, out_ours), ("enc", out_ref["enc_outputs"],
                                               out_ours["enc_outputs"])]
        sets += [(f"aux{i}", a, b) for i, (a, b) in
                 enumerate(zip(out_ref["aux_outputs"], out_ours["aux_outputs"]))]
        for name, a, b in sets:
            for key in ("pred_logits", "pred_boxes", "pred_masks"):
                if key in a or key in b:
                    row[f"{name}.{key}"] = _max_diff(a[key], b[key])
        if "pred_masks" in out_ours:
            row["pred_masks_shape"] = list(out_ours["pred_masks"].shape)
            row["mask_logit_abs_mean"] = float(out_ref["pred_masks"].abs().mean())
            row.update(compare_postprocess(rf, preset, out_ref, out_ours))
        row["logit_abs_mean"] = float(out_ref["pred_logits"].abs().mean())
        result[preset] = row
        finals = {k: f"{v:.3g}" for k, v in row.items() if k.startswith("final.")}
        worst = max(v for k, v in row.items() if k.split(".")[0] in ("final", "enc")
                    or k.startswith("aux"))
        print(f"{preset} @ {res}px batch {batch}: {finals}; worst over final/aux/enc "
              f"{worst:.3g} (RF-DETR {t_ref:.2f} s, raydetr {t_ours:.2f} s)")
        if "post.num_select" in row:
            print(f"  post-processing (top {row['post.num_select']}, originals 480x640 and "
                  f"300x200): scores max |diff| {row['post.max_abs_diff_scores']:.3g}, labels "
                  f"differing {row['post.labels_differing']}, mask pixels differing "
                  f"{row['post.mask_pixels_differing']} of {row['post.mask_pixels']}")
    return result


def compare_postprocess(rf: types.SimpleNamespace, preset: str, out_ref: dict, out_ours: dict
                        ) -> dict[str, Any]:
    """RF-DETR's PostProcess (num_select of the preset) vs ours + masks_at_size, at two
    original sizes: scores, labels and full-size bool masks."""
    from raydetr.model.postprocess import PostProcessor, masks_at_size

    k = int(RFDETR_PRESETS[preset]["num_select"])
    sizes = torch.tensor([[480, 640], [300, 200]])[: out_ref["pred_logits"].shape[0]]
    ref = rf.models.PostProcess(num_select=k)(out_ref, sizes)
    ours = PostProcessor()(out_ours, sizes, top_k=k)
    score_diff, label_diff, mask_diff, mask_px = 0.0, 0, 0, 0
    for r, o, size in zip(ref, ours, sizes.tolist()):
        score_diff = max(score_diff, float((r["scores"] - o["scores"]).abs().max()))
        label_diff += int((r["labels"] != o["labels"]).sum())
        masks = torch.cat(list(masks_at_size(o["mask_logits"], size)))
        mask_diff += int((r["masks"][:, 0] != masks).sum())
        mask_px += masks.numel()
    return {"post.num_select": k, "post.max_abs_diff_scores": score_diff,
            "post.labels_differing": label_diff, "post.mask_pixels_differing": mask_diff,
            "post.mask_pixels": mask_px}


def make_targets(batch: int, res: int, with_masks: bool, seed: int = 2) -> list[dict]:
    """A few boxes per image; masks = the box filled (full input resolution), as bool."""
    gen = torch.Generator().manual_seed(seed)
    targets = []
    for i in range(batch):
        n = 3 - i % 2
        cxcy = torch.rand(n, 2, generator=gen) * 0.5 + 0.25
        wh = torch.rand(n, 2, generator=gen) * 0.3 + 0.1
        t = {"labels": torch.randint(1, 91, (n,), generator=gen),
             "boxes": torch.cat([cxcy, wh], 1)}
        if with_masks:
            ys = (torch.arange(res) + 0.5) / res
            m = torch.zeros(n, res, res, dtype=torch.bool)
            for j in range(n):
                x0, y0 = cxcy[j] - wh[j] / 2
                x1, y1 = cxcy[j] + wh[j] / 2
                m[j] = ((ys[:, None] >= y0) & (ys[:, None] < y1)
                        & (ys[None, :] >= x0) & (ys[None, :] < x1))
            t["masks"] = m
        targets.append(t)
    return targets


def cmd_loss(rf: types.SimpleNamespace, presets: list[str], batch: int,
             resolution: int | None) -> dict:
    from raydetr.config import load_config
    from raydetr.model.build import build_criterion

    result = {}
    for preset in presets:
        ref, ours, args = noisy_pair(rf, preset, training=True)
        criterion_ref, _ = rf.models.build_criterion_and_postprocessors(args)
        cfg = load_config(None, [f"model.preset={preset}"])
        criterion = build_criterion(cfg.model, cfg.loss, ours, ours.num_classes)
        seg = bool(RFDETR_PRESETS[preset]["segmentation_head"])
        res = resolution or 2 * 12 * 4 * 2
        images = torch.randn(batch, 3, res, res, generator=torch.Generator().manual_seed(1))
        targets = make_targets(batch, res, seg)
        row: dict[str, Any] = {"resolution": res, "batch": batch}
        for mode in ("train", "eval"):
            ref.train(mode == "train")
            ours.train(mode == "train")
            criterion_ref.train(mode == "train")
            criterion.train(mode == "train")
            torch.manual_seed(3)
            out_ref = ref(images)
            torch.manual_seed(3)
            out_ours = ours(images)
            torch.manual_seed(4)
            losses_ref = criterion_ref(out_ref, targets)
            torch.manual_seed(4)
            losses_ours = criterion(out_ours, targets)
            ref_total = sum(losses_ref[k] * criterion_ref.weight_dict[k]
                            for k in losses_ref if k in criterion_ref.weight_dict)
            diffs = {"total": abs(float(ref_total.detach()) - float(losses_ours["loss"].detach()))}
            for k_ref, value in losses_ref.items():
                k_ours = ours_name(k_ref)
                if k_ours in losses_ours:
                    diffs[k_ref] = abs(float(value) - float(losses_ours[k_ours]))
            row[mode] = {"total_rfdetr": float(ref_total), "total_raydetr":
                         float(losses_ours["loss"]), "max_abs_diff": max(diffs.values()),
                         "terms_compared": len(diffs) - 1, "diffs": diffs}
            print(f"{preset} {mode} @ {res}px: RF-DETR total {float(ref_total):.6f}, raydetr "
                  f"{float(losses_ours['loss']):.6f}; {len(diffs) - 1} terms, max |diff| "
                  f"{max(diffs.values()):.3g}")
        result[preset] = row
    return result


def training_args(rf: types.SimpleNamespace, preset: str = "rfdetr-nano", num_classes: int = 90,
                  **overrides: Any) -> argparse.Namespace:
    """The Namespace RF-DETR trains with: ``RFDETR.train_from_config``'s merge of the model
    config (minus keys TrainConfig also has), TrainConfig, extra kwargs and ``num_classes``,
    then ``populate_args`` (rfdetr/detr.py, rfdetr/main.py). ``num_classes`` as RF-DETR counts
    it (the class head has num_classes + 1 logits)."""
    model_config = getattr(rf.config, CONFIG_CLASS[preset])(device="cpu").model_dump()
    # a seg model trains with SegmentationTrainConfig (cls_loss_coef 5, the mask losses)
    train_cls = (rf.config.SegmentationTrainConfig if model_config.get("segmentation_head")
                 else rf.config.TrainConfig)
    fields = train_cls.model_fields
    train_kw = {k: v for k, v in overrides.items() if k in fields}
    extra = {k: v for k, v in overrides.items() if k not in fields}
    train_config = train_cls(dataset_dir="/nonexistent", **train_kw).model_dump()
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


def build_training(rf: types.SimpleNamespace, preset: str = "rfdetr-nano", num_classes: int = 90,
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
    rf = import_rfdetr(source.resolve())
    data = torch.load(batches, weights_only=True)
    images0 = data["batches"][0]["images"]
    torch.manual_seed(0)
    ref = build_training(rf, "rfdetr-nano", num_classes=data["num_logits"] - 1,
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


def cmd_check(rf: types.SimpleNamespace, source: Path) -> dict:
    torch.manual_seed(0)
    ref = build_training(rf, "rfdetr-nano")
    ref.make_optim()
    n = sum(p.numel() for p in ref.model.parameters())
    print(f"RF-DETR from {source}: nano built, {n} parameters, "
          f"{len(ref.optimizer.param_groups)} param groups, num_select {ref.args.num_select}, "
          f"eval_max_dets {ref.args.eval_max_dets}, clip {ref.args.clip_max_norm}")
    return {"parameters": n, "param_groups": len(ref.optimizer.param_groups),
            "num_select": ref.args.num_select, "eval_max_dets": ref.args.eval_max_dets}


def ours_name(rf_key: str) -> str:
    """RF-DETR's loss key -> ours: loss_ce -> loss_cls, suffix _i -> _aux{i}."""
    name = rf_key.replace("loss_ce", "loss_cls")
    parts = name.rsplit("_", 1)
    if len(parts) == 2 and parts[1].isdigit():
        return f"{parts[0]}_aux{parts[1]}"
    return name


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rfdetr-src", type=Path, default=DEFAULT_SOURCE,
                   help="dir holding RF-DETR's rfdetr/ package (its source, e.g. 1.4.1); "
                        f"default {DEFAULT_SOURCE} (make rfdetr-reference)")
    p.add_argument("--threads", type=int, default=1)
    sub = p.add_subparsers(dest="command", required=True)
    k = sub.add_parser("keys", help="RF-DETR's state_dict key list for presets")
    k.add_argument("presets", nargs="+", choices=sorted(CONFIG_CLASS))
    k.add_argument("--out", type=Path, default=None)
    for name in ("compare", "loss"):
        c = sub.add_parser(name)
        c.add_argument("presets", nargs="+", choices=sorted(CONFIG_CLASS))
        c.add_argument("--batch", type=int, default=2)
        c.add_argument("--resolution", type=int, default=None,
                       help="default: the preset's own (compare) / 192 (loss)")
    sub.add_parser("check", help="build RF-DETR nano's training pieces and print them")
    t = sub.add_parser("trajectory", help="RF-DETR's train_one_epoch over saved batches")
    t.add_argument("--weights", type=Path, required=True)
    t.add_argument("--batches", type=Path, required=True)
    t.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.command == "trajectory":
        trajectory(a.rfdetr_src, a.weights, a.batches, a.out, a.threads)
        return {}
    rf = import_rfdetr(a.rfdetr_src.resolve())
    if a.command == "check":
        return cmd_check(rf, a.rfdetr_src)
    if a.command == "keys":
        result = cmd_keys(rf, a.presets, a.out)
    elif a.command == "compare":
        result = cmd_compare(rf, a.presets, a.batch, a.resolution)
    else:
        result = cmd_loss(rf, a.presets, a.batch, a.resolution)
    if a.command != "keys" or a.out is None:
        RESULTS.mkdir(parents=True, exist_ok=True)
        out = RESULTS / f"rfdetr_reference_{a.command}.json"
        payload = {"command": a.command, "rfdetr_src": str(a.rfdetr_src), "threads": a.threads,
                   "torch": torch.__version__, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                   "results": result}
        if a.command == "keys":
            payload["results"] = {k: {kk: vv for kk, vv in v.items() if kk != "state_dict"}
                                  for k, v in result.items()}
        out.write_text(json.dumps(payload, indent=2))
        print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
