"""The virtual clock (`time: virtual`): a discrete-event simulation of the edges' lives in simulated time.

Every quantity that decides *when* something happens is known before any edge trains: an epoch's training
FLOPs depend only on shapes (counted once per architecture and batch shape), the upload's size only on the
architecture and the spec. So `simulate` plays the whole timeline first, without sleeping, and decides each
edge's fate (it uploads at time t, or it crashed / left / stayed offline first); the engine then trains and
uploads the edges that upload, in the order of their simulated arrivals, and records the rest as lost.

The model, per edge:
- training: `epochs x epoch_seconds` of work at rate 1; the rate is the trace's speed divided by the
  timeline's slow-down factor, and 0 while the edge is offline (its training pauses);
- upload: `latency + bytes * 8 / bandwidth` (the trace's bandwidth where it gives one, else the link's,
  as it is when the attempt starts); going offline mid-upload fails the attempt;
- an edge offline when it should upload retries when it is back online (`offline_upload: retry`) or is
  lost (`lost`); an edge whose trace has no online time left before it finished is lost (`offline`).

Order of events at one instant: timeline events first (by their position in the file), then trace changes,
then the edges' own progress (a crash at t = 5 beats an upload that would arrive at t = 5).
"""

from __future__ import annotations

import heapq
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from actors.edge import upload_spec
from actors.uploads import declared_spec
from baim.config import LearnerSpec
from baim.costs import forward_backward_flops
from baim.learners import VAELearner
from baim.training import vae_batch_loss
from orchestrator.core.artifacts import canonical_json, pack_state
from orchestrator.core.scenario import (
    CoordinatorCrashEvent,
    CrashEvent,
    Event,
    JoinEvent,
    LeaveEvent,
    LinkEvent,
    NewTaskEvent,
    PoisonEvent,
    Scenario,
    SlowEvent,
)
from orchestrator.data.partitions import Partitions
from orchestrator.data.traces import OnlineInterval

FateStatus = Literal["uploads", "crashed", "left", "offline", "not_joined"]
TIMELINE, TRACE, PROGRESS = 0, 1, 2  # tie-break classes at one instant


@dataclass(frozen=True)
class EdgeWork:
    """What the clock needs to know of one edge."""

    edge_id: str
    starts: bool  # with the run at t = 0 (else at its join event)
    epochs: int
    epoch_seconds: float  # simulated seconds of one epoch at rate 1
    upload_bytes: int
    bandwidth_mbps: float
    latency_ms: float


@dataclass(frozen=True)
class SimEvent:
    """One entry of the simulated timeline."""

    t: float
    kind: str  # a timeline kind, or start, offline, online, upload_start, upload_failed, upload_arrived
    edge: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class EdgeFate:
    edge_id: str
    status: FateStatus = "not_joined"
    at: float | None = None  # when the upload arrived, or when the edge was lost
    started_at: float | None = None
    epochs_done: int = 0
    upload_attempts: int = 0
    poison: list[PoisonEvent] = field(default_factory=list)  # the poison events that hit before its upload
    note: str = ""


@dataclass
class Simulation:
    events: list[SimEvent]
    fates: dict[str, EdgeFate]
    coordinator_crashes: list[float]
    end_s: float

    def uploads_in_order(self) -> list[EdgeFate]:
        """The edges that upload, by simulated arrival (ties: edge id)."""
        arriving = [fate for fate in self.fates.values() if fate.status == "uploads"]
        return sorted(arriving, key=lambda fate: (fate.at or 0.0, fate.edge_id))


@dataclass
class _Edge:
    work: EdgeWork
    fate: EdgeFate
    phase: Literal["waiting", "training", "uploading", "done"] = "waiting"
    left: float = 0.0  # work left, in seconds at rate 1
    since: float = 0.0
    slow: float = 1.0
    speed: float = 1.0
    online: bool = True
    trace_bandwidth: float | None = None
    bandwidth: float = 0.0
    latency_ms: float = 0.0
    version: int = 0  # bumps when its rate changes: older scheduled progress events are stale
    has_trace: bool = False
    online_ahead: int = 0  # online intervals still to come

    @property
    def rate(self) -> float:
        return self.speed / self.slow if self.online else 0.0


