"""cluster.yaml passes Ray's own cluster-launcher schema check, offline (no AWS, no network).

``prepare_config`` fills Ray's AWS defaults from ray/autoscaler/aws/defaults.yaml (a file in the
installed package) and ``validate_config`` checks the result against ray-schema.json. Neither
talks to AWS: the AWS bootstrap step (key pairs, subnets, IAM, instance-type lookup) only runs
inside ``ray up``. AWS-specific ``node_config`` fields are not checked here.
"""

from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER_YAML = Path(__file__).resolve().parents[2] / "cluster.yaml"


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def check(config: dict) -> dict:
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def test_cluster_yaml_passes_ray_schema(raw):
    prepared = check(raw)
    assert prepared["provider"]["type"] == "aws"
    # Our commands replace Ray's defaults (which would pip install a Ray nightly wheel).
    assert prepared["setup_commands"] == raw["setup_commands"]
    assert all("ray-wheels" not in c for c in prepared["head_setup_commands"])


def test_image_tag_matches_installed_ray(raw):
    image = raw["docker"]["image"]
    repo, _, tag = image.partition(":")
    assert repo == "rayproject/ray"
    assert tag == f"{ray.__version__}-py311-gpu", f"{CLUSTER_YAML}: docker.image {image}"
    for key in ("head_image", "worker_image"):
        assert key not in raw["docker"], f"{key} would run a different image"


def test_node_types_and_worker_bounds(raw):
    prepared = check(raw)
    types = prepared["available_node_types"]
    head = prepared["head_node_type"]
    assert types[head]["max_workers"] == 0
    assert types[head]["resources"].get("GPU", 0) == 0
    workers = {name: t for name, t in types.items() if name != head}
    assert workers, "at least one worker node type"
    for name, t in workers.items():
        assert t["resources"].get("GPU", 0) >= 1, f"worker type {name} has no GPU"
        assert 0 == t["min_workers"] <= t["max_workers"] <= prepared["max_workers"], name
    assert sum(t["min_workers"] for t in workers.values()) <= prepared["max_workers"]
    assert prepared["idle_timeout_minutes"] > 0


def test_commands(raw):
    setup = " ".join(raw["setup_commands"])
    assert "-c ~/raydetr/constraints.txt" in setup and "-e ~/raydetr" in setup
    assert raw["file_mounts"]["~/raydetr"] == "."
    head = " ".join(raw["head_start_ray_commands"])
    assert raw["head_start_ray_commands"][0] == "ray stop"
    for flag in ("--head", "--port=6379", "--autoscaling-config=~/ray_bootstrap_config.yaml"):
        assert flag in head
    worker = " ".join(raw["worker_start_ray_commands"])
    assert "--address=$RAY_HEAD_IP:6379" in worker


def test_broken_copy_fails_validation(raw):
    broken = copy.deepcopy(raw)
    broken["max_wrokers"] = 4  # typo: unknown top-level key
    with pytest.raises(jsonschema.ValidationError, match="max_wrokers"):
        check(broken)

    broken = copy.deepcopy(raw)
    broken["head_node_type"] = "no_such_type"
    with pytest.raises(ValueError, match="head_node_type"):
        check(broken)

    broken = copy.deepcopy(raw)
    broken["available_node_types"]["gpu_a10g"]["min_workers"] = 99  # > global max_workers
    with pytest.raises(ValueError, match="max_workers"):
        check(broken)
