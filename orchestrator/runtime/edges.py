"""Spawning EdgeNode actors with the resources each edge declares (shared by the BAIM run and FedAvg)."""

from __future__ import annotations

from typing import Any

import ray

from actors.edge import EdgeNode
from orchestrator.core.scenario import EdgeConfig, Scenario

# One thread runs the long call (run() or fedavg_round()); the others answer progress and timeline events.
EDGE_MAX_CONCURRENCY = 4


def edge_actor_options(edge: EdgeConfig) -> dict[str, Any]:
    """Ray actor options from the edge's declaration, so Ray's scheduler decides where it can run."""
    options: dict[str, Any] = {
        "num_cpus": edge.num_cpus,
        "num_gpus": edge.num_gpus,
        "max_concurrency": EDGE_MAX_CONCURRENCY,
        "max_restarts": 0,  # a crashed edge stays dead (churn): its loss is part of the experiment
    }
    if edge.memory_mb is not None:
        options["memory"] = edge.memory_mb * 1024 * 1024
    if edge.custom_resources:
        options["resources"] = dict(edge.custom_resources)
    return options


def spawn_edge_node(scenario: Scenario, edge: EdgeConfig, source_ref: Any, indices: list[int]) -> Any:
    """Start one EdgeNode actor; it loads only `indices` of the data source, inside its own process."""
    actor_cls = ray.remote(EdgeNode).options(**edge_actor_options(edge))
    return actor_cls.remote(
        edge,
        source_ref,
        indices,
        resolution=scenario.data.resolution,
        scenario_seed=scenario.seed,
        kld_weight=scenario.cloud.kld_weight,
        time_scale=scenario.time_scale,
    )