class _Clock:
    def __init__(self, works: Sequence[EdgeWork], offline_upload: str) -> None:
        self.queue: list[tuple[float, int, int, int, str, Any]] = []
        self.seq = 0
        self.now = 0.0
        self.events: list[SimEvent] = []
        self.coordinator_crashes: list[float] = []
        self.offline_upload = offline_upload
        self.edges = {
            w.edge_id: _Edge(w, EdgeFate(w.edge_id), bandwidth=w.bandwidth_mbps, latency_ms=w.latency_ms)
            for w in works
        }

    def push(self, t: float, tie: int, order: int, kind: str, payload: Any) -> None:
        self.seq += 1
        heapq.heappush(self.queue, (t, tie, order, self.seq, kind, payload))

    def log(self, kind: str, edge: str | None = None, **detail: Any) -> None:
        self.events.append(SimEvent(round(self.now, 6), kind, edge, detail))

    # ---- progress ------------------------------------------------------------------------------------

    def advance(self, edge: _Edge) -> None:
        """Book the work done since the last change (training only)."""
        if edge.phase == "training":
            edge.left = max(0.0, edge.left - (self.now - edge.since) * edge.rate)
            done = (
                edge.work.epochs - math.ceil(edge.left / edge.work.epoch_seconds - 1e-9)
                if edge.work.epoch_seconds
                else 0
            )
            edge.fate.epochs_done = max(edge.fate.epochs_done, min(edge.work.epochs, done))
        edge.since = self.now

    def schedule(self, edge: _Edge) -> None:
        """(Re)schedule the edge's next own event from its current phase and rate."""
        edge.version += 1
        if edge.phase == "training" and edge.rate > 0:
            self.push(
                self.now + edge.left / edge.rate, PROGRESS, 0, "trained", (edge.work.edge_id, edge.version)
            )

    def start(self, edge: _Edge) -> None:
        edge.phase = "training"
        edge.left = edge.work.epochs * edge.work.epoch_seconds
        edge.since = self.now
        edge.fate.started_at = self.now
        self.log("start", edge.work.edge_id)
        self.schedule(edge)

    def trained(self, edge: _Edge) -> None:
        edge.fate.epochs_done = edge.work.epochs
        edge.phase = "uploading"
        self.begin_upload(edge)

    def begin_upload(self, edge: _Edge) -> None:
        edge_id = edge.work.edge_id
        if not edge.online:
            if self.offline_upload == "lost":
                self.lose(edge, "offline", "offline when it should upload (offline_upload: lost)")
            else:
                self.log("upload_waits", edge_id)  # retried when the trace brings it back online
            return
        bandwidth = edge.trace_bandwidth or edge.bandwidth
        seconds = edge.latency_ms / 1000.0 + edge.work.upload_bytes * 8 / (bandwidth * 1e6)
        edge.fate.upload_attempts += 1
        edge.version += 1
        self.log("upload_start", edge_id, attempt=edge.fate.upload_attempts, seconds=round(seconds, 6))
        self.push(self.now + seconds, PROGRESS, 0, "arrived", (edge_id, edge.version))

    def lose(self, edge: _Edge, status: FateStatus, note: str) -> None:
        self.advance(edge)
        edge.phase = "done"
        edge.version += 1
        edge.fate.status, edge.fate.at, edge.fate.note = status, self.now, note
        self.log("lost", edge.work.edge_id, status=status, note=note)

    # ---- events --------------------------------------------------------------------------------------

    def timeline_event(self, index: int, event: Event) -> None:
        where = f"timeline.{index}"
        if isinstance(event, CoordinatorCrashEvent):
            self.coordinator_crashes.append(self.now)
            self.log(event.kind, where=where)
            return
        if isinstance(event, NewTaskEvent):  # the cloud's few-shot step: no edge's clock changes
            self.log(
                event.kind, where=where, applied=False, note="a cloud step; the virtual clock has no cloud"
            )
            return
        edge_id = event.edge_id() if isinstance(event, JoinEvent) else event.edge
        edge = self.edges[edge_id]
        if isinstance(event, JoinEvent):
            self.log(event.kind, edge_id, where=where)
            self.start(edge)
            return
        if edge.phase in ("waiting", "done"):
            self.log(event.kind, edge_id, where=where, applied=False, note=f"edge is {edge.phase}")
            return
        self.log(event.kind, edge_id, where=where, applied=True)
        if isinstance(event, CrashEvent):
            self.lose(edge, "crashed", f"crashed at {self.now:g}s ({where})")
        elif isinstance(event, LeaveEvent):
            self.lose(edge, "left", f"left at {self.now:g}s ({where})")
        elif isinstance(event, SlowEvent):
            self.advance(edge)
            edge.slow = float(event.factor)
            self.schedule(edge) if edge.phase == "training" else None
        elif isinstance(event, LinkEvent):
            edge.bandwidth = event.bandwidth_mbps or edge.bandwidth
            edge.latency_ms = edge.latency_ms if event.latency_ms is None else event.latency_ms
        elif isinstance(event, PoisonEvent) and edge.phase == "training":
            edge.fate.poison.append(event)

    def trace_change(self, edge: _Edge, online: bool, interval: OnlineInterval | None) -> None:
        edge_id = edge.work.edge_id
        self.advance(edge)
        edge.online = online
        if online:
            assert interval is not None
            edge.online_ahead -= 1
            edge.speed = interval.speed
            edge.trace_bandwidth = interval.bandwidth_mbps
            self.log("online", edge_id, speed=interval.speed)
        else:
            self.log("offline", edge_id)
        if edge.phase == "training":
            self.schedule(edge)
        elif edge.phase == "uploading":
            if not online:
                edge.version += 1  # the attempt in flight fails
                self.log("upload_failed", edge_id, attempt=edge.fate.upload_attempts)
                if self.offline_upload == "lost":
                    self.lose(edge, "offline", "went offline during its upload (offline_upload: lost)")
            else:
                self.begin_upload(edge)
        if not online and edge.online_ahead == 0 and edge.phase in ("training", "uploading"):
            self.lose(edge, "offline", "its trace has no online time left")

    def progress(self, kind: str, edge_id: str, version: int) -> None:
        edge = self.edges[edge_id]
        if version != edge.version or edge.phase == "done":
            return  # superseded by a change of rate, a failed attempt or a loss
        if kind == "trained":
            self.advance(edge)
            self.trained(edge)
        else:
            edge.phase = "done"
            edge.fate.status, edge.fate.at = "uploads", self.now
            self.log("upload_arrived", edge_id, attempt=edge.fate.upload_attempts)


