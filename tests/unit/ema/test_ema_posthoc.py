"""Post-hoc EMA maths (EDM2 sec. 3 / appendix C) against closed forms and direct tracking."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from raydetr.config import PosthocConfig
from raydetr.ema.ema import ModelEma
from raydetr.ema.posthoc import (
    PosthocTracker,
    gamma_to_sigma_rel,
    gram_matrix,
    list_snapshots,
    load_snapshot,
    profile_inner,
    reconstruct,
    snapshot_every,
    snapshot_steps,
    solve_coefficients,
)
from raydetr.ema.schedules import sigma_rel_to_gamma


@pytest.mark.parametrize("sigma_rel", [0.01, 0.05, 0.07, 0.1, 0.2, 0.27])
def test_gamma_sigma_rel_round_trip(sigma_rel):
    gamma = sigma_rel_to_gamma(sigma_rel)
    assert gamma > -1
    assert gamma_to_sigma_rel(gamma) == pytest.approx(sigma_rel, rel=1e-10)


def test_known_gammas():
    # gamma 0 (uniform average) has sigma_rel = sqrt(1 / (4 * 3)); EDM2 (sec. 3.1) pairs
    # sigma_rel 0.05 with gamma 16.97 and 0.10 with gamma 6.94.
    assert gamma_to_sigma_rel(0.0) == pytest.approx(math.sqrt(1 / 12))
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.01)
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.01)


def _profile(t: float, gamma: float, tau: np.ndarray) -> np.ndarray:
    return np.where(tau <= t, (gamma + 1) * tau**gamma / t ** (gamma + 1), 0.0)


@pytest.mark.parametrize("ta,ga,tb,gb", [(1.0, 6.94, 1.0, 16.97), (0.4, 6.94, 1.0, 6.94),
                                         (1.0, 0.5, 0.3, 16.97), (0.7, 2.0, 0.7, 2.0)])
def test_inner_product_matches_numeric_integral(ta, ga, tb, gb):
    tau = np.linspace(0.0, 1.0, 2_000_001)
    numeric = np.trapezoid(_profile(ta, ga, tau) * _profile(tb, gb, tau), tau)
    assert profile_inner(ta, ga, tb, gb) == pytest.approx(numeric, rel=1e-4)


def test_inner_product_scales_as_one_over_time():
    # Step counts in the millions must neither overflow nor change the solution.
    assert profile_inner(3e6, 16.97, 1e6, 6.94) * 1e6 == pytest.approx(
        profile_inner(3.0, 16.97, 1.0, 6.94))


def test_gram_matrix_symmetric_positive_definite():
    ts = [0.25, 0.5, 0.75, 1.0] * 2
    gs = [6.94] * 4 + [16.97] * 4
    a = gram_matrix(ts, gs)
    assert np.allclose(a, a.T)
    assert np.linalg.eigvalsh(a).min() > 0
    assert a[3, 7] == pytest.approx(profile_inner(1.0, 6.94, 1.0, 16.97))


def test_coefficients_sum_to_one_and_pick_a_tracked_profile():
    ts = [10, 20, 30, 40, 10, 20, 30, 40]
    gs = [sigma_rel_to_gamma(0.05)] * 4 + [sigma_rel_to_gamma(0.10)] * 4
    x = solve_coefficients(ts, gs, 40, sigma_rel_to_gamma(0.07))
    assert x.sum() == pytest.approx(1.0)
    # The target IS the last 0.10 snapshot: all weight on it.
    x = solve_coefficients(ts, gs, 40, sigma_rel_to_gamma(0.10))
    assert x[7] == pytest.approx(1.0, abs=1e-6)
    assert np.abs(np.delete(x, 7)).max() < 1e-6


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 4)
        self.bn = nn.BatchNorm1d(4)


def _train(tracker: PosthocTracker, direct: ModelEma, steps: int) -> nn.Module:
    torch.manual_seed(0)
    model = tracker._model_for_test  # type: ignore[attr-defined]
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(1, steps + 1):
        x = torch.randn(16, 8)
        loss = (model.bn(model.lin(x)) - torch.sin(x[:, :4] * step / 50)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        tracker.after_step(model, step)
        direct.update(model)
    return model


def test_reconstruction_matches_directly_tracked_power_ema(tmp_path):
    """With the default snapshot count (ema.posthoc.snapshots over the run's 400 steps)."""
    torch.manual_seed(0)
    model = _Tiny()
    every = snapshot_every(400, PosthocConfig().snapshots)
    tracker = PosthocTracker(model, (0.05, 0.10), every_steps=every, out_dir=tmp_path)
    tracker._model_for_test = model  # type: ignore[attr-defined]
    direct = ModelEma(model, decay=1 - 1e-15, schedule="power",
                      schedule_kwargs={"sigma_rel": 0.07})
    _train(tracker, direct, 400)
    tracker.snapshot(400)  # the run's last step (the worker writes it)
    snaps = list_snapshots(tmp_path)
    assert len(snaps) == 2 * PosthocConfig().snapshots == 2 * len(snapshot_steps(400, every))
    assert {s.sigma_rel for s in snaps} == {0.05, 0.10}
    assert sum(p.stat().st_size for p in tmp_path.iterdir()) == pytest.approx(
        tracker.run_nbytes(400), abs=len(snaps) * 4096)  # + one small header per file
    weights, info = reconstruct(snaps, 0.07)
    assert sum(info["coefficients"]) == pytest.approx(1.0)
    target = direct.shadow_state_dict(0)
    num = sum(float((weights[k] - target[k]).pow(2).sum()) for k in target
              if target[k].is_floating_point())
    den = sum(float(target[k].pow(2).sum()) for k in target if target[k].is_floating_point())
    assert math.sqrt(num / den) < 1e-3
    # A profile that was tracked is returned as is.
    same, _ = reconstruct(snaps, 0.10)
    last = load_snapshot(snaps[-1].path)
    for k, v in last.items():
        torch.testing.assert_close(same[k], v, atol=1e-5, rtol=1e-5)


def test_tracker_resume_is_exact(tmp_path):
    torch.manual_seed(0)
    model = _Tiny()
    a = PosthocTracker(model, (0.05, 0.10), every_steps=3, out_dir=tmp_path / "a")
    for step in range(1, 8):
        with torch.no_grad():
            model.lin.weight.add_(0.1)
        a.after_step(model, step)
    b = PosthocTracker(model, (0.05, 0.10), every_steps=3, out_dir=tmp_path / "a")
    b.load_state_dict(a.state_dict())
    assert b.updates == 7 and b.written == [3, 6]
    for k, v in a.shadow_state_dict(1).items():
        torch.testing.assert_close(b.shadow_state_dict(1)[k], v)
    with pytest.raises(ValueError, match="sigma_rels"):
        PosthocTracker(model, (0.05, 0.2), 3, tmp_path).load_state_dict(a.state_dict())


def test_bf16_snapshots_halve_bytes(tmp_path):
    model = _Tiny()
    f32 = PosthocTracker(model, (0.05, 0.10), 1, tmp_path / "f32")
    b16 = PosthocTracker(model, (0.05, 0.10), 1, tmp_path / "b16", bf16=True)
    f32.after_step(model, 1)
    b16.after_step(model, 1)
    w = load_snapshot(next((tmp_path / "b16").glob("*.safetensors")))
    assert w["lin.weight"].dtype == torch.bfloat16
    assert w["bn.num_batches_tracked"].dtype == torch.int64


def test_snapshot_budget_is_bounded_by_the_count_not_the_epochs():
    assert snapshot_every(400, 16) == 25 and len(snapshot_steps(400, 25)) == 16
    # 100 epochs x 1234 steps: 16 per profile, the last at the run's end
    steps = snapshot_steps(123_400, snapshot_every(123_400, 16))
    assert len(steps) == 16 and steps[-1] == 123_400
    assert snapshot_steps(10, 4) == [4, 8, 10]  # the grid falls short: the end adds one
    with pytest.raises(ValueError, match="snapshots"):
        snapshot_every(10, 0)
