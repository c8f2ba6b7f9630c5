"""Checkpoints keep both winners for ANY metric sequence, and storage does not grow.

A real Ray TorchTrainer run drives the production checkpoint code (update_bests,
write_checkpoint, CheckpointConfig(num_to_keep=1)) with a scripted mAP sequence. The model's
weights encode the epoch (regular = epoch, EMA = 100 + epoch), so the files left in storage
say exactly which epoch they came from. Epochs are numbered from 1, as the worker numbers them
(``epoch_0001`` holds the first epoch).
"""

from __future__ import annotations

import random
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from raydetr.artifacts import load_weights
from raydetr.ema.shadow import Shadow
from raydetr.fit.postfit import strip_winner
from raydetr.train.checkpoint import (
    Bests,
    BestWeightsCache,
    checkpoint_dirs,
    latest_checkpoint,
    read_bests,
    read_state,
    update_bests,
    write_checkpoint,
)

MAP = [0.30, 0.50, 0.40, 0.45, 0.42, 0.41, 0.20]
MAP_EMA = [0.20, 0.35, 0.52, 0.55, 0.58, 0.60, 0.10]


def _weights(value: float) -> dict[str, torch.Tensor]:
    return {"w": torch.full((4, 4), float(value)), "b": torch.full((4,), float(value))}


def _epoch(bests, cache, epoch, m, me, out: Path) -> Path:
    update_bests(bests, cache, epoch=epoch, map_regular=m, map_ema=me, shadow=Shadow(0, 0.993, 0.993),
                 regular_weights=lambda: _weights(epoch), ema_weights=lambda: _weights(100 + epoch))
    return write_checkpoint(out, state={"epoch": epoch, "history": []}, bests=bests, cache=cache)


@pytest.mark.parametrize("seed", range(25))
def test_any_sequence_keeps_both_bests(tmp_path, seed):
    """Property over random sequences, with Ray's keep-latest-only storage simulated."""
    rng = random.Random(seed)
    n = rng.randint(1, 12)
    maps = [round(rng.random(), 2) for _ in range(n)]
    emas = [round(rng.random(), 2) for _ in range(n)]
    bests, cache = Bests(), BestWeightsCache(tmp_path / "cache")
    storage = tmp_path / "storage"
    for e in range(1, n + 1):
        ckpt = _epoch(bests, cache, e, maps[e - 1], emas[e - 1], storage / f"epoch_{e:04d}")
        for old in checkpoint_dirs(storage):  # num_to_keep=1
            if old != ckpt:
                import shutil

                shutil.rmtree(old)
    assert len(checkpoint_dirs(storage)) == 1
    last = latest_checkpoint(storage)
    best_reg = max(range(1, n + 1), key=lambda e: (maps[e - 1], -e))
    best_ema = max(range(1, n + 1), key=lambda e: (emas[e - 1], -e))
    assert load_weights(last / "best_regular.safetensors")["w"][0, 0] == best_reg
    assert load_weights(last / "best_ema.safetensors")["w"][0, 0] == 100 + best_ema
    assert last.name == f"epoch_{n:04d}" and read_state(last)["epoch"] == n


def _train_fn(config):
    import ray.train

    bests, cache = Bests(), BestWeightsCache(Path(tempfile.mkdtemp()))
    for epoch, (m, me) in enumerate(zip(MAP, MAP_EMA), start=1):
        out = Path(tempfile.mkdtemp())
        update_bests(bests, cache, epoch=epoch, map_regular=m, map_ema=me, shadow=Shadow(0, 0.993, 0.993),
                     regular_weights=lambda e=epoch: _weights(e),
                     ema_weights=lambda e=epoch: _weights(100 + e))
        history = [{"epoch": i + 1, "map": MAP[i], "map_ema": MAP_EMA[i]} for i in range(epoch)]
        write_checkpoint(out, state={"epoch": epoch, "history": history, "classes": ["a"],
                                     "config": config["cfg"]}, bests=bests, cache=cache)
        ray.train.report({"epoch": epoch, "map": m, "map_ema": me},
                         checkpoint=ray.train.Checkpoint.from_directory(str(out)),
                         checkpoint_dir_name=f"epoch_{epoch:04d}")


@pytest.mark.slow
def test_scripted_sequence_under_ray(tmp_path):
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from raydetr.config import Config

    cfg = Config().to_dict()
    # Workers cannot import this test module: ship _train_fn's code with it.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        trainer = TorchTrainer(
            _train_fn, train_loop_config={"cfg": cfg},
            scaling_config=ray.train.ScalingConfig(num_workers=1),
            run_config=ray.train.RunConfig(
                name="bests", storage_path=str(tmp_path),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1)),
        )
        trainer.fit()
    finally:
        ray.shutdown()
    train_dir = tmp_path / "bests"
    kept = checkpoint_dirs(train_dir)
    assert [p.name for p in kept] == ["epoch_0007"], "storage must not grow with epochs"
    last = latest_checkpoint(train_dir)
    assert last.name == "epoch_0007"  # the 7th (last) epoch
    assert load_weights(last / "best_regular.safetensors")["w"][0, 0] == 2  # map .50 @ epoch 2
    assert load_weights(last / "best_ema.safetensors")["w"][0, 0] == 106  # ema .60 @ epoch 6
    bests = read_bests(last)
    assert (bests.regular.epoch, bests.ema.epoch, bests.winner()) == (2, 6, "ema")
    # The post-fit strips that winner: the EMA weights of epoch 6.
    winner = tmp_path / "winner"
    meta = strip_winner(last, winner, dataset="scripted").meta
    assert meta.variant == "ema" and meta.epoch == 6
    assert load_weights(winner / "model.safetensors")["w"][0, 0] == 106
    assert meta.metrics["map"] == pytest.approx(0.60)
