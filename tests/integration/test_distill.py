"""Distillation on a real 2-worker TorchTrainer: an RF-DETR teacher (another family, given as
an RF-DETR .pth) teaches an rtdetr-r18 student. The student's winner is registered with its
teacher recorded (URI, sha256, teacher mAP) and never included; the teacher's file is unchanged;
a rank killed mid-run restarts from the checkpoint and ends bit-equal to the uninterrupted run.

Random (non-trivial) teacher weights at 64 px on a handful of synthetic images: mechanics and
exact equalities, not accuracy (bench/distill.py measures the gain).
"""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch
from rfdetr_support import write_rfdetr_checkpoint

from raydetr.artifacts import load_weights
from raydetr.config import load_config
from raydetr.data.synthetic import CLASSES
from raydetr.fit.driver import FitError, fit
from raydetr.train.checkpoint import latest_checkpoint, read_state

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def local_ray():
    import ray

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray.init(address="local", num_cpus=4, include_dashboard=True, dashboard_host="127.0.0.1")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def teacher_pth(module_tmp):
    # logit 0 is RF-DETR's super-category; logits 1..3 are the synthetic set's classes
    return write_rfdetr_checkpoint(module_tmp / "teacher.pth",
                                   num_logits=len(CLASSES) + 1, class_names=list(CLASSES),
                                   resolution=64, ema=False, seed=5)


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def cfg_with_teacher(out, name, teacher, *extra):
    return load_config(None, [
        f"run.output_dir={out}", f"run.name={name}", "run.seed=7",
        "model.preset=rtdetr-r18", "model.resolution=64", "model.num_queries=20",
        "model.num_denoising=0", "data.synthetic_image_size=64",
        "data.synthetic_train_images=16", "data.synthetic_val_images=8",
        "data.multi_scale=false", "optim.batch_size=4", "optim.epochs=2",
        "optim.warmup_steps=2", "scaling.num_workers=2", "ema.decay=0.9",
        f"distill.teacher={teacher}", "distill.score_threshold=0.05", *extra,
    ])


@pytest.fixture(scope="module")
def distilled(module_tmp, local_ray, teacher_pth):
    before = sha256(teacher_pth)
    out = module_tmp / "distilled"
    result = fit(cfg_with_teacher(out, "student", teacher_pth, "mlflow.model_name=student"))
    return result, before, out


def test_rfdetr_teacher_registers_rtdetr_student_and_stays_out(distilled, teacher_pth):
    import mlflow

    result, before, out = distilled
    assert sha256(teacher_pth) == before  # the teacher's file is untouched
    teacher_rec = json.loads((result.run_dir / "teacher.json").read_text())
    converted = result.run_dir / "teacher" / "model.safetensors"
    assert teacher_rec["uri"] == str(teacher_pth) and teacher_rec["sha256"] == sha256(converted)
    assert teacher_rec["preset"] == "rfdetr-nano"
    teacher_keys = set(load_weights(converted))

    state = read_state(latest_checkpoint(result.train_dir))
    history = state["history"]
    assert [h["epoch"] for h in history] == [1, 2]
    assert all(h["distill_loss"] > 0 for h in history)
    assert len({h["teacher_map"] for h in history}) == 1  # measured once, the same number
    # the checkpoint holds the student only: its keys are the student's, none the teacher's
    assert not set(state["model"]) & teacher_keys
    for shadow in state["ema"]["shadows"]:
        assert set(shadow) == set(state["model"])
    ckpt_files = {p.name for p in latest_checkpoint(result.train_dir).iterdir()}
    assert not any("teacher" in n for n in ckpt_files)

    meta = json.loads((result.winner_dir / "meta.json").read_text())
    assert meta["model"]["preset"] == "rtdetr-r18"
    assert meta["distill"]["sha256"] == teacher_rec["sha256"]
    assert meta["distill"]["map"] == history[-1]["teacher_map"]
    assert set(load_weights(result.winner_dir / "model.safetensors")) == set(state["model"])

    reg = result.registered
    assert reg is not None and reg["model_name"] == "student"
    client = mlflow.MlflowClient(tracking_uri=reg["tracking_uri"])
    version = client.get_model_version_by_alias("student", "champion")
    assert version.tags["distill.teacher"] == str(teacher_pth)
    assert version.tags["distill.teacher_sha256"] == teacher_rec["sha256"]
    assert float(version.tags["distill.teacher_map"]) == pytest.approx(history[-1]["teacher_map"],
                                                                       abs=1e-4)
    run = client.get_run(reg["run_id"])
    assert "teacher_map" in run.data.metrics and "distill_loss" in run.data.metrics


def test_restart_with_a_teacher_equals_uninterrupted(distilled, teacher_pth, tmp_path,
                                                     monkeypatch):
    result, _, _ = distilled
    ref = read_state(latest_checkpoint(result.train_dir))
    monkeypatch.setenv("RAYDETR_FAULT_INJECT", f"2:1:{tmp_path / 'killed-once'}")
    restarted = fit(cfg_with_teacher(tmp_path, "restart", teacher_pth, "scaling.max_failures=1",
                                     "mlflow.enabled=false"))
    assert (tmp_path / "killed-once").exists(), "the fault was not injected"
    state = read_state(latest_checkpoint(restarted.train_dir))
    for k in ref["model"]:
        assert torch.equal(state["model"][k], ref["model"][k]), k
    for a, b in zip(state["ema"]["shadows"], ref["ema"]["shadows"]):
        for k in a:
            assert torch.equal(a[k], b[k]), k
    assert [h["distill_loss"] for h in state["history"]] == [
        h["distill_loss"] for h in ref["history"]]


def test_unmatched_classes_fail_before_ray(tmp_path, teacher_pth):
    other = write_rfdetr_checkpoint(tmp_path / "pets.pth", num_logits=3,
                                    class_names=["cat", "dog"], resolution=64, ema=False)
    with pytest.raises(FitError, match=r"\['rectangle', 'ellipse', 'triangle'\] are not among"):
        fit(cfg_with_teacher(tmp_path, "bad", other, "mlflow.enabled=false"))
    assert not (tmp_path / "bad" / "tune").exists()


def test_ema_teacher_self_distils(tmp_path, local_ray):
    """``distill.teacher=ema``: the student's own EMA shadow teaches it (nothing loaded, no
    teacher mAP of its own: that is map_ema), recorded as such."""
    result = fit(cfg_with_teacher(tmp_path, "self", "ema", "scaling.num_workers=1",
                                  "mlflow.enabled=false"))
    history = read_state(latest_checkpoint(result.train_dir))["history"]
    assert all(h["distill_loss"] > 0 and "teacher_map" not in h for h in history)
    assert not (result.run_dir / "teacher").exists()
    meta = json.loads((result.winner_dir / "meta.json").read_text())
    assert meta["distill"]["uri"] == "ema" and meta["distill"]["sha256"] is None
