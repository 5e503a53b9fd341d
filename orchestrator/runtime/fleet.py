"""The edge fleet: the EdgeNode actors of one run, addressed by edge id (docs/ARCHITECTURE.md, "Runtime").

Used by the BAIM run (orchestrator.runtime.engine) and the FedAvg baseline (orchestrator.baselines.fedavg).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import ray
from ray.exceptions import RayActorError, RayTaskError

from actors.edge import EdgeNode
from actors.edge_worker import CONTROL_GROUP, TRAIN_GROUP
from orchestrator.core.metrics import Ledger
from orchestrator.core.reports import EdgeReport
from orchestrator.core.scenario import (
    CrashEvent,
    EdgeConfig,
    Event,
    LeaveEvent,
    LinkEvent,
    PoisonEvent,
    Scenario,
    SlowEvent,
)
from orchestrator.data.partitions import Partitions
from orchestrator.data.sources import DataSource
from orchestrator.runtime.pool import EdgeWorkerPool

POLL_SECONDS = 0.2  # how long one wait for edges blocks at most
# One actor thread runs the long call (run() or fedavg_round()); the others answer progress and events.
EDGE_MAX_CONCURRENCY = 4

LostStatus = Literal["crashed", "died", "failed", "unschedulable"]
EdgeEvent = CrashEvent | LeaveEvent | SlowEvent | LinkEvent | PoisonEvent


@dataclass(frozen=True)
class EdgeLost:
    """An edge that gave no answer: `crashed` (killed by a timeline crash), `died` (its process died
    otherwise), `failed` (the method raised), `unschedulable` (no node can ever host it)."""

    edge_id: str
    status: LostStatus
    error: str


@dataclass(frozen=True)
class EdgeStarted:
    """An edge whose start probe (its first `progress()` call) answered."""

    edge_id: str
    answer: Any


@dataclass
class _Member:
    config: EdgeConfig
    actor: Any = None
    probe_ref: Any = None
    spawned_at: float | None = None
    crash_requested: bool = False
    # Pool placement: the worker the edge is pinned to, its start verdict, its call in flight.
    worker: Any = None
    start: EdgeStarted | EdgeLost | None = None
    busy_ref: Any = None


def resource_demand(edge: EdgeConfig) -> dict[str, float]:
    """The Ray resources an edge actor asks for, in Ray's names."""
    demand: dict[str, float] = {"CPU": edge.num_cpus}
    if edge.num_gpus > 0:
        demand["GPU"] = edge.num_gpus
    if edge.memory_mb is not None:
        demand["memory"] = float(edge.memory_mb * 1024 * 1024)
    demand.update(edge.custom_resources)
    return demand


def unmet_demand(demand: dict[str, float], nodes: list[dict[str, Any]]) -> str | None:
    """Why no alive node can ever host `demand` (by total capacity), or None when one can."""
    alive = [node for node in nodes if node.get("Alive")]
    if not alive:
        return "no alive Ray node"
    for node in alive:
        offered = node.get("Resources", {})
        if all(offered.get(name, 0.0) >= amount for name, amount in demand.items()):
            return None
    largest = {name: max(node.get("Resources", {}).get(name, 0.0) for node in alive) for name in demand}
    missing = {name: amount for name, amount in demand.items() if largest[name] < amount}
    return f"no node offers {missing} (largest offer per node: {largest})"


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


class Timeline:
    """A scenario's timeline in firing order: by `at_seconds`, then by position in the file."""

    def __init__(self, events: Sequence[Event]) -> None:
        self._pending = sorted(enumerate(events), key=lambda item: (item[1].at_seconds, item[0]))

    def __bool__(self) -> bool:
        return bool(self._pending)

    def due(self, elapsed: float) -> list[tuple[int, Event]]:
        """The events (index in the file, event) due at `elapsed` seconds, removed from the timeline."""
        count = 0
        while count < len(self._pending) and self._pending[count][1].at_seconds <= elapsed:
            count += 1
        due, self._pending = self._pending[:count], self._pending[count:]
        return due

    def rest(self) -> list[tuple[int, Event]]:
        """Every event not fired yet, removed from the timeline."""
        rest, self._pending = self._pending, []
        return rest


