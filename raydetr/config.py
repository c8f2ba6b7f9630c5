"""Typed configuration: the one source of defaults.

YAML files and ``key=value`` CLI overrides only override these models. Every error names the
key (dotted path) and, for files, the file.

    cfg = load_config("configs/thermal.yaml", ["optim.lr=2e-4", "ema.decay=[0.99,0.999]"])
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from raydetr.config_distill import DistillConfig, ema_teacher_needs_ema
from raydetr.presets import (
    RENAMED_PRESETS,
    RFDETR_PRESETS,
    RTDETR_PRESETS,
    preset_family,
    resolution_multiple,
)


class ConfigError(ValueError):
    """A configuration problem a user can fix; the message names the key and what to do."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Strict):
    path: str | None = Field(
        None,
        description="Prepared dataset (output of `raydetr prepare`; a local path or a pyarrow "
        "filesystem URI such as s3://bucket/prefix) or a raw COCO/YOLO/VOC dataset (local), "
        "which is prepared into <run.output_dir>/datasets first. None: built-in synthetic "
        "shapes dataset (the demo). Multi-node: a path every node sees, or a URI.",
    )
    train_split: str = "train"
    val_split: str = "val"
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
    hflip_prob: float = Field(0.5, ge=0, le=1)
    multi_scale: bool = Field(True, description="Random square size per batch around resolution.")
    scale_range: tuple[float, float] = (0.75, 1.25)
    crop_prob: float = Field(0.3, ge=0, le=1, description="Probability of a random box-safe crop.")
    synthetic_train_images: int = Field(256, gt=0)
    synthetic_val_images: int = Field(64, gt=0)
    synthetic_image_size: int = Field(128, gt=15)


class ModelConfig(_Strict):
    preset: str = Field(
        "rtdetr-r18",
        description="rtdetr-r18|r34|r50: ResNet + hybrid encoder (from scratch on CPU); "
        "rfdetr-nano|small|medium|base: RF-DETR's architecture (fine-tune from its checkpoints).",
    )
    resolution: int | None = Field(None, description="Square input size; None: preset default.")
    num_queries: int | None = Field(None, gt=0, description="None: preset default.")
    backbone: Literal["resnet18", "resnet34", "resnet50"] | None = None
    backbone_weights: str | None = Field(
        None, description="Local torchvision-compatible ResNet state_dict; nothing is downloaded."
    )
    gradient_checkpointing: bool = False
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
    cls_loss: Literal["varifocal", "focal", "ia_bce"] = Field(
        "varifocal", description="rfdetr presets default to ia_bce (RF-DETR's IoU-aware BCE).")
    weight_cls: float = 1.0
    weight_bbox: float = 5.0
    weight_giou: float = 2.0
    cost_class: float = 2.0
    cost_bbox: float = 5.0
    cost_giou: float = 2.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0


class OptimConfig(_Strict):
    epochs: int = Field(12, gt=0)
    batch_size: int = Field(4, gt=0, description="Images per worker per step.")
    grad_accum_steps: int = Field(1, gt=0)
    # From-scratch defaults (nothing is downloaded, so the backbone starts random). With a
    # pretrained backbone (model.backbone_weights) use RF-DETR's lr=1e-4, lr_encoder=1.5e-4.
    lr: float = Field(1e-3, gt=0)
    lr_encoder: float = Field(1e-3, gt=0, description="Backbone learning rate.")
    weight_decay: float = Field(1e-4, ge=0)
    schedule: Literal["cosine", "step"] = "cosine"
    warmup_steps: int = Field(50, ge=0)
    lr_drop_epochs: list[int] = Field(default_factory=list, description="For schedule=step.")
    lr_min_ratio: float = Field(0.05, ge=0, le=1)
    clip_max_norm: float = Field(0.1, ge=0, description="0 disables clipping.")
    amp: bool = Field(True, description="bf16 autocast on GPU (ignored on CPU).")
    # RF-DETR family only (its get_param_dicts): ViT block lr x layer_decay^(depth - id) and
    # x component_decay^2; the decoder's lr x component_decay.
    lr_vit_layer_decay: float = Field(0.8, gt=0, le=1)
    lr_component_decay: float = Field(0.7, gt=0, le=1)


