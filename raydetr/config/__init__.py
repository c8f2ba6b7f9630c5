"""Typed configuration: the one source of defaults.

YAML files and ``key=value`` CLI overrides only override these models. Every error names the
key (dotted path) and where its value came from (the file, or the ``key=value`` argument).
``raydetr config`` lists every key with its type, default and description.

    cfg = load_config("configs/thermal.yaml", ["optim.lr=2e-4", "ema.decay=[0.99,0.999]"])
"""

from raydetr.config.loading import (
    RENAMED,
    build_config,
    config_from_json,
    load_config,
    set_dotted,
    with_overrides,
)
from raydetr.config.schema import (
    RFDETR_DEFAULTS,
    Config,
    ConfigError,
    DataConfig,
    DistillConfig,
    EarlyStoppingConfig,
    EmaConfig,
    LossConfig,
    MlflowConfig,
    ModelConfig,
    OptimConfig,
    PosthocConfig,
    RunConfig,
    ScalingConfig,
    TuneConfig,
)

__all__ = [
    "RENAMED", "RFDETR_DEFAULTS", "Config", "ConfigError", "DataConfig", "DistillConfig",
    "EarlyStoppingConfig",
    "EmaConfig", "LossConfig", "MlflowConfig", "ModelConfig", "OptimConfig", "PosthocConfig",
    "RunConfig", "ScalingConfig", "TuneConfig", "build_config", "config_from_json", "load_config",
    "set_dotted", "with_overrides",
]
