"""The training core without Ray: TrainState, EpochResult, the winner rule, one eval model
for every EMA shadow, and what --pretrain-weights resolves to (the early-stopping rule and its
replay: tests/unit/stopping)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from detr_shapes import batches, make_images

from raydetr.artifacts import load_weights
from raydetr.config import LossConfig, ModelConfig, OptimConfig
from raydetr.ema.ema import ModelEma
from raydetr.ema.shadow import Shadow
from raydetr.model.build import build
from raydetr.record import Bests, EpochResult, epoch_number, winner
from raydetr.train.checkpoint import BestWeightsCache, update_bests, write_checkpoint
from raydetr.train.engine import predict_records
from raydetr.train.evaluation import ShadowEvaluator
from raydetr.train.optim import build_lr_scheduler, build_optimizer
from raydetr.train.pretrained import load_pretrained, resolve_pretrained
from raydetr.train.state import TrainState


def _tiny():
    torch.manual_seed(0)
    cfg = ModelConfig(preset="rtdetr-r18", resolution=64, num_queries=10, num_denoising=0)
    return build(cfg, LossConfig(), 2)


def _state(model, ema=None, factory=None):
    opt = build_optimizer(model, OptimConfig(warmup_steps=0, epochs=1))
    return TrainState(model, opt, build_lr_scheduler(opt, OptimConfig(epochs=1), 4), ema=ema,
                      ema_factory=factory)


def _perturb(model, value):
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)


# ------------------------------------------------------------------ winner, record, rule
@pytest.mark.parametrize("reg, ema, expected", [
    (0.4, 0.41, "ema"), (0.4, 0.4, "regular"), (0.4, 0.39, "regular"), (0.4, None, "regular"),
])
def test_winner_rule(reg, ema, expected):
    assert winner(reg, ema) == expected


def test_epoch_result_report_and_winner():
    bests = Bests()
    bests.regular.map, bests.regular.epoch = 0.30, 1
    bests.ema.map, bests.ema.epoch, bests.ema.decay = 0.35, 1, 0.99
    per = {k: 0.1 for k in ("map", "map50", "map75", "mar")}
    # configured 0.9 / 0.99 at a reference batch, run at k=2: names keep the configured decay
    s0, s1 = Shadow(0, 0.9, 0.81), Shadow(1, 0.99, 0.9801)
    r = EpochResult(epoch=epoch_number(0), step=4, regular={**per, "map": 0.30},
                    ema={s0: {**per, "map": 0.2}, s1: {**per, "map": 0.35}}, bests=bests,
                    score=0.35, monitored=0.35, train={"train_loss": 1.0, "lr": 1e-3,
                                                       "images_per_s": 5.0})
    m = r.to_report()
    assert (m["map_ema"], m["map_ema_decay"], m["map_ema@0.9"]) == (0.35, 0.99, 0.2)
    assert m["map_ema_decay_effective"] == 0.9801 and m["map_ema@0.99"] == 0.35
    assert r.best_shadow == s1 and s1.label == "ema@0.99"
    assert (m["best_map"], m["best_map_ema"], m["winner_is_ema"]) == (0.30, 0.35, 1)
    assert r.winner == "ema" and "winner ema" in r.format_line(3)
    # The first epoch is epoch 1 in the report, the bests and the log line alike.
    assert (m["epoch"], m["best_map_epoch"], m["best_map_ema_epoch"]) == (1, 1, 1)
    line = r.format_line(3)
    assert line.startswith("epoch 1/3") and "@1)" in line and "@0)" not in line


# ------------------------------------------------------------------ defect 9
def test_resume_without_ema_starts_shadow_from_loaded_weights():
    """A checkpoint saved with EMA off, resumed with EMA on: the shadow starts from the loaded
    weights (RF-DETR rebuilds its EMA after loading), not from the fresh initialisation."""
    saved_model, _, _ = _tiny()
    _perturb(saved_model, 0.5)
    checkpoint = _state(saved_model).state_dict()
    assert checkpoint["ema"] is None

    fresh, _, _ = _tiny()

    def factory(m):
        return ModelEma(m, decays=[0.9])

    state = _state(fresh, ema=factory(fresh), factory=factory)
    state.load_state_dict(checkpoint)
    shadow = state.ema.shadow_state_dict(0)
    for k, v in fresh.state_dict().items():
        if v.is_floating_point():
            assert torch.equal(shadow[k], v.float()), k
    assert next(iter(shadow.values())).flatten()[0] == 0.5


def test_train_state_round_trip(tmp_path):
    model, _, _ = _tiny()
    state = _state(model, ema=ModelEma(model, decays=[0.9, 0.99]))
    state.epoch, state.step, state.history = 3, 12, [{"epoch": 1}, {"epoch": 2}, {"epoch": 3}]
    state.bests.regular.map, state.bests.regular.epoch = 0.2, 1
    torch.save(state.state_dict(), tmp_path / "s.pt")
    other_model, _, _ = _tiny()
    _perturb(other_model, 0.0)
    other = _state(other_model, ema=ModelEma(other_model, decays=[0.9, 0.99]))
    other.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    assert (other.epoch, other.step, other.next_epoch, len(other.history)) == (3, 12, 4, 3)
    assert other.bests == state.bests
    for k, v in model.state_dict().items():
        assert torch.equal(other_model.state_dict()[k], v)


# ------------------------------------------------------------------ defect 8
@pytest.mark.parametrize("k", [1, 3])
def test_one_eval_model_for_every_shadow(k, capsys):
    """K shadows through one eval model give exactly the records of K separate eval copies,
    and the eval-only copies on the model's device do not grow with K."""
    model, _, post = _tiny()
    decays = [0.5, 0.8, 0.9][:k]
    ema = ModelEma(model, decays=decays, schedule="constant", device="cpu")
    for value in (0.01, 0.02):  # give each shadow different weights
        for p in model.parameters():
            p.data.add_(value * torch.randn_like(p))
        ema.update(model)
    items = make_images(4, size=64, seed=1, num_classes=2)
    evaluator = ShadowEvaluator(model, ema)
    got = evaluator.predict(post, batches(items, 2, size=64), torch.device("cpu"), None)

    copies = {"regular": model}
    for shadow in ema.shadows:
        copies[shadow.label] = ema.load_into(copy.deepcopy(model), shadow.index)
    want = predict_records(copies, post, batches(items, 2, size=64), "cpu")
    for name in want:
        for a, b in zip(got[name], want[name]):
            np.testing.assert_array_equal(a["scores"], b["scores"])
            np.testing.assert_array_equal(a["boxes"], b["boxes"])
    model_bytes = sum(t.numel() * t.element_size()
                      for t in (*model.parameters(), *model.buffers()))
    assert evaluator.model_copies_bytes() == model_bytes  # one copy, whatever K
    old_layout = k * model_bytes  # one deepcopy per decay before
    with capsys.disabled():
        print(f"\n[eval memory] K={k}: eval-only model copies on the model device "
              f"{evaluator.model_copies_bytes()} bytes (one deepcopy per decay: {old_layout})")


