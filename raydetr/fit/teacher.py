"""Driver side of distillation: turn ``distill.teacher`` into a :class:`TeacherSpec` before Ray
starts, so a bad source or a class mismatch fails once, with a clear message, not in every
worker.

Sources: ``ema`` (self-distillation), a model dir (``model.safetensors`` + ``meta.json``, or an
MLflow model dir), a run dir (its ``winner/``), ``models:/name@alias`` / ``runs:/...`` (fetched
into ``<run dir>/teacher``), or an RF-DETR ``.pth`` (converted into ``<run dir>/teacher``).
Classes are matched to the dataset's by name (case and surrounding spaces ignored).
"""

from __future__ import annotations

import logging
from pathlib import Path

from raydetr.artifacts import (
    ModelDir,
    ModelDirError,
    RunDir,
    atomic_write_json,
    mlflow_model_files,
    read_meta,
)
from raydetr.config import Config, DistillConfig
from raydetr.data.coco_categories import unused_name
from raydetr.errors import UserError
from raydetr.model.convert import ConvertError, convert_checkpoint
from raydetr.registry.errors import ModelLoadError
from raydetr.registry.fetch import download_model
from raydetr.train.teacher import EMA_TEACHER, TeacherSpec, sha256_file

log = logging.getLogger("raydetr.driver")

REMOTE = ("models:/", "runs:/", "mlflow-artifacts:/")


class TeacherError(UserError, ValueError):
    """distill.teacher cannot be used (named source, what was wrong, what to do)."""


def _norm(name: str) -> str:
    return str(name).strip().lower()


def class_map_for(teacher_classes: list[str], dataset_classes: list[str], source: str
                  ) -> tuple[list[int], bool]:
    """(teacher logit -> dataset class index or -1, same class set?). Every dataset class must be
    a teacher class: otherwise the teacher cannot supervise it and this raises, naming them.
    Same class set: no teacher class outside the dataset's but RF-DETR's placeholders."""
    index = {_norm(c): i for i, c in enumerate(dataset_classes)}
    mapping = [index.get(_norm(c), -1) for c in teacher_classes]
    have = {_norm(c) for c in teacher_classes}
    missing = [c for c in dataset_classes if _norm(c) not in have]
    if missing:
        raise TeacherError(
            f"distill.teacher {source}: the dataset's classes {missing} are not among the "
            f"teacher's classes ({len(teacher_classes)}: {teacher_classes[:20]}"
            f"{'...' if len(teacher_classes) > 20 else ''}); classes are matched by name. Use a "
            "teacher trained on these classes, or rename them in the dataset.")
    # RF-DETR heads carry placeholder logits (unused_N, e.g. its super-category at 0): they
    # do not make the class sets differ
    same = all(m >= 0 or _norm(c) == _norm(unused_name(i))
               for i, (c, m) in enumerate(zip(teacher_classes, mapping)))
    return mapping, same


def _model_files(path: Path) -> tuple[Path, Path] | None:
    if ModelDir(path).exists():
        return ModelDir(path).weights_path, ModelDir(path).meta_path
    if (path / "MLmodel").is_file():
        return mlflow_model_files(path)
    winner = RunDir(path).winner  # a run dir after post-fit
    if winner.exists():
        return winner.weights_path, winner.meta_path
    return None


def _materialise(source: str, dst: Path) -> tuple[Path, Path]:
    """(weights, meta) of the teacher, copied into ``dst`` when it is not a local model dir."""
    if source.startswith(REMOTE) and not Path(source).exists():
        try:
            local, _ = download_model(source, dst)
        except (ModelLoadError, ModelDirError) as exc:
            raise TeacherError(f"distill.teacher {source}: {exc}") from None
        files = _model_files(Path(local))
        if files is None:
            raise TeacherError(f"distill.teacher {source}: the download holds no raydetr model")
        return files
    path = Path(source).expanduser()
    if path.is_file() and path.suffix in (".pth", ".pt", ".ckpt"):
        try:
            convert_checkpoint(path, dst)
        except ConvertError as exc:
            raise TeacherError(f"distill.teacher {source}: {exc}") from None
        return dst / "model.safetensors", dst / "meta.json"
    if path.is_dir():
        files = _model_files(path)
        if files is not None:
            return files
        raise TeacherError(
            f"distill.teacher {source}: not a model dir (model.safetensors + meta.json), an "
            "MLflow model dir, or a run dir with a winner/ (has its fit finished?)")
    raise TeacherError(
        f"distill.teacher {source}: no such file or directory. Give 'ema', a model or run dir, "
        "models:/name@alias, or an RF-DETR .pth")


def resolve_teachers(cfg: Config, dataset_classes: list[str], run_dir: Path, *, search: bool
                     ) -> dict[str | None, TeacherSpec | None]:
    """Every teacher the run's trials may use, by ``distill.teacher`` value: the config's, and
    in a search the values of ``tune.search_space['distill.teacher']`` (grid or choice)."""
    sources: list[str | None] = [cfg.distill.teacher]
    space = cfg.tune.search_space.get("distill.teacher") if search else None
    if isinstance(space, dict):
        for values in space.values():
            sources += [v for v in values if v not in sources] if isinstance(values, list) else []
    if len(sources) == 1:
        return {sources[0]: resolve_teacher(cfg.distill, dataset_classes, run_dir)}
    return {src: resolve_teacher(cfg.distill.model_copy(update={"teacher": src}),
                                 dataset_classes, run_dir, dst=RunDir(run_dir).root / "teachers" / str(i),
                                 record=False)
            for i, src in enumerate(sources)}


def resolve_teacher(cfg: DistillConfig, dataset_classes: list[str], run_dir: Path, *,
                    dst: Path | None = None, record: bool = True) -> TeacherSpec | None:
    """The teacher every worker will load (None: distillation off); a copy, when one is needed,
    goes to ``dst`` (default ``<run dir>/teacher``). ``record``: write ``<run dir>/teacher.json``
    (URI, content hash, classes)."""
    if cfg.teacher is None:
        return None
    dst = dst or RunDir(run_dir).teacher
    if cfg.teacher == EMA_TEACHER:
        spec = TeacherSpec(uri=EMA_TEACHER, model_dir=None, sha256=None,
                           classes=list(dataset_classes),
                           class_map=list(range(len(dataset_classes))), same_classes=True)
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        weights, meta_path = _materialise(cfg.teacher, dst)
        try:
            meta = read_meta(meta_path)
        except ModelDirError as exc:
            raise TeacherError(f"distill.teacher {cfg.teacher}: {exc}") from None
        mapping, same = class_map_for(list(meta.classes), dataset_classes, cfg.teacher)
        model_dir = weights.parent
        if weights.name != "model.safetensors" or meta_path.parent != model_dir:
            model_dir = dst / "model_dir"  # an MLflow dir's artifact names: normalise
            ModelDir.write(model_dir, weights, meta)
        spec = TeacherSpec(uri=cfg.teacher, model_dir=str(model_dir.resolve()),
                           sha256=sha256_file(model_dir / "model.safetensors"),
                           classes=list(meta.classes), class_map=mapping, same_classes=same,
                           model=dict(meta.model), resolution=int(meta.resolution))
    if record:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(RunDir(run_dir).teacher_record, spec.record())
    log.info("distill: teacher %s (%s, sha256 %s), %d classes%s", spec.uri,
             spec.record()["preset"] or "the student's EMA", (spec.sha256 or "-")[:12],
             len(spec.classes), "" if spec.same_classes else " (mapped by name onto the dataset's)")
    return spec
