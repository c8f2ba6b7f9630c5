"""Shared test fixtures. Tests use real parts (Ray, MLflow, pycocotools), small sizes."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

# Two cores on CI: keep torch from oversubscribing when Ray workers also run.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

# Everything the suite and what it starts (Ray sessions, MLflow's sqlite init locks, worker
# temp files, pytest's own tmp_path) writes to a temp dir goes under one short folder of /tmp,
# removed when the session ends. Short: Ray's socket paths must stay under 107 bytes.
SESSION_TMP = Path(tempfile.mkdtemp(prefix="rdt", dir="/tmp"))
os.environ["TMPDIR"] = str(SESSION_TMP)
tempfile.tempdir = None  # recomputed from TMPDIR

from raydetr.fit.cluster import LOCAL_POLL_ENV, LOCAL_POLL_S  # noqa: E402

# What raydetr's own local Ray uses (init_ray), also for the Ray clusters the tests start
# themselves: Ray Train sees reports and finished workers within 0.5 s, not 2 s.
os.environ.setdefault(LOCAL_POLL_ENV, LOCAL_POLL_S)

import torch  # noqa: E402

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
# ../shared/data beside the repo; RAYDETR_SHARED_DATA points elsewhere (e.g. from a git worktree)
SHARED_DATA = Path(os.environ.get("RAYDETR_SHARED_DATA", REPO.parent / "shared" / "data"))
THERMAL = SHARED_DATA / "thermal-dogs-people"
COCO_REFERENCE = SHARED_DATA / "coco-reference"
BRAIN_TUMOR_SEG = SHARED_DATA / "brain-tumor-seg"  # Roboflow COCO segmentation export


@pytest.fixture(scope="session")
def thermal_dir() -> Path:
    if not (THERMAL / "data.yaml").is_file():
        pytest.skip(f"shared thermal dataset not found at {THERMAL} (../shared/data beside the repo)")
    return THERMAL


@pytest.fixture(scope="session")
def brain_tumor_seg_dir() -> Path:
    if not (BRAIN_TUMOR_SEG / "train" / "_annotations.coco.json").is_file():
        pytest.skip(f"shared brain-tumor-seg dataset not found at {BRAIN_TUMOR_SEG} "
                    "(../shared/data beside the repo)")
    return BRAIN_TUMOR_SEG


@pytest.fixture(scope="session")
def coco_reference_dir() -> Path:
    if not (COCO_REFERENCE / "expected_bbox_stats.json").is_file():
        pytest.skip(f"shared COCO reference not found at {COCO_REFERENCE}")
    return COCO_REFERENCE


@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory) -> Iterator[Path]:
    """A folder shared by one test module's fixtures, removed when the module ends.

    The suite writes checkpoints of real models (hundreds of MB per training run); CI's disk
    holds the suite only if each module's outputs go when the module does (a passed test's
    tmp_path goes right away: tmp_path_retention_policy in pyproject.toml).
    """
    path = tmp_path_factory.mktemp("module")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def pytest_sessionfinish(session, exitstatus):
    """raydetr's own temp folders left in TMPDIR are a product bug: name them, then clean up."""
    left = sorted(p.name for p in SESSION_TMP.glob("raydetr-*"))
    if left:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(f"raydetr left temp folders behind: {', '.join(left)}",
                                red=True)
    shutil.rmtree(SESSION_TMP, ignore_errors=True)
