"""The on-disk layout of a run and of a model dir, written and read here only.

A **model dir** is what post-fit, post-hoc, ``convert-checkpoint`` and ``export`` write and what
``predict``, ``evaluate``, the pyfunc model and ``Detector.from_dir`` read::

    <model dir>/model.safetensors   the weights (safetensors: nothing is unpickled)
    <model dir>/meta.json           ModelMeta: classes, model config, resolution, variant, ...

A **run dir** (``<run.output_dir>/<run.name>``) holds one fit::

    train/ | trials/<id>/   Ray Train storage: epoch_NNNN checkpoints, posthoc/ snapshots
    tune/                   Ray Tune's experiment state
    winner/                 the stripped winner (a model dir)
    history.json config.json fit.json registered.json mlflow_runs.json early_stopping.json
    posthoc/                post-hoc profiles (model dirs) and their results

Every file and folder is written under a temporary name and renamed when complete, so a
half-written one never looks complete (``atomic_dir``, ``atomic_write_text``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file

import raydetr
from raydetr.errors import UserError

WEIGHTS_FILE = "model.safetensors"
META_FILE = "meta.json"
METRIC_NAMES = ("map", "map50", "map75", "mar")


class ModelDirError(UserError, ValueError):
    """A model dir is missing a file, or its meta.json cannot be read."""


# ---------------------------------------------------------------- atomic writes


def atomic_write_text(path: str | Path, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, default=str))


@contextlib.contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield an empty temporary sibling of ``final``; on success it replaces ``final``."""
    final = Path(final)
    tmp = final.with_name(f"{final.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def cpu_contiguous(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors with no shared storage (what safetensors needs)."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items()}


def save_weights(sd: dict[str, torch.Tensor], path: str | Path) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_file(cpu_contiguous(sd), str(tmp))
    os.replace(tmp, path)


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise ModelDirError(f"weights file not found: {path}")
    return load_file(str(path))


# ---------------------------------------------------------------- model dir


@dataclass
class ModelMeta:
    """meta.json of a model dir. ``variant``: ema | regular | posthoc_ema.

    ``shadow``: for an EMA winner, which shadow won (``raydetr.ema.shadow.Shadow.to_dict()``: index, label,
    configured and effective decay); ``ema_decay`` is its effective decay (kept for readers of
    older dirs). ``source``: what made the dir beyond a raydetr fit (``converted_from``,
    ``posthoc``), under their own keys.
    """

    classes: list[str]
    model: dict[str, Any]
    resolution: int
    variant: str
    dataset: str
    metrics: dict[str, float | None] = field(
        default_factory=lambda: dict.fromkeys(METRIC_NAMES))
    ema_decay: float | None = None
    shadow: dict[str, Any] | None = None
    best_map: float | None = None
    best_map_ema: float | None = None
    epoch: int = -1
    epochs_run: int = 0
    raydetr_version: str = raydetr.__version__
    source: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def preset(self) -> str:
        return str(self.model.get("preset"))

    @property
    def decided_by(self) -> str:
        """The metric that picked these weights: ``map_segm`` for a segmentation model, else
        ``map`` (box mAP)."""
        return "map_segm" if "map_segm" in self.metrics else "map"

    def scores_text(self) -> str:
        """``map_segm 0.2038, mAP 0.0659`` for a segmentation model, ``mAP 0.4512`` otherwise:
        the deciding metric first."""
        box = f"mAP {self.metrics.get('map') or 0.0:.4f}"
        if self.decided_by == "map":
            return box
        return f"map_segm {self.metrics.get('map_segm') or 0.0:.4f}, {box}"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        source = d.pop("source")
        return {"num_classes": self.num_classes, **d, **source}

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "meta.json") -> ModelMeta:
        missing = [k for k in ("classes", "model", "resolution") if k not in d]
        if missing:
            raise ModelDirError(f"{where}: missing keys {missing}: not a raydetr model dir")
        if "num_classes" in d and len(d["classes"]) != int(d["num_classes"]):
            raise ModelDirError(f"{where}: {len(d['classes'])} classes but num_classes="
                                f"{d['num_classes']}")
        known = set(cls.__dataclass_fields__) - {"source"}
        source = {k: v for k, v in d.items() if k not in known and k != "num_classes"}
        kw = {k: d[k] for k in known if k in d}
        kw.setdefault("variant", "regular")
        kw.setdefault("dataset", "")
        return cls(**kw, source=source)


