"""Pool placement on a local Ray instance: virtual edges on a bounded pool of edge workers give the same
per-edge bytes, FLOPs and uploads as one actor per edge; an edge with a custom resource only runs on a
worker that holds it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from orchestrator.baselines.fedavg import run_fedavg
from orchestrator.core.scenario import Scenario
from orchestrator.data.partitions import make_partitions
from orchestrator.data.sources import resolve_source
from orchestrator.runtime.engine import EngineOptions, run_scenario

REPO = Path(__file__).resolve().parents[2]
EDGE = {"shard_size": 24, "batch_size": 8, "num_cpus": 0.25, "model": {"widths": [4, 8], "latent_dim": 4}}


def pool_scenario(tmp_path: Path, mode: str) -> Scenario:
    """Six edges (two tasks, heterogeneous models), a slowed one and one crashed mid-training."""
    return Scenario.model_validate({
        "name": f"pool-{mode}",
        "seed": 11,
        "time_scale": 0.0,
        "data": {
            "root": str(tmp_path / "no-celeba"),
            "procedural": {"num_images": 1200, "native_size": 32},
            "resolution": 16,
            "test_per_task": 16,
            "cloud_per_task": 32,
            "holdout_per_task": 16,
        },
        "tasks": [{"name": "male", "expression": "Male"}, {"name": "female", "expression": "not Male"}],
        "edges": [
            {"id": "m-0", "task": "male", **EDGE},
            {"id": "m-1", "task": "male", **EDGE, "model": {"widths": [8], "latent_dim": 4}},
            {"id": "m-2", "task": "male", **EDGE, "local_epochs": 2},
            {"id": "f-0", "task": "female", **EDGE},
            {"id": "f-1", "task": "female", **EDGE, "shard_size": 40},
            {"id": "f-2", "task": "female", **EDGE},
        ],
        "timeline": [{"kind": "slow", "at_seconds": 0, "edge": "f-1", "factor": 3}],
        "placement": {"mode": mode, "max_workers": 2},
        "cloud": {
            "strategies": ["finetune"],
            "epochs": 1,
            "batch_size": 32,
            "top_k": 1,
            "connection_height": 1,
            "cpus_per_worker": 0.5,
            "fusion": {"min_new_models": 100, "max_wait_seconds": 100_000},
        },
        "baselines": {"fedavg": {"enabled": True, "rounds": 2, "local_epochs": 1, "client_fraction": 1.0}},
        "serving": {"enabled": False},
    })  # fmt: skip


def per_edge(report: dict[str, Any]) -> dict[str, tuple[Any, ...]]:
    return {
        edge_id: (
            row["status"],
            row["bytes_sent"],
            row["flops"],
            row["upload"]["outcome"],
            row["upload"]["sha256"],
        )
        for edge_id, row in report["edges"].items()
    }


@pytest.mark.usefixtures("ray_session")
def test_pool_and_actor_placement_give_the_same_edges_and_uploads(tmp_path: Path) -> None:
    # Execute: the same seeded scenario, one actor per edge vs six virtual edges on two workers.
    reports = {
        mode: run_scenario(
            pool_scenario(tmp_path, mode), tmp_path / mode, EngineOptions(cloud_trainer="local")
        ).model_dump(mode="json")
        for mode in ("actor", "pool")
    }

    # Assert
    actor, pool = per_edge(reports["actor"]), per_edge(reports["pool"])
    assert pool == actor
    assert all(status == "accepted" for status, *_ in pool.values())
    assert len({sha for *_, sha in pool.values()}) == 6  # six distinct models, each accepted once
    accepted = {
        mode: sorted(u["sha256"] for u in r["uploads"] if u["accepted"]) for mode, r in reports.items()
    }
    assert accepted["pool"] == accepted["actor"]
    assert reports["pool"]["edges"]["m-2"]["epochs_done"] == 2
    slow = [e for e in reports["pool"]["events"] if e["kind"] == "slow"]
    assert slow and slow[0]["applied"]


@pytest.mark.usefixtures("ray_session")
def test_fedavg_on_the_pool_matches_fedavg_on_edge_actors(tmp_path: Path) -> None:
    outcomes = {}
    for mode in ("actor", "pool"):
        scenario = pool_scenario(tmp_path, mode)
        source = resolve_source(scenario.data)
        outcomes[mode] = run_fedavg(scenario, source, make_partitions(source, scenario)).report.model_dump(
            mode="json"
        )
    for mode in ("actor", "pool"):
        edges = outcomes[mode]["edges"]
        assert all(row["rounds_aggregated"] == [1, 2] for row in edges.values()), mode

    def costs(report: dict[str, Any]) -> dict[str, tuple[int, int, int]]:
        return {k: (v["bytes_sent"], v["bytes_received"], v["flops"]) for k, v in report["edges"].items()}

    assert costs(outcomes["pool"]) == costs(outcomes["actor"])
    assert outcomes["pool"]["final_test_loss"] == outcomes["actor"]["final_test_loss"]


CUSTOM_RESOURCE_SCRIPT = r"""
import json, sys
import ray
from actors.edge_worker import CONTROL_GROUP
from baim.learners import VAELearner
from orchestrator.baselines.fedavg import global_spec, homogeneous_spec
from orchestrator.core.artifacts import pack_state
from orchestrator.core.scenario import Scenario
from orchestrator.data.partitions import make_partitions
from orchestrator.data.sources import resolve_source
from orchestrator.runtime.fleet import EdgeFleet