def simulate(
    works: Sequence[EdgeWork],
    timeline: Sequence[Event],
    trace: Sequence[OnlineInterval] = (),
    *,
    offline_upload: Literal["retry", "lost"] = "retry",
) -> Simulation:
    """Play the edges' lives, the timeline and the trace in simulated time (module docstring)."""
    clock = _Clock(works, offline_upload)
    for index, event in enumerate(timeline):
        clock.push(event.at_seconds, TIMELINE, index, "timeline", (index, event))
    by_edge: dict[str, list[OnlineInterval]] = {}
    for row in trace:
        if row.edge_id in clock.edges:  # rows of edges not in the scenario are ignored
            by_edge.setdefault(row.edge_id, []).append(row)
    order = {edge_id: i for i, edge_id in enumerate(clock.edges)}
    for edge_id, rows in by_edge.items():
        edge = clock.edges[edge_id]
        edge.has_trace, edge.online, edge.online_ahead = True, False, len(rows)
        for row in rows:
            clock.push(row.start_s, TRACE, order[edge_id], "online", (edge_id, row))
            clock.push(row.end_s, TRACE, order[edge_id], "offline", (edge_id, None))
    for work in works:
        if work.starts:
            clock.start(clock.edges[work.edge_id])
    while clock.queue:
        t, _, _, _, kind, payload = heapq.heappop(clock.queue)
        clock.now = t
        if kind == "timeline":
            clock.timeline_event(*payload)
        elif kind in ("online", "offline"):
            edge_id, row = payload
            clock.trace_change(clock.edges[edge_id], kind == "online", row)
        else:
            clock.progress(kind, *payload)
    for edge in clock.edges.values():  # still waiting for time that never comes: the trace ran out
        if edge.phase in ("training", "uploading"):
            clock.lose(edge, "offline", "its trace has no online time left")
    end_s = clock.events[-1].t if clock.events else 0.0  # the last thing that happened (not a stale event)
    return Simulation(clock.events, {e: s.fate for e, s in clock.edges.items()}, clock.coordinator_crashes,
                      end_s)  # fmt: skip


