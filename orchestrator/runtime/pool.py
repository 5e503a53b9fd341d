"""The edge-worker pool of `placement.mode: pool`: sub-pools sized from the cluster's resources.

One sub-pool per distinct resource request (an edge's CPUs, GPUs, memory and custom resources, as
`resource_demand` names them): its workers reserve exactly that request, so an edge that needs a GPU or a
custom resource only ever runs on a worker holding it (Ray's scheduler places the worker). Each virtual
edge is pinned to one worker of its sub-pool (round-robin in the order edges are spawned), so its calls
and its timeline events reach the same process in the order they were sent.

Sizing (`plan_pool_sizes`), after Flower's `pool_size_from_resources`: a sub-pool holds as many workers as
the alive nodes can host at once (per node, the fewest multiples of the request any resource allows),
at most one per edge of the request. When the sub-pools together would ask for more CPUs than the cluster
has once `reserve_cpus` (the coordinator and the cloud's training workers) are taken off, every sub-pool
is scaled down by the same factor, keeping at least one worker each; `max_workers` caps the total the same
way.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import ray

from actors.edge_worker import CONTROL_GROUP, CONTROL_THREADS, TRAIN_GROUP, TRAIN_THREADS, EdgeWorker
from orchestrator.core.scenario import EdgeConfig

Demand = tuple[tuple[str, float], ...]  # a resource request, sorted by name: hashable, printable


def demand_key(demand: Mapping[str, float]) -> Demand:
    return tuple(sorted(demand.items()))


def node_capacity(demand: Mapping[str, float], nodes: Iterable[Mapping[str, Any]]) -> int:
    """How many workers of `demand` the alive nodes host at once (by total resources)."""
    total = 0
    for node in nodes:
        if not node.get("Alive"):
            continue
        offered = node.get("Resources", {})
        fits = [
            math.floor(offered.get(name, 0.0) / amount + 1e-9) for name, amount in demand.items() if amount
        ]
        total += min(fits) if fits else 0
    return total


def plan_pool_sizes(
    edges_per_demand: Mapping[Demand, int],
    nodes: list[Mapping[str, Any]],
    *,
    reserve_cpus: float = 0.0,
    max_workers: int | None = None,
) -> dict[Demand, int]:
    """Workers per sub-pool (0 for a request no alive node can meet). See the module docstring."""
    sizes = {key: min(count, node_capacity(dict(key), nodes)) for key, count in edges_per_demand.items()}
    cluster_cpus = sum(n.get("Resources", {}).get("CPU", 0.0) for n in nodes if n.get("Alive"))
    free_cpus = max(0.0, cluster_cpus - reserve_cpus)
    wanted_cpus = sum(size * dict(key).get("CPU", 0.0) for key, size in sizes.items())
    factor = 1.0
    if wanted_cpus > free_cpus:
        factor = free_cpus / wanted_cpus
    total = sum(sizes.values())
    if max_workers is not None and total * factor > max_workers:
        factor = max_workers / total
    if factor < 1.0:
        sizes = {key: max(1, math.floor(size * factor)) if size else 0 for key, size in sizes.items()}
    return sizes


@dataclass
class SubPool:
    demand: Demand
    size: int
    workers: list[Any] = field(default_factory=list)
    next_worker: int = 0
    members: set[str] = field(default_factory=set)  # edges pinned here and not released


class EdgeWorkerPool:
    """The sub-pools of one run; workers start when their first edge is spawned and stop when their
    sub-pool has no edge left (their CPUs go back to the cloud's training)."""

    def __init__(
        self,
        edges: list[EdgeConfig],
        demand_of: Any,
        worker_args: dict[str, Any],
        *,
        reserve_cpus: float,
        max_workers: int | None,
    ) -> None:
        self.demand_of = demand_of
        self.worker_args = worker_args  # EdgeWorker's keyword arguments but worker_id; source is a ref
        self.reserve_cpus = reserve_cpus
        self.max_workers = max_workers
        self._counts: dict[Demand, int] = {}
        for edge in edges:
            key = demand_key(demand_of(edge))
            self._counts[key] = self._counts.get(key, 0) + 1
        self._pools: dict[Demand, SubPool] | None = None
        self._pinned: dict[str, Any] = {}

    def sizes(self) -> dict[Demand, int]:
        """Workers per sub-pool (planned on first use, from the alive nodes then)."""
        if self._pools is None:
            planned = plan_pool_sizes(
                self._counts, ray.nodes(), reserve_cpus=self.reserve_cpus, max_workers=self.max_workers
            )
            self._pools = {key: SubPool(key, size) for key, size in planned.items()}
        return {key: pool.size for key, pool in self._pools.items()}

    def assign(self, edge: EdgeConfig) -> Any:
        """The worker that runs `edge` (started if its sub-pool has none yet); None when no node can host
        the edge's request."""
        self.sizes()
        assert self._pools is not None
        pool = self._pools[demand_key(self.demand_of(edge))]
        if pool.size == 0:
            return None
        if not pool.workers:
            pool.workers = [self._start_worker(pool, i) for i in range(pool.size)]
        worker = pool.workers[pool.next_worker % pool.size]
        pool.next_worker += 1
        pool.members.add(edge.id)
        self._pinned[edge.id] = worker
        return worker

    def release(self, edge: EdgeConfig) -> None:
        """The edge is done; a sub-pool without edges stops its workers."""
        self._pinned.pop(edge.id, None)
        if self._pools is None:
            return
        pool = self._pools[demand_key(self.demand_of(edge))]
        pool.members.discard(edge.id)
        if not pool.members:
            self._stop(pool)

    def release_all(self) -> None:
        self._pinned.clear()
        for pool in (self._pools or {}).values():
            pool.members.clear()
            self._stop(pool)

    def workers(self) -> dict[Demand, list[Any]]:
        """The running workers per sub-pool."""
        return {key: list(pool.workers) for key, pool in (self._pools or {}).items() if pool.workers}

    def _start_worker(self, pool: SubPool, index: int) -> Any:
        demand = dict(pool.demand)
        options: dict[str, Any] = {
            "num_cpus": demand.pop("CPU", 0.0),
            "num_gpus": demand.pop("GPU", 0.0),
            "max_restarts": 0,  # a dead worker's edges are lost (`died`), as a dead edge actor's would be
        }
        if "memory" in demand:
            options["memory"] = demand.pop("memory")
        if demand:
            options["resources"] = demand
        name = "+".join(f"{k}={v:g}" for k, v in pool.demand)
        groups = {TRAIN_GROUP: TRAIN_THREADS, CONTROL_GROUP: CONTROL_THREADS}
        worker_cls = ray.remote(concurrency_groups=groups)(EdgeWorker).options(**options)  # type: ignore[call-overload]
        return worker_cls.remote(**self.worker_args, worker_id=f"{name}#{index}")

    @staticmethod
    def _stop(pool: SubPool) -> None:
        for worker in pool.workers:
            ray.kill(worker, no_restart=True)
        pool.workers = []
        pool.next_worker = 0
