"""A `time: virtual` run on a local Ray instance: an hour of simulated churn (timeline and trace) in a minute
of compute, events in simulated time, each edge's fate as the simulation decided it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator.core.scenario import Scenario
from orchestrator.data.traces import OnlineInterval, write_trace
from orchestrator.runtime.engine import VIRTUAL_EVENTS_FILE, EngineOptions, run_scenario

EDGE = {"shard_size": 24, "batch_size": 8, "num_cpus": 0.25, "model": {"widths": [4, 8], "latent_dim": 4}}


@pytest.mark.usefixtures("ray_session")
def test_virtual_clock_run_follows_the_timeline_and_the_trace(tmp_path: Path) -> None:
    # Prepare: at 1e-5 GFLOP/s an epoch of these edges takes hundreds of simulated seconds.
    trace = write_trace(
        [OnlineInterval("gone", 0.0, 10.0), OnlineInterval("late-online", 1800.0, 7200.0, speed=4.0)],
        tmp_path / "trace.csv",
    )
    scenario = Scenario.model_validate({
        "name": "virtual-test",
        "seed": 4,
        "time": "virtual",
        "virtual_time": {"edge_gflops": 1e-5},
        "traces": {"path": str(trace), "offline_upload": "retry"},
        "data": {"root": str(tmp_path / "no-celeba"), "procedural": {"num_images": 1200, "native_size": 32},
                 "resolution": 16, "test_per_task": 16, "cloud_per_task": 32, "holdout_per_task": 16},
        "tasks": [{"name": "male", "expression": "Male"}, {"name": "female", "expression": "not Male"}],
        "edges": [
            {"id": "steady", "task": "male", **EDGE},
            {"id": "doomed", "task": "male", **EDGE, "local_epochs": 50},
            {"id": "gone", "task": "female", **EDGE},
            {"id": "late-online", "task": "female", **EDGE},
            {"id": "joiner", "task": "female", **EDGE, "start": False},
        ],
        "timeline": [
            {"kind": "crash", "at_seconds": 600, "edge": "doomed"},
            {"kind": "join", "at_seconds": 900, "edge": "joiner"},
            {"kind": "slow", "at_seconds": 0, "edge": "steady", "factor": 2},
        ],
        "placement": {"mode": "pool", "max_workers": 2},
        "cloud": {"strategies": ["finetune"], "epochs": 1, "batch_size": 32, "top_k": 1,
                  "connection_height": 1, "cpus_per_worker": 0.5,
                  "fusion": {"min_new_models": 100, "max_wait_seconds": 100_000}},
        "baselines": {"fedavg": {"enabled": False}},
        "serving": {"enabled": False},
    })  # fmt: skip

    # Execute
    report = run_scenario(scenario, tmp_path / "out", EngineOptions(cloud_trainer="local")).model_dump(
        mode="json"
    )

    # Assert: fates
    status = {edge_id: row["status"] for edge_id, row in report["edges"].items()}
    assert status == {
        "steady": "accepted", "doomed": "crashed", "gone": "offline", "late-online": "accepted",
        "joiner": "accepted",
    }  # fmt: skip
    assert report["edges"]["doomed"]["bytes_sent"] == 0 and report["edges"]["gone"]["flops"] == 0
    # Times: simulated, far beyond the wall time it took.
    simulated = [
        json.loads(line) for line in (tmp_path / "out" / VIRTUAL_EVENTS_FILE).read_text().splitlines()
    ]
    arrivals = {e["edge"]: e["t"] for e in simulated if e["kind"] == "upload_arrived"}
    assert set(arrivals) == {"steady", "late-online", "joiner"}
    assert arrivals["late-online"] > 1800.0 and arrivals["joiner"] > 900.0
    assert report["totals"]["simulated_seconds"] == max(e["t"] for e in simulated)
    assert report["totals"]["simulated_seconds"] > 3 * report["totals"]["wall_seconds"]
    played = [
        (e["t"], e["kind"], e.get("edge")) for e in report["events"] if e["kind"] in ("crash", "join", "slow")
    ]
    assert played == [(0.0, "slow", "steady"), (600.0, "crash", "doomed"), (900.0, "join", "joiner")]
    assert "simulated on the virtual clock" in (tmp_path / "out" / "report.md").read_text()
