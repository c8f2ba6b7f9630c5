"""Checkpoint folders: the full resume state plus the best-so-far weights of both variants.

Ray keeps the latest checkpoint plus the top K by one fixed score, and no single score keeps both
the best-regular and the best-EMA weights for every metric sequence. So every ``epoch_NNNN``
folder is self-sufficient::

    epoch_0007/                 the 7th epoch (numbered from 1)
      state.pt                  resume state (torch.load(weights_only=True)-safe)
      best_regular.safetensors  best-so-far regular weights (unwrapped model keys)
      best_ema.safetensors      best-so-far EMA weights (best over every EMA decay)
      bests.json                which epoch / decay / mAP each best file holds

and ``CheckpointConfig(num_to_keep=K)`` bounds storage: it does not grow with epochs. The best
files are serialised only when they change: rank 0 keeps them in a local cache folder and
hard-links them into each new checkpoint (a copy where the filesystem cannot link).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from raydetr.artifacts import atomic_write_json, save_weights
from raydetr.ema.shadow import Shadow
from raydetr.record import Best, Bests

STATE_FILE = "state.pt"
BEST_FILES = {"regular": "best_regular.safetensors", "ema": "best_ema.safetensors"}
BESTS_FILE = "bests.json"


class CheckpointError(RuntimeError):
    """A checkpoint folder is missing a file or does not match the model."""


def rng_state() -> dict[str, Any]:
    """RNG states in weights_only-safe types (tensors, ints, lists)."""
    np_state = np.random.get_state()
    py_version, py_keys, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "python": list(py_keys),
        "python_version": py_version,
        "python_gauss": py_gauss,
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def best_cache_dir(run_key: str) -> Path:
    """Where rank 0 caches a run's best weights: a fixed folder per run (its storage path), so
    a restarted worker group reuses it instead of leaking one more, and the driver can delete it
    when the fit ends however it ended (a Tune STOP kills the workers: no ``finally`` runs)."""
    digest = hashlib.sha1(run_key.encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"raydetr-best-{digest}"


class BestWeightsCache:
    """Rank 0's local copy of the best weights, rewritten only when a best changes."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, variant: str) -> Path:
        return self.root / BEST_FILES[variant]

    def update(self, variant: str, state_dict: dict[str, torch.Tensor]) -> None:
        save_weights(state_dict, self.path(variant))

    def seed_from(self, checkpoint_dir: Path) -> None:
        """After a restart: take the best files of the checkpoint we resume from."""
        for name in BEST_FILES.values():
            src = Path(checkpoint_dir) / name
            if src.is_file():
                shutil.copyfile(src, self.root / name)

    def link_into(self, checkpoint_dir: Path) -> int:
        """Hard-link (or copy) the cached best files into a checkpoint; returns bytes linked."""
        total = 0
        for name in BEST_FILES.values():
            src = self.root / name
            if not src.is_file():
                continue
            dst = Path(checkpoint_dir) / name
            try:
                os.link(src, dst)
            except OSError:
                shutil.copyfile(src, dst)
            total += src.stat().st_size
        return total


def update_bests(
    bests: Bests,
    cache: BestWeightsCache,
    *,
    epoch: int,
    map_regular: float,
    map_ema: float | None = None,
    shadow: Shadow | None = None,
    regular_weights: Callable[[], dict[str, torch.Tensor]],
    ema_weights: Callable[[], dict[str, torch.Tensor]] | None = None,
) -> tuple[bool, bool]:
    """Record one epoch; serialise a variant's weights only when its best improves.

    Returns (regular improved, EMA improved). Ties keep the earlier epoch.
    """
    reg_up = map_regular > bests.regular.map
    if reg_up:
        bests.regular = Best(map=float(map_regular), epoch=epoch)
        cache.update("regular", regular_weights())
    ema_up = map_ema is not None and map_ema > bests.ema.map
    if ema_up:
        bests.ema = Best(map=float(map_ema), epoch=epoch,
                         decay=shadow.effective if shadow is not None else None,
                         shadow=shadow.to_dict() if shadow is not None else None)
        cache.update("ema", ema_weights())
    return reg_up, ema_up


def write_checkpoint(
    directory: Path,
    *,
    state: dict[str, Any],
    bests: Bests,
    cache: BestWeightsCache,
) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cache.link_into(directory)
    atomic_write_json(directory / BESTS_FILE, bests.to_dict())
    tmp = directory / (STATE_FILE + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, directory / STATE_FILE)
    return directory


def read_state(directory: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        raise CheckpointError(
            f"{path} is missing: {directory} is not a complete raydetr checkpoint"
        )
    # mmap: post-fit readers need only the history and config, not every tensor in memory.
    return torch.load(path, map_location=map_location, weights_only=True, mmap=True)


def read_bests(directory: Path) -> Bests:
    path = Path(directory) / BESTS_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: not a raydetr checkpoint")
    return Bests.from_dict(json.loads(path.read_text()))


def checkpoint_dirs(train_dir: Path) -> list[Path]:
    """Complete ``epoch_NNNN`` folders under a Train run's storage, oldest first."""
    return sorted(
        p for p in Path(train_dir).glob("epoch_*") if (p / STATE_FILE).is_file()
    )


def latest_checkpoint(train_dir: Path) -> Path:
    """The run's latest checkpoint, as Ray Train recorded it (falls back to the folder scan)."""
    train_dir = Path(train_dir)
    try:
        import ray.train

        result = ray.train.Result.from_path(str(train_dir))
        if result.checkpoint is not None:
            path = Path(result.checkpoint.path)
            if (path / STATE_FILE).is_file():
                return path
    except Exception:  # noqa: BLE001 - a killed run may lack Ray's state file; scan instead
        pass
    found = checkpoint_dirs(train_dir)
    if not found:
        raise CheckpointError(
            f"no checkpoint under {train_dir}: the run ended before its first epoch finished"
        )
    return found[-1]