scenario = Scenario.model_validate(json.loads(sys.argv[1]))
ray.init(address="local", num_cpus=3, resources={"site": 1}, include_dashboard=False,
         configure_logging=False, log_to_driver=False)
source = resolve_source(scenario.data)
fleet = EdgeFleet(scenario, source, make_partitions(source, scenario))
edges = [edge.id for edge in scenario.all_edges()]
for edge_id in edges:
    fleet.spawn(edge_id)
started = fleet.wait_until_up(edges, 60)
spec = homogeneous_spec(scenario)
payload = pack_state(VAELearner(spec).state_dict(), global_spec(spec, 1))
args = (payload.weights, payload.spec_json, payload.sha256, 1, 1)
refs = {e: fleet.call(e, "fedavg_round", *args) for e in edges}
answers = {e: json.loads(fleet.answer(e, ref)[3])["status"] for e, ref in refs.items()}
workers = []
for demand, handles in fleet.pool.workers().items():
    for handle in handles:
        workers.append({
            "demand": dict(demand),
            "held": ray.get(handle.assigned_resources.options(concurrency_group=CONTROL_GROUP).remote()),
            "ran": ray.get(handle.ran.options(concurrency_group=CONTROL_GROUP).remote()),
        })
fleet.release_all()
ray.shutdown()
print(json.dumps({"started": [type(s).__name__ for s in started], "answers": answers, "workers": workers}))
"""


def test_an_edge_with_a_custom_resource_runs_only_on_a_worker_holding_it(tmp_path: Path) -> None:
    # Prepare: a local Ray (in a subprocess: one Ray per process) offering one unit of `site`; three edges
    # need it, three do not. The `site` sub-pool can hold only one worker.
    document = pool_scenario(tmp_path, "pool").model_dump(mode="json")
    document["timeline"] = []
    document["placement"] = {"mode": "pool", "max_workers": None}
    for edge in document["edges"][:3]:
        edge["custom_resources"] = {"site": 1.0}

    # Execute
    done = subprocess.run(
        [sys.executable, "-c", CUSTOM_RESOURCE_SCRIPT, json.dumps(document)],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip

    # Assert
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["started"] == ["EdgeStarted"] * 6
    assert set(result["answers"].values()) == {"trained"}
    ran_where = {edge: w for w in result["workers"] for edge in w["ran"]}
    assert set(ran_where) == {"m-0", "m-1", "m-2", "f-0", "f-1", "f-2"}
    for edge in ("m-0", "m-1", "m-2"):
        assert ran_where[edge]["held"].get("site") == 1.0, ran_where[edge]
    for edge in ("f-0", "f-1", "f-2"):
        assert "site" not in ran_where[edge]["held"], ran_where[edge]
    site_workers = [w for w in result["workers"] if "site" in w["demand"]]
    assert len(site_workers) == 1 and site_workers[0]["ran"] == ["m-0", "m-1", "m-2"]
