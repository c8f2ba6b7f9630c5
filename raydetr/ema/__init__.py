"""EMA of model weights: ModelEma (ema.py) and the decay schedule registry (schedules.py)."""

from raydetr.ema.ema import ModelEma, clean_key, clean_state_dict, unwrap_model
from raydetr.ema.schedules import available_schedules, get_schedule, register_schedule

__all__ = [
    "ModelEma",
    "available_schedules",
    "clean_key",
    "clean_state_dict",
    "get_schedule",
    "register_schedule",
    "unwrap_model",
]
