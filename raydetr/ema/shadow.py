"""The identity of one EMA shadow, made once where the EMA is built and carried everywhere.

``ema.decay=[0.99, 0.999]`` with ``ema.reference_batch`` set gives each shadow a configured
decay (what the user wrote) and an effective one (``decay ** k``, what the update uses; see
``raydetr.ema.scaling``). Every name a person reads is derived here from the configured decay,
so it does not change with the worker count: ``label`` (``ema@0.99``), the report keys
(``map_ema@0.99``) and the registry tags. Nothing parses a name back into a decay.

    s = Shadow(index=0, decay=0.99, effective=0.9801)
    s.label == "ema@0.99"; s.metric("map") == "map_ema@0.99"
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


def _fmt(decay: float) -> str:
    return format(float(decay), ".10g")


@dataclass(frozen=True)
class Shadow:
    index: int  # position in ema.decay and in ModelEma's shadow list
    decay: float  # configured (ema.decay[index])
    effective: float  # per-update decay the EMA applies (== decay without ema.reference_batch)

    @property
    def label(self) -> str:
        return f"ema@{_fmt(self.decay)}"

    def metric(self, name: str) -> str:
        """Report key of metric ``name`` for this shadow: ``map`` -> ``map_ema@0.99``."""
        return f"{name}_{self.label}"

    def describe(self) -> str:
        if self.effective == self.decay:
            return f"{self.label}"
        return f"{self.label} (effective {_fmt(self.effective)})"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "label": self.label}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Shadow:
        return cls(index=int(d["index"]), decay=float(d["decay"]),
                   effective=float(d["effective"]))


def plain_shadows(decays: list[float]) -> list[Shadow]:
    """Shadows whose configured and effective decays are the same (no batch scaling)."""
    return [Shadow(i, float(d), float(d)) for i, d in enumerate(decays)]


def shadow_tags(shadow: dict[str, Any] | None) -> dict[str, str]:
    """Registry tags of the shadow that won (empty for a regular winner)."""
    if not shadow:
        return {}
    s = Shadow.from_dict(shadow)
    return {"ema_shadow": s.label, "ema_decay": _fmt(s.decay),
            "ema_decay_effective": _fmt(s.effective)}
