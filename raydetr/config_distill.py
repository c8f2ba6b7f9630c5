"""The ``distill`` section of the config (a module of its own to keep config.py short; it
belongs in the config package when the layout moves)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class DistillConfig(BaseModel):
    """Distillation from a teacher (raydetr.loss.distill; defaults from Teach-DETR, README).
    teacher: None (off), a model/run dir, models:/name@alias, an RF-DETR .pth, or 'ema' (the
    student's first EMA shadow). logit_weight: soft-target BCE on matched class probabilities,
    used only when the teacher's classes are the dataset's."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    teacher: str | None = None
    weight: float = Field(1.0, ge=0)
    score_threshold: float = Field(0.3, ge=0, lt=1)
    max_boxes: int = Field(100, gt=0)
    unmatched_weight: float = Field(0.5, ge=0)
    logit_weight: float = Field(0.2, ge=0)


def ema_teacher_needs_ema(cfg: Any) -> Any:
    """Config check: ``distill.teacher=ema`` distils from the EMA, so the EMA must be on."""
    if cfg.distill.teacher == "ema" and not cfg.ema.enabled:
        raise ValueError("distill.teacher=ema needs ema.enabled=true (its teacher is the EMA)")
    if cfg.distill.teacher == "ema" and cfg.scaling.use_gpu and cfg.ema.device == "cpu":
        raise ValueError("distill.teacher=ema runs the EMA shadow through the student on the "
                         "GPU every step: unset ema.device (it keeps the shadow on the CPU)")
    return cfg
