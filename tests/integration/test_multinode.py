"""Multi-node on one machine: a head and two worker nodes on loopback (`ray.cluster_utils.Cluster`) offering
different custom resources, the way cluster.yaml's edge classes do on real VMs.

Checks:
- the real EdgeNode actor, spawned with `ray.remote(EdgeNode).options(resources=...)` as the engine spawns it,
  runs only on a node that offers what it declares (the node id seen from inside the actor);
- an edge declaring a resource no node offers stays pending, and the engine's `unmet_demand` names it;
- the engine joins the running cluster with `address="auto"` (RAY_ADDRESS set, as `ray job submit` does), with
  no code change: edges that need `edge_small` / `edge_large` can only run because it joined this cluster.

The cluster runs in a subprocess, so it never meets the session-scoped `ray_session` fixture (one Ray per
process): the fixture's instance, if any, is untouched, and this test works whether it started or not.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
SMALL, LARGE = "edge_small", "edge_large"
EDGE = {"shard_size": 32, "batch_size": 16, "num_cpus": 0.25, "model": {"widths": [8], "latent_dim": 4}}


def scenario_document(tmp_path: Path) -> dict[str, Any]:
    """Two tasks, two small-class and one large-class edge: procedural faces, one short round, no serving."""
    return {
        "name": "multinode-test",
        "seed": 5,
        "time_scale": 0.0,
        "data": {
            "root": str(tmp_path / "no-celeba"),
            "procedural": {"num_images": 1000, "native_size": 32},
            "resolution": 16,
            "test_per_task": 16,
            "cloud_per_task": 32,
            "holdout_per_task": 16,
        },
        "tasks": [{"name": "male", "expression": "Male"}, {"name": "female", "expression": "not Male"}],
        "edges": [
            {"id": "small-m", "task": "male", **EDGE, "custom_resources": {SMALL: 1}},
            {"id": "small-f", "task": "female", **EDGE, "custom_resources": {SMALL: 1}},
            {"id": "large-f", "task": "female", **EDGE, "custom_resources": {LARGE: 1}},
        ],
        "cloud": {
            "strategies": ["finetune"],
            "epochs": 1,
            "batch_size": 32,
            "top_k": 1,
            "connection_height": 1,
            "fusion": {"min_new_models": 3, "max_wait_seconds": 60},
        },
        "baselines": {"fedavg": {"enabled": False}},
        "serving": {"enabled": False},
    }


def run_on_a_three_node_cluster(tmp_path: Path) -> dict[str, Any]:
    """The subprocess body: start the cluster, place edges, run the engine with address="auto"."""
    import ray
    from ray.cluster_utils import Cluster

    from actors.edge import EdgeNode
    from orchestrator.core.scenario import Scenario
    from orchestrator.data.partitions import make_partitions
    from orchestrator.data.sources import resolve_source
    from orchestrator.runtime.engine import EngineOptions, run_scenario
    from orchestrator.runtime.fleet import edge_actor_options, resource_demand, unmet_demand

    class PlacedEdgeNode(EdgeNode):
        """The real EdgeNode plus one question: which node am I on?"""

        def node_id(self) -> str:
            return ray.get_runtime_context().get_node_id()

    scenario = Scenario.model_validate(scenario_document(tmp_path))
    started = time.monotonic()
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "include_dashboard": False, "object_store_memory": 80 * 2**20},
    )
    nodes = {
        SMALL: cluster.add_node(num_cpus=1, resources={SMALL: 2}, object_store_memory=80 * 2**20),
        LARGE: cluster.add_node(num_cpus=1, resources={LARGE: 1}, object_store_memory=80 * 2**20),
    }
    cluster.wait_for_nodes()
    assert cluster.head_node is not None
    result: dict[str, Any] = {
        "head": cluster.head_node.node_id,
        "nodes": {kind: node.node_id for kind, node in nodes.items()},
        "seconds": {"cluster_up": time.monotonic() - started},
    }
    try:
        # 1. Placement of the real EdgeNode actor, spawned the way the engine spawns it.
        ray.init(address=cluster.address, configure_logging=False, log_to_driver=False)
        source = resolve_source(scenario.data)
        partitions = make_partitions(source, scenario)
        placed: dict[str, str] = {}
        edge_class: Any = ray.remote(PlacedEdgeNode)
        handles: list[Any] = []
        for edge in scenario.all_edges():
            handle = edge_class.options(**edge_actor_options(edge)).remote(
                edge,
                source,
                partitions.edges[edge.id],
                resolution=scenario.data.resolution,
                scenario_seed=scenario.seed,
                kld_weight=scenario.cloud.kld_weight,
                time_scale=0.0,
            )
            handles.append(handle)
            placed[edge.id] = ray.get(handle.node_id.remote(), timeout=120)
        result["placed"] = placed

        # An edge that declares a class no node offers: never scheduled, and the engine can say why.
        gpu_edge = scenario.all_edges()[0].model_copy(
            update={"id": "gpu-edge", "custom_resources": {"edge_gpu": 1}}
        )
        pending = edge_class.options(num_cpus=0.25, resources={"edge_gpu": 1}).remote(
            gpu_edge, source, partitions.edges["small-m"], resolution=16, scenario_seed=0, kld_weight=0.0
        )
        ready, _ = ray.wait([pending.node_id.remote()], timeout=3)
        result["gpu_edge_started"] = bool(ready)
        result["gpu_edge_unmet"] = unmet_demand(resource_demand(gpu_edge), ray.nodes())
        for live in [*handles, pending]:
            ray.kill(live)
        ray.shutdown()
        result["seconds"]["placement"] = time.monotonic() - started

        # 2. The engine joins the running cluster like `baim run --address auto` under `ray job submit`.
        os.environ["RAY_ADDRESS"] = cluster.address
        report = run_scenario(scenario, tmp_path / "out", EngineOptions(address="auto")).model_dump(
            mode="json"
        )
        result["engine_edges"] = {edge_id: row["status"] for edge_id, row in report["edges"].items()}
        result["seconds"]["engine"] = time.monotonic() - started
        result["cluster_alive_after"] = len([n for n in cluster.list_all_nodes() if n.any_processes_alive()])
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()
    return result


def main() -> None:
    """Entry point of the subprocess: argv[1] is a scratch folder; prints the result as JSON."""
    tmp_path = Path(sys.argv[1])
    print(json.dumps(run_on_a_three_node_cluster(tmp_path)))


@pytest.mark.slow
def test_edges_land_on_nodes_offering_their_resources_and_the_engine_joins_with_address_auto(
    tmp_path: Path,
) -> None:
    # Execute: in a fresh interpreter, so this cluster and the session's Ray never share a process.
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    completed = subprocess.run(
        [sys.executable, __file__, str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    print("multinode seconds (cumulative):", result["seconds"])

    # Assert: each edge ran on the one node offering its class, never on the head or the other class.
    nodes = result["nodes"]
    assert result["placed"] == {"small-m": nodes[SMALL], "small-f": nodes[SMALL], "large-f": nodes[LARGE]}
    assert result["head"] not in result["placed"].values()
    assert result["gpu_edge_started"] is False
    assert "edge_gpu" in result["gpu_edge_unmet"]
    # The engine, given only address="auto", ran every edge on this cluster (nowhere else has the classes).
    assert result["engine_edges"] == {"small-m": "accepted", "small-f": "accepted", "large-f": "accepted"}
    assert result["cluster_alive_after"] == 3


if __name__ == "__main__":  # the subprocess of the test above
    main()
