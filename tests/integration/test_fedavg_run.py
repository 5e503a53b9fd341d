"""FedAvg on Ray: real EdgeNode actors, 2 rounds, a crash from the timeline, exact byte counts."""

from __future__ import annotations

import time
from pathlib import Path

import ray

from baim.costs import serialized_bytes
from baim.learners import VAELearner
from orchestrator.baselines.fedavg import global_spec, homogeneous_spec, run_fedavg
from orchestrator.core.artifacts import canonical_json
from orchestrator.core.scenario import Scenario
from orchestrator.data.partitions import make_partitions
from orchestrator.data.sources import resolve_source
from tests.support.scenarios import tiny_scenario


def fedavg_scenario(tmp_path: Path) -> Scenario:
    document = tiny_scenario(tmp_path).model_dump(mode="json")
    document["baselines"]["fedavg"] = {
        "enabled": True,
        "rounds": 2,
        "local_epochs": 1,
        "client_fraction": 1.0,
    }
    document["timeline"] = [{"kind": "crash", "edge": "edge-3", "at_seconds": 0.0}]
    return Scenario.model_validate(document)


def test_fedavg_two_rounds_on_edge_actors_with_a_crashed_client(ray_session: None, tmp_path: Path) -> None:
    # Prepare
    scenario = fedavg_scenario(tmp_path)
    source = resolve_source(scenario.data)
    partitions = make_partitions(source, scenario)
    spec = homogeneous_spec(scenario)

    # Execute
    outcome = run_fedavg(scenario, source, partitions)

    # Assert: the crashed client dropped out, the round proceeded with the rest
    report = outcome.report.model_dump(mode="json")
    assert [r["round"] for r in report["rounds"]] == [1, 2]
    for round_report in report["rounds"]:
        assert round_report["aggregated"] == ["edge-0", "edge-1", "edge-2"]
        assert round_report["global_updated"]
    assert report["edges"]["edge-3"]["status"] == "crashed"
    assert report["edges"]["edge-3"]["bytes_sent"] == 0
    assert any(e["kind"] == "crash" and e["applied"] for e in report["events"])

    # Bytes are the serialized sizes of what crossed: safetensors weights + the canonical JSON spec.
    weights_bytes = serialized_bytes(VAELearner(spec))
    down = [weights_bytes + len(canonical_json(global_spec(spec, r))) for r in (1, 2)]
    up = [weights_bytes + len(canonical_json({**global_spec(spec, r), "edge_id": "edge-0"})) for r in (1, 2)]
    assert [r["global_model_bytes"] for r in report["rounds"]] == down
    edge0 = report["edges"]["edge-0"]
    assert edge0["bytes_received"] == sum(down)
    assert edge0["bytes_sent"] == sum(up)
    assert edge0["rounds_aggregated"] == [1, 2]
    assert edge0["flops"] > 0
    assert report["totals"]["edge_bytes_sent"] == sum(e["bytes_sent"] for e in report["edges"].values())

    # The global model trained: its test loss fell from the random initial model's.
    assert report["final_test_loss"] < report["initial_test_loss"]
    assert set(report["final_test_loss_per_task"]) == {"male", "female"}
    assert outcome.global_model.generate(2).shape == (2, 3, 16, 16)

    # The clients are gone: their CPUs come back for whatever runs next (ray.kill releases asynchronously).
    deadline = time.monotonic() + 30
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"] - 0.01:
        assert time.monotonic() < deadline, f"CPUs still held: {ray.available_resources()}"
        time.sleep(0.2)
