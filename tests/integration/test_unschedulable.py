"""An edge asking for resources no node offers is reported unschedulable; the run does not hang."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.core.scenario import Scenario
from orchestrator.runtime.engine import EngineOptions, run_scenario
from orchestrator.runtime.fleet import unmet_demand

EDGE = {"shard_size": 32, "batch_size": 16, "model": {"widths": [8], "latent_dim": 4}}


def test_unmet_demand_names_the_missing_resource() -> None:
    nodes = [
        {"Alive": True, "Resources": {"CPU": 4.0, "memory": 1e9}},
        {"Alive": False, "Resources": {"GPU": 8.0}},
    ]

    assert unmet_demand({"CPU": 2.0}, nodes) is None
    reason = unmet_demand({"CPU": 1.0, "GPU": 1.0}, nodes)
    assert reason is not None and "'GPU': 1.0" in reason


@pytest.mark.usefixtures("ray_session")
def test_edge_with_resources_no_node_offers_is_reported_unschedulable(tmp_path: Path) -> None:
    scenario = Scenario.model_validate(
        {
            "name": "unschedulable",
            "time_scale": 0.0,
            "data": {
                "root": str(tmp_path / "no-celeba"),
                "procedural": {"num_images": 600, "native_size": 32},
                "resolution": 16,
                "test_per_task": 16,
                "cloud_per_task": 32,
                "holdout_per_task": 8,
            },
            "tasks": [{"name": "all", "expression": "Male or not Male"}],
            "edges": [
                {"id": "fits", "task": "all", "num_cpus": 0.25, **EDGE},
                {
                    "id": "needs-tpu",
                    "task": "all",
                    "num_cpus": 0.25,
                    "custom_resources": {"tpu_pod": 1},
                    **EDGE,
                },
                {"id": "needs-gpus", "task": "all", "num_cpus": 0.25, "num_gpus": 8, **EDGE},
            ],
            "cloud": {"strategies": ["finetune"], "epochs": 1, "top_k": 1, "fusion": {"min_new_models": 1}},
            "baselines": {"fedavg": {"enabled": False}},
            "serving": {"enabled": False},
        }
    )

    report = run_scenario(
        scenario, tmp_path / "out", EngineOptions(unschedulable_after_s=3.0, cloud_trainer="local")
    ).model_dump(mode="json")

    edges = report["edges"]
    assert edges["fits"]["status"] == "accepted"
    assert edges["needs-tpu"]["status"] == "unschedulable"
    assert "tpu_pod" in edges["needs-tpu"]["error"]
    assert edges["needs-gpus"]["status"] == "unschedulable"
    assert "GPU" in edges["needs-gpus"]["error"]
    assert report["cloud"]["learners"] == ["fits"]
