import pytest
import torch

from raydetr.config import LossConfig, ModelConfig
from raydetr.model.build import build


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(2, 3, 64, 64, generator=g)
    targets = [{"labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2],
                                                                       [0.6, 0.6, 0.3, 0.4]])},
               {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}]
    return images, targets


@pytest.mark.parametrize("cls_loss", ["varifocal", "focal"])
def test_loss_finite_with_empty_targets(cls_loss):
    torch.manual_seed(0)
    model, criterion, _ = build(ModelConfig(preset="rtdetr-r18", resolution=64, num_queries=20),
                                LossConfig(cls_loss=cls_loss), num_classes=3)
    images, _ = _batch()
    empty = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}] * 2
    losses = criterion(model(images, empty), empty)
    assert torch.isfinite(losses["loss"])
    losses["loss"].backward()  # no boxes: still a connected graph
    assert losses["loss_bbox"] == 0 and losses["loss_giou"] == 0


def test_gradients_reach_every_parameter_group_and_terms_present():
    torch.manual_seed(0)
    model, criterion, _ = build(ModelConfig(preset="rtdetr-r18", resolution=64, num_queries=20),
                                LossConfig(), num_classes=3)
    images, targets = _batch()
    out = model(images, targets)
    losses = criterion(out, targets)
    for key in ["loss_cls", "loss_bbox", "loss_giou", "loss_cls_aux0", "loss_cls_enc",
                "loss_cls_dn", "loss_bbox_dn_aux1"]:
        assert key in losses and torch.isfinite(losses[key]), key
    assert not any(v.requires_grad for k, v in losses.items() if k != "loss")
    losses["loss"].backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and
               (p.grad is None or not torch.isfinite(p.grad).all())]
    # the padding row of the denoising label embedding is the only allowed exception
    assert no_grad == [], no_grad
    for prefix in ["backbone.", "encoder.", "decoder.", "enc_score_head", "denoising_class_embed"]:
        grads = [p.grad.abs().sum() for n, p in model.named_parameters() if n.startswith(prefix)]
        assert sum(grads) > 0, prefix


def test_weighted_total_matches_weight_dict():
    torch.manual_seed(0)
    cfg = LossConfig(weight_cls=1.0, weight_bbox=5.0, weight_giou=2.0)
    model, criterion, _ = build(ModelConfig(preset="rtdetr-r18", resolution=64, num_queries=20,
                                            num_denoising=0), cfg, num_classes=3)
    images, targets = _batch()
    losses = criterion(model(images, targets), targets)
    expect = sum({"cls": 1.0, "bbox": 5.0, "giou": 2.0}[k.split("_")[1]] * v
                 for k, v in losses.items() if k != "loss")
    assert torch.allclose(losses["loss"].detach(), expect)
    assert not any("_dn" in k for k in losses)
