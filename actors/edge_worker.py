"""EdgeWorker: one process of a bounded pool that trains many virtual edges, one at a time.

In `placement.mode: pool` an edge is cheap state until it is scheduled: its scenario entry, its shard's
indices and the timeline events that hit it. A worker holds the data source (shipped once), builds the
edge's `EdgeNode` when the edge's call comes up and drops it afterwards, so the memory of an idle edge is
a few small records, not a process. The edge's computation is the same `EdgeNode.run` / `fedavg_round` as
in actor placement: the same seed, shard, batches and FLOPs, hence the same bytes and uploads.

Threads: the edge fleet gives the worker two concurrency groups, `train` (TRAIN_THREADS threads) and
`control` (events and queries, answered while an edge trains). One edge computes at a time, in the order the
fleet sent the calls (each carries its `turn`, numbered per worker): a `run` holds its turn from the start of
training to its upload's acknowledgement (`EdgeNode.compute_slot`), not while it waits for the coordinator's
decision, so the next edge trains meanwhile. Events for an edge that is not training yet are kept and
replayed onto its node when it starts, in the order they arrived.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from actors.edge import EdgeNode
from orchestrator.core.scenario import EdgeConfig
from orchestrator.data.sources import DataSource

logger = logging.getLogger(__name__)

TRAIN_GROUP = "train"  # the edge computing now and the one waiting for its upload's decision
TRAIN_THREADS = 2
CONTROL_GROUP = "control"  # events and queries while an edge trains
CONTROL_THREADS = 2
EVENT_METHODS = ("slow_down", "change_link", "poison", "leave")


class Turns:
    """Calls compute one at a time in the order of their turn numbers (0, 1, 2, ... per worker)."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._next = 0

    def slot(self, turn: int) -> Turn:
        return Turn(self, turn)

    def _wait(self, turn: int) -> None:
        with self._changed:
            self._changed.wait_for(lambda: self._next == turn)

    def _done(self) -> None:
        with self._changed:
            self._next += 1
            self._changed.notify_all()


class Turn:
    """One call's turn, lock-like: `acquire` waits for it, `release` (once; later calls do nothing) passes
    it on. A call that ends before its turn came (it failed early) still waits for it before passing it on,
    so no later call computes beside an earlier one."""

    def __init__(self, turns: Turns, number: int) -> None:
        self.turns = turns
        self.number = number
        self._acquired = False
        self._released = False

    def acquire(self) -> None:
        self.turns._wait(self.number)
        self._acquired = True

    def release(self) -> None:
        if self._released:
            return
        if not self._acquired:
            self.acquire()
        self._released = True
        self.turns._done()

    def __enter__(self) -> Turn:
        self.acquire()
        return self

    def __exit__(self, *_: object) -> None:
        self.release()


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
        self._turns = Turns()  # one edge computes at a time, in call order (see the module docstring)
        self._active: dict[str, EdgeNode] = {}  # the edges of the train group's calls (at most two)
        self._events: dict[str, list[tuple[str, tuple[Any, ...]]]] = {}  # kept for later calls of an edge
        self._cancelled: set[str] = set()
        self.history: list[str] = []  # edge ids in the order their calls started

    # ---- train group ---------------------------------------------------------------------------------

    def call_edge(self, edge: EdgeConfig, indices: list[int], method: str, *args: Any, turn: int) -> Any:
        """Build the edge's node, replay its events, run `method` (`run`, `fedavg_round` or `progress`) in
        its `turn` (the fleet numbers each worker's calls 0, 1, 2, ...; every number must come)."""
        slot = self._turns.slot(turn)
        try:
            if method not in ("run", "fedavg_round", "progress"):
                raise ValueError(f"method: expected run, fedavg_round or progress, received {method!r}")
            if method == "run":  # run holds its turn until its upload's acknowledgement
                return self._call(edge, indices, method, args, slot)
            with slot:
                return self._call(edge, indices, method, args, None)
        finally:
            slot.release()  # also when the call failed before its turn came

    def _call(
        self, edge: EdgeConfig, indices: list[int], method: str, args: tuple[Any, ...], slot: Turn | None
    ) -> Any:
        node = EdgeNode(edge, self.source, indices, **self.node_options)
        node.compute_slot = slot
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
