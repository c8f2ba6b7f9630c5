"""The rtdetr-r18 detector must memorise a handful of images: a cheap end-to-end learning check
(model + matcher + criterion + optimizer + engine + postprocessor + COCO evaluation)."""

import time

import pytest
import torch
from detr_shapes import batches, make_images

from raydetr.config import LossConfig, ModelConfig, OptimConfig
from raydetr.model.build import build
from raydetr.train.engine import evaluate, train_one_epoch
from raydetr.train.optim import build_lr_scheduler, build_optimizer


@pytest.mark.slow
def test_nano_overfits_eight_images():
    torch.manual_seed(0)
    items = make_images(8, size=128, seed=0, num_classes=2)
    classes = ["rectangle", "ellipse"]
    max_epochs = 40
    cfg = OptimConfig(lr=1e-3, lr_encoder=1e-3, warmup_steps=10, epochs=max_epochs, batch_size=4)
    model, criterion, post = build(ModelConfig(preset="rtdetr-r18", resolution=128), LossConfig(), 2)
    opt = build_optimizer(model, cfg)
    sched = build_lr_scheduler(opt, cfg, steps_per_epoch=2)
    start = time.process_time()
    history = []
    for epoch in range(max_epochs):
        train_one_epoch(model, criterion, batches(items, 4, shuffle_seed=epoch), opt, sched,
                        device="cpu", epoch=epoch, clip_max_norm=cfg.clip_max_norm)
        if epoch >= 14 and epoch % 5 == 4:
            metrics = evaluate({"regular": model}, post, batches(items, 8), classes, "cpu")
            history.append((epoch, round(metrics["regular"]["map50"], 3)))
            if metrics["regular"]["map50"] >= 0.9:
                break
    cpu_s = time.process_time() - start
    assert history[-1][1] >= 0.9, f"mAP50 per epoch {history} after {cpu_s:.0f} CPU-s"
