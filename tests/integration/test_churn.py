"""A churn run on a local Ray instance: a crash mid-training, a late join, a poisoned upload and a
coordinator killed mid-run. Nothing accepted may be lost and every edge must be accounted for."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.core.registry import Registry
from orchestrator.core.scenario import Scenario
from orchestrator.runtime.engine import EngineOptions, run_scenario

EDGE = {"shard_size": 32, "batch_size": 16, "num_cpus": 0.25, "model": {"widths": [8, 16], "latent_dim": 8}}


def churn_scenario(tmp_path: Path) -> Scenario:
    return Scenario.model_validate(
        {
            "name": "churn-test",
            "seed": 3,
            "time_scale": 1.0,
            "data": {
                "root": str(tmp_path / "no-celeba"),  # procedural faces: no file reads, fast
                "procedural": {"num_images": 1200, "native_size": 32},
                "resolution": 16,
                "test_per_task": 32,
                "cloud_per_task": 48,
                "holdout_per_task": 16,
            },
            "tasks": [{"name": "male", "expression": "Male"}, {"name": "female", "expression": "not Male"}],
            "edges": [
                {"id": "steady-m", "task": "male", **EDGE},
                {"id": "steady-f", "task": "female", **EDGE},
                # Trains for a long time: the crash event always finds it mid-training.
                {"id": "doomed", "task": "male", **EDGE, "local_epochs": 10_000},
                {"id": "poisoned", "task": "female", **EDGE},
                # Slowed down so that its upload arrives after the coordinator's restart.
                {"id": "slow", "task": "female", **EDGE, "local_epochs": 2},
                {"id": "late", "task": "male", **EDGE, "start": False},
            ],
            "timeline": [
                {"kind": "poison", "at_seconds": 0, "edge": "poisoned", "mode": "nan"},
                {"kind": "slow", "at_seconds": 0, "edge": "slow", "factor": 80},
                {"kind": "join", "at_seconds": 2, "edge": "late"},
                {"kind": "crash", "at_seconds": 4, "edge": "doomed"},
                {"kind": "coordinator_crash", "at_seconds": 8},
            ],
            "cloud": {
                "strategies": ["finetune"],
                "epochs": 1,
                "batch_size": 32,
                "top_k": 1,
                "connection_height": 1,
                "fusion": {"min_new_models": 2, "max_wait_seconds": 5},
            },
            "baselines": {"fedavg": {"enabled": False}},
            "serving": {"enabled": False},
        }
    )


@pytest.mark.usefixtures("ray_session")
def test_churn_run_accounts_for_every_edge_and_loses_no_accepted_upload(tmp_path: Path) -> None:
    # Prepare
    scenario = churn_scenario(tmp_path)
    lines: list[str] = []

    # Execute
    report = run_scenario(
        scenario, tmp_path / "out", EngineOptions(cloud_trainer="local", progress=lines.append)
    ).model_dump(mode="json")

    # Assert: every edge is accounted for, with the status its story implies.
    edges = report["edges"]
    assert set(edges) == {"steady-m", "steady-f", "doomed", "poisoned", "slow", "late"}
    assert edges["doomed"]["status"] == "crashed"
    assert edges["doomed"]["upload"]["outcome"] == "none"
    assert edges["poisoned"]["status"] == "rejected"
    assert edges["poisoned"]["upload"]["reason"] == "non_finite"
    for edge_id in ("steady-m", "steady-f", "slow", "late"):
        assert edges[edge_id]["status"] == "accepted", (edge_id, edges[edge_id])
        assert edges[edge_id]["bytes_sent"] > 0 and edges[edge_id]["flops"] > 0
    rejected = [u for u in report["uploads"] if not u["accepted"]]
    assert [(u["edge_id"], u["reason"]) for u in rejected] == [("poisoned", "non_finite")]

    # The coordinator was killed once and resumed from its checkpoint.
    assert report["cloud"]["coordinator_restarts"] >= 1
    assert any(e["kind"] == "coordinator_resumed" for e in report["ledger"]["events"])

    # Every accepted upload is in the final BAIM and was trained; the registry holds each one.
    accepted = sorted(u["edge_id"] for u in report["uploads"] if u["accepted"])
    assert accepted == ["late", "slow", "steady-f", "steady-m"]
    assert sorted(report["cloud"]["learners"]) == accepted
    assert report["cloud"]["untrained_learners"] == []
    registry = Registry(report["registry"])
    assert sorted(owner.removeprefix("edge/") for owner in registry.owners("edge/")) == accepted
    for task in report["tasks"].values():
        assert task["decomposition_max_abs_diff"] <= 1e-5
    assert (tmp_path / "out" / "report.json").is_file()