# ------------------------------------------------------------------ defect 6
def _checkpoint_with_bests(tmp_path):
    """epoch_0003 whose bests say EMA won (0.6 > 0.5); weights encode which file they are."""
    cache = BestWeightsCache(tmp_path / "cache")
    bests = Bests()
    model, _, _ = _tiny()
    sd = model.state_dict()

    def filled(v):
        return {k: torch.full_like(t, v) if t.is_floating_point() else t for k, t in sd.items()}

    update_bests(bests, cache, epoch=1, map_regular=0.5, map_ema=0.6, shadow=Shadow(0, 0.99, 0.99),
                 regular_weights=lambda: filled(1.0), ema_weights=lambda: filled(2.0))
    ckpt = tmp_path / "run" / "train" / "epoch_0003"
    write_checkpoint(ckpt, state={"model": filled(3.0), "epoch": 3, "history": []}, bests=bests,
                     cache=cache)
    return ckpt


def test_pretrained_takes_the_winner_from_a_checkpoint(tmp_path):
    ckpt = _checkpoint_with_bests(tmp_path)
    for path in (ckpt, ckpt / "state.pt", tmp_path / "run"):
        sd, description = resolve_pretrained(path)
        value = next(v for v in sd.values() if v.is_floating_point()).flatten()[0]
        assert value == 2.0, f"{path}: expected the EMA winner, got {value} ({description})"
        assert "best ema" in description
    model, _, _ = _tiny()
    reinit, _ = load_pretrained(model, ckpt)
    assert reinit == []
    assert next(model.parameters()).flatten()[0] == 2.0


def test_pretrained_winner_dir_and_errors(tmp_path):
    from raydetr.artifacts import save_weights
    from raydetr.train.pretrained import PretrainedError

    model, _, _ = _tiny()
    (tmp_path / "winner").mkdir()
    save_weights(model.state_dict(), tmp_path / "winner" / "model.safetensors")
    sd, _ = resolve_pretrained(tmp_path / "winner")
    assert sd.keys() == load_weights(tmp_path / "winner" / "model.safetensors").keys()
    with pytest.raises(PretrainedError, match="no such file"):
        resolve_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PretrainedError, match="pass a run dir"):
        resolve_pretrained(tmp_path / "empty")


def test_bad_pretrain_path_fails_before_ray(tmp_path):
    import ray

    from raydetr.config import load_config
    from raydetr.fit.cluster import FitError
    from raydetr.fit.driver import fit

    cfg = load_config(None, [f"run.output_dir={tmp_path}", "mlflow.enabled=false"])
    with pytest.raises(FitError, match="--pretrain-weights .*nope: no such file"):
        fit(cfg, pretrain_weights=str(tmp_path / "nope"))
    assert not ray.is_initialized()
