import math

import pytest
import torch
from torch import nn

from raydetr.config import LossConfig, ModelConfig, OptimConfig
from raydetr.model.build import build
from raydetr.train.optim import build_lr_scheduler, build_optimizer, lr_factor


def test_param_groups_backbone_lr_and_no_decay():
    model, _, _ = build(ModelConfig(preset="rtdetr-r18"), LossConfig(), 3)
    cfg = OptimConfig(lr=2e-4, lr_encoder=1e-5, weight_decay=0.05)
    opt = build_optimizer(model, cfg)
    by_name = {}
    for g in opt.param_groups:
        for n in g["names"]:
            by_name[n] = g
    assert set(by_name) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert by_name["backbone.layer1.0.conv1.weight"]["lr"] == 1e-5
    assert by_name["backbone.layer1.0.conv1.weight"]["weight_decay"] == 0.05
    assert by_name["backbone.bn1.weight"]["weight_decay"] == 0.0
    assert by_name["decoder.layers.0.linear1.weight"]["lr"] == 2e-4
    assert by_name["decoder.layers.0.linear1.weight"]["weight_decay"] == 0.05
    for name in ["decoder.layers.0.linear1.bias", "decoder.layers.0.norm1.weight",
                 "denoising_class_embed.weight", "encoder.input_proj.0.1.weight"]:
        assert by_name[name]["weight_decay"] == 0.0, name
    assert by_name["decoder.layers.0.norm1.weight"]["lr"] == 2e-4


def test_param_groups_see_through_ddp_prefix():
    class Wrapper(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.module = m

    model, _, _ = build(ModelConfig(preset="rtdetr-r18"), LossConfig(), 3)
    opt = build_optimizer(Wrapper(model), OptimConfig(lr_encoder=3e-5))
    lrs = {g["group_name"]: g["lr"] for g in opt.param_groups}
    assert lrs["backbone"] == 3e-5 and lrs["head"] == OptimConfig().lr


def _lrs(cfg, steps_per_epoch):
    opt = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_lr_scheduler(opt, cfg, steps_per_epoch)
    out = []
    for _ in range(cfg.epochs * steps_per_epoch):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_warmup_then_cosine_shape():
    cfg = OptimConfig(epochs=10, warmup_steps=20, lr_min_ratio=0.1)
    lrs = _lrs(cfg, 10)
    assert lrs[0] == pytest.approx(1 / 20)
    assert all(a < b for a, b in zip(lrs[:19], lrs[1:20]))  # rising warmup
    assert lrs[19] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[20:], lrs[21:]))  # monotone decay
    assert lrs[-1] == pytest.approx(0.1, abs=2e-3)
    mid = 20 + (100 - 20) // 2
    assert lrs[mid] == pytest.approx(0.1 + 0.9 * 0.5, abs=0.02)


def test_step_schedule():
    cfg = OptimConfig(epochs=6, warmup_steps=0, schedule="step", lr_drop_epochs=[2, 4])
    lrs = _lrs(cfg, 5)
    assert lrs[9] == pytest.approx(1.0) and lrs[10] == pytest.approx(0.1)
    assert lrs[20] == pytest.approx(0.01)
    assert lr_factor(0, cfg, 5) == 1.0
    assert math.isclose(lr_factor(29, cfg, 5), 0.01)
