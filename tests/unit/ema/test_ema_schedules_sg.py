"""SuperGradients' custom EMA decay forms, named by import path, give SuperGradients' values.

Expected values come from SuperGradients' published equations (EMA.md and
training/utils/ema_decay_schedules.py): linear = decay * step / total_steps,
exp = decay * (1 - exp(-beta * step / total_steps)), threshold = min(decay, (1 + step) / (10 + step)),
with its trainer's convention step = batch_idx + 1 + len(loader) * epoch and
total_steps = len(loader) * max_epochs (sg_trainer.py ``_backward_step``).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from raydetr.config import load_config
from raydetr.ema.ema import ModelEma
from raydetr.ema.schedules import get_schedule, register_schedule, schedule_form

HERE = Path(__file__).parent


@pytest.fixture(autouse=True)
def forms_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))


def test_forms_are_told_apart():
    import sg_decay_forms as m

    assert schedule_form(m.LinearDecay) == "sg_class"
    assert schedule_form(m.linear) == "sg_function"
    assert schedule_form(lambda updates, *, decay: decay) == "raydetr"


@pytest.mark.parametrize("step", [1, 7, 250, 1000])
def test_values_equal_supergradients_equations(step):
    total, c = 1000, 0.9999
    lin = c * step / total
    assert get_schedule("sg_decay_forms:LinearDecay", c, total_steps=total)(step) == lin
    assert get_schedule("sg_decay_forms:linear", c, total_steps=total)(step) == lin
    exp = c * (1 - math.exp(-15 * step / total))
    assert get_schedule("sg_decay_forms:ExpDecay", c, total_steps=total, beta=15)(step) == (
        pytest.approx(exp, rel=1e-12))
    thr = min(c, (1 + step) / (10 + step))
    assert get_schedule("sg_decay_forms:threshold", c, total_steps=total)(step) == thr
    # the same numbers as raydetr's own SuperGradients ports (threshold, exp)
    assert get_schedule("threshold", c)(step) == pytest.approx(thr)
    assert get_schedule("exp", c, total_steps=total, beta=15)(step) == pytest.approx(exp)


def test_shadow_equals_supergradients_update_loop():
    """ModelEma over 3 epochs of 4 batches == SuperGradients' ModelEMA.update loop with its
    trainer's step / total_steps, for the class and the plain-function form."""
    epochs, per_epoch, c = 3, 4, 0.9
    weights = [0.5 * k - 1.0 for k in range(epochs * per_epoch)]  # the model after each step
    for path in ("sg_decay_forms:LinearDecay", "sg_decay_forms:linear"):
        model = nn.Linear(1, 1, bias=False)
        with torch.no_grad():
            model.weight.fill_(2.0)
        ema = ModelEma(model, decay=c, schedule=path, total_steps=epochs * per_epoch)
        expected = 2.0  # SuperGradients: ema_v = ema_v * d + (1 - d) * model_v
        for epoch in range(epochs):
            for batch_idx in range(per_epoch):
                global_step = batch_idx + 1 + per_epoch * epoch
                w = weights[global_step - 1]
                with torch.no_grad():
                    model.weight.fill_(w)
                ema.update(model)
                d = c * global_step / (per_epoch * epochs)
                expected = expected * d + (1 - d) * w
        got = ema.shadow_state_dict(0)["weight"].item()
        assert got == pytest.approx(expected, rel=1e-6), path


def test_config_accepts_both_forms_and_names_what_is_missing():
    cfg = load_config(None, ["ema.schedule=sg_decay_forms:LinearDecay"])
    assert cfg.ema.schedule == "sg_decay_forms:LinearDecay"
    load_config(None, ["ema.schedule=sg_decay_forms:linear"])
    load_config(None, ["ema.schedule=sg_decay_forms:ExpDecay", "ema.schedule_kwargs={beta: 15}"])
    with pytest.raises(ValueError, match="ExpDecay' needs beta in ema.schedule_kwargs"):
        load_config(None, ["ema.schedule=sg_decay_forms:ExpDecay"])


def test_wrong_arity_is_refused(tmp_path, monkeypatch):
    (tmp_path / "rdt_bad_sg.py").write_text(
        "class Two:\n"
        "    def __init__(self, **kw):\n        pass\n"
        "    def __call__(self, decay, step):\n        return decay\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match=r"__call__ must take \(decay, step, total_steps\)"):
        get_schedule("rdt_bad_sg:Two", 0.9, total_steps=10)


def test_registered_supergradients_class():
    import sg_decay_forms as m

    register_schedule("test_sg_linear")(m.LinearDecay)
    assert get_schedule("test_sg_linear", 0.8, total_steps=4)(2) == pytest.approx(0.4)
