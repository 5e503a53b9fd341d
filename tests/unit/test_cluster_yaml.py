"""cluster.yaml passes Ray's own cluster-config checks and keeps the project's security choices.

Ray's `prepare_config` fills in the AWS provider defaults and `validate_config` checks the result against
ray/autoscaler/ray-schema.json plus the launcher's cross-field rules; neither makes a cloud call.
"""

from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER_YAML = Path(__file__).resolve().parents[2] / "cluster.yaml"


@pytest.fixture(scope="module")
def raw_config() -> dict:
    with open(CLUSTER_YAML) as f:
        return yaml.safe_load(f)


@pytest.fixture(scope="module")
def config(raw_config: dict) -> dict:
    prepared = prepare_config(copy.deepcopy(raw_config))
    validate_config(prepared)
    return prepared


def _worker_types(config: dict) -> dict[str, dict]:
    return {
        name: node_type
        for name, node_type in config["available_node_types"].items()
        if name != config["head_node_type"]
    }


def test_passes_ray_schema_and_launcher_rules(config: dict) -> None:
    assert config["provider"]["type"] == "aws"
    assert config["head_node_type"] in config["available_node_types"]


def test_schema_rejects_an_unknown_node_type_key(raw_config: dict) -> None:
    # Guards the check above: the same validation fails on a key Ray does not know.
    broken = copy.deepcopy(raw_config)
    broken["available_node_types"]["edge.small"]["gpus"] = 1
    with pytest.raises(jsonschema.ValidationError, match="gpus"):
        validate_config(prepare_config(broken))


def test_edge_classes_are_custom_resources_on_cpu_workers(config: dict) -> None:
    workers = _worker_types(config)
    offered = {name: set(node_type["resources"]) for name, node_type in workers.items()}
    assert offered["edge.small"] == {"CPU", "edge_small"}
    assert offered["edge.large"] == {"CPU", "edge_large"}
    for name in ("edge.small", "edge.large"):
        assert "GPU" not in workers[name]["resources"]


def test_cloud_training_worker_offers_a_gpu(config: dict) -> None:
    gpu = config["available_node_types"]["cloud.gpu"]
    assert gpu["resources"]["GPU"] == 1
    assert gpu["node_config"]["InstanceType"].startswith("g5.")


def test_head_offers_no_edge_or_gpu_resource(config: dict) -> None:
    head = config["available_node_types"][config["head_node_type"]]
    assert set(head["resources"]) == {"CPU"}


def test_every_node_uses_the_same_image(config: dict) -> None:
    images = {node_type["node_config"]["ImageId"] for node_type in config["available_node_types"].values()}
    assert len(images) == 1


def test_global_max_workers_covers_every_worker_type(config: dict) -> None:
    assert (
        sum(node_type["max_workers"] for node_type in _worker_types(config).values()) <= config["max_workers"]
    )


def test_token_auth_on_every_ray_start(config: dict) -> None:
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [cmd for cmd in config[key] if "ray start" in cmd]
        assert len(starts) == 1, key
        assert "RAY_AUTH_MODE=token ray start" in starts[0], key
    init = "\n".join(config["initialization_commands"])
    assert "export RAY_AUTH_MODE=token" in init


def test_token_file_is_mounted_and_private(config: dict) -> None:
    assert config["file_mounts"]["/home/ubuntu/.ray/auth_token"] == "~/.ray/auth_token"
    assert "chmod 600 ~/.ray/auth_token" in config["initialization_commands"]


def test_dashboard_bound_to_loopback(config: dict) -> None:
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "0.0.0.0" not in yaml.safe_dump(config)


def test_setup_installs_this_package_with_pinned_constraints(config: dict) -> None:
    setup = config["setup_commands"]
    assert any(cmd.endswith("pip install -q -c constraints.txt .") for cmd in setup)
    assert config["file_mounts"]["/home/ubuntu/edge-baim"] == "."
    assert ".venv" in config["rsync_exclude"]


def test_registry_is_an_s3_uri_in_the_node_environment(config: dict) -> None:
    init = "\n".join(config["initialization_commands"])
    registry_lines = [line for line in init.split("'") if line.startswith("export BAIM_REGISTRY=")]
    assert len(registry_lines) == 1
    assert registry_lines[0].removeprefix("export BAIM_REGISTRY=").startswith("s3://")


def test_the_bucket_is_the_only_placeholder() -> None:
    # docs/cluster.md tells users to replace exactly this one value.
    text = CLUSTER_YAML.read_text()
    assert text.count("CHANGE-ME") == 2  # the header comment and the BAIM_REGISTRY line
    assert "s3://CHANGE-ME-edge-baim-bucket/" in text
