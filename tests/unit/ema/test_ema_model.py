"""ModelEma: closed forms, buffers, NaN guard, wrappers, load_into, state_dict."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import raydetr.ema.ema as ema_mod
from raydetr.ema import ModelEma, clean_key, clean_state_dict, unwrap_model
from raydetr.ema.schedules import get_schedule


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


def _set_weights(model: nn.Module, values: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, t in model.state_dict(keep_vars=True).items():
            if name in values:
                t.copy_(values[name])


def test_constant_decay_matches_closed_form():
    model, d, n = _net(), 0.8, 6
    names = [k for k, v in model.state_dict().items() if v.is_floating_point()]
    w = [{k: v.double().clone() for k, v in model.state_dict().items() if k in names}]
    ema = ModelEma(model, decay=d, schedule="constant")
    g = torch.Generator().manual_seed(1)
    for _ in range(n):
        new = {k: torch.randn(w[0][k].shape, generator=g, dtype=torch.float64) for k in names}
        _set_weights(model, new)
        w.append(new)
        ema.update(model)
    shadow = ema.shadow_state_dict()
    for k in names:  # shadow_n = d^n w0 + sum_k (1-d) d^(n-k) w_k
        expect = d**n * w[0][k] + sum((1 - d) * d ** (n - i) * w[i][k] for i in range(1, n + 1))
        torch.testing.assert_close(shadow[k].double(), expect, rtol=1e-6, atol=1e-6)
        assert shadow[k].dtype == torch.float32
    assert ema.updates == n


@pytest.mark.parametrize(
    "schedule,kwargs", [("rfdetr", {"tau": 3}), ("timm", {}), ("threshold", {})]
)
def test_warmup_schedule_matches_python_loop(schedule, kwargs):
    model = _net()
    ema = ModelEma(model, decay=0.95, schedule=schedule, schedule_kwargs=kwargs)
    sched = get_schedule(schedule, 0.95, **kwargs)
    ref = {k: v.double().clone() for k, v in model.state_dict().items() if v.is_floating_point()}
    g = torch.Generator().manual_seed(2)
    for n in range(1, 9):
        _set_weights(model, {k: torch.randn(v.shape, generator=g) for k, v in ref.items()})
        ema.update(model)
        d = sched(n)
        live = model.state_dict()
        ref = {k: d * v + (1 - d) * live[k].double() for k, v in ref.items()}
        assert ema.current_decays() == [d]
    for k, v in ref.items():
        torch.testing.assert_close(ema.shadow_state_dict()[k].double(), v, rtol=1e-6, atol=1e-6)


def test_buffers_averaged_or_copied_and_integer_buffers_copied():
    model = _net()
    avg = ModelEma(model, decay=0.5, schedule="constant")
    cp = ModelEma(model, decay=0.5, schedule="constant", average_buffers=False)
    before = model[1].running_mean.clone()
    model.train()
    model(torch.randn(8, 3) + 3)  # moves BatchNorm running stats, num_batches_tracked -> 1
    avg.update(model)
    cp.update(model)
    now = model[1].running_mean
    torch.testing.assert_close(avg.shadow_state_dict()["1.running_mean"], 0.5 * before + 0.5 * now)
    assert torch.equal(cp.shadow_state_dict()["1.running_mean"], now)
    for e in (avg, cp):
        nbt = e.shadow_state_dict()["1.num_batches_tracked"]
        assert nbt.dtype == torch.int64 and int(nbt) == 1


def test_nan_guard_skips_and_counts():
    model = _net()
    ema = ModelEma(model, decay=0.9, schedule="constant")
    ema.update(model)
    snap = {k: v.clone() for k, v in ema.shadow_state_dict().items()}
    with torch.no_grad():
        model[2].bias[0] = float("nan")
    assert ema.update(model) is False
    assert (ema.skipped, ema.updates) == (1, 1)
    for k, v in ema.shadow_state_dict().items():
        assert torch.equal(v, snap[k]), k
    with torch.no_grad():
        model[2].bias[0] = 0.0
        model[1].running_var[0] = float("inf")  # a buffer going non-finite is caught too
    assert ema.update(model) is False and ema.skipped == 2
    unguarded = ModelEma(_net(), decay=0.9, nan_guard=False)
    with torch.no_grad():
        unguarded._module[0].weight[0, 0] = float("nan")
    unguarded.update(unguarded._module)
    assert torch.isnan(unguarded.shadow_state_dict()["0.weight"][0, 0])


def test_caller_verdict_replaces_the_weight_scan():
    """finite=False (e.g. a non-finite clipping norm) skips; finite=True trusts the caller."""
    model = _net()
    ema = ModelEma(model, decay=0.9, schedule="constant")
    snap = {k: v.clone() for k, v in ema.shadow_state_dict().items()}
    assert ema.update(model, finite=False) is False
    assert (ema.skipped, ema.updates) == (1, 0)
    for k, v in ema.shadow_state_dict().items():
        assert torch.equal(v, snap[k]), k
    with torch.no_grad():
        model[0].weight.add_(1.0)
    assert ema.update(model, finite=True) is True
    assert ema.updates == 1
    assert not torch.equal(ema.shadow_state_dict()["0.weight"], snap["0.weight"])


def test_non_finite_buffer_at_creation_is_copied_not_guarded():
    model = _net()
    model.register_buffer("mask", torch.tensor([0.0, float("-inf")]))
    ema = ModelEma(model, decay=0.9)
    assert ema.update(model) is True
    assert torch.equal(ema.shadow_state_dict()["mask"], model.mask)


def test_bf16_model_is_upcast_into_float32_shadow():
    model = _net()
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    ema32 = ModelEma(model, decay=0.7, schedule="constant")
    model = model.to(torch.bfloat16)
    ema16 = ModelEma(model, decay=0.7, schedule="constant")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema16.update(model)
    ema32.update(model)  # the model changed dtype after creation: re-bound automatically
    for k, w1 in model.state_dict().items():
        if not w1.is_floating_point():
            continue
        for e, start in ((ema16, w0[k].bfloat16().float()), (ema32, w0[k])):
            v = e.shadow_state_dict()[k]
            assert v.dtype == torch.float32
            torch.testing.assert_close(v, start.lerp(w1.float(), 0.3), rtol=1e-6, atol=1e-6)


def test_fallback_mul_add_matches_lerp(monkeypatch):
    a, b = _net(), _net()
    ea, eb = ModelEma(a, decay=0.9), ModelEma(b, decay=0.9)
    with torch.no_grad():
        for p, q in zip(a.parameters(), b.parameters()):
            p.mul_(-2.0)
            q.mul_(-2.0)
    ea.update(a)
    monkeypatch.setattr(ema_mod, "_HAS_FOREACH_LERP", False)
    eb.update(b)
    for k, v in ea.shadow_state_dict().items():
        torch.testing.assert_close(v, eb.shadow_state_dict()[k])


class _Compiled(nn.Module):
    def __init__(self, mod: nn.Module) -> None:
        super().__init__()
        self._orig_mod = mod


def test_wrappers_and_clean_keys():
    model = _net()
    compiled = _Compiled(model)  # torch.compile's OptimizedModule layout (importing it: ~6 s)
    assert unwrap_model(compiled) is model and unwrap_model(nn.DataParallel(model)) is model
    assert list(compiled.state_dict())[0].startswith("_orig_mod.")
    ema = ModelEma(compiled, decay=0.9)
    assert list(ema.shadow_state_dict()) == list(model.state_dict())
    ema.update(nn.DataParallel(model))
    assert clean_key("module._orig_mod.backbone._orig_mod.conv.weight") == "backbone.conv.weight"
    assert clean_key("head.module.weight") == "head.module.weight"
    assert list(clean_state_dict({"module.a": 1, "_orig_mod.b": 2})) == ["a", "b"]


def test_load_into_target_device_and_dtype():
    model = _net()
    ema = ModelEma(model, decays=[0.5, 0.9], schedule="constant")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    target = _net().to(torch.bfloat16)
    ema.load_into(target, index=1)
    shadow = ema.shadow_state_dict(1)
    for k, v in target.state_dict().items():
        assert v.dtype == (torch.bfloat16 if v.is_floating_point() else torch.int64)
        assert torch.equal(v, shadow[k].to(v.dtype)), k
    meta = _net().to("meta")
    ema.load_into(meta)
    assert all(p.device.type == "meta" for p in meta.parameters())
    with pytest.raises(KeyError, match="not in the model"):
        ema.load_into(nn.Linear(3, 4))


def test_shadow_on_other_device_path_runs():
    """No GPU here: a 'meta' shadow exercises the cross-device staging path (no values)."""
    model = _net()
    ema = ModelEma(model, decay=0.9, device="meta", nan_guard=False)
    assert ema._groups[0].cross_device and ema._groups[0].scratch is not None
    ema.update(model)
    assert ema.updates == 1 and ema.shadow_state_dict()["0.weight"].device.type == "meta"


def test_state_dict_roundtrip_weights_only_and_mismatch_errors():
    model = _net()
    ema = ModelEma(model, decays=[0.9, 0.99], schedule="timm", schedule_kwargs={"power": 0.75})
    for _ in range(3):
        ema.update(model)
    buf = io.BytesIO()
    torch.save(ema.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    fresh = ModelEma(_net(), decays=[0.9, 0.99], schedule="timm", schedule_kwargs={"power": 0.75})
    fresh.load_state_dict(state)
    assert fresh.updates == 3 and fresh.current_decays() == ema.current_decays()
    for i in range(2):
        for k, v in ema.shadow_state_dict(i).items():
            assert torch.equal(v, fresh.shadow_state_dict(i)[k])
    with pytest.raises(ValueError, match=r"decays: checkpoint \[0.9, 0.99\] vs this EMA \[0.9\]"):
        ModelEma(_net(), decay=0.9, schedule="timm").load_state_dict(state)
    with pytest.raises(ValueError, match="schedule: checkpoint timm"):
        ModelEma(_net(), decays=[0.9, 0.99]).load_state_dict(state)
    other = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"missing from checkpoint \[\]"):
        ModelEma(other, decays=[0.9, 0.99], schedule="timm",
                 schedule_kwargs={"power": 0.75}).load_state_dict(state)  # fmt: skip


def test_rebinds_after_module_to_and_explicit_bind():
    model = _net()
    ema = ModelEma(model, decay=0.5, schedule="constant")
    model = model.to(torch.float64)  # buffers replaced, parameter .data swapped
    with torch.no_grad():
        model[0].weight.fill_(2.0)
    ema.update(model)
    assert ema._groups[0].scratch is not None  # now staged from float64
    model[2] = nn.Linear(4, 2)  # surgery is not detected by the sentinels: bind explicitly
    ema.bind(model)
    assert any(t is model[2].weight for g in ema._groups for t in g.model)
