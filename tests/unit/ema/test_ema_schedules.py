"""EMA decay schedules: values from the published formulas, registry behaviour."""

from __future__ import annotations

import math

import pytest

from raydetr.ema.schedules import (
    available_schedules,
    get_schedule,
    register_schedule,
    sigma_rel_to_gamma,
)


def test_reference_values():
    # Ultralytics (c=0.9999, tau=2000) at 2000 updates: 0.9999 * (1 - e^-1)
    assert get_schedule("rfdetr", 0.9999, tau=2000)(2000) == pytest.approx(0.632057, abs=1e-6)
    # timm ModelEmaV3, step = updates: step 10 -> s = 9 -> 1 - 10^(-2/3)
    assert get_schedule("timm", 0.9999)(10) == pytest.approx(0.784557, abs=1e-6)
    # SuperGradients exp, s = updates (its global step counts from 1): s / T = 0.1
    assert get_schedule("exp", 0.9999, total_steps=1000)(100) == pytest.approx(0.776792, abs=1e-6)


def test_first_update_matches_supergradients():
    """SuperGradients' trainer passes step = batch_idx + 1 + len(loader) * epoch, so its first
    EMA update uses step 1: threshold 2/11 = 0.1818, exp (decay 0.9999, beta 15, 10000 steps)
    0.9999 * (1 - exp(-15/10000)) = 0.0014987 (0.0015)."""
    assert get_schedule("threshold", 0.9999)(1) == pytest.approx(0.181818, abs=1e-6)
    first = get_schedule("exp", 0.9999, total_steps=10000, beta=15)(1)
    assert first == pytest.approx(0.00149873, abs=1e-8)
    assert round(first, 4) == 0.0015


@pytest.mark.parametrize("n", [1, 2, 7, 100, 5000])
def test_formulas(n):
    c = 0.999
    assert get_schedule("constant", c)(n) == c
    assert get_schedule("rfdetr", c, tau=50)(n) == pytest.approx(c * (1 - math.exp(-n / 50)))
    s = n - 1
    timm = 0.0 if s == 0 else min(c, 1 - (1 + s / 2.0) ** -0.75)
    assert get_schedule("timm", c, gamma=2.0, power=0.75)(n) == pytest.approx(timm)
    # SuperGradients' step counts from 1: step = n.
    assert get_schedule("threshold", c)(n) == pytest.approx(min(c, (1 + n) / (10 + n)))
    exp = c * (1 - math.exp(-10 * n / 4000))
    assert get_schedule("exp", c, total_steps=4000, beta=10)(n) == pytest.approx(exp)
    assert get_schedule("power", 0.99999, gamma=6.94)(n) == pytest.approx((1 - 1 / n) ** 7.94)


def test_timm_options():
    sched = get_schedule("timm", 0.9, update_after_step=5, min_decay=0.2)
    assert [sched(n) for n in (1, 6)] == [0.0, 0.0]  # s = 0 up to update_after_step + 1
    assert sched(7) == pytest.approx(1 - 2 ** (-2 / 3))  # s = 1
    assert get_schedule("timm", 0.9, min_decay=0.5)(2) == pytest.approx(0.5)
    assert get_schedule("timm", 0.9)(10**6) == 0.9


def test_sigma_rel_to_gamma_matches_edm2():
    # EDM2 (Karras et al. 2024): sigma_rel 0.05 <-> gamma 16.97, 0.10 <-> 6.94
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.01)
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.01)
    g = sigma_rel_to_gamma(0.07)
    assert math.sqrt((g + 1) / ((g + 2) ** 2 * (g + 3))) == pytest.approx(0.07)
    assert get_schedule("power", 0.99999, sigma_rel=0.10)(20) == pytest.approx(
        (1 - 1 / 20) ** (sigma_rel_to_gamma(0.10) + 1)
    )
    assert get_schedule("power", 0.5, gamma=6.94)(10**6) == 0.5  # capped by the peak decay


def test_errors_are_clear():
    with pytest.raises(ValueError, match="unknown EMA schedule 'nope'.*constant.*rfdetr.*timm"):
        get_schedule("nope", 0.9)
    with pytest.raises(ValueError, match="needs total_steps"):
        get_schedule("exp", 0.9)
    with pytest.raises(ValueError, match="unexpected keyword argument 'taux'.*accepts: tau"):
        get_schedule("rfdetr", 0.9, taux=3)
    with pytest.raises(ValueError, match="tau must be > 0"):
        get_schedule("rfdetr", 0.9, tau=0)
    with pytest.raises(ValueError, match="counts from 1"):
        get_schedule("constant", 0.9)(0)


def test_register_custom_schedule():
    @register_schedule("test_linear_warmup")
    def linear(updates: int, *, decay: float, warmup: int = 10) -> float:
        return decay * min(1.0, updates / warmup)

    assert "test_linear_warmup" in available_schedules()
    assert get_schedule("test_linear_warmup", 0.9, warmup=4)(2) == pytest.approx(0.45)
    with pytest.raises(ValueError, match="already registered"):
        register_schedule("test_linear_warmup")(lambda updates, *, decay: decay)


def test_import_path_schedule(tmp_path, monkeypatch):
    """``ema.schedule=pkg.module:fn`` needs no registration; it gets total_steps from ModelEma."""
    (tmp_path / "rdt_custom_decay.py").write_text(
        "def linear(updates, *, decay, total_steps):\n"
        "    return decay * min(1.0, updates / total_steps)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    sched = get_schedule("rdt_custom_decay:linear", 0.9, total_steps=10)
    assert sched(5) == pytest.approx(0.45)
    with pytest.raises(ValueError, match="cannot import module 'rdt_nope'"):
        get_schedule("rdt_nope:linear", 0.9)
    with pytest.raises(ValueError, match="has no function 'quadratic'"):
        get_schedule("rdt_custom_decay:quadratic", 0.9)