class PosthocConfig(_Strict):
    """Post-hoc EMA (EDM2): track power-function EMAs, snapshot them, pick sigma_rel later."""

    enabled: bool = Field(False, description="Record post-hoc EMA snapshots (`raydetr posthoc`).")
    sigma_rels: list[float] = Field(
        default_factory=lambda: [0.05, 0.10],
        description="Relative widths of the tracked power-function EMAs (EDM2: 0.05, 0.10).",
    )
    every_steps: int | None = Field(
        None, gt=0, description="Snapshot every N optimizer steps; None: 4 per epoch."
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
    enabled: bool = True
    decay: list[float] = Field(
        default_factory=lambda: [0.993],
        description="Peak decay of each EMA shadow, e.g. [0.99, 0.999] (one shadow each, one "
        "run); a single number is shorthand for a one-element list.",
    )
    tau: float = Field(100.0, gt=0, description="Warmup length in optimizer updates (rfdetr).")
    schedule: str = Field(
        "rfdetr", description="constant | rfdetr | timm | threshold | exp | power, or an import "
        "path such as mypkg.decay:linear (fn(updates, *, decay, ...) -> float).")
    schedule_kwargs: dict[str, Any] = Field(default_factory=dict)
    average_buffers: bool = True
    nan_guard: bool = Field(True, description="Skip (and count) updates from non-finite weights.")
    device: str | None = Field(None, description="e.g. 'cpu' to keep the shadow off the GPU.")
    reference_batch: int | None = Field(
        None, gt=0,
        description="Effective batch the decays (and tau) were chosen for; the run uses "
        "decay**k and tau/k with k = effective batch / reference_batch (Busbridge et al. 2023), "
        "so the averaging window stays the same number of images. None: no scaling.",
    )
    posthoc: PosthocConfig = Field(default_factory=PosthocConfig)

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
        from raydetr.ema.schedules import check_schedule, schedule_accepts

        try:
            kwargs = dict(self.schedule_kwargs)
            if "tau" not in kwargs and schedule_accepts(self.schedule, "tau"):
                kwargs["tau"] = self.tau
            check_schedule(self.schedule, self.decay, kwargs)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"ema.schedule / ema.schedule_kwargs: {exc}") from None
        return self


class ScalingConfig(_Strict):
    num_workers: int = Field(1, gt=0)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    max_failures: int = Field(0, ge=-1)
    torch_threads: int | None = Field(None, gt=0, description="torch threads per worker.")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="Ray placement of the workers: SPREAD puts them on different "
        "nodes where it can.")


class EarlyStoppingConfig(_Strict):
    enabled: bool = False
    patience: int = Field(10, gt=0)
    min_delta: float = Field(0.001, ge=0)
    use_ema: bool = False
    skip_epochs: int = Field(0, ge=0)


class MlflowConfig(_Strict):
    enabled: bool = True
    tracking_uri: str | None = Field(
        None, description="None: $MLFLOW_TRACKING_URI, else sqlite:///<output_dir>/mlflow.db"
    )
    experiment: str = "raydetr"
    model_name: str = "raydetr"
    alias: str = "champion"


class RunConfig(_Strict):
    name: str = "raydetr"
    output_dir: str = "runs"
    seed: int = 0
    keep_checkpoints: int = Field(1, gt=0, description="Latest checkpoints kept by Ray.")
    log_every_steps: int = Field(0, ge=0, description="0: one line per epoch only.")
    verbose: bool = Field(False, description="Also show Ray's, Tune's, MLflow's and COCOeval's "
                          "own output (`--verbose`); by default a fit prints a header, one line "
                          "per epoch and the winner.")


