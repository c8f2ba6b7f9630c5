"""The distillation teacher on a Ray worker: frozen, eval mode, no_grad (bf16 autocast on GPU),
outside DDP, the EMA and every checkpoint.

    teacher = Teacher.load(spec, cfg.distill, num_classes, device, amp_dtype, criterion)
    extra = teacher(images, student_outputs)      # {"loss_distill": ..., ...}: the engine's hook

``spec`` (a :class:`TeacherSpec`) is made on the driver (raydetr.train.teacher_source) before
Ray starts; the worker only builds the model from its local model dir. ``teacher=ema``: the
student's own first EMA shadow runs through the student's module with
``torch.func.functional_call`` (no second model is built or loaded).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from raydetr.artifacts import load_weights
from raydetr.config import DistillConfig, LossConfig, ModelConfig
from raydetr.ema.keys import unwrap_model
from raydetr.loss.distill import DistillLoss, align_features, teacher_targets
from raydetr.model.build import build
from raydetr.train.engine import predict_records

EMA_TEACHER = "ema"


@dataclass(frozen=True)
class TeacherSpec:
    """What every worker needs to rebuild the teacher; also what the run records about it."""

    uri: str  # as the user gave it (distill.teacher)
    model_dir: str | None  # local dir with model.safetensors + meta.json; None for "ema"
    sha256: str | None  # of model.safetensors (the content the student learned from)
    classes: list[str] = field(default_factory=list)
    class_map: list[int] = field(default_factory=list)  # teacher logit -> dataset class, -1
    same_classes: bool = True  # every teacher class is a dataset class and vice versa
    model: dict[str, Any] | None = None  # the teacher's ModelConfig (its meta.json "model")
    resolution: int | None = None

    def record(self) -> dict[str, Any]:
        """The JSON-able facts the run and the published student carry (never the weights)."""
        return {"uri": self.uri, "sha256": self.sha256, "classes": self.classes,
                "preset": (self.model or {}).get("preset"), "resolution": self.resolution,
                "same_classes": self.same_classes}


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


FEATURE_WEIGHT = 64.0  # distill.feature_weight's default for a trained teacher (README)


def feature_weight(cfg: DistillConfig, ema_teacher: bool) -> float:
    """``distill.feature_weight``, or its default for this kind of teacher: a trained teacher's
    maps are worth 64 (bench/distill.py); the student's own EMA shadow's are a lagging copy of
    its own, and pulling towards them held the student back (0)."""
    if cfg.feature_weight is not None:
        return cfg.feature_weight
    return 0.0 if ema_teacher else FEATURE_WEIGHT


def distill_loss(cfg: DistillConfig, criterion: nn.Module, same_classes: bool, *,
                 ema_teacher: bool = False) -> DistillLoss:
    """The Teach-DETR loss on the student's own matcher, classification loss and loss weights,
    and PKD's feature term at ``cfg``'s weight for this kind of teacher."""
    return DistillLoss(criterion, weight=cfg.weight,
                       logit_weight=cfg.logit_weight if same_classes else 0.0,
                       unmatched_weight=cfg.unmatched_weight,
                       feature_weight=feature_weight(cfg, ema_teacher))


class Teacher:
    """A frozen teacher and the distillation loss it feeds."""

    def __init__(self, spec: TeacherSpec, cfg: DistillConfig, num_classes: int,
                 loss: DistillLoss, *, model: nn.Module | None, postprocessor: nn.Module | None,
                 device: torch.device, amp_dtype: torch.dtype | None, ema: Any = None,
                 student: nn.Module | None = None) -> None:
        self.spec, self.cfg, self.num_classes = spec, cfg, num_classes
        self.loss = loss
        self.model, self.postprocessor = model, postprocessor
        # the teacher only runs forward: bf16 on GPU whatever optim.amp says
        self.device = device
        self.amp_dtype = amp_dtype or (torch.bfloat16 if device.type == "cuda" else None)
        self.ema, self.student = ema, student
        self.class_map = torch.tensor(spec.class_map, dtype=torch.int64, device=device)
        # the feature term reads both models' encoder maps (out["features"])
        self.features = loss.feature_weight > 0
        if self.features:
            if student is None:
                raise ValueError("distill.feature_weight > 0 needs the student model")
            unwrap_model(student).return_features = True
            if model is not None:
                model.return_features = True

    @classmethod
    def load(cls, spec: TeacherSpec, cfg: DistillConfig, num_classes: int, criterion: nn.Module,
             device: torch.device, amp_dtype: torch.dtype | None, *, ema: Any = None,
             student: nn.Module | None = None) -> Teacher:
        """Build the teacher of ``spec`` from its model dir (or the EMA for ``teacher=ema``)."""
        if spec.model_dir is None:  # self-distillation from the EMA
            if ema is None or student is None:
                raise ValueError("distill.teacher=ema needs the EMA (ema.enabled=true)")
            if ema.device is not None and ema.device.type != torch.device(device).type:
                raise ValueError(f"distill.teacher=ema runs the EMA shadow on {device}, but "
                                 f"ema.device={ema.device} keeps it elsewhere: unset ema.device")
            return cls(spec, cfg, num_classes,
                       distill_loss(cfg, criterion, spec.same_classes, ema_teacher=True),
                       model=None, postprocessor=None, device=device, amp_dtype=amp_dtype,
                       ema=ema, student=student)
        model_cfg = ModelConfig(**{**(spec.model or {}), "backbone_weights": None})
        model, _, post = build(model_cfg, LossConfig(), len(spec.classes))
        model.load_state_dict(load_weights(Path(spec.model_dir) / "model.safetensors"))
        return cls.from_model(spec, cfg, num_classes, criterion, model, post, device, amp_dtype,
                              student=student)

    @classmethod
    def from_model(cls, spec: TeacherSpec, cfg: DistillConfig, num_classes: int,
                   criterion: nn.Module, model: nn.Module, postprocessor: nn.Module,
                   device: torch.device, amp_dtype: torch.dtype | None, *,
                   student: nn.Module | None = None) -> Teacher:
        """A teacher from a model already in memory (frozen here: eval, no grad); ``student``
        (the model being trained) is needed for the feature term."""
        model.to(device).eval().requires_grad_(False)
        return cls(spec, cfg, num_classes, distill_loss(cfg, criterion, spec.same_classes),
                   model=model, postprocessor=postprocessor.eval(), device=device,
                   amp_dtype=amp_dtype, student=student)

    def _autocast(self):
        if self.amp_dtype is None or self.device.type != "cuda":
            return torch.autocast(device_type="cpu", enabled=False)
        return torch.autocast(device_type="cuda", dtype=self.amp_dtype)

    def _at_resolution(self, images: Tensor) -> Tensor:
        r = self.spec.resolution
        if r is None or tuple(images.shape[-2:]) == (r, r):
            return images
        return F.interpolate(images, size=(r, r), mode="bilinear", align_corners=False)

    @torch.no_grad()
    def outputs(self, images: Tensor) -> dict[str, Any]:
        """The teacher's raw outputs (pred_logits, pred_boxes; with the feature term also
        features and input_hw, the size the teacher saw) on ``images``."""
        hw = tuple(images.shape[-2:])
        with self._autocast():
            if self.model is not None:
                images = self._at_resolution(images)
                hw = tuple(images.shape[-2:])
                out = self.model(images)
            else:
                module = unwrap_model(self.student)
                was_training = module.training
                module.eval()
                try:
                    out = torch.func.functional_call(module, self.ema.shadow_state_dict(0),
                                                     (images,))
                finally:
                    module.train(was_training)
        res = {"pred_logits": out["pred_logits"].float(), "pred_boxes": out["pred_boxes"].float()}
        if self.features:
            res["features"], res["input_hw"] = [f.float() for f in out["features"]], hw
        return res

    def targets(self, outputs: dict[str, Any]) -> list[dict[str, Tensor]]:
        return teacher_targets(outputs, self.class_map, self.num_classes,
                               score_threshold=self.cfg.score_threshold,
                               max_boxes=self.cfg.max_boxes, nms_iou=self.cfg.nms_iou)

    def __call__(self, images: Tensor, student_outputs: dict) -> dict[str, Tensor]:
        self.loss.train(unwrap_model(self.student).training if self.student is not None
                        else True)
        out = self.outputs(images)
        features = None
        if self.features:
            features = align_features(student_outputs["features"], tuple(images.shape[-2:]),
                                      out["features"], out["input_hw"])
        return self.loss(student_outputs, self.targets(out), features)

    def eval_model(self) -> tuple[nn.Module, nn.Module] | None:
        """(model, postprocessor) for measuring the teacher's own mAP; None for ``ema``."""
        if self.model is None:
            return None
        return self.model, self.postprocessor


class _AtResolution(nn.Module):
    def __init__(self, teacher: Teacher) -> None:
        super().__init__()
        self.teacher = teacher

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        return self.teacher.outputs(images)


def teacher_records(teacher: Teacher, batches) -> list[dict] | None:
    """This rank's eval records of the teacher, its labels mapped onto the dataset's classes
    (detections of unmapped classes dropped); None for a ``teacher=ema``."""
    pair = teacher.eval_model()
    if pair is None:
        return None
    _, post = pair
    records = predict_records({"teacher": _AtResolution(teacher)}, post, batches, teacher.device,
                              None, masks=False)["teacher"]  # its boxes are what is scored
    cmap = teacher.class_map.cpu().numpy()
    for r in records:
        mapped = cmap[r["labels"]]
        keep = mapped >= 0
        r["labels"], r["scores"], r["boxes"] = mapped[keep], r["scores"][keep], r["boxes"][keep]
    return records