class ModelDir:
    """``model.safetensors`` + ``meta.json``; ``write`` is the one writer."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @property
    def weights_path(self) -> Path:
        return self.path / WEIGHTS_FILE

    @property
    def meta_path(self) -> Path:
        return self.path / META_FILE

    def exists(self) -> bool:
        return self.weights_path.is_file() and self.meta_path.is_file()

    def read_meta(self) -> ModelMeta:
        return read_meta(self.meta_path)

    def load_weights(self) -> dict[str, torch.Tensor]:
        return load_weights(self.weights_path)

    @classmethod
    def write(cls, path: str | Path, weights: dict[str, torch.Tensor] | Path,
              meta: ModelMeta) -> ModelDir:
        """Write atomically; ``weights``: a state dict, or a safetensors file to copy."""
        with atomic_dir(path) as tmp:
            if isinstance(weights, Path):
                if not weights.is_file():
                    raise ModelDirError(f"weights file not found: {weights}")
                shutil.copyfile(weights, tmp / WEIGHTS_FILE)
            else:
                save_weights(weights, tmp / WEIGHTS_FILE)
            (tmp / META_FILE).write_text(json.dumps(meta.to_dict(), indent=2))
        return cls(path)

    def __repr__(self) -> str:
        return f"ModelDir({str(self.path)!r})"


def read_meta(path: str | Path) -> ModelMeta:
    """A meta.json, checked for the keys a loader needs."""
    path = Path(path)
    if not path.is_file():
        raise ModelDirError(f"meta file not found: {path}")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelDirError(f"{path}: not valid JSON ({exc})") from None
    return ModelMeta.from_dict(d, str(path))


# ---------------------------------------------------------------- run dir


class RunDir:
    """Names of everything a fit writes under ``<run.output_dir>/<run.name>``."""

    TRAIN, TRIALS, TUNE = "train", "trials", "tune"

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @classmethod
    def of(cls, output_dir: str | Path, name: str) -> RunDir:
        return cls(Path(output_dir) / name)

    @property
    def train(self) -> Path:
        return self.root / self.TRAIN

    @property
    def trials(self) -> Path:
        return self.root / self.TRIALS

    def trial(self, trial_id: str) -> Path:
        return self.trials / trial_id

    @property
    def tune(self) -> Path:
        return self.root / self.TUNE

    @property
    def winner(self) -> ModelDir:
        return ModelDir(self.root / "winner")

    @property
    def history(self) -> Path:
        return self.root / "history.json"

    @property
    def teacher(self) -> Path:
        """Where a fetched or converted distillation teacher is kept (``teachers/<i>`` for the
        values a search tries)."""
        return self.root / "teacher"

    @property
    def teacher_record(self) -> Path:
        return self.root / "teacher.json"

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def fit_info(self) -> Path:
        return self.root / "fit.json"

    @property
    def registered(self) -> Path:
        return self.root / "registered.json"

    @property
    def mlflow_ids(self) -> Path:
        return self.root / "mlflow_runs.json"

    @property
    def early_stopping(self) -> Path:
        return self.root / "early_stopping.json"

    @property
    def posthoc(self) -> Path:
        return self.root / "posthoc"

    def train_dirs(self) -> list[Path]:
        """Ray Train storage of the plain run and of every search trial."""
        return [self.train, *sorted(self.trials.glob("*"))]

    @staticmethod
    def train_name(single: bool, trial_id: str) -> str:
        """Ray Train run name (relative to the run dir) of a plain run or a search trial."""
        return RunDir.TRAIN if single else f"{RunDir.TRIALS}/{trial_id}"

    @classmethod
    def of_train_dir(cls, train_dir: str | Path) -> RunDir:
        """The run dir that holds ``train_dir`` (``<run>/train`` or ``<run>/trials/<id>``)."""
        train_dir = Path(train_dir)
        parent = train_dir.parent
        return cls(parent.parent if parent.name == cls.TRIALS else parent)

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"


def mlflow_model_files(model_dir: str | Path) -> tuple[Path, Path]:
    """(weights, meta) paths inside a downloaded MLflow model dir, read from its MLmodel file
    (the ``weights`` and ``meta`` artifacts the registry publishes)."""
    model_dir = Path(model_dir)
    conf = yaml.safe_load((model_dir / "MLmodel").read_text())
    arts = conf.get("flavors", {}).get("python_function", {}).get("artifacts", {})
    if "weights" not in arts or "meta" not in arts:
        raise ModelDirError(f"{model_dir}: not a raydetr model (no 'weights'/'meta' artifacts)")
    return model_dir / arts["weights"]["path"], model_dir / arts["meta"]["path"]
