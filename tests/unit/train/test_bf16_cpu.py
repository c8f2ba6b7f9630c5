"""The GPU recipe's dtype handling without a GPU: training steps, evaluation of the regular and
the EMA variant, and a checkpoint, under bf16 autocast on CPU through the engine the workers use
(``amp_dtype`` is what the worker sets on CUDA)."""

import numpy as np
import pytest
import torch

import raydetr.loss.matcher as matcher_module
from raydetr.config import load_config
from raydetr.ema.ema import ModelEma
from raydetr.model.build import build
from raydetr.record import Bests
from raydetr.train.checkpoint import BestWeightsCache, read_state, write_checkpoint
from raydetr.train.engine import train_one_epoch
from raydetr.train.evaluation import ShadowEvaluator
from raydetr.train.optim import build_lr_scheduler, build_optimizer
from raydetr.train.state import TrainState


def _batches(n, size, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        targets = [{"labels": torch.tensor([1, 2]), "boxes": torch.tensor(
            [[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.4]]), "image_id": torch.tensor(2 * i + j),
            "orig_size": torch.tensor([size, size])} for j in range(2)]
        out.append({"images": torch.randn(2, 3, size, size, generator=g), "targets": targets})
    return out


@pytest.mark.parametrize("preset, size", [("rfdetr-nano", 64), ("rtdetr-r18", 64)])
def test_bf16_autocast_steps_eval_and_checkpoint_on_cpu(preset, size, monkeypatch, tmp_path):
    torch.manual_seed(0)
    cfg = load_config(None, [f"model.preset={preset}", f"model.resolution={size}"])
    model, criterion, post = build(cfg.model, cfg.loss, 3)
    optimizer = build_optimizer(model, cfg.optim, preset)
    scheduler = build_lr_scheduler(optimizer, cfg.optim, 2)
    ema = ModelEma(model, decays=[0.9], tau=2)

    cost_dtypes, out_dtypes = [], []
    real_lsa = matcher_module.linear_sum_assignment
    monkeypatch.setattr(matcher_module, "linear_sum_assignment",
                        lambda c: cost_dtypes.append(np.asarray(c).dtype) or real_lsa(c))
    real_forward = criterion.forward

    def spy(outputs, targets):
        out_dtypes.append(outputs["pred_logits"].dtype)
        return real_forward(outputs, targets)
    monkeypatch.setattr(criterion, "forward", spy)

    stats = train_one_epoch(model, criterion, _batches(2, size), optimizer, scheduler,
                            device="cpu", epoch=1, ema=ema, amp_dtype=torch.bfloat16)
    assert stats["steps"] == 2 and np.isfinite(stats["train_loss"])
    assert set(out_dtypes) == {torch.bfloat16}            # the model ran under autocast ...
    assert cost_dtypes and set(cost_dtypes) == {np.dtype(np.float32)}  # ... the matcher did not
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(t.dtype == torch.float32 for t in ema.shadow_state_dict(0).values()
               if t.is_floating_point())

    evaluator = ShadowEvaluator(model, ema)
    records = evaluator.predict(post, _batches(1, size, seed=1), torch.device("cpu"),
                                torch.bfloat16, top_k=10)
    assert set(records) == {"regular", "ema@0.9"}
    for recs in records.values():
        assert len(recs) == 2
        for r in recs:
            assert r["scores"].dtype == np.float32 and np.isfinite(r["boxes"]).all()
            assert len(r["scores"]) == 10
    assert not np.allclose(records["regular"][0]["scores"], records["ema@0.9"][0]["scores"])

    state = TrainState(model=model, optimizer=optimizer, lr_scheduler=scheduler, ema=ema)
    cache = BestWeightsCache(tmp_path / "cache")
    cache.update("ema", ema.shadow_state_dict(0))
    write_checkpoint(tmp_path / "epoch_0001", state=state.state_dict(), bests=Bests(), cache=cache)
    saved = read_state(tmp_path / "epoch_0001")
    floats = [t for t in saved["model"].values() if t.is_floating_point()]
    assert floats and all(t.dtype == torch.float32 for t in floats)

    def tensors(x):
        if isinstance(x, torch.Tensor):
            yield x
        elif isinstance(x, dict):
            for v in x.values():
                yield from tensors(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                yield from tensors(v)
    ema_floats = [t for t in tensors(saved["ema"]) if t.is_floating_point()]
    assert ema_floats and all(t.dtype == torch.float32 for t in ema_floats)
