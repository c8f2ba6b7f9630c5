"""distill.teacher sources resolved on the driver: an RF-DETR .pth (converted, hashed), a run
dir, 'ema', every value of a search over distill.teacher, and clear errors before Ray."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
from rfdetr_support import write_rfdetr_checkpoint

from raydetr.config import load_config
from raydetr.fit.teacher import TeacherError, resolve_teacher, resolve_teachers

CLASSES = ["rectangle", "ellipse", "triangle"]


@pytest.fixture(scope="module")
def pth(tmp_path_factory):
    return write_rfdetr_checkpoint(tmp_path_factory.mktemp("t") / "teacher.pth", num_logits=4,
                                   class_names=CLASSES, resolution=64, ema=False)


def test_pth_is_converted_hashed_and_recorded(tmp_path, pth):
    cfg = load_config(None, [f"distill.teacher={pth}"])
    spec = resolve_teacher(cfg.distill, CLASSES, tmp_path / "run")
    weights = tmp_path / "run" / "teacher" / "model.safetensors"
    assert spec.model_dir == str(weights.parent.resolve())
    assert spec.sha256 == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert spec.class_map == [-1, 0, 1, 2] and spec.same_classes  # logit 0: RF-DETR placeholder
    assert json.loads((tmp_path / "run" / "teacher.json").read_text())["sha256"] == spec.sha256
    # a run dir is its winner: the converted dir stands in for one here
    shutil.copytree(weights.parent, tmp_path / "other_run" / "winner")
    again = resolve_teacher(load_config(None, [f"distill.teacher={tmp_path / 'other_run'}"])
                            .distill, CLASSES, tmp_path / "run2")
    assert again.sha256 == spec.sha256 and again.model == spec.model


def test_search_over_teachers_resolves_every_value(tmp_path, pth):
    cfg = load_config(None, [f"tune.search_space={{distill.teacher: {{grid: [ema, '{pth}']}}}}"])
    teachers = resolve_teachers(cfg, CLASSES, tmp_path, search=True)
    assert set(teachers) == {None, "ema", str(pth)}
    assert teachers[None] is None and teachers["ema"].model_dir is None
    assert teachers[str(pth)].model_dir == str((tmp_path / "teachers" / "2").resolve())


def test_bad_sources_are_named(tmp_path):
    with pytest.raises(TeacherError, match="no such file or directory"):
        resolve_teacher(load_config(None, ["distill.teacher=/nope/x"]).distill, CLASSES, tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(TeacherError, match="not a model dir"):
        resolve_teacher(load_config(None, [f"distill.teacher={tmp_path / 'empty'}"]).distill,
                        CLASSES, tmp_path)
