"""cluster.yaml passes Ray's own offline validation; broken variants fail; every key is commented.

Uses `prepare_config` + `validate_config` from ray.autoscaler._private.util (private APIs, checked on
the pinned Ray 2.60; RAY_NOTES.md 5.4): no cloud calls are made.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster.yaml"
RAYJOB = ROOT / "kuberay" / "rayjob.yaml"
DRIVER_RESOURCE = "TRAIN_DRIVER_RESOURCE"


def _load() -> dict:
    return yaml.safe_load(CLUSTER.read_text())


def _validate(config: dict) -> dict:
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def test_cluster_yaml_passes_ray_validation_with_the_required_shape():
    config = _load()
    prepared = _validate(config)
    nodes = prepared["available_node_types"]
    head = nodes[prepared["head_node_type"]]
    assert head["resources"].get(DRIVER_RESOURCE, 0) > 0 and head["resources"].get("GPU", 0) == 0
    gpu_types = [n for n in nodes.values() if n["resources"].get("GPU", 0) >= 1]
    assert gpu_types and all(0 <= n["min_workers"] <= n["max_workers"] for n in gpu_types)
    assert max(n["max_workers"] for n in gpu_types) >= 1
    assert prepared["provider"]["type"] in ("aws", "gcp")
    # Setup is explicit (no provider default sneaks in a Ray nightly) and installs this project
    # from the mounted source with the Ray version the project pins.
    assert config["setup_commands"] == prepared["worker_setup_commands"][: len(config["setup_commands"])]
    commands = " ".join(config["setup_commands"])
    mounted = [remote for remote, local in config["file_mounts"].items() if local == "."]
    assert mounted and f"pip install -e {mounted[0]}" in commands
    assert f"=={ray.__version__}" in commands
    assert "nightly" not in " ".join(prepared["head_setup_commands"] + prepared["worker_setup_commands"])


def test_every_key_in_cluster_yaml_is_commented():
    """A key line has a trailing comment or a comment line right above it."""
    lines = CLUSTER.read_text().splitlines()
    key = re.compile(r"^\s*(- )?[\w.\"~/-]+:( |$)")
    previous = ""
    for number, line in enumerate(lines, 1):
        stripped = line.strip()
        if key.match(line) and not stripped.startswith("#"):
            assert "#" in line or previous.startswith("#"), f"cluster.yaml:{number}: key without a comment: {line}"
        if stripped:
            previous = stripped


@pytest.mark.parametrize(
    "breakage, error",
    [
        (lambda c: c.update(head_node_type="head.gpu"), ValueError),  # not a node type
        (lambda c: c["available_node_types"]["worker.gpu"].update(gpus=1), jsonschema.ValidationError),  # unknown key
        (lambda c: c["available_node_types"]["worker.gpu"].pop("node_config"), jsonschema.ValidationError),
        (lambda c: c["available_node_types"]["worker.gpu"].update(min_workers=9), ValueError),  # > max_workers
        (lambda c: c.update(setup_command=[]), jsonschema.ValidationError),  # typo of a top-level key
    ],
)
def test_broken_variants_fail(breakage, error):
    config = _load()
    breakage(config)
    with pytest.raises(error):
        _validate(config)


def test_kuberay_rayjob_shape():
    """The RayJob example submits `robust-dpo tune`, gives the head the driver resource and GPUs to workers."""
    job = yaml.safe_load(RAYJOB.read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert spec["entrypoint"].startswith("robust-dpo tune")
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__
    assert DRIVER_RESOURCE in cluster["headGroupSpec"]["rayStartParams"]["resources"]
    workers = cluster["workerGroupSpecs"]
    limits = [c["resources"]["limits"] for w in workers for c in w["template"]["spec"]["containers"]]
    assert any(int(lim.get("nvidia.com/gpu", 0)) >= 1 for lim in limits)
    assert all(w["minReplicas"] <= w["maxReplicas"] for w in workers)
