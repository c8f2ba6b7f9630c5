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


def _module_with(names: list[str]) -> torch.nn.Module:
    """A module whose parameters have exactly these dotted names (RF-DETR's key layout)."""
    root = torch.nn.Module()
    for name in names:
        *path, leaf = name.split(".")
        node = root
        for part in path:
            if not hasattr(node, part):
                node.add_module(part, torch.nn.Module())
            node = getattr(node, part)
        node.register_parameter(leaf, torch.nn.Parameter(torch.zeros(2)))
    return root


def test_rfdetr_param_groups_follow_rfdetrs_rules():
    vit = "backbone.0.encoder.encoder."
    names = [vit + "embeddings.position_embeddings",
             vit + "embeddings.patch_embeddings.projection.weight",
             vit + "encoder.layer.0.attention.attention.query.weight",
             vit + "encoder.layer.0.attention.attention.query.bias",
             vit + "encoder.layer.11.norm1.weight",
             vit + "encoder.layer.11.layer_scale1.lambda1",
             vit + "layernorm.weight",
             "backbone.0.projector.stages.0.0.cv1.conv.weight",
             "transformer.decoder.layers.0.norm1.bias",
             "transformer.decoder.layers.0.linear1.weight",
             "transformer.enc_out_class_embed.3.weight", "class_embed.bias",
             "refpoint_embed.weight"]
    cfg = OptimConfig(lr=1e-4, lr_encoder=1.5e-4, weight_decay=1e-4)
    for preset, depth in (("rfdetr-nano", 13), ("rfdetr-base", 12)):
        opt = build_optimizer(_module_with(names), cfg, preset)
        got = {n: (g["lr"], g["weight_decay"]) for g in opt.param_groups for n in g["names"]}
        vit_lr = [1.5e-4 * 0.8 ** (depth + 1 - layer) * 0.7 ** 2 for layer in range(depth + 2)]
        expected = {
            names[0]: (vit_lr[0], 0.0), names[1]: (vit_lr[0], 0.0),  # embeddings: id 0, no wd
            names[2]: (vit_lr[1], 1e-4), names[3]: (vit_lr[1], 0.0),
            names[4]: (vit_lr[12], 0.0),
            names[5]: (vit_lr[12], 1e-4),  # LayerScale lambda1 does get weight decay
            names[6]: (vit_lr[depth + 1], 0.0),  # final layernorm: factor 1 (x component^2)
            names[7]: (1e-4, 1e-4),  # projector: base lr, default decay
            names[8]: (0.7e-4, 1e-4), names[9]: (0.7e-4, 1e-4),  # decoder: no exclusions
            names[10]: (1e-4, 1e-4), names[11]: (1e-4, 1e-4), names[12]: (1e-4, 1e-4),
        }
        assert set(got) == set(expected)
        for name, (lr, wd) in expected.items():
            assert got[name][0] == pytest.approx(lr, rel=1e-9), (preset, name)
            assert got[name][1] == wd, (preset, name)