class EdgeFleet:
    """The run's edges on Ray: spawned with their declared resources, probed, called and killed by id.

    An edge is *starting* from `spawn` until its start probe answers (`poll_starts`), then *up* until it is
    lost (an `EdgeLost` from `answer` or `poll_starts`) or `release`d.
    """

    def __init__(
        self,
        scenario: Scenario,
        source: DataSource,
        partitions: Partitions,
        *,
        unschedulable_after_s: float = 10.0,
        reserve_cpus: float = 0.0,
    ) -> None:
        self.scenario = scenario
        self.source = source
        self.partitions = partitions
        self.unschedulable_after_s = unschedulable_after_s
        self._members = {edge.id: _Member(edge) for edge in scenario.all_edges()}
        self._turns: dict[Any, int] = {}  # per pool worker: the turn number of its next call
        self._source_ref: Any = None
        self.pooled = scenario.placement.mode == "pool"
        self._pool: EdgeWorkerPool | None = None
        # The cloud's Ray Train workers and the coordinator keep their CPUs free of edge workers.
        self.reserve_cpus = reserve_cpus + scenario.cloud.num_workers * scenario.cloud.cpus_per_worker

    @property
    def edge_time_scale(self) -> float:
        """What edges multiply their simulated delays by: 0 on the virtual clock (it keeps the time)."""
        return 0.0 if self.scenario.time == "virtual" else self.scenario.time_scale

    @property
    def polls_progress(self) -> bool:
        """Whether running edges answer `progress` (pool placement: the final report only)."""
        return not self.pooled

    @property
    def pool(self) -> EdgeWorkerPool:
        """The edge-worker pool (pool placement), created on first use."""
        if self._pool is None:
            if self._source_ref is None:
                self._source_ref = ray.put(self.source)
            self._pool = EdgeWorkerPool(
                self.scenario.all_edges(),
                resource_demand,
                {
                    "source": self._source_ref,
                    "resolution": self.scenario.data.resolution,
                    "scenario_seed": self.scenario.seed,
                    "kld_weight": self.scenario.cloud.kld_weight,
                    "time_scale": self.edge_time_scale,
                },
                reserve_cpus=self.reserve_cpus,
                max_workers=self.scenario.placement.max_workers,
            )
        return self._pool

    # ---- lifecycle -------------------------------------------------------------------------------------

    def spawn(self, edge_id: str) -> None:
        """Start the edge's actor (it loads only its own shard, in its own process) and its start probe."""
        member = self._members[edge_id]
        edge = member.config
        member.crash_requested = False
        if self.pooled:
            self._spawn_virtual(member)
            return
        if self._source_ref is None:
            self._source_ref = ray.put(self.source)  # shipped once, shared by every edge
        actor_cls = ray.remote(EdgeNode).options(**edge_actor_options(edge))
        member.actor = actor_cls.remote(
            edge,
            self._source_ref,
            self.partitions.edges[edge.id],
            resolution=self.scenario.data.resolution,
            scenario_seed=self.scenario.seed,
            kld_weight=self.scenario.cloud.kld_weight,
            time_scale=self.edge_time_scale,
        )
        member.probe_ref = member.actor.progress.remote()
        member.spawned_at = time.monotonic()
        member.crash_requested = False

    def _spawn_virtual(self, member: _Member) -> None:
        """Pin the edge to a worker of its sub-pool: nothing starts, its start is settled at once."""
        edge = member.config
        member.spawned_at = time.monotonic()
        member.worker = self.pool.assign(edge)
        if member.worker is None:
            why = unmet_demand(resource_demand(edge), ray.nodes()) or "no worker of its request fits"
            member.start = EdgeLost(edge.id, "unschedulable", why)
            return
        member.actor = member.worker
        created = EdgeReport(
            edge_id=edge.id, task=edge.task, status="created", epoch=0, epochs=edge.local_epochs, steps=0,
            train_loss=None, shard_size=len(self.partitions.edges[edge.id]), receipt=None, error=None,
            ledger=Ledger(export_metrics=False).to_dict(),
        )  # fmt: skip
        member.start = EdgeStarted(edge.id, created.model_dump_json())

    def starting(self, edge_id: str) -> bool:
        member = self._members[edge_id]
        return member.probe_ref is not None or member.start is not None

    def up(self, edge_id: str) -> bool:
        """Spawned, started and not lost or released."""
        member = self._members[edge_id]
        return member.actor is not None and not self.starting(edge_id)

    def has_actor(self, edge_id: str) -> bool:
        return self._members[edge_id].actor is not None

    def poll_starts(self) -> list[EdgeStarted | EdgeLost]:
        """The edges whose start was settled since the last call (never blocks): started, lost while
        starting, or unschedulable (still starting after `unschedulable_after_s`, with a demand no alive
        node can meet; killed)."""
        settled: list[EdgeStarted | EdgeLost] = []
        nodes: list[dict[str, Any]] | None = None
        for edge_id, member in self._members.items():
            if member.start is not None:
                settled.append(member.start)
                member.start = None
                continue
            if member.probe_ref is None or member.spawned_at is None:
                continue
            ready, _ = ray.wait([member.probe_ref], timeout=0)
            if ready:
                member.probe_ref = None
                answer = self.answer(edge_id, ready[0])
                settled.append(answer if isinstance(answer, EdgeLost) else EdgeStarted(edge_id, answer))
                continue
            if time.monotonic() - member.spawned_at < self.unschedulable_after_s:
                continue
            nodes = nodes if nodes is not None else ray.nodes()
            why = unmet_demand(resource_demand(member.config), nodes)
            if why is not None:
                self.release(edge_id)
                settled.append(EdgeLost(edge_id, "unschedulable", why))
        return settled

    def wait_until_up(self, edge_ids: Sequence[str], timeout_s: float) -> list[EdgeStarted | EdgeLost]:
        """Poll the starts of `edge_ids` until none is starting or `timeout_s` passed; what was settled."""
        deadline = time.monotonic() + timeout_s
        settled: list[EdgeStarted | EdgeLost] = []
        while True:
            settled += self.poll_starts()
            if not any(self.starting(edge_id) for edge_id in edge_ids) or time.monotonic() >= deadline:
                return settled
            time.sleep(POLL_SECONDS)

    def release(self, edge_id: str) -> None:
        """Kill the edge's actor, if it still has one (done, timed out, or the run ends)."""
        member = self._members[edge_id]
        if member.worker is not None:
            if member.busy_ref is not None:  # queued or training: stop it on its worker
                member.worker.cancel.options(concurrency_group=CONTROL_GROUP).remote(edge_id)
            self.pool.release(member.config)
        elif member.actor is not None:
            ray.kill(member.actor, no_restart=True)
        member.actor = member.worker = member.busy_ref = member.start = None
        member.probe_ref = None

    def release_all(self) -> None:
        for edge_id in self._members:
            self.release(edge_id)
        if self._pool is not None:
            self._pool.release_all()

    # ---- calls -----------------------------------------------------------------------------------------

    def call(self, edge_id: str, method: str, *args: Any) -> Any:
        """Call an EdgeNode method on the edge; returns the reference to pass to `answer`."""
        member = self._members[edge_id]
        actor = member.actor
        if actor is None:
            raise ValueError(f"edge {edge_id}: expected a running edge, it has no process")
        if member.worker is None:
            return getattr(actor, method).remote(*args)
        if method not in ("run", "fedavg_round"):
            raise ValueError(f"edge {edge_id}: a pooled edge answers run and fedavg_round, not {method!r}")
        indices = self.partitions.edges[edge_id]
        call = actor.call_edge.options(concurrency_group=TRAIN_GROUP)
        turn = self._turns.get(actor, 0)  # the worker computes its calls in this order
        self._turns[actor] = turn + 1
        member.busy_ref = call.remote(member.config, indices, method, *args, turn=turn)
        return member.busy_ref

    def answer(self, edge_id: str, ref: Any) -> Any:
        """The value behind `ref`, or `EdgeLost` when the edge's process died or the method raised.

        A dead edge loses its actor here (never killed again): `crashed` when a timeline crash killed it.
        """
        member = self._members[edge_id]
        if self.pooled:
            return self._answer_pooled(member, ref)
        try:
            return ray.get(ref)
        except RayActorError as err:
            member.actor = None
            member.probe_ref = None
            status: LostStatus = "crashed" if member.crash_requested else "died"
            return EdgeLost(edge_id, status, f"{type(err).__name__}: {_first_line(err)}")
        except RayTaskError as err:
            return EdgeLost(edge_id, "failed", str(err).splitlines()[-1])

    def _answer_pooled(self, member: _Member, ref: Any) -> Any:
        """`answer` for a pooled edge: its worker outlives it, so a crash is the fleet's verdict."""
        if ref is member.busy_ref:
            member.busy_ref = None
        try:
            value = ray.get(ref)
        except RayActorError as err:  # the worker died: every edge pinned to it is lost
            member.actor = None
            status: LostStatus = "crashed" if member.crash_requested else "died"
            return EdgeLost(member.config.id, status, f"{type(err).__name__}: {_first_line(err)}")
        except RayTaskError as err:
            if member.crash_requested:
                return EdgeLost(member.config.id, "crashed", "stopped by a timeline crash event")
            return EdgeLost(member.config.id, "failed", str(err).splitlines()[-1])
        if member.crash_requested:
            return EdgeLost(member.config.id, "crashed", "stopped by a timeline crash event")
        return value

    def apply(self, edge_id: str, event: EdgeEvent) -> None:
        """A timeline event that acts on one running edge (crash kills its process: no restart)."""
        member = self._members[edge_id]
        if member.actor is None:
            raise ValueError(f"edge {edge_id}: expected a running edge for {event.kind}, it has no process")
        if member.worker is not None:
            self._apply_pooled(member, event)
            return
        if isinstance(event, CrashEvent):
            member.crash_requested = True
            ray.kill(member.actor, no_restart=True)
            member.actor = None  # its outstanding calls answer EdgeLost("crashed")
        elif isinstance(event, LeaveEvent):
            member.actor.leave.remote()
        elif isinstance(event, SlowEvent):
            member.actor.slow_down.remote(event.factor)
        elif isinstance(event, LinkEvent):
            member.actor.change_link.remote(event.bandwidth_mbps, event.latency_ms)
        elif isinstance(event, PoisonEvent):
            member.actor.poison.remote(event.mode, event.scale)

    def _apply_pooled(self, member: _Member, event: EdgeEvent) -> None:
        """A timeline event for a pooled edge, sent to its worker (which keeps it for the edge's calls)."""
        edge_id = member.config.id
        control = CONTROL_GROUP
        if isinstance(event, CrashEvent):
            member.crash_requested = True
            member.worker.cancel.options(concurrency_group=control).remote(edge_id)
            member.actor = None  # its outstanding call answers EdgeLost("crashed")
            return
        args: tuple[Any, ...] = ()
        if isinstance(event, LeaveEvent):
            name = "leave"
        elif isinstance(event, SlowEvent):
            name, args = "slow_down", (event.factor,)
        elif isinstance(event, LinkEvent):
            name, args = "change_link", (event.bandwidth_mbps, event.latency_ms)
        else:
            name, args = "poison", (event.mode, event.scale)
        member.worker.edge_event.options(concurrency_group=control).remote(edge_id, name, *args)


def _first_line(err: BaseException) -> str:
    lines = str(err).splitlines()
    return lines[0] if lines else ""
