"""Chaos on a local Ray instance (the measurement code is benchmarks/bench_chaos.py; these are its goals):

- 30% of the edges killed mid-training and the coordinator killed while uploads arrive: no acknowledged
  upload is lost (scenarios/chaos.yaml through the real engine; slow);
- the coordinator killed during a fusion, as the engine runs it (max_restarts=-1, max_task_retries=-1):
  it resumes, and every upload it acknowledged is in its BAIM;
- a Serve replica killed under a bounded HTTP load on loopback: fewer than 1% of the requests fail.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from ray import serve

from orchestrator.core.scenario import Scenario, load_scenario

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("ray_session")


def load_chaos_harness() -> ModuleType:
    """benchmarks/bench_chaos.py (benchmarks/ is not a package: loaded by path)."""
    path = REPO / "benchmarks" / "bench_chaos.py"
    spec = importlib.util.spec_from_file_location("bench_chaos", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_chaos"] = module
    spec.loader.exec_module(module)
    return module


chaos = load_chaos_harness()


def chaos_scenario(tmp_path: Path, **changes: Any) -> Scenario:
    """scenarios/chaos.yaml on procedural faces (no image files), with top-level changes applied."""
    document = load_scenario(REPO / "scenarios" / "chaos.yaml").model_dump(mode="json")
    document["data"]["root"] = str(tmp_path / "no-celeba")
    document["data"]["procedural"] = {"num_images": 1500, "native_size": 32}
    document.update(changes)
    return Scenario.model_validate(document)


def test_coordinator_killed_during_a_fusion_resumes_and_loses_no_acknowledged_upload(tmp_path: Path) -> None:
    # Prepare: ten edges' uploads, no training round (this test is about fusion and durability).
    scenario = chaos_scenario(tmp_path)
    document = scenario.model_dump(mode="json")
    document["cloud"]["fusion"] = {"min_new_models": 100, "max_wait_seconds": 100_000}
    scenario = Scenario.model_validate(document)

    # Execute
    result = chaos.coordinator_kill_during_fusion(scenario, str(tmp_path / "registry"))

    # Assert
    print("coordinator kill:", result)
    assert result["restarts"] == 1
    assert result["rejected"] == {}
    assert result["acknowledged"] == result["uploads"] == 10
    assert result["lost"] == []


def test_serve_replica_killed_under_load_fails_fewer_than_1_percent(tmp_path: Path) -> None:
    registry_uri = str(tmp_path / "registry")
    chaos.publish_task_model(registry_uri, "male", resolution=16)
    try:
        result = chaos.serve_replica_kill_under_load(registry_uri, "male", clients=2, requests_per_client=150)
    finally:
        serve.shutdown()

    print("serve replica kill:", result)
    assert result["replicas_before"] == 2
    assert result["requests"] == 300  # at most 2 in flight on the killed replica: < 1%
    assert result["failed_fraction"] < 0.01, result["failure_kinds"]
    assert result["replaced"] is True


@pytest.mark.slow
def test_chaos_scenario_loses_no_acknowledged_upload(tmp_path: Path) -> None:
    scenario = chaos_scenario(tmp_path)

    result = chaos.edge_churn_run(scenario, tmp_path / "run")

    print("chaos run:", result)
    assert result["crashed"] == ["doomed-0", "doomed-1", "doomed-2"]  # 30% of 10 edges, all mid-training
    assert result["acknowledged"] == 7
    assert result["lost"] == []
    assert result["coordinator_restarts"] >= 1
    assert result["untrained_learners"] == []