class TuneConfig(_Strict):
    search_space: dict[str, Any] = Field(
        default_factory=lambda: {"ema.decay": {"grid": [0.99, 0.993, 0.999]}},
        description="Dotted key -> {grid: [...]} | {uniform: [lo, hi]} | {loguniform: [lo, hi]} "
        "| {choice: [...]}.",
    )
    num_samples: int = Field(1, gt=0)
    scheduler: Literal["early_stopping", "asha", "fifo"] = "early_stopping"
    max_concurrent_trials: int | None = Field(None, gt=0)
    metric: Literal["map", "map_ema", "best"] = "best"


# RF-DETR's TrainConfig / ModelConfig defaults (fine-tuning from COCO weights): AdamW lr 1e-4,
# encoder 1.5e-4, no warm-up, step schedule with its lr_drop at epoch 100 (constant before).
RFDETR_DEFAULTS: dict[str, dict[str, Any]] = {
    "optim": {"lr": 1e-4, "lr_encoder": 1.5e-4, "weight_decay": 1e-4, "warmup_steps": 0,
              "schedule": "step", "lr_drop_epochs": [100], "clip_max_norm": 0.1},
    "loss": {"cls_loss": "ia_bce", "weight_cls": 1.0, "weight_bbox": 5.0, "weight_giou": 2.0,
             "cost_class": 2.0, "cost_bbox": 5.0, "cost_giou": 2.0},
    "model": {"num_denoising": 0},
}


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
        """RF-DETR presets fine-tune a pretrained checkpoint: RF-DETR's recipe replaces the
        from-scratch defaults of every key the user did not set (explicit values win)."""
        if preset_family(self.model.preset) != "rfdetr":
            return self
        for section, values in RFDETR_DEFAULTS.items():
            sub = getattr(self, section)
            for key, value in values.items():
                if key not in sub.model_fields_set:
                    setattr(sub, key, value)
        return self

    _ema_teacher = model_validator(mode="after")(ema_teacher_needs_ema)

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


def _parse_value(text: str) -> Any:
    """CLI values are YAML scalars/lists: 1e-4, true, null, [0.99,0.999], 'x'."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"config key '{key}': '{part}' is a value, not a section")
        node = child
    node[parts[-1]] = value


# Keys that were removed on purpose, and what replaces them.
RENAMED = {"ema.decays": "ema.decay (now a list; a single number is shorthand)"}


def _check_known(tree: dict[str, Any], model: type[BaseModel], prefix: str, source: str) -> None:
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        fields = model.model_fields
        if dotted in RENAMED:
            raise ConfigError(f"{source}: config key '{dotted}' is now {RENAMED[dotted]}")
        if key not in fields:
            raise ConfigError(
                f"{source}: unknown config key '{dotted}'. Known keys here: "
                f"{', '.join(sorted(fields))}"
            )
        ann = fields[key].annotation
        if isinstance(value, dict) and isinstance(ann, type) and issubclass(ann, BaseModel):
            _check_known(value, ann, dotted + ".", source)


def build_config(tree: dict[str, Any], source: str = "config") -> Config:
    _check_known(tree, Config, "", source)
    try:
        return Config.model_validate(tree)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"])
            lines.append(f"  {loc}: {err['msg']} (got {err.get('input')!r})")
        raise ConfigError(f"{source}: invalid configuration\n" + "\n".join(lines)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- YAML file <- ``key=value`` overrides (dotted keys)."""
    tree: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections (data:, model:...)")
        tree = loaded
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key=value, e.g. optim.lr=1e-4")
        key, _, raw = item.partition("=")
        set_dotted(tree, key.strip(), _parse_value(raw))
        source = f"{source} + overrides"
    return build_config(tree, source)


def config_from_json(text: str) -> Config:
    return build_config(json.loads(text), "checkpoint config")


def with_overrides(cfg: Config, params: dict[str, Any], source: str = "overrides") -> Config:
    """``cfg`` with dotted-key values applied (a search trial's parameters), validated; the
    same object when there is nothing to apply."""
    if not params:
        return cfg
    tree = cfg.to_dict()
    for key, value in params.items():
        set_dotted(tree, key, value)
    return build_config(tree, source)