# --------------------------------------------------------------------------------------------------------
# The edges' work, from the scenario (what the clock needs, computed as the edges would count it)


def edge_works(scenario: Scenario, partitions: Partitions) -> list[EdgeWork]:
    """Per edge: epochs, simulated seconds per epoch (its training FLOPs / `virtual_time.edge_gflops`) and
    the exact size of its upload; one FLOP count per (architecture, batch size, shard size)."""
    rate = scenario.virtual_time.edge_gflops * 1e9
    resolution = scenario.data.resolution
    loss_fn = vae_batch_loss(scenario.cloud.kld_weight)
    flops: dict[tuple[LearnerSpec, int, int], int] = {}
    weight_bytes: dict[LearnerSpec, int] = {}
    works = []
    for edge in scenario.all_edges():
        spec = declared_spec(edge, resolution)
        shard = len(partitions.edges[edge.id])
        key = (spec, edge.batch_size, shard)
        if key not in flops:
            flops[key] = epoch_flops(spec, edge.batch_size, shard, loss_fn)
        if spec not in weight_bytes:
            with torch.random.fork_rng(devices=[]):
                weight_bytes[spec] = len(
                    pack_state(VAELearner(spec).state_dict(), {"kind": "learner"}).weights
                )
        spec_bytes = len(canonical_json(upload_spec(edge, spec)))
        works.append(EdgeWork(
            edge.id, edge.start, edge.local_epochs, flops[key] / rate, weight_bytes[spec] + spec_bytes,
            edge.link.bandwidth_mbps, edge.link.latency_ms,
        ))  # fmt: skip
    return works


def epoch_flops(spec: LearnerSpec, batch_size: int, shard_size: int, loss_fn: Any) -> int:
    """Training FLOPs of one epoch over `shard_size` images in batches of `batch_size` (shapes only, as
    `EdgeNode` counts them: one full batch and the last partial one)."""
    full, rest = divmod(shard_size, batch_size)
    with torch.random.fork_rng(devices=[]):
        model = VAELearner(spec)
        total = 0
        for n, count in ((batch_size, full), (rest, 1)):
            if n and count:
                example = torch.zeros(n, spec.in_channels, spec.resolution, spec.resolution)
                total += count * forward_backward_flops(model, example, loss_fn).total
    return total


def write_simulated_events(simulation: Simulation, path: Path) -> Path:
    """Every simulated event, one JSON object per line (t in simulated seconds)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as out:
        for event in simulation.events:
            record = {"t": event.t, "kind": event.kind, "edge": event.edge, **event.detail}
            out.write(json.dumps(record, sort_keys=True) + "\n")
    return path
