"""ModelEma inside a (tiny) training loop: K decays == K runs, resume, real DDP wrapper."""

from __future__ import annotations

import io

import pytest
import torch
import torch.distributed as dist
from torch import nn

from raydetr.ema import ModelEma

STEPS = 8


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(seed + 1)
    batches = [
        (torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)) for _ in range(STEPS)
    ]
    return model, opt, batches


def _step(model, opt, batch):
    x, y = batch
    opt.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()


def _train(decays, steps=range(STEPS), fused=False, **kw):
    model, opt, batches = _setup()
    ema = ModelEma(model, decays=decays, tau=3, **kw)
    ema.fused_shadows = fused
    for i in steps:
        _step(model, opt, batches[i])
        ema.update(model)
    return ema


@pytest.mark.parametrize("fused", [False, True])
def test_k_decays_equal_k_single_runs_bit_for_bit(fused):
    decays = [0.5, 0.9, 0.99]
    multi = _train(decays, fused=fused)
    for i, d in enumerate(decays):
        single = _train([d])
        for k, v in single.shadow_state_dict().items():
            assert torch.equal(multi.shadow_state_dict(i)[k], v), (d, k)
    assert multi.updates == STEPS


def test_resume_mid_warmup_equals_uninterrupted():
    full = _train([0.9, 0.99])
    model, opt, batches = _setup()
    ema = ModelEma(model, decays=[0.9, 0.99], tau=3)
    half = STEPS // 2
    for i in range(half):
        _step(model, opt, batches[i])
        ema.update(model)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "ema": ema.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model2, opt2, _ = _setup(seed=123)  # different init: everything must come from the checkpoint
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    ema2 = ModelEma(model2, decays=[0.9, 0.99], tau=3)
    ema2.load_state_dict(ckpt["ema"])
    assert ema2.updates == half  # warmup continues: next decay is schedule(half + 1)
    for i in range(half, STEPS):
        _step(model2, opt2, batches[i])
        ema2.update(model2)
    assert ema2.updates == STEPS and ema2.current_decays() == full.current_decays()
    for j in range(2):
        for k, v in full.shadow_state_dict(j).items():
            assert torch.equal(ema2.shadow_state_dict(j)[k], v), k


def test_real_ddp_wrapper_gloo_single_process(tmp_path):
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        model, opt, batches = _setup()
        ddp = nn.parallel.DistributedDataParallel(model)
        assert next(iter(ddp.state_dict())).startswith("module.")
        ema = ModelEma(ddp, decays=[0.9], tau=3)
        assert list(ema.shadow_state_dict()) == list(model.state_dict())
        for b in batches:
            _step(ddp, opt, b)
            ema.update(ddp)
        plain = _train([0.9])
        for k, v in plain.shadow_state_dict().items():
            assert torch.equal(ema.shadow_state_dict()[k], v), k
        eval_model, _, _ = _setup(seed=5)
        ema.load_into(eval_model)
        for k, v in eval_model.state_dict().items():
            assert torch.equal(v, ema.shadow_state_dict()[k])
    finally:
        dist.destroy_process_group()
