"""EdgeWorker: one process of a bounded pool that trains many virtual edges, one at a time.

In `placement.mode: pool` an edge is cheap state until it is scheduled: its scenario entry, its shard's
indices and the timeline events that hit it. A worker holds the data source (shipped once), builds the
edge's `EdgeNode` when the edge's call comes up and drops it afterwards, so the memory of an idle edge is
a few small records, not a process. The edge's computation is the same `EdgeNode.run` / `fedavg_round` as
in actor placement: the same seed, shard, batches and FLOPs, hence the same bytes and uploads.

Threads: the edge fleet gives the worker two concurrency groups, `train` (one thread: the edge being
trained) and `control` (events and queries, answered while an edge trains). Events for an edge that is not
training yet are kept and replayed onto its node when it starts, in the order they arrived.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from actors.edge import EdgeNode
from orchestrator.core.scenario import EdgeConfig
from orchestrator.data.sources import DataSource

logger = logging.getLogger(__name__)

TRAIN_GROUP = "train"  # one thread: the edge being trained
CONTROL_GROUP = "control"  # events and queries while an edge trains
CONTROL_THREADS = 2
EVENT_METHODS = ("slow_down", "change_link", "poison", "leave")


class EdgeWorker:
    """Trains virtual edges one at a time, each with `EdgeNode`'s own code.

    Args:
        source: the run's data source (metadata only); images of an edge's shard are read when it trains.
        resolution, scenario_seed, kld_weight, time_scale: as for `EdgeNode`.
        worker_id: the worker's name in its pool (reports and tests).
    """

    def __init__(
        self,
        source: DataSource,
        *,
        resolution: int,
        scenario_seed: int,
        kld_weight: float,
        time_scale: float,
        worker_id: str,
    ) -> None:
        self.source = source
        self.node_options: dict[str, Any] = {
            "resolution": resolution,
            "scenario_seed": scenario_seed,
            "kld_weight": kld_weight,
            "time_scale": time_scale,
        }
        self.worker_id = worker_id
        self._lock = threading.Lock()
        self._active: dict[str, EdgeNode] = {}  # the edge training now (at most one: the train group)
        self._events: dict[str, list[tuple[str, tuple[Any, ...]]]] = {}  # kept for later calls of an edge
        self._cancelled: set[str] = set()
        self.history: list[str] = []  # edge ids in the order their calls ran

    # ---- train group ---------------------------------------------------------------------------------

    def call_edge(self, edge: EdgeConfig, indices: list[int], method: str, *args: Any) -> Any:
        """Build the edge's node, replay its events, run `method` (`run`, `fedavg_round` or `progress`)."""
        if method not in ("run", "fedavg_round", "progress"):
            raise ValueError(f"method: expected run, fedavg_round or progress, received {method!r}")
        node = EdgeNode(edge, self.source, indices, **self.node_options)
        with self._lock:
            if edge.id in self._cancelled:
                node.leave()
            for name, event_args in self._events.get(edge.id, []):
                getattr(node, name)(*event_args)
            self._active[edge.id] = node
            self.history.append(edge.id)
        try:
            return getattr(node, method)(*args)
        finally:
            with self._lock:
                self._active.pop(edge.id, None)

    # ---- control group -------------------------------------------------------------------------------

    def edge_event(self, edge_id: str, name: str, *args: Any) -> None:
        """A timeline event for one edge: applied now if it is training, and to every later call of it."""
        if name not in EVENT_METHODS:
            raise ValueError(f"event: expected one of {', '.join(EVENT_METHODS)}, received {name!r}")
        with self._lock:
            self._events.setdefault(edge_id, []).append((name, args))
            node = self._active.get(edge_id)
        if node is not None:
            getattr(node, name)(*args)

    def cancel(self, edge_id: str) -> None:
        """The edge is gone (crashed or released): a queued call of it stops at once, a running one leaves."""
        with self._lock:
            self._cancelled.add(edge_id)
            self._events.pop(edge_id, None)
            node = self._active.get(edge_id)
        if node is not None:
            node.leave()

    def progress(self, edge_id: str) -> str | None:
        """The training edge's progress report, or None when `edge_id` is not training on this worker."""
        with self._lock:
            node = self._active.get(edge_id)
        return None if node is None else node.progress()

    def ran(self) -> list[str]:
        """Edge ids in the order this worker ran their calls."""
        return list(self.history)

    def assigned_resources(self) -> dict[str, float]:
        """The Ray resources this worker's process holds (what its sub-pool's demand reserved)."""
        import ray  # only inside a Ray worker: the class is importable without a Ray runtime

        return dict(ray.get_runtime_context().get_assigned_resources())
