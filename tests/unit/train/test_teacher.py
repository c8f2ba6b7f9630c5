"""The worker-side teacher: frozen while the student trains, and ``teacher=ema`` runs the
student's own module with its EMA shadow (no second model)."""

from __future__ import annotations

import copy

import pytest
import torch
from detr_shapes import batches, make_images
from test_train_engine import TinyDetector, _criterion

from raydetr.config import DistillConfig, OptimConfig
from raydetr.ema.ema import ModelEma
from raydetr.train.engine import train_one_epoch
from raydetr.train.optim import build_lr_scheduler, build_optimizer
from raydetr.train.teacher import Teacher, TeacherSpec


def spec(model_dir=None) -> TeacherSpec:
    return TeacherSpec(uri="test", model_dir=model_dir, sha256=None, classes=["a", "b"],
                       class_map=[0, 1], same_classes=True)


def frozen_teacher(criterion, cfg) -> Teacher:
    torch.manual_seed(1)
    return Teacher.from_model(spec(), cfg, 2, criterion, TinyDetector(), torch.nn.Identity(),
                              torch.device("cpu"), None)


def train(distill):
    torch.manual_seed(0)
    model = TinyDetector()
    cfg = OptimConfig(lr=1e-2, lr_encoder=1e-2, warmup_steps=0, epochs=1)
    opt = build_optimizer(model, cfg)
    stats = train_one_epoch(model, _criterion(), batches(make_images(4, size=32, seed=3,
                                                                      num_classes=2), 2, size=32),
                            opt, build_lr_scheduler(opt, cfg, 1), device="cpu", epoch=1,
                            clip_max_norm=0.0, distill=distill)
    return model, stats


def test_teacher_is_frozen_and_changes_the_student():
    cfg = DistillConfig(teacher="test", score_threshold=0.0, feature_weight=0)  # a map-less toy
    teacher = frozen_teacher(_criterion(), cfg)
    before = copy.deepcopy(teacher.model.state_dict())
    distilled, stats = train(teacher)
    plain, plain_stats = train(None)
    for k, v in teacher.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in teacher.model.parameters())
    assert stats["distill_loss"] > 0 and "distill_loss" not in plain_stats
    assert any(not torch.equal(a, b) for a, b in zip(distilled.state_dict().values(),
                                                     plain.state_dict().values()))
    again, _ = train(frozen_teacher(_criterion(), cfg))  # deterministic: restarts stay exact
    for a, b in zip(again.state_dict().values(), distilled.state_dict().values()):
        assert torch.equal(a, b)


def test_ema_teacher_runs_the_shadow_through_the_student_module():
    torch.manual_seed(0)
    student = TinyDetector()
    ema = ModelEma(student, decay=0.5, schedule="constant")
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.3)
    ema.update(student)
    student.train()
    t = Teacher.load(spec(), DistillConfig(teacher="ema", feature_weight=0), 2, _criterion(),
                     torch.device("cpu"), None, ema=ema, student=student)
    assert t.model is None  # no second model
    images = torch.rand(2, 3, 32, 32)
    reference = ema.load_into(copy.deepcopy(student)).eval()
    got = t.outputs(images)
    want = reference(images)
    assert torch.allclose(got["pred_boxes"], want["pred_boxes"])
    assert torch.allclose(got["pred_logits"], want["pred_logits"])
    assert student.training  # left as it was
    regular = student.eval()(images)
    assert not torch.allclose(got["pred_boxes"], regular["pred_boxes"])


