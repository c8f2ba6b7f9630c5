"""EMA batch scaling: 1 and 2 workers at the same ema.reference_batch average the same images."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from raydetr.config import ConfigError, load_config
from raydetr.ema.ema import ModelEma
from raydetr.ema.scaling import scale_for_batch


def _shadow_after(decay: float, steps: int) -> float:
    """A real ModelEma (constant decay) of a weight that jumps from 0 to 1 before the first
    step: its shadow after ``steps`` updates."""
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = ModelEma(model, decays=[decay], schedule="constant")
    with torch.no_grad():
        model.weight.fill_(1.0)
    for _ in range(steps):
        ema.update(model)
    return ema.shadow_state_dict(0)["weight"].item()


def test_known_scaled_decays_and_tau():
    s = scale_for_batch([0.99, 0.999], 100, effective_batch=8, reference_batch=4)  # k = 2
    assert s.decays == pytest.approx([0.9801, 0.998001], rel=1e-12) and s.tau == 50
    assert "k = 8/4 = 2" in s.describe()
    half = scale_for_batch([0.99], 100, effective_batch=2, reference_batch=4)  # k = 1/2
    assert half.decays == pytest.approx([0.99498743710662], rel=1e-12) and half.tau == 200


def test_one_and_two_workers_average_the_same_images():
    # 400 images after the jump: one worker (batch 4) takes 100 steps at the reference decay
    # 0.99, so the shadow holds 1 - 0.99**100 = 0.633968 of the new weight. Two workers
    # (batch 8) take 50 steps; with ema.reference_batch=4 they use the scaled decay and land
    # on the same value, while the unscaled decay would hold only 1 - 0.99**50 = 0.394994.
    one = scale_for_batch([0.99], 100, effective_batch=4, reference_batch=4)
    two = scale_for_batch([0.99], 100, effective_batch=8, reference_batch=4)
    assert _shadow_after(one.decays[0], 100) == pytest.approx(0.633968, abs=1e-6)
    assert _shadow_after(two.decays[0], 50) == pytest.approx(0.633968, abs=1e-6)
    assert _shadow_after(0.99, 50) == pytest.approx(0.394994, abs=1e-6)


def test_unset_reference_batch_changes_nothing():
    s = scale_for_batch([0.99, 0.999], 100, 32, None)
    assert s.decays == [0.99, 0.999] and s.k == 1.0 and "not scaled" in s.describe()


def test_config_validation():
    cfg = load_config(None, ["ema.reference_batch=8", "ema.posthoc.enabled=true"])
    assert cfg.ema.reference_batch == 8 and cfg.ema.posthoc.sigma_rels == [0.05, 0.10]
    with pytest.raises(ConfigError, match="ema.reference_batch"):
        load_config(None, ["ema.reference_batch=0"])
    with pytest.raises(ConfigError, match="ema.posthoc.sigma_rels"):
        load_config(None, ["ema.posthoc.sigma_rels=[0.05]"])
    with pytest.raises(ConfigError, match="ema.posthoc.sigma_rels"):
        load_config(None, ["ema.posthoc.sigma_rels=[0.05,0.3]"])
    with pytest.raises(ConfigError, match="ema.posthoc.every_steps"):
        load_config(None, ["ema.posthoc.every_steps=0"])
