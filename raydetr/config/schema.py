"""The typed config models: every key, its type, default and description (one source of
defaults; ``raydetr config`` prints them). Loading and overriding: :mod:`raydetr.config.loading`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from raydetr.config.presets import (
    RENAMED_PRESETS,
    RFDETR_PRESETS,
    RTDETR_PRESETS,
    is_segmentation,
    preset_family,
    resolution_multiple,
)
from raydetr.ema.schedules import check_schedule, schedule_accepts
from raydetr.errors import UserError


class ConfigError(UserError, ValueError):
    """A configuration problem a user can fix; the message names the key and what to do."""

    kind = "config error"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Strict):
    """The dataset, how it is read and augmented."""

    path: str | None = Field(
        None,
        description="Prepared dataset (output of `raydetr prepare`; a local path or a pyarrow "
        "filesystem URI such as s3://bucket/prefix) or a raw COCO/YOLO/VOC dataset (local), "
        "which is prepared into <run.output_dir>/datasets first. None: built-in synthetic "
        "shapes dataset (the demo). Multi-node: a path every node sees, or a URI.",
    )
    train_split: str = Field("train", description="Split the model trains on.")
    val_split: str = Field("val", description="Split evaluated after every epoch (picks the winner, drives early stopping).")
    shard_size: int = Field(256, gt=0, description="Images per Parquet shard.")
    row_group_size: int = Field(
        1, gt=0, description="Images per Parquet row group when preparing: the unit a rank "
        "reads. 1 keeps bytes read per rank at ~split/N under a global shuffle.")
    materialize_max_bytes: int = Field(
        256 * 1024 * 1024, ge=0, description="A split whose files total at most this many "
        "bytes is read whole once per worker and kept in memory; larger splits stream.")
    verify_checksums: bool = Field(
        False, description="Before training, compare every shard's sha256 with dataset.json "
        "(reads the whole dataset once; sizes are always checked).")
    loader_threads: int = Field(2, gt=0, description="Threads reading + decoding batches ahead.")
    prefetch_batches: int = Field(4, gt=0, description="Batches prepared ahead of the step.")
    augment: Literal["rfdetr", "raydetr", "none"] = Field(
        "raydetr", description="Training augmentation: rfdetr = RF-DETR's (flip, square resize "
        "or resize-crop-resize to the largest multi-scale size, then the batch resized to the "
        "step's size; raydetr.data.rfdetr_augment), raydetr = flip + box-safe crop "
        "(hflip_prob, crop_prob), none = neither. The rfdetr presets default to rfdetr.")
    hflip_prob: float = Field(0.5, ge=0, le=1, description="Probability of a horizontal flip.")
    multi_scale: bool = Field(True, description="Random square size per batch around resolution.")
    scale_range: tuple[float, float] = Field(
        (0.75, 1.25), description="data.multi_scale sizes: multiples of 32 between lo and hi times model.resolution (RF-DETR presets use their own steps).")
    crop_prob: float = Field(0.3, ge=0, le=1, description="Probability of a random box-safe crop.")
    synthetic_train_images: int = Field(256, gt=0, description="data.path=null: train images of the built-in dataset.")
    synthetic_val_images: int = Field(64, gt=0, description="data.path=null: val images.")
    synthetic_image_size: int = Field(128, gt=15, description="data.path=null: image side in pixels.")


class ModelConfig(_Strict):
    """The detector: a preset and the knobs it leaves open."""

    preset: str = Field(
        "rtdetr-r18",
        description="rtdetr-r18|r34|r50: ResNet + hybrid encoder (from scratch on CPU); "
        "rfdetr-nano|small|medium|base|large: RF-DETR's detectors and "
        "rfdetr-seg-preview|nano|small|medium|large|xlarge|2xlarge: its instance-segmentation "
        "models (fine-tune from its checkpoints).",
    )
    resolution: int | None = Field(None, description="Square input size; None: preset default.")
    num_queries: int | None = Field(None, gt=0, description="None: preset default.")
    backbone: Literal["resnet18", "resnet34", "resnet50"] | None = Field(
        None, description="ResNet presets: another backbone than the preset's; None: preset default.")
    backbone_weights: str | None = Field(
        None, description="Local torchvision-compatible ResNet state_dict; nothing is downloaded."
    )
    gradient_checkpointing: bool = Field(False, description="Recompute activations in the backward pass: less memory, slower steps.")
    num_denoising: int = Field(50, ge=0, description="Denoising queries (0 disables).")

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, v: str) -> str:
        if v in RENAMED_PRESETS:
            raise ValueError(f"preset '{v}' was renamed to '{RENAMED_PRESETS[v]}' (the ResNet "
                             "hybrid model); for RF-DETR's model use 'rfdetr-" + v + "'")
        if v not in RTDETR_PRESETS + RFDETR_PRESETS:
            raise ValueError(f"unknown preset; choose one of {list(RTDETR_PRESETS + RFDETR_PRESETS)}")
        return v

    @model_validator(mode="after")
    def _resolution_fits_family(self) -> ModelConfig:
        v, m = self.resolution, resolution_multiple(self.preset)
        if v is not None and (v < 2 * m or v % m):
            raise ValueError(f"model.resolution {v} must be a multiple of {m} and >= {2 * m} for "
                             f"preset {self.preset}, e.g. {12 * m}")
        if preset_family(self.preset) == "rfdetr" and (self.backbone or self.backbone_weights):
            raise ValueError(f"model.backbone / model.backbone_weights apply to the ResNet presets only; "
                             f"{self.preset} starts from --pretrain-weights (an RF-DETR .pth)")
        return self


class LossConfig(_Strict):
    """Set criterion (losses) and Hungarian matcher (costs)."""

    cls_loss: Literal["varifocal", "focal", "ia_bce"] = Field(
        "varifocal", description="rfdetr presets default to ia_bce (RF-DETR's IoU-aware BCE).")
    weight_cls: float = Field(1.0, description="Loss weight of the classification term.")
    weight_bbox: float = Field(5.0, description="Loss weight of the L1 box term.")
    weight_giou: float = Field(2.0, description="Loss weight of the GIoU box term.")
    cost_class: float = Field(2.0, description="Hungarian matcher: weight of the class cost.")
    cost_bbox: float = Field(5.0, description="Hungarian matcher: weight of the L1 box cost.")
    cost_giou: float = Field(2.0, description="Hungarian matcher: weight of the GIoU cost.")
    focal_alpha: float = Field(0.25, description="Focal alpha (loss and matcher class cost).")
    focal_gamma: float = Field(2.0, description="Focal gamma (loss and matcher class cost).")
    weight_mask_ce: float = Field(5.0, description="RF-DETR Seg presets: loss weight of the "
                                  "sigmoid cross-entropy of the sampled mask points.")
    weight_mask_dice: float = Field(5.0, description="RF-DETR Seg presets: loss weight of the "
                                    "mask dice term.")
    cost_mask_ce: float = Field(5.0, description="Hungarian matcher (Seg): weight of the mask "
                                "cross-entropy cost.")
    cost_mask_dice: float = Field(5.0, description="Hungarian matcher (Seg): weight of the mask "
                                  "dice cost.")
    mask_point_sample_ratio: int = Field(16, gt=0, description="Seg: mask points sampled per "
                                         "mask = mask-map pixels / this (RF-DETR's ratio).")


class OptimConfig(_Strict):
    """AdamW, the LR schedule, epochs and batch."""

    epochs: int = Field(12, gt=0, description="Training epochs (early stopping may end sooner).")
    batch_size: int = Field(4, gt=0, description="Images per worker per step.")
    grad_accum_steps: int = Field(1, gt=0, description="Micro-batches summed per optimizer step; effective batch = batch_size x grad_accum_steps x scaling.num_workers.")
    # From-scratch defaults (nothing is downloaded, so the backbone starts random). With a
    # pretrained backbone (model.backbone_weights) use RF-DETR's lr=1e-4, lr_encoder=1.5e-4.
    lr: float = Field(1e-3, gt=0, description="AdamW learning rate of everything but the backbone.")
    lr_encoder: float = Field(1e-3, gt=0, description="Backbone learning rate.")
    weight_decay: float = Field(1e-4, ge=0, description="AdamW weight decay.")
    schedule: Literal["cosine", "step"] = Field(
        "cosine", description="LR after warm-up: cosine down to lr x lr_min_ratio, or x0.1 at each of lr_drop_epochs.")
    warmup_steps: int = Field(50, ge=0, description="Linear LR warm-up, in optimizer steps.")
    lr_drop_epochs: list[int] = Field(default_factory=list, description="For schedule=step.")
    lr_min_ratio: float = Field(0.05, ge=0, le=1, description="schedule=cosine: final LR as a fraction of the peak.")
    clip_max_norm: float = Field(0.1, ge=0, description="0 disables clipping.")
    amp: bool = Field(True, description="bf16 autocast on GPU (ignored on CPU).")
    # RF-DETR family only (its get_param_dicts): ViT block lr x layer_decay^(depth - id) and
    # x component_decay^2; the decoder's lr x component_decay.
    lr_vit_layer_decay: float = Field(0.8, gt=0, le=1, description="RF-DETR presets: LR factor per ViT block below the top.")
    lr_component_decay: float = Field(0.7, gt=0, le=1, description="RF-DETR presets: LR factor of the decoder (squared for the ViT).")


class PosthocConfig(_Strict):
    """Post-hoc EMA (EDM2): track power-function EMAs, snapshot them, pick sigma_rel later."""

    enabled: bool = Field(False, description="Record post-hoc EMA snapshots (`raydetr posthoc`).")
    sigma_rels: list[float] = Field(
        default_factory=lambda: [0.05, 0.10],
        description="Relative widths of the tracked power-function EMAs (EDM2: 0.05, 0.10).",
    )
    snapshots: int = Field(
        16, ge=2, description="Snapshots per profile over the whole run: every "
        "ceil(total steps / snapshots) optimizer steps, and one at the run's last step "
        "(bench/posthoc_snapshots.py measures the reconstruction error against this count).",
    )
    every_steps: int | None = Field(
        None, gt=0, description="Snapshot every N optimizer steps instead (more snapshots: "
        "finer steps to reconstruct at, more bytes); None: from `snapshots`."
    )
    bf16: bool = Field(False, description="Store snapshots in bfloat16 (half the bytes).")

    @field_validator("sigma_rels")
    @classmethod
    def _sigma_rels_valid(cls, v: list[float]) -> list[float]:
        if len(v) < 2 or len(set(v)) != len(v):
            raise ValueError(f"needs at least 2 distinct values, e.g. [0.05, 0.10]; got {v}")
        bad = [s for s in v if not 0 < s < 0.28]
        if bad:
            raise ValueError(f"every sigma_rel must be in (0, 0.28); got {bad}")
        return v


class EmaConfig(_Strict):
    """EMA shadows of the weights, evaluated every epoch beside the regular weights."""

    enabled: bool = Field(True, description="Keep EMA shadows; the winner is the better of EMA and regular weights.")
    decay: list[float] = Field(
        default_factory=lambda: [0.993],
        description="Peak decay of each EMA shadow, e.g. [0.99, 0.999] (one shadow each, one "
        "run); a single number is shorthand for a one-element list.",
    )
    tau: float = Field(100.0, gt=0, description="Warmup length in optimizer updates (rfdetr).")
    schedule: str = Field(
        "rfdetr", description="constant | rfdetr | timm | threshold | exp | power, or an import "
        "path such as mypkg.decay:linear (fn(updates, *, decay, ...) -> float).")
    schedule_kwargs: dict[str, Any] = Field(default_factory=dict, description="Extra keyword arguments of ema.schedule, e.g. {gamma: 0.75} for timm.")
    average_buffers: bool = Field(True, description="Average float buffers (BatchNorm statistics) like weights; false copies them.")
    nan_guard: bool = Field(True, description="Skip (and count) updates from non-finite weights.")
    device: str | None = Field(None, description="e.g. 'cpu' to keep the shadow off the GPU.")
    reference_batch: int | None = Field(
        None, gt=0,
        description="Effective batch the decays (and tau) were chosen for; the run uses "
        "decay**k and tau/k with k = effective batch / reference_batch (Busbridge et al. 2023), "
        "so the averaging window stays the same number of images. None: no scaling.",
    )
    posthoc: PosthocConfig = Field(default_factory=PosthocConfig, description="Post-hoc EMA; ema.posthoc=true is short for ema.posthoc.enabled=true.")

    @field_validator("decay", mode="before")
    @classmethod
    def _scalar_is_shorthand(cls, v: Any) -> Any:
        return [v] if isinstance(v, (int, float)) and not isinstance(v, bool) else v

    @field_validator("decay")
    @classmethod
    def _decays_in_range(cls, v: list[float]) -> list[float]:
        if not v:
            raise ValueError("must be a decay or a non-empty list of decays")
        bad = [d for d in v if not 0 < d < 1]
        if bad:
            raise ValueError(f"every decay must be in (0, 1); got {bad}")
        if len(set(v)) != len(v):
            raise ValueError(f"duplicate decays in {v}")
        return v

    @model_validator(mode="after")
    def _schedule_builds(self) -> EmaConfig:
        # Build the schedule here, as every worker will, so a bad ema.schedule or option fails
        # when the config loads, not in a worker after the cluster started.
        try:
            kwargs = dict(self.schedule_kwargs)
            if "tau" not in kwargs and schedule_accepts(self.schedule, "tau"):
                kwargs["tau"] = self.tau
            check_schedule(self.schedule, self.decay, kwargs)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"ema.schedule / ema.schedule_kwargs: {exc}") from None
        return self


class ScalingConfig(_Strict):
    """Ray Train workers (DDP ranks) and their resources."""

    num_workers: int = Field(1, gt=0, description="Training workers (DDP ranks).")
    use_gpu: bool = Field(False, description="One GPU per worker.")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs Ray reserves per worker.")
    max_failures: int = Field(0, ge=-1, description="Worker-group restarts from the last checkpoint after a failure (-1: no limit).")
    torch_threads: int | None = Field(None, gt=0, description="torch threads per worker.")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="Ray placement of the workers: SPREAD puts them on different "
        "nodes where it can.")


class EarlyStoppingConfig(_Strict):
    """Stop a run when its val mAP stops improving (RF-DETR's rule; `--early-stopping`)."""

    enabled: bool = Field(False, description="Stop when the monitored mAP stops improving.")
    patience: int = Field(10, gt=0, description="Non-improving epochs in a row that stop the run.")
    min_delta: float = Field(0.001, ge=0, description="An epoch improves when mAP > best + "
                             "min_delta.")
    use_ema: bool = Field(False, description="Watch the EMA mAP only; false: max(mAP, EMA mAP).")
    skip_epochs: int = Field(0, ge=0, description="First epochs not watched at all.")


class MlflowConfig(_Strict):
    """Tracking and the model registry."""

    enabled: bool = Field(True, description="Log the run live and register the winner; false: "
                          "nothing goes to MLflow (`raydetr register RUN_DIR` later).")
    tracking_uri: str | None = Field(
        None, description="None: $MLFLOW_TRACKING_URI, else sqlite:///<output_dir>/mlflow.db"
    )
    experiment: str = Field("raydetr", description="MLflow experiment of the runs.")
    model_name: str = Field("raydetr", description="Registered model name.")
    alias: str = Field("champion", description="Alias moved to each new registered version.")
    onnx: bool = Field(False, description="Also export the winner to ONNX (checked against "
                       "torch) and attach model.onnx to the registered model version.")


class RunConfig(_Strict):
    """Where a run lives and how it reports."""

    name: str = Field("raydetr", description="Run name: <output_dir>/<name> holds its files.")
    output_dir: str = Field("runs", description="Root of run directories (and the default "
                            "sqlite MLflow store).")
    seed: int = Field(0, description="Seed of weights init, shuffling and augmentation.")
    keep_checkpoints: int = Field(1, gt=0, description="Latest checkpoints kept by Ray.")
    log_every_steps: int = Field(0, ge=0, description="0: one line per epoch only.")
    verbose: bool = Field(False, description="Also show Ray's, Tune's, MLflow's and COCOeval's "
                          "own output (`--verbose`); by default a fit prints a header, one line "
                          "per epoch and the winner.")


class TuneConfig(_Strict):
    """`raydetr tune`: the search space and how trials are run and ranked."""

    search_space: dict[str, Any] = Field(
        default_factory=lambda: {"ema.decay": {"grid": [0.99, 0.993, 0.999]}},
        description="Dotted key -> {grid: [...]} | {uniform: [lo, hi]} | {loguniform: [lo, hi]} "
        "| {choice: [...]}.",
    )
    num_samples: int = Field(1, gt=0, description="Samples of the search space (each grid "
                             "point num_samples times).")
    scheduler: Literal["early_stopping", "asha", "fifo"] = Field(
        "early_stopping", description="Trial scheduler: early_stopping (the early_stopping.* "
        "rule per trial), asha (prunes on the score) or fifo (none).")
    max_concurrent_trials: int | None = Field(None, gt=0, description="None: as many as the "
                                              "cluster's CPUs (and GPUs) can place.")
    metric: Literal["map", "map_ema", "best"] = Field(
        "best", description="What ranks trials: best regular mAP, best EMA mAP, or the better "
        "of both.")


# RF-DETR's TrainConfig / ModelConfig defaults (fine-tuning from COCO weights): AdamW lr 1e-4,
# encoder 1.5e-4, no warm-up, step schedule with its lr_drop at epoch 100 (constant before).
RFDETR_DEFAULTS: dict[str, dict[str, Any]] = {
    "optim": {"lr": 1e-4, "lr_encoder": 1.5e-4, "weight_decay": 1e-4, "warmup_steps": 0,
              "schedule": "step", "lr_drop_epochs": [100], "clip_max_norm": 0.1},
    "loss": {"cls_loss": "ia_bce", "weight_cls": 1.0, "weight_bbox": 5.0, "weight_giou": 2.0,
             "cost_class": 2.0, "cost_bbox": 5.0, "cost_giou": 2.0},
    "model": {"num_denoising": 0},
    "data": {"augment": "rfdetr"},
}


class DistillConfig(_Strict):
    """Distillation from a teacher (raydetr.loss.distill; defaults from Teach-DETR, README)."""

    teacher: str | None = Field(
        None, description="None (off), a model/run dir, models:/name@alias, an RF-DETR .pth, or "
        "'ema' (the student's first EMA shadow). Resolved on the driver before Ray starts; a "
        "search may give it a grid or choice.")
    weight: float = Field(0.5, ge=0, le=1, description="The teacher's share of the student "
                          "decoder's supervision: (1 - weight) x ground-truth loss + weight x "
                          "teacher loss (raydetr.loss.distill).")
    score_threshold: float = Field(0.5, ge=0, lt=1, description="Teacher detections kept as "
                                   "boxes to match: score at least this (0.5: measured, README).")
    nms_iou: float = Field(0.2, gt=0, le=1, description="Class-aware NMS of the teacher's "
                           "kept boxes: one overlapping a higher-scored box of its class by more "
                           "IoU than this is dropped (Teach-DETR's released code: 0.2); 1: off.")
    max_boxes: int = Field(100, gt=0, description="At most this many teacher boxes per image.")
    unmatched_weight: float = Field(1.0, ge=0, description="Weight of the no-object term for "
                                    "queries no teacher box matched (1: as the ground truth's "
                                    "loss weighs them; Teach-DETR's added term used 0.5).")
    logit_weight: float = Field(0.2, ge=0, description="Soft-target BCE on matched class "
                                "probabilities; used only when the teacher's classes are the "
                                "dataset's.")
    feature_weight: float | None = Field(
        None, ge=0, description="PKD's feature term (1 - the Pearson correlation of the student's "
        "encoder maps with the teacher's, added to the loss); 0: off; None: 64 for a trained "
        "teacher, 0 for teacher=ema (raydetr.train.teacher.feature_weight; measured: README).")


class Config(_Strict):
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    ema: EmaConfig = Field(default_factory=EmaConfig)
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    early_stopping: EarlyStoppingConfig = Field(default_factory=EarlyStoppingConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)
    run: RunConfig = Field(default_factory=RunConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)

    @model_validator(mode="after")
    def _family_defaults(self) -> Config:
        """RF-DETR presets take RF-DETR's recipe (Seg: its class weight 5) for every key the
        user did not set, replacing the from-scratch defaults (explicit values win)."""
        if preset_family(self.model.preset) != "rfdetr":
            return self
        extra = {"loss": {"weight_cls": 5.0}} if is_segmentation(self.model.preset) else {}
        for section, values in RFDETR_DEFAULTS.items():
            sub = getattr(self, section)
            for key, value in (values | extra.get(section, {})).items():
                if key not in sub.model_fields_set:
                    setattr(sub, key, value)
        return self

    @model_validator(mode="after")
    def _ema_teacher_needs_ema(self) -> Config:
        if self.distill.teacher == "ema" and not self.ema.enabled:
            raise ValueError("distill.teacher=ema needs ema.enabled=true (its teacher is the EMA)")
        if self.distill.teacher == "ema" and self.scaling.use_gpu and self.ema.device == "cpu":
            raise ValueError("distill.teacher=ema runs the EMA shadow through the student on the "
                             "GPU every step: unset ema.device (it keeps the shadow on the CPU)")
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def flat(self) -> dict[str, Any]:
        """Dotted-key view, e.g. for MLflow params."""
        out: dict[str, Any] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict):
                for k, v in value.items():
                    walk(f"{prefix}.{k}" if prefix else k, v)
            else:
                out[prefix] = value

        walk("", self.to_dict())
        return out
