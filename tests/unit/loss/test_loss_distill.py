"""Teacher-box distillation (Teach-DETR): teacher targets, one-to-one matching with the
student's own matcher, score weighting, soft class targets, class mapping by name; PKD's
feature term (Pearson correlation of the encoder maps, levels paired by stride)."""

from __future__ import annotations

import pytest
import torch

from raydetr.config import LossConfig
from raydetr.fit.teacher import TeacherError, class_map_for
from raydetr.loss.criterion import SetCriterion
from raydetr.loss.distill import (
    DistillLoss,
    align_features,
    pearson_feature_loss,
    teacher_targets,
    width_projection,
)
from raydetr.loss.matcher import HungarianMatcher


def _logit(p: float) -> float:
    return float(torch.logit(torch.tensor(p)))


def teacher_outputs() -> dict[str, torch.Tensor]:
    """1 image, 3 teacher queries over 3 teacher classes (cat, dog, person)."""
    logits = torch.full((1, 3, 3), _logit(0.01))
    logits[0, 0, 1] = _logit(0.9)   # dog 0.9
    logits[0, 1, 2] = _logit(0.5)   # person 0.5
    logits[0, 2, 0] = _logit(0.2)   # cat 0.2: under the threshold
    boxes = torch.tensor([[[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.4], [0.5, 0.5, 0.1, 0.1]]])
    return {"pred_logits": logits, "pred_boxes": boxes}


def test_teacher_targets_threshold_map_and_cap():
    # dataset classes: person (0), dog (1); teacher: cat (unmapped), dog, person
    cmap = torch.tensor([-1, 1, 0])
    (t,) = teacher_targets(teacher_outputs(), cmap, 2, score_threshold=0.3)
    assert t["labels"].tolist() == [1, 0]
    assert t["scores"].tolist() == pytest.approx([0.9, 0.5], abs=1e-6)
    assert t["probs"].shape == (2, 2)
    assert t["probs"][0].tolist() == pytest.approx([0.01, 0.9], abs=1e-6)  # [person, dog]
    (top,) = teacher_targets(teacher_outputs(), cmap, 2, score_threshold=0.3, max_boxes=1)
    assert top["labels"].tolist() == [1]
    (none,) = teacher_targets(teacher_outputs(), cmap, 2, score_threshold=0.95)
    assert len(none["labels"]) == 0


def test_teacher_duplicates_are_dropped_by_class_aware_nms():
    """Two teacher queries on one object (a DETR teacher's duplicate) would ask the student for
    two boxes there; the NMS keeps the higher-scored one, and keeps another class's box."""
    out = teacher_outputs()
    out["pred_logits"][0, 2] = torch.tensor([_logit(0.01), _logit(0.6), _logit(0.01)])
    out["pred_boxes"][0, 2] = torch.tensor([0.31, 0.3, 0.2, 0.2])  # dog again, IoU ~0.9
    cmap = torch.tensor([-1, 1, 0])
    (raw,) = teacher_targets(out, cmap, 2, score_threshold=0.3)
    assert raw["labels"].tolist() == [1, 0, 1]
    (t,) = teacher_targets(out, cmap, 2, score_threshold=0.3, nms_iou=0.2)
    assert t["labels"].tolist() == [1, 0]
    assert t["scores"].tolist() == pytest.approx([0.9, 0.5], abs=1e-6)
    out["pred_logits"][0, 2] = torch.tensor([_logit(0.01), _logit(0.01), _logit(0.6)])
    (other,) = teacher_targets(out, cmap, 2, score_threshold=0.3, nms_iou=0.2)
    assert sorted(other["labels"].tolist()) == [0, 0, 1]  # a person on the dog's box stays


def loss_fn(cls_loss: str = "focal", **kw) -> DistillLoss:
    """On a 2-class student criterion (loss weights: cls 2, bbox 5, giou 2)."""
    crit = SetCriterion(2, HungarianMatcher(), LossConfig(cls_loss=cls_loss, weight_cls=2.0))
    return DistillLoss(crit, **kw)


