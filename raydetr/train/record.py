"""One typed record per epoch, and the one winner rule.

Everything downstream of an epoch reads :class:`EpochResult`: the Tune metric (its flat
``to_report()`` dict), the early-stopping rule (``monitored``), the bests written into the
checkpoint, the log line, post-fit (the history rows) and MLflow.

Epochs are numbered from 1 everywhere a person reads one (``EpochResult.epoch``, ``Best.epoch``,
the report's ``epoch`` / ``best_map_epoch``, history rows, MLflow steps, ``epoch_NNNN`` folders,
meta.json). The training loop counts a 0-based index; :func:`epoch_number` is the one conversion.

    winner(best_map=0.41, best_map_ema=0.43)   # -> "ema"  (RF-DETR: strictly higher wins)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Variant = Literal["regular", "ema"]
METRIC_KEYS = ("map", "map50", "map75", "mar")


def epoch_number(index: int) -> int:
    """The epoch number people read (1 = the first epoch) of the loop's 0-based ``index``."""
    return index + 1


def winner(best_map: float, best_map_ema: float | None) -> Variant:
    """RF-DETR's rule (main.py): the EMA weights win only when their best mAP is strictly higher.
    ``best_map_ema`` None (no EMA, or never evaluated) means the regular weights win."""
    if best_map_ema is None or math.isnan(best_map_ema):
        return "regular"
    return "ema" if best_map_ema > best_map else "regular"


def score_of(map_regular: float, map_ema: float | None, metric: str = "best") -> float:
    """The number a search ranks and prunes trials by (``tune.metric``): ``map``, ``map_ema``
    (the regular mAP when there is no EMA) or ``best`` = max of both. Used both per epoch (ASHA's
    metric ``score``) and on the bests (choosing the best trial), so they cannot disagree."""
    if metric == "map" or map_ema is None:
        return float(map_regular)
    if metric == "map_ema":
        return float(map_ema)
    return float(max(map_regular, map_ema))


@dataclass
class Best:
    """Best-so-far mAP of one variant. ``epoch`` counts from 1; -1 means no evaluation yet."""

    map: float = -1.0
    epoch: int = -1
    decay: float | None = None  # EMA decay of the shadow that made it (EMA only)


@dataclass
class Bests:
    regular: Best = field(default_factory=Best)
    ema: Best = field(default_factory=Best)

    def to_dict(self) -> dict[str, Any]:
        return {"regular": asdict(self.regular), "ema": asdict(self.ema)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Bests:
        return cls(regular=Best(**d["regular"]), ema=Best(**d["ema"]))

    @property
    def map_ema(self) -> float | None:
        return self.ema.map if self.ema.epoch >= 0 else None

    def winner(self) -> Variant:
        return winner(self.regular.map, self.map_ema)

    def best(self, variant: Variant) -> Best:
        return self.ema if variant == "ema" else self.regular


@dataclass
class EpochResult:
    """What one epoch produced (rank 0). ``ema`` maps each shadow's decay to its COCO metrics;
    the ``*_ema`` report keys are those of the best shadow this epoch."""

    epoch: int  # from 1: see epoch_number
    step: int  # optimizer steps done after this epoch
    regular: dict[str, float]
    ema: dict[float, dict[str, float]]
    bests: Bests
    score: float
    monitored: float  # the value the early-stopping rule watches
    train: dict[str, float] = field(default_factory=dict)  # train_loss, lr, images_per_s, ...
    ema_decay_now: float | None = None  # first shadow's current (scheduled) decay
    early_stopping_counter: int | None = None

    @property
    def best_ema_decay(self) -> float | None:
        if not self.ema:
            return None
        return max(self.ema, key=lambda d: self.ema[d]["map"])

    @property
    def map_ema(self) -> float | None:
        d = self.best_ema_decay
        return None if d is None else float(self.ema[d]["map"])

    @property
    def winner(self) -> Variant:
        return self.bests.winner()

    def to_report(self) -> dict[str, Any]:
        """The flat metrics dict (ARCHITECTURE.md contract) for ``ray.train.report``, Tune, the
        history rows in the checkpoint, post-fit and MLflow."""
        m: dict[str, Any] = {"epoch": self.epoch, "step": self.step}
        m.update({k: float(self.regular[k]) for k in METRIC_KEYS})
        d = self.best_ema_decay
        if d is not None:
            m.update({f"{k}_ema": float(self.ema[d][k]) for k in METRIC_KEYS})
            for decay, met in self.ema.items():
                m[f"map_ema@{decay}"] = float(met["map"])
                m[f"map50_ema@{decay}"] = float(met["map50"])
            m["map_ema_decay"] = d
        if self.ema_decay_now is not None:
            m["ema_decay"] = float(self.ema_decay_now)
        m.update(
            best_map=self.bests.regular.map, best_map_epoch=self.bests.regular.epoch,
            best_map_ema=self.bests.ema.map if self.ema else -1.0,
            best_map_ema_epoch=self.bests.ema.epoch,
            winner_is_ema=int(self.winner == "ema"), score=self.score, monitored=self.monitored,
        )
        if self.early_stopping_counter is not None:
            m["early_stopping_counter"] = self.early_stopping_counter
        m.update({k: float(v) for k, v in self.train.items()})
        return m

    def format_line(self, epochs: int, patience: int | None = None) -> str:
        """The one log line of an epoch (see ``format_report_line``)."""
        return format_report_line(self.to_report(), epochs, patience)


def format_report_line(m: dict[str, Any], epochs: int, patience: int | None = None) -> str:
    """The one log line of an epoch, from its flat report (``EpochResult.to_report()``, as Tune
    receives it): both mAPs with their bests, the early-stopping counter, speed, lr, winner.
    Its epochs are already numbered from 1 (``epoch_number``)."""
    parts = [
        f"epoch {int(m['epoch'])}/{epochs}",
        f"loss {m.get('train_loss', math.nan):.4f}",
        f"mAP {m['map']:.4f} (best {m['best_map']:.4f} @{int(m['best_map_epoch'])})",
    ]
    if "eval_max_dets" in m and int(m["eval_max_dets"]) != 100:  # COCO's usual goes unsaid
        parts[-1] += f" @maxDets {int(m['eval_max_dets'])}"
    if "map_ema" in m:
        parts.append(f"mAP_ema {m['map_ema']:.4f} (best {m['best_map_ema']:.4f} "
                     f"@{int(m['best_map_ema_epoch'])})")
    if patience is not None and "early_stopping_counter" in m:
        parts.append(f"early-stop {int(m['early_stopping_counter'])}/{patience}")
    parts.append(f"{m.get('images_per_s', math.nan):.1f} img/s")
    parts.append(f"lr {m.get('lr', math.nan):.2e}")
    parts.append(f"winner {'ema' if m.get('winner_is_ema') else 'regular'}")
    return "  ".join(parts)
