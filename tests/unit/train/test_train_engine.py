import numpy as np
import pytest
import torch
from detr_shapes import batches, make_images
from torch import nn

from raydetr.config import LossConfig, ModelConfig, OptimConfig
from raydetr.model.build import build
from raydetr.train.engine import NonFiniteLossError, predict_records, train_one_epoch
from raydetr.train.optim import build_lr_scheduler, build_optimizer


class TinyDetector(nn.Module):
    """No batch-dependent layers: per-image outputs depend only on that image."""

    def __init__(self, q=5, c=2):
        super().__init__()
        self.q, self.c = q, c
        self.backbone = nn.Linear(3 * 4 * 4, 16)
        self.head = nn.Linear(16, q * (c + 4))

    def forward(self, images, targets=None):
        x = nn.functional.adaptive_avg_pool2d(images, 4).flatten(1)
        y = self.head(torch.relu(self.backbone(x))).view(-1, self.q, self.c + 4)
        return {"pred_logits": y[..., :self.c], "pred_boxes": y[..., self.c:].sigmoid()}


def _criterion():
    _, criterion, _ = build(ModelConfig(preset="rtdetr-r18", num_denoising=0), LossConfig(), 2)
    return criterion


def _data(n=4):
    return make_images(n, size=32, seed=3, num_classes=2)


def _train(accum, batch_size, items, with_ema=False):
    torch.manual_seed(0)
    model = TinyDetector()
    cfg = OptimConfig(lr=1e-2, lr_encoder=1e-2, warmup_steps=0, epochs=1)
    opt = build_optimizer(model, cfg)
    sched = build_lr_scheduler(opt, cfg, 1)

    class CountingEma:
        calls = []

        def update(self, m, finite=None):
            self.calls.append(opt.state[next(iter(opt.state))]["step"].item() if opt.state else 0)

    ema = CountingEma() if with_ema else None
    stats = train_one_epoch(model, _criterion(), batches(items, batch_size, size=32), opt, sched,
                            device="cpu", epoch=0, grad_accum_steps=accum, clip_max_norm=0.0,
                            ema=ema)
    return model, stats, ema


def test_grad_accumulation_equals_full_batch():
    """2 micro-batches of 1 == 1 batch of 2 (model without batch-dependent layers).

    The criterion normalises by the boxes of the batch it sees, and each micro-loss is scaled by
    1/2, so the two are exactly equivalent when both images hold the same number of boxes.
    """
    items = _data(12)
    by_count = {}
    for it in items:
        by_count.setdefault(len(it["labels"]), []).append(it)
    pair = next(v[:2] for v in by_count.values() if len(v) >= 2)
    assert not torch.equal(pair[0]["image"], pair[1]["image"])
    m_full, s_full, _ = _train(1, 2, pair)
    m_acc, s_acc, _ = _train(2, 1, pair)
    assert s_full["steps"] == 1 and s_acc["steps"] == 1 and s_acc["images"] == 2
    torch.manual_seed(0)
    init = TinyDetector().state_dict()
    for (n, a), (_, b) in zip(m_full.named_parameters(), m_acc.named_parameters()):
        assert not torch.allclose(a, init[n]), f"{n} did not move"
        assert torch.allclose(a, b, atol=1e-6), n


def test_partial_final_accumulation_steps_and_ema_after_step():
    items = _data(3)
    _, stats, ema = _train(2, 1, items, with_ema=True)
    assert stats["steps"] == 2 and stats["images"] == 3
    assert ema.calls == [1, 2]  # called after each optimizer.step, never between micro-steps


def test_non_finite_loss_raises_with_context():
    model = TinyDetector()
    with torch.no_grad():
        model.head.bias.fill_(float("nan"))
    opt = build_optimizer(model, OptimConfig())
    with pytest.raises(NonFiniteLossError, match=r"epoch 7.*image ids \[0, 1\].*loss_cls"):
        train_one_epoch(model, _criterion(), batches(_data(2), 2, size=32), opt, None,
                        device="cpu", epoch=7)


def test_predict_records_frames_and_variants():
    items = _data(3)
    model = TinyDetector().eval()
    _, _, post = build(ModelConfig(preset="rtdetr-r18"), LossConfig(), 2)
    recs = predict_records({"regular": model, "ema": model}, post, batches(items, 2, size=32),
                           "cpu")
    assert set(recs) == {"regular", "ema"} and len(recs["ema"]) == 3
    r = recs["regular"][0]
    assert r["image_id"] == 0 and (r["width"], r["height"]) == (32, 32)
    assert r["boxes"].dtype == np.float32 and r["boxes"].shape == (10, 4)
    gt = items[0]["boxes"][0].numpy()
    expect = np.array([gt[0] - gt[2] / 2, gt[1] - gt[3] / 2, gt[0] + gt[2] / 2, gt[1] + gt[3] / 2]) * 32
    assert np.allclose(r["gt_boxes"][0], expect, atol=1e-4)
    assert np.array_equal(recs["regular"][1]["scores"], recs["ema"][1]["scores"])