def student(boxes: torch.Tensor, logits: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"pred_logits": logits.clone().requires_grad_(), "pred_boxes": boxes.clone()
            .requires_grad_()}


def test_matched_boxes_cost_nothing_and_scores_weight_the_box_terms():
    targets = [{"labels": torch.tensor([0, 1]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2],
                                                                      [0.7, 0.6, 0.3, 0.4]]),
                "scores": torch.tensor([0.9, 0.5]), "probs": torch.zeros(2, 2)}]
    q = 4
    boxes = torch.tensor([[[0.5, 0.5, 0.1, 0.1], [0.7, 0.6, 0.3, 0.4],
                           [0.2, 0.8, 0.1, 0.1], [0.3, 0.3, 0.2, 0.2]]])
    logits = torch.full((1, q, 2), -4.0)
    logits[0, 3, 0], logits[0, 1, 1] = 4.0, 4.0
    out = loss_fn()(student(boxes, logits), targets)
    assert out["loss_distill_bbox"].item() == pytest.approx(0.0, abs=1e-6)  # matched exactly
    assert out["loss_distill_giou"].item() == pytest.approx(0.0, abs=1e-6)
    # shift the query matched to the 0.9 box: L1 grows by 0.9 * 0.1 / 2 teacher boxes
    moved = boxes.clone()
    moved[0, 3, 0] += 0.1
    out2 = loss_fn()(student(moved, logits), targets)
    assert out2["loss_distill_bbox"].item() == pytest.approx(0.9 * 0.1 / 2, rel=1e-4)
    targets[0]["scores"] = torch.tensor([0.45, 0.5])
    out3 = loss_fn()(student(moved, logits), targets)
    assert out3["loss_distill_bbox"].item() == pytest.approx(0.45 * 0.1 / 2, rel=1e-4)


def test_gradient_pulls_the_student_onto_the_teacher_boxes():
    targets = teacher_targets(teacher_outputs(), torch.tensor([-1, 1, 0]), 2, score_threshold=0.3)
    torch.manual_seed(0)
    boxes = torch.rand(1, 5, 4) * 0.5 + 0.25
    raw_boxes = torch.logit(boxes).requires_grad_()
    raw_logits = torch.zeros(1, 5, 2, requires_grad=True)
    opt = torch.optim.Adam([raw_boxes, raw_logits], lr=0.05)
    loss = loss_fn(logit_weight=0.2)
    first = None
    for _ in range(150):
        out = loss({"pred_logits": raw_logits, "pred_boxes": raw_boxes.sigmoid()}, targets)
        first = first if first is not None else float(out["loss_distill"].detach())
        opt.zero_grad()
        out["loss_distill"].backward()
        opt.step()
    assert float(out["loss_distill"].detach()) < 0.3 * first
    assert out["loss_distill_bbox"].item() < 0.02  # every teacher box has a student query


def test_no_teacher_boxes_keeps_the_graph_and_only_pushes_scores_down():
    targets = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4),
                "scores": torch.zeros(0), "probs": torch.zeros(0, 2)}]
    out = student(torch.rand(1, 3, 4), torch.zeros(1, 3, 2))
    res = loss_fn(logit_weight=0.2)(out, targets)
    res["loss_distill"].backward()
    assert torch.isfinite(res["loss_distill"])
    assert out["pred_boxes"].grad is not None and out["pred_boxes"].grad.abs().sum() == 0
    assert (out["pred_logits"].grad > 0).all()  # every query is told: no object here


def test_aux_layers_are_distilled_too():
    targets = teacher_targets(teacher_outputs(), torch.tensor([-1, 1, 0]), 2, score_threshold=0.3)
    main = student(torch.rand(1, 4, 4), torch.zeros(1, 4, 2))
    aux = student(torch.rand(1, 4, 4), torch.zeros(1, 4, 2))
    loss_fn()({**main, "aux_outputs": [aux]}, targets)["loss_distill"].backward()
    assert aux["pred_boxes"].grad.abs().sum() > 0


