"""Shared test fixtures. Tests use real parts (Ray, MLflow, pycocotools), small sizes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Two cores on CI: keep torch from oversubscribing when Ray workers also run.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import torch  # noqa: E402

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
THERMAL = SHARED_DATA / "thermal-dogs-people"
COCO_REFERENCE = SHARED_DATA / "coco-reference"


@pytest.fixture(scope="session")
def thermal_dir() -> Path:
    if not (THERMAL / "data.yaml").is_file():
        pytest.skip(f"shared thermal dataset not found at {THERMAL} (../shared/data beside the repo)")
    return THERMAL


@pytest.fixture(scope="session")
def coco_reference_dir() -> Path:
    if not (COCO_REFERENCE / "expected_bbox_stats.json").is_file():
        pytest.skip(f"shared COCO reference not found at {COCO_REFERENCE}")
    return COCO_REFERENCE