def test_the_feature_term_reaches_the_student_encoder_and_spares_the_teacher():
    """rtdetr-r18 student (128-wide maps), rtdetr-r34 teacher (256-wide) at twice the
    resolution: both models hand over their encoder maps, the term is positive, its gradient
    (the box terms weighted 0 here) reaches the student's backbone, and nothing reaches the
    teacher."""
    from raydetr.config import LossConfig, ModelConfig
    from raydetr.model.build import build

    torch.manual_seed(0)
    student, criterion, _ = build(ModelConfig(preset="rtdetr-r18", resolution=64,
                                              num_queries=20), LossConfig(), 2)
    teacher_model, _, post = build(ModelConfig(preset="rtdetr-r34", resolution=128,
                                               num_queries=20), LossConfig(), 2)
    t_spec = TeacherSpec(uri="test", model_dir=None, sha256=None, classes=["a", "b"],
                         class_map=[0, 1], same_classes=True, resolution=128)
    cfg = DistillConfig(teacher="test", score_threshold=0.0, weight=0.0, logit_weight=0.0,
                        feature_weight=4.0)
    teacher = Teacher.from_model(t_spec, cfg, 2, criterion, teacher_model, post,
                                 torch.device("cpu"), None, student=student)
    assert student.return_features and teacher_model.return_features
    images = torch.randn(2, 3, 64, 64)
    out = student.train()(images)
    assert [f.shape[-1] for f in out["features"]] == [8, 4, 2]
    terms = teacher(images, out)
    assert terms["loss_distill_feat"] > 0
    terms["loss_distill"].backward()
    assert student.backbone.conv1.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher_model.parameters())


def test_the_ema_teacher_hands_over_its_maps_too():
    from raydetr.config import LossConfig, ModelConfig
    from raydetr.model.build import build

    torch.manual_seed(0)
    student, criterion, _ = build(ModelConfig(preset="rtdetr-r18", resolution=64,
                                              num_queries=20), LossConfig(), 2)
    ema = ModelEma(student, decay=0.5, schedule="constant")
    t = Teacher.load(spec(), DistillConfig(teacher="ema", feature_weight=4.0), 2, criterion,
                     torch.device("cpu"), None, ema=ema, student=student)
    images = torch.randn(2, 3, 64, 64)
    got = t.outputs(images)
    assert [f.shape[-1] for f in got["features"]] == [8, 4, 2] and got["input_hw"] == (64, 64)
    # the shadow equals the weights here: its maps are the student's own (eval mode)
    want = student.eval()(images)["features"]
    for a, b in zip(got["features"], want):
        torch.testing.assert_close(a, b)


def test_the_feature_term_needs_the_student():
    with_features = DistillConfig(teacher="test", feature_weight=1.0)
    with pytest.raises(ValueError, match="needs the student"):
        Teacher.from_model(spec(), with_features, 2, _criterion(), TinyDetector(),
                           torch.nn.Identity(), torch.device("cpu"), None)


def test_the_feature_term_defaults_to_64_for_a_trained_teacher_and_off_for_the_ema():
    """A trained teacher's maps are worth 64 by default; the student's own EMA shadow's maps
    are a lagging copy of its own (pulling towards them held students back: README), so
    ``teacher=ema`` leaves the term off unless distill.feature_weight is set."""
    from raydetr.config import LossConfig, ModelConfig
    from raydetr.model.build import build

    torch.manual_seed(0)
    cfg = ModelConfig(preset="rtdetr-r18", resolution=64, num_queries=20)
    student, criterion, _ = build(cfg, LossConfig(), 2)
    teacher_model, _, post = build(cfg, LossConfig(), 2)
    trained = Teacher.from_model(spec(), DistillConfig(teacher="test"), 2, criterion,
                                 teacher_model, post, torch.device("cpu"), None, student=student)
    assert trained.loss.feature_weight == 64.0 and trained.features
    ema = ModelEma(student, decay=0.999)
    own = Teacher.load(spec(), DistillConfig(teacher="ema"), 2, build(cfg, LossConfig(), 2)[1],
                       torch.device("cpu"), None, ema=ema, student=build(cfg, LossConfig(), 2)[0])
    assert own.loss.feature_weight == 0.0 and not own.features
    asked = Teacher.load(spec(), DistillConfig(teacher="ema", feature_weight=8.0), 2,
                         build(cfg, LossConfig(), 2)[1], torch.device("cpu"), None, ema=ema,
                         student=student)
    assert asked.loss.feature_weight == 8.0
