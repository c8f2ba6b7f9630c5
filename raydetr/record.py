"""One typed record per epoch, and the one winner rule.

Everything downstream of an epoch reads :class:`EpochResult`. It crosses to the driver inside
Ray's report: ``to_report()`` is the flat dict Tune and MLflow need (the metrics contract), with
the typed record itself under ``"record"`` (``to_dict``); the driver's scheduler and console
read it back with ``EpochResult.from_result`` instead of parsing flat names. The history rows in
a checkpoint are the flat rows (what MLflow, the plot and post-fit log), without the record.

Epochs are numbered from 1 everywhere a person reads one (``EpochResult.epoch``, ``Best.epoch``,
the report's ``epoch`` / ``best_map_epoch``, history rows, MLflow steps, ``epoch_NNNN`` folders,
meta.json). The training loop counts a 0-based index; :func:`epoch_number` is the one conversion.

    winner(best_map=0.41, best_map_ema=0.43)   # -> "ema"  (RF-DETR: strictly higher wins)

One metric decides (``EpochResult.metric``): the bests, the winner, early stopping and the
search score read it. It is COCO bbox ``map``, or for a segmentation preset the mask mAP
``map_segm`` (RF-DETR chooses seg checkpoints by segm AP); ``Best.map`` holds that metric's
value and the report names the bests after it (``best_map`` / ``best_map_segm``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from raydetr.ema.shadow import Shadow

Variant = Literal["regular", "ema"]
METRIC_KEYS = ("map", "map50", "map75", "mar")
# COCO segm of a segmentation preset, beside METRIC_KEYS (bbox) in the same metric dicts
SEGM_METRIC_KEYS = ("map_segm", "map50_segm", "map75_segm", "mar_segm")
RECORD_KEY = "record"  # the typed record inside Ray's report (EpochResult.to_dict)


def deciding_metric(segmentation: bool) -> str:
    """The metric that decides a run: ``map_segm`` for a segmentation preset, else ``map``."""
    return "map_segm" if segmentation else "map"


def metric_keys(segmentation: bool) -> tuple[str, ...]:
    """The COCO metrics an epoch records per variant: bbox, and segm for a segmentation preset."""
    return (*METRIC_KEYS, *SEGM_METRIC_KEYS) if segmentation else METRIC_KEYS


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
    """Best-so-far mAP of one variant (of the metric that decides: ``map``, or ``map_segm`` for a
    segmentation preset). ``epoch`` counts from 1; -1 means no evaluation yet."""

    map: float = -1.0
    epoch: int = -1
    decay: float | None = None  # effective EMA decay of the shadow that made it (EMA only)
    shadow: dict[str, Any] | None = None  # that shadow's Shadow.to_dict() (EMA only)


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
    """What one epoch produced (rank 0). ``ema`` maps each shadow (``raydetr.ema.shadow``) to
    its COCO metrics; the ``*_ema`` report keys are those of the best shadow this epoch (best by
    ``metric``, the key of the metric dicts that decides: see :func:`deciding_metric`)."""

    epoch: int  # from 1: see epoch_number
    step: int  # optimizer steps done after this epoch
    regular: dict[str, float]
    ema: dict[Shadow, dict[str, float]]
    bests: Bests
    score: float
    monitored: float  # the value the early-stopping rule watches
    train: dict[str, float] = field(default_factory=dict)  # train_loss, lr, images_per_s, ...
    ema_decay_now: float | None = None  # first shadow's current (scheduled) decay
    early_stopping_counter: int | None = None
    metric: str = "map"  # what decides: "map" (bbox) or "map_segm" (segmentation presets)

    @property
    def best_shadow(self) -> Shadow | None:
        if not self.ema:
            return None
        return max(self.ema, key=lambda s: self.ema[s][self.metric])

    @property
    def map_ema(self) -> float | None:
        """bbox mAP of the best shadow."""
        s = self.best_shadow
        return None if s is None else float(self.ema[s]["map"])

    @property
    def value(self) -> float:
        """The deciding metric of the regular weights."""
        return float(self.regular[self.metric])

    @property
    def value_ema(self) -> float | None:
        """The deciding metric of the best shadow (None without EMA)."""
        s = self.best_shadow
        return None if s is None else float(self.ema[s][self.metric])

    @property
    def winner(self) -> Variant:
        return self.bests.winner()

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON- and ``torch.load(weights_only=True)``-safe) of the whole record."""
        return {"epoch": self.epoch, "step": self.step, "regular": dict(self.regular),
                # keyed by the shadow's index, not a list: every leaf is a number or a string,
                # which Tune's loggers take as they are (a list of dicts they reject)
                "ema": {str(s.index): {"shadow": s.to_dict(), "metrics": dict(m)}
                        for s, m in self.ema.items()},
                "bests": self.bests.to_dict(), "score": self.score, "monitored": self.monitored,
                "train": dict(self.train), "ema_decay_now": self.ema_decay_now,
                "early_stopping_counter": self.early_stopping_counter, "metric": self.metric}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EpochResult:
        # .get: a flattened result (Tune's) has no entry for an empty dict or list
        return cls(epoch=int(d["epoch"]), step=int(d["step"]), regular=dict(d["regular"]),
                   ema={Shadow.from_dict(e["shadow"]): dict(e["metrics"])
                        for _, e in sorted(d.get("ema", {}).items(), key=lambda kv: int(kv[0]))},
                   bests=Bests.from_dict(d["bests"]), score=float(d["score"]),
                   monitored=float(d["monitored"]), train=dict(d.get("train", {})),
                   ema_decay_now=d.get("ema_decay_now"),
                   early_stopping_counter=d.get("early_stopping_counter"),
                   metric=str(d.get("metric", "map")))

    @classmethod
    def from_result(cls, result: dict[str, Any]) -> EpochResult | None:
        """The record inside a Tune result (None for a result without one). Tune hands its
        schedulers the result flattened (``record/bests/regular/map``): both forms are read."""
        record = result.get(RECORD_KEY)
        if not isinstance(record, dict):
            prefix = RECORD_KEY + "/"
            record = {}
            for key, value in result.items():
                if key.startswith(prefix):
                    node = record
                    *parents, leaf = key[len(prefix):].split("/")
                    for part in parents:
                        node = node.setdefault(part, {})
                    node[leaf] = value
        return cls.from_dict(record) if record else None

    def to_report(self, *, with_record: bool = True) -> dict[str, Any]:
        """The flat metrics dict (ARCHITECTURE.md contract) for ``ray.train.report``, Tune and
        MLflow, plus the record under ``"record"`` (``with_record=False``: a history row)."""
        m: dict[str, Any] = {"epoch": self.epoch, "step": self.step}
        keys = [k for k in (*METRIC_KEYS, *SEGM_METRIC_KEYS) if k in self.regular]
        m.update({k: float(self.regular[k]) for k in keys})
        best = self.best_shadow
        if best is not None:
            m.update({f"{k}_ema": float(self.ema[best][k]) for k in keys})
            for shadow, met in self.ema.items():
                for k in ("map", "map50", "map_segm", "map50_segm"):
                    if k in met:
                        m[shadow.metric(k)] = float(met[k])
            m["map_ema_decay"] = best.decay
            m["map_ema_decay_effective"] = best.effective
        if self.ema_decay_now is not None:
            m["ema_decay"] = float(self.ema_decay_now)
        b = f"best_{self.metric}"  # best_map, or best_map_segm for a segmentation preset
        m.update({
            b: self.bests.regular.map, f"{b}_epoch": self.bests.regular.epoch,
            f"{b}_ema": self.bests.ema.map if self.ema else -1.0,
            f"{b}_ema_epoch": self.bests.ema.epoch,
            "winner_is_ema": int(self.winner == "ema"), "score": self.score,
            "monitored": self.monitored,
        })
        if self.early_stopping_counter is not None:
            m["early_stopping_counter"] = self.early_stopping_counter
        m.update({k: float(v) for k, v in self.train.items()})
        if with_record:
            m[RECORD_KEY] = self.to_dict()
        return m

    def format_line(self, epochs: int, patience: int | None = None) -> str:
        """The one log line of an epoch: both mAPs with their bests, the early-stopping counter,
        speed, lr, winner. Its epochs are numbered from 1 (``epoch_number``)."""
        b = self.bests
        parts = [f"epoch {self.epoch}/{epochs}",
                 f"loss {self.train.get('train_loss', math.nan):.4f}"]
        if self.metric == "map":
            parts.append(f"mAP {self.regular['map']:.4f} (best {b.regular.map:.4f} "
                         f"@{b.regular.epoch})")
        else:  # the deciding metric with its bests first, then the bbox mAP
            parts.append(f"{self.metric} {self.value:.4f} (best {b.regular.map:.4f} "
                         f"@{b.regular.epoch})  mAP {self.regular['map']:.4f}")
        max_dets = int(self.train.get("eval_max_dets", 100))
        if max_dets != 100:  # COCO's usual goes unsaid
            parts[-1] += f" @maxDets {max_dets}"
        if self.metric == "map" and self.map_ema is not None:
            parts.append(f"mAP_ema {self.map_ema:.4f} (best {b.ema.map:.4f} @{b.ema.epoch})")
        elif self.value_ema is not None:
            parts.append(f"{self.metric}_ema {self.value_ema:.4f} (best {b.ema.map:.4f} "
                         f"@{b.ema.epoch})  mAP_ema {self.map_ema:.4f}")
        if patience is not None and self.early_stopping_counter is not None:
            parts.append(f"early-stop {self.early_stopping_counter}/{patience}")
        parts.append(f"{self.train.get('images_per_s', math.nan):.1f} img/s")
        if "eval_seconds" in self.train:  # predict + match + gather + accumulate, every variant
            parts.append(f"eval {self.train['eval_seconds']:.1f}s")
        parts.append(f"lr {self.train.get('lr', math.nan):.2e}")
        parts.append(f"winner {self.winner}")
        if self.metric != "map":
            parts.append(f"(decided by {self.metric})")
        return "  ".join(parts)