def test_classes_map_by_name_or_the_error_names_them():
    mapping, same = class_map_for(["Cat", "dog ", "person"], ["person", "dog"], "t")
    assert mapping == [-1, 1, 0] and not same
    assert class_map_for(["b", "a"], ["a", "b"], "t") == ([1, 0], True)
    assert class_map_for(["unused_0", "b", "a"], ["a", "b"], "t") == ([-1, 1, 0], True)
    with pytest.raises(TeacherError, match=r"\['zebra'\] are not among the teacher's classes"):
        class_map_for(["cat", "dog"], ["dog", "zebra"], "coco-teacher")


@pytest.mark.parametrize("cls_loss", ["varifocal", "focal", "ia_bce"])
def test_classification_is_the_students_own_loss(cls_loss):
    """The teacher set is scored with the student's own classification loss: with every teacher
    score 1 and unmatched queries weighted 1 it is the criterion's loss_cls on those boxes as
    ground truth; a teacher score of 0.5 halves the matched query's part."""
    crit = SetCriterion(2, HungarianMatcher(), LossConfig(cls_loss=cls_loss))
    torch.manual_seed(0)
    out = {"pred_logits": torch.randn(1, 5, 2), "pred_boxes": torch.rand(1, 5, 4) * 0.4 + 0.3}
    boxes = torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.4]])
    gt = [{"labels": torch.tensor([0, 1]), "boxes": boxes}]
    teacher = [{**gt[0], "scores": torch.ones(2), "probs": torch.zeros(2, 2)}]
    indices = crit.matcher(out, gt, 1)
    want = crit._classification(out["pred_logits"], out["pred_boxes"], gt, indices, 2.0)
    got = DistillLoss(crit, unmatched_weight=1.0)(out, teacher)["loss_distill_cls"]
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    per_entry = crit.classification_map(out["pred_logits"], out["pred_boxes"], gt, indices)
    (src, _), = indices
    half = [{**teacher[0], "scores": torch.tensor([0.5, 1.0])}]
    got_half = DistillLoss(crit, unmatched_weight=1.0)(out, half)["loss_distill_cls"]
    matched_to_first = per_entry[0, src[indices[0][1] == 0]].sum()
    assert got_half.item() == pytest.approx(want.item() - 0.5 * matched_to_first.item() / 2,
                                            rel=1e-5)


def _layer(q: int, c: int) -> dict[str, torch.Tensor]:
    return {"pred_logits": torch.randn(2, q, c), "pred_boxes": torch.rand(2, q, 4) * 0.4 + 0.3}


@pytest.mark.parametrize("weight", [0.3, 1.0])
@pytest.mark.parametrize("cls_loss", ["varifocal", "ia_bce"])
def test_a_teacher_equal_to_the_labels_changes_nothing(cls_loss, weight):
    """The teacher takes ``weight`` of the decoder's supervision (final and auxiliary layers)
    from the ground truth; the encoder's terms keep theirs. So a teacher set that is the
    ground truth (scores 1, every other query weighted 1 as no object) gives the plain loss and
    gradients, where Teach-DETR's added term would count the decoder's loss twice."""
    torch.manual_seed(0)
    raw = {**_layer(6, 2), "aux_outputs": [_layer(6, 2)], "enc_outputs": _layer(6, 2)}
    boxes = torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.4]])
    gt = [{"labels": torch.tensor([0, 1]), "boxes": boxes},
          {"labels": torch.tensor([1]), "boxes": boxes[1:] * 0.9}]
    teacher = [{**t, "scores": torch.ones(len(t["labels"])),
                "probs": torch.nn.functional.one_hot(t["labels"], 2).float()} for t in gt]

    def leaves():
        def copy(d):
            return {k: (v.clone().requires_grad_() if torch.is_tensor(v) else
                        [copy(a) for a in v] if isinstance(v, list) else copy(v))
                    for k, v in d.items()}
        return copy(raw)

    def grads(out):
        return torch.cat([out["pred_logits"].grad.flatten(), out["pred_boxes"].grad.flatten(),
                          out["aux_outputs"][0]["pred_logits"].grad.flatten(),
                          out["enc_outputs"]["pred_logits"].grad.flatten()])

    cfg = LossConfig(cls_loss=cls_loss)
    plain_out = leaves()
    plain = SetCriterion(2, HungarianMatcher(), cfg)(plain_out, gt)["loss"]
    plain.backward()
    crit = SetCriterion(2, HungarianMatcher(), cfg)
    distill = DistillLoss(crit, weight=weight, unmatched_weight=1.0)
    assert crit.decoder_share == pytest.approx(1.0 - weight)
    out = leaves()
    total = crit(out, gt)["loss"] + distill(out, teacher)["loss_distill"]
    total.backward()
    assert total.item() == pytest.approx(plain.item(), rel=1e-5)
    torch.testing.assert_close(grads(out), grads(plain_out), rtol=1e-4, atol=1e-6)
    # the teacher's share is a training matter: evaluation losses stay the criterion's own
    crit.eval()
    assert crit(raw, gt)["loss"].item() == pytest.approx(
        SetCriterion(2, HungarianMatcher(), cfg).eval()(raw, gt)["loss"].item(), rel=1e-6)


def test_the_teachers_share_is_at_most_all_of_it():
    crit = SetCriterion(2, HungarianMatcher(), LossConfig())
    with pytest.raises(ValueError, match=r"distill.weight=1.5: the teacher's share"):
        DistillLoss(crit, weight=1.5)


def test_a_teacher_equal_to_the_labels_changes_nothing_on_a_real_step():
    """The same on an rtdetr-r18 training forward (final, auxiliary, encoder and denoising
    outputs): the loss of the shared labels teacher is the plain loss and every parameter's
    gradient matches to float rounding."""
    from raydetr.config import ModelConfig
    from raydetr.model.build import build

    torch.manual_seed(0)
    model_cfg = ModelConfig(preset="rtdetr-r18", resolution=64, num_queries=20)
    model, plain, _ = build(model_cfg, LossConfig(), 2)
    shared = build(model_cfg, LossConfig(), 2)[1]
    distill = DistillLoss(shared, weight=0.5, unmatched_weight=1.0)
    targets = [{"labels": torch.tensor([0, 1]),
                "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.4]])},
               {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.3]])}]
    teacher = [{**t, "scores": torch.ones(len(t["labels"])),
                "probs": torch.nn.functional.one_hot(t["labels"], 2).float()} for t in targets]
    out = model.train()(torch.randn(2, 3, 64, 64), targets)
    assert "dn_outputs" in out and out["aux_outputs"]
    params = [p for p in model.parameters() if p.requires_grad]
    want = plain(out, targets)["loss"]
    got = shared(out, targets)["loss"] + distill(out, teacher)["loss_distill"]
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    g_want = torch.autograd.grad(want, params, retain_graph=True, allow_unused=True)
    g_got = torch.autograd.grad(got, params, allow_unused=True)
    for a, b in zip(g_want, g_got):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-7)


def test_the_feature_term_is_one_minus_the_channel_correlation():
    """(1 - r) (n - 1) / n with r the per-channel Pearson correlation over n = B h w values:
    zero for the teacher's own maps and any per-channel positive scale and shift of them, about
    1 for unrelated maps, 2 (n - 1) / n for negated ones; no gradient reaches the teacher."""
    torch.manual_seed(0)
    t = torch.randn(2, 8, 6, 6)
    scale, shift = torch.rand(1, 8, 1, 1) + 0.5, torch.randn(1, 8, 1, 1)
    assert pearson_feature_loss([t * scale + shift], [t]).item() == pytest.approx(0, abs=1e-6)
    assert pearson_feature_loss([-t], [t]).item() == pytest.approx(2 * 71 / 72, rel=1e-5)
    unrelated = pearson_feature_loss([torch.randn(2, 8, 6, 6)], [t]).item()
    assert 0.8 < unrelated < 1.2
    s = torch.randn(2, 8, 6, 6, requires_grad=True)
    teacher = t.clone().requires_grad_(True)
    pearson_feature_loss([s], [teacher]).backward()
    assert s.grad.abs().sum() > 0 and teacher.grad is None


def test_teacher_levels_pair_with_student_levels_by_stride():
    """An RT-DETR-like student (strides 8, 16, 32 at 64 px) under an RF-DETR-like teacher (one
    stride-16 map at 128 px) reads that map at every level; the other way round the student's
    stride-16 map pairs with the teacher's stride-16 level, resized."""
    s3 = [torch.randn(1, 4, 8, 8), torch.randn(1, 4, 4, 4), torch.randn(1, 4, 2, 2)]
    t1 = [torch.randn(1, 4, 8, 8)]
    got = align_features(s3, (64, 64), t1, (128, 128))
    assert [tuple(g.shape[-2:]) for g in got] == [(8, 8), (4, 4), (2, 2)]
    assert torch.equal(got[0], t1[0])
    t3 = [torch.randn(1, 4, 16, 16), torch.randn(1, 4, 8, 8), torch.randn(1, 4, 4, 4)]
    (one,) = align_features([torch.randn(1, 4, 4, 4)], (64, 64), t3, (128, 128))
    want = torch.nn.functional.interpolate(t3[1], size=(4, 4), mode="bilinear",
                                           align_corners=False)
    assert torch.equal(one, want)
    same = align_features(s3, (64, 64), [t.clone() for t in s3], (64, 64))
    assert all(torch.equal(a, b) for a, b in zip(same, s3))


def test_teacher_maps_of_another_width_are_projected_orthonormally():
    """rtdetr-r18's 128-wide maps under a 256-wide teacher and the other way round: a fixed
    projection (the same on every call), orthonormal, so a wider teacher's map keeps its
    inner products within the kept subspace and a narrower one's are kept whole."""
    torch.manual_seed(0)
    wide, narrow = torch.randn(2, 16, 4, 4), torch.randn(2, 8, 4, 4)
    (down,) = align_features([narrow], (32, 32), [wide], (32, 32))
    assert down.shape == narrow.shape
    (again,) = align_features([narrow], (32, 32), [wide], (32, 32))
    assert torch.equal(down, again)
    p = width_projection(16, 8)
    torch.testing.assert_close(p.T @ p, torch.eye(8), atol=1e-5, rtol=0)
    torch.testing.assert_close(down, torch.einsum("bchw,cd->bdhw", wide, p))
    (up,) = align_features([wide], (32, 32), [narrow], (32, 32))
    assert up.shape == wide.shape
    # a narrower teacher is embedded isometrically: every position's vector keeps its length
    torch.testing.assert_close(up.norm(dim=1), narrow.norm(dim=1), atol=1e-5, rtol=1e-5)


def test_the_feature_term_needs_the_maps_and_a_weight_of_at_least_zero():
    crit = SetCriterion(2, HungarianMatcher(), LossConfig())
    with pytest.raises(ValueError, match="feature_weight=-1"):
        DistillLoss(crit, feature_weight=-1.0)
    loss = DistillLoss(crit, feature_weight=1.0)
    out = {"pred_logits": torch.zeros(1, 3, 2), "pred_boxes": torch.full((1, 3, 4), 0.5)}
    with pytest.raises(ValueError, match="return_features"):
        loss(out, [{"labels": torch.tensor([0]), "boxes": torch.full((1, 4), 0.5),
                    "scores": torch.ones(1), "probs": torch.tensor([[1.0, 0.0]])}])
