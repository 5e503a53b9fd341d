"""Costs and metrics in one place: the run's `Ledger` (JSON snapshots, mergeable) and its Prometheus metrics.

Metric names and labels: docs/metrics.md. Plain Python, no Ray: actors, the driver and Serve replicas use it.
"""

from __future__ import annotations

import copy
import logging
import math
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any, Literal
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    start_http_server,
)
from pydantic import AfterValidator, Field, model_validator

from orchestrator.core.scenario import StrictModel

logger = logging.getLogger(__name__)

UPLOAD_OUTCOMES = ("accepted", "rejected")
DIRECTIONS = ("sent", "received")  # seen from the edge: "sent" is edge -> cloud
# Rejection reasons become a Prometheus label, so they are short codes ("sha256_mismatch", "non_finite"),
# never free text; free text goes in `detail`, which is kept in the ledger only.
REASON_PATTERN = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
EVENT_VALUE_TYPES = (str, int, float, bool, type(None))
LEDGER_FORMAT_VERSION = 2  # 2: upload counts kept apart from the (bounded) list of upload records
# The ledger travels inside every coordinator checkpoint, so its upload records are capped: an edge that sends
# many bad uploads must not make each checkpoint larger (and the run's total work quadratic). The counts
# (`upload_counts`, Prometheus) stay exact; only the oldest records are dropped.
MAX_UPLOAD_RECORDS = 1000

# ---------------------------------------------------------------------------------------------------------
# Prometheus metrics (one registry owned by this module)

METRICS_REGISTRY = CollectorRegistry(auto_describe=True)
METRICS_CONTENT_TYPE = CONTENT_TYPE_LATEST

UPLOADS_TOTAL = Counter(
    "baim_uploads",
    "Edge model uploads by outcome (accepted/rejected) and rejection reason (empty when accepted).",
    ["outcome", "reason"],
    registry=METRICS_REGISTRY,
)
BYTES_TOTAL = Counter(
    "baim_bytes",
    "Bytes each edge sent (edge -> cloud) and received (cloud -> edge), as serialized on the wire.",
    ["edge", "direction"],
    registry=METRICS_REGISTRY,
)
FLOPS_TOTAL = Counter(
    "baim_flops",
    "Floating point operations counted by torch.utils.flop_counter; where=edge|cloud, "
    "name=edge id or training strategy.",
    ["where", "name"],
    registry=METRICS_REGISTRY,
)
PHASE_SECONDS_TOTAL = Counter(
    "baim_phase_seconds",
    "Wall-clock seconds spent per named phase.",
    ["phase"],
    registry=METRICS_REGISTRY,
)
FUSION_SECONDS = Histogram(
    "baim_fusion_seconds",
    "Seconds to fuse one arriving edge model into the BAIM.",
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
    registry=METRICS_REGISTRY,
)
GENERATION_SECONDS = Histogram(
    "baim_generation_seconds",
    "Seconds to generate one batch of images, by task.",
    ["task"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
    registry=METRICS_REGISTRY,
)


def render_latest() -> bytes:
    """The current metrics in Prometheus text format: the body of an HTTP `/metrics` response
    (send it with `Content-Type: METRICS_CONTENT_TYPE`)."""
    return generate_latest(METRICS_REGISTRY)


def start_metrics_server(host: str = "127.0.0.1", port: int = 0) -> tuple[WSGIServer, int]:
    """Serve this module's metrics at http://host:port/metrics from a daemon thread.

    Bound to loopback by default; pass a routable host only behind a firewall or a scraping proxy.
    `port=0` picks a free port. Returns the server (stop it with `server.shutdown(); server.server_close()`)
    and the port it listens on.
    """
    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
        raise ValueError(f"port must be an int in [0, 65535], received {port!r}")
    server, _thread = start_http_server(port, addr=host, registry=METRICS_REGISTRY)
    bound_port = int(server.server_port)
    logger.info("metrics server listening on http://%s:%d/metrics", host, bound_port)
    return server, bound_port


# ---------------------------------------------------------------------------------------------------------
# Argument checks: bad values raise ValueError naming the argument, the expected and the received value


def _check_name(what: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what} must be a non-empty string, received {value!r}")
    return value


def _check_count(what: str, value: Any) -> int:
    # bool is an int subclass; True bytes is a bug upstream, not a count.
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{what} must be a non-negative int, received {value!r}")
    return value


def _check_seconds(what: str, value: Any) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{what} must be a finite non-negative number of seconds, received {value!r}")
    return float(value)


def _check_choice(what: str, value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"{what} must be one of {', '.join(allowed)}; received {value!r}")
    return str(value)


def _check_fields(what: str, fields: dict[str, Any]) -> dict[str, Any]:
    for key, value in fields.items():
        if not isinstance(value, EVENT_VALUE_TYPES) or (
            isinstance(value, float) and not math.isfinite(value)
        ):
            raise ValueError(
                f"{what} field {key!r} must be a str, int, finite float, bool or None; received {value!r}"
            )
    return dict(fields)


def _check_outcome(prefix: str, outcome: Any, reason: Any) -> None:
    """An upload outcome and its reason: a short code when rejected, empty when accepted."""
    _check_choice(f"{prefix}outcome", outcome, UPLOAD_OUTCOMES)
    if outcome == "rejected" and not (isinstance(reason, str) and REASON_PATTERN.match(reason)):
        raise ValueError(
            f"{prefix}reason of a rejected upload must be a short code matching "
            f"{REASON_PATTERN.pattern}, received {reason!r}"
        )
    if outcome == "accepted" and reason != "":
        raise ValueError(f"{prefix}reason must be empty for an accepted upload, received {reason!r}")


def _new_edge() -> dict[str, Any]:
    return {"bytes_sent": 0, "bytes_received": 0, "flops": 0, "seconds": {}}


# ---------------------------------------------------------------------------------------------------------
# The snapshot `to_dict` writes and `from_dict` reads (report.json's "ledger", coordinator checkpoints)

Count = Annotated[int, Field(ge=0, strict=True)]
Seconds = Annotated[float, Field(ge=0, allow_inf_nan=False, strict=True)]
Name = Annotated[str, Field(min_length=1)]
ReasonCode = Annotated[str, Field(pattern=REASON_PATTERN.pattern)]


def _check_event(event: dict[str, Any]) -> dict[str, Any]:
    _check_seconds("time", event.get("time"))
    _check_name("kind", event.get("kind"))
    return _check_fields("event", event)


class EdgeCosts(StrictModel):
    """What one edge cost."""

    bytes_sent: Count = Field(description="Serialized bytes the edge sent (edge -> cloud).")
    bytes_received: Count = Field(description="Serialized bytes the edge received (cloud -> edge).")
    flops: Count = Field(description="FLOPs spent on the edge (training, personalisation).")
    seconds: dict[Name, Seconds] = Field(description="Wall-clock seconds per phase on this edge.")


class PhaseTotals(StrictModel):
    """Wall-clock time of one named phase, summed over its occurrences."""

    seconds: Seconds = Field(description="Total seconds.")
    count: Count = Field(description="How many times the phase was recorded.")


class UploadRecord(StrictModel):
    """One upload's outcome, as recorded."""

    time: Seconds = Field(description="Unix time of the record.")
    edge: Name = Field(description="The edge id the upload named ('unknown' when it named none).")
    outcome: Literal["accepted", "rejected"] = Field(description="Accepted or rejected.")
    reason: str = Field(description="Short rejection code (a Prometheus label); empty when accepted.")
    version: Count | None = Field(description="The upload's version, when it was a valid one.")
    detail: str = Field(description="Free-text explanation of a rejection.")

    @model_validator(mode="after")
    def _reason_matches_outcome(self) -> UploadRecord:
        _check_outcome("", self.outcome, self.reason)
        return self


class UploadCounts(StrictModel):
    """Every upload ever recorded, also those whose record was dropped (MAX_UPLOAD_RECORDS)."""

    accepted: Count = Field(description="Accepted uploads.")
    rejected: dict[ReasonCode, Count] = Field(description="Rejected uploads per reason code.")


class LedgerSnapshot(StrictModel):
    """A ledger as JSON (format 2; format 1, from older checkpoints, is upgraded on reading)."""

    format_version: Literal[2] = Field(description="Snapshot format; 2 keeps upload counts apart.")
    edges: dict[Name, EdgeCosts] = Field(description="Costs per edge id.")
    cloud_flops: dict[Name, Count] = Field(description="Cloud FLOPs per training strategy or baseline.")
    phases: dict[Name, PhaseTotals] = Field(description="Wall-clock seconds per named phase.")
    upload_counts: UploadCounts = Field(description="Exact upload counts.")
    uploads: list[UploadRecord] = Field(
        description="The newest MAX_UPLOAD_RECORDS upload records, oldest first."
    )
    events: list[Annotated[dict[str, Any], AfterValidator(_check_event)]] = Field(
        description="What happened: each event has `time` (Unix seconds), `kind` and JSON scalar fields."
    )

    @model_validator(mode="before")
    @classmethod
    def _upgrade_format_1(cls, data: Any) -> Any:
        """Format 1 held every upload record, so its counts are those of its records."""
        if not (isinstance(data, dict) and data.get("format_version") == 1):
            return data
        records = data.get("uploads")
        records = records if isinstance(records, list) else []
        accepted, rejected = 0, dict[str, int]()
        for upload in records:
            if not isinstance(upload, dict):
                continue  # the model names the malformed record
            if upload.get("outcome") == "accepted":
                accepted += 1
            elif isinstance(upload.get("reason"), str):
                rejected[upload["reason"]] = rejected.get(upload["reason"], 0) + 1
        return {**data, "format_version": 2, "upload_counts": {"accepted": accepted, "rejected": rejected}}


# ---------------------------------------------------------------------------------------------------------


class Ledger:
    """Costs of one run (or of one actor's share of it), JSON-able and mergeable.

    export_metrics: also update this process's Prometheus metrics on every record (default True). A ledger
    whose numbers will be merged into another ledger in the same process should pass False, so the merge
    does not count them twice.
    """

    def __init__(self, *, export_metrics: bool = True) -> None:
        self.export_metrics = export_metrics
        self._edges: dict[str, dict[str, Any]] = {}
        self._cloud_flops: dict[str, int] = {}
        self._phases: dict[str, dict[str, Any]] = {}  # name -> {"seconds": float, "count": int}
        self._uploads: list[dict[str, Any]] = []  # the newest MAX_UPLOAD_RECORDS, oldest first
        self._accepted_uploads = 0
        self._rejected_uploads: dict[str, int] = {}  # reason -> count
        self._events: list[dict[str, Any]] = []

    # -- bytes and FLOPs --------------------------------------------------------------------------------

    def record_bytes(self, edge: str, direction: Literal["sent", "received"], nbytes: int) -> None:
        """Count `nbytes` (the serialized length actually transferred) sent or received by `edge`."""
        _check_name("edge", edge)
        _check_choice("direction", direction, DIRECTIONS)
        _check_count("nbytes", nbytes)
        self._edge(edge)[f"bytes_{direction}"] += nbytes
        if self.export_metrics:
            BYTES_TOTAL.labels(edge=edge, direction=direction).inc(nbytes)

    def record_edge_flops(self, edge: str, flops: int) -> None:
        """Count FLOPs spent on `edge` (training, personalisation)."""
        _check_name("edge", edge)
        _check_count("flops", flops)
        self._edge(edge)["flops"] += flops
        if self.export_metrics:
            FLOPS_TOTAL.labels(where="edge", name=edge).inc(flops)

    def record_cloud_flops(self, strategy: str, flops: int) -> None:
        """Count FLOPs spent in the cloud for `strategy` (finetune, freeze, scratch, fedavg, ...)."""
        _check_name("strategy", strategy)
        _check_count("flops", flops)
        self._cloud_flops[strategy] = self._cloud_flops.get(strategy, 0) + flops
        if self.export_metrics:
            FLOPS_TOTAL.labels(where="cloud", name=strategy).inc(flops)

    # -- time -------------------------------------------------------------------------------------------

    def record_seconds(self, phase: str, seconds: float, *, edge: str | None = None) -> None:
        """Add `seconds` of wall-clock time to `phase` (and to that edge's own per-phase time if given)."""
        _check_name("phase", phase)
        seconds = _check_seconds("seconds", seconds)
        if edge is not None:
            _check_name("edge", edge)
            per_edge = self._edge(edge)["seconds"]
            per_edge[phase] = per_edge.get(phase, 0.0) + seconds
        totals = self._phases.setdefault(phase, {"seconds": 0.0, "count": 0})
        totals["seconds"] += seconds
        totals["count"] += 1
        if self.export_metrics:
            PHASE_SECONDS_TOTAL.labels(phase=phase).inc(seconds)

    @contextmanager
    def phase(self, name: str, *, edge: str | None = None) -> Iterator[None]:
        """Time the `with` block (time.perf_counter) and record it under `name`, also when it raises."""
        _check_name("phase", name)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.record_seconds(name, time.perf_counter() - start, edge=edge)

    def record_fusion_seconds(self, seconds: float) -> None:
        """One edge model fused into the BAIM: phase "fusion" and the fusion_seconds histogram."""
        self.record_seconds("fusion", seconds)
        if self.export_metrics:
            FUSION_SECONDS.observe(seconds)

    def record_generation_seconds(self, task: str, seconds: float) -> None:
        """One generation request: phase "generate/<task>" and the generation_seconds histogram."""
        _check_name("task", task)
        self.record_seconds(f"generate/{task}", seconds)
        if self.export_metrics:
            GENERATION_SECONDS.labels(task=task).observe(seconds)

    @contextmanager
    def fusion(self) -> Iterator[None]:
        """Time the `with` block as one fusion."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.record_fusion_seconds(time.perf_counter() - start)

    @contextmanager
    def generation(self, task: str) -> Iterator[None]:
        """Time the `with` block as one generation for `task`."""
        _check_name("task", task)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.record_generation_seconds(task, time.perf_counter() - start)

    # -- uploads and events -----------------------------------------------------------------------------

    def record_upload(
        self,
        edge: str,
        outcome: Literal["accepted", "rejected"],
        *,
        reason: str = "",
        version: int | None = None,
        detail: str = "",
        at: float | None = None,
    ) -> None:
        """An upload from `edge` was accepted, or rejected with `reason` (a short code such as
        "sha256_mismatch"; free text goes in `detail`), at Unix time `at` (None: now). Count its bytes with
        `record_bytes` separately."""
        _check_name("edge", edge)
        _check_outcome("", outcome, reason)
        if version is not None:
            _check_count("version", version)
        if not isinstance(detail, str):
            raise ValueError(f"detail must be a string, received {detail!r}")
        self._count_upload(outcome, reason, 1)
        self._uploads.append(
            {
                "time": time.time() if at is None else float(at),
                "edge": edge,
                "outcome": outcome,
                "reason": reason,
                "version": version,
                "detail": detail,
            }
        )
        del self._uploads[:-MAX_UPLOAD_RECORDS]

    def _count_upload(self, outcome: str, reason: str, count: int) -> None:
        """Add `count` uploads to the exact counts (and to Prometheus when this ledger exports)."""
        if outcome == "accepted":
            self._accepted_uploads += count
        else:
            self._rejected_uploads[reason] = self._rejected_uploads.get(reason, 0) + count
        if self.export_metrics:
            UPLOADS_TOTAL.labels(outcome=outcome, reason=reason).inc(count)

    def record_event(self, kind: str, **fields: str | int | float | bool | None) -> None:
        """Something that happened (an edge joined, crashed, a round started), with JSON-able fields."""
        _check_name("kind", kind)
        if "time" in fields or "kind" in fields:
            raise ValueError("event fields may not be named 'time' or 'kind' (the ledger sets them)")
        event = {"time": time.time(), "kind": kind, **_check_fields(f"event {kind!r}", fields)}
        self._events.append(event)

    # -- reading ----------------------------------------------------------------------------------------

    @property
    def edges(self) -> list[str]:
        return sorted(self._edges)

    def edge_costs(self, edge: str) -> dict[str, Any]:
        """bytes_sent, bytes_received, flops and seconds per phase of one edge (a copy)."""
        if edge not in self._edges:
            raise KeyError(f"no costs recorded for edge {edge!r}; edges with costs: {self.edges}")
        return copy.deepcopy(self._edges[edge])

    def cloud_flops(self) -> dict[str, int]:
        return dict(self._cloud_flops)

    def phase_seconds(self, phase: str) -> float:
        return float(self._phases.get(phase, {}).get("seconds", 0.0))

    def total_bytes(self, direction: Literal["sent", "received"]) -> int:
        _check_choice("direction", direction, DIRECTIONS)
        return sum(costs[f"bytes_{direction}"] for costs in self._edges.values())

    def upload_counts(self) -> dict[str, Any]:
        """{"accepted": n, "rejected": {reason: n}}: every upload ever recorded, also those whose record
        was dropped (see MAX_UPLOAD_RECORDS)."""
        return {"accepted": self._accepted_uploads, "rejected": dict(sorted(self._rejected_uploads.items()))}

    @property
    def uploads(self) -> list[dict[str, Any]]:
        """The newest MAX_UPLOAD_RECORDS upload records, oldest first."""
        return copy.deepcopy(self._uploads)

    @property
    def events(self) -> list[dict[str, Any]]:
        return copy.deepcopy(self._events)

    # -- serialisation and merging ----------------------------------------------------------------------

    def snapshot(self) -> LedgerSnapshot:
        """The typed snapshot (report.json, checkpoints); `from_dict(snapshot().model_dump())` restores it."""
        return LedgerSnapshot.model_validate(
            {
                "format_version": LEDGER_FORMAT_VERSION,
                "edges": {edge: self._edges[edge] for edge in sorted(self._edges)},
                "cloud_flops": dict(sorted(self._cloud_flops.items())),
                "phases": {name: self._phases[name] for name in sorted(self._phases)},
                "upload_counts": self.upload_counts(),
                "uploads": self._uploads,
                "events": self._events,
            }
        )

    def to_dict(self) -> dict[str, Any]:
        """The snapshot as plain JSON-able data."""
        return self.snapshot().model_dump()

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, export_metrics: bool = True) -> Ledger:
        """Restore a ledger written by `to_dict` (format 1 or 2). Raises ValueError (a pydantic
        ValidationError) naming every malformed entry by its path.

        Restored totals are not replayed into Prometheus: counters there start from zero in every process.
        """
        return cls.from_snapshot(LedgerSnapshot.model_validate(data), export_metrics=export_metrics)

    @classmethod
    def from_snapshot(cls, snapshot: LedgerSnapshot, *, export_metrics: bool = True) -> Ledger:
        """Restore a ledger from its typed snapshot (not replayed into Prometheus either)."""
        ledger = cls(export_metrics=export_metrics)
        ledger._edges = {edge: costs.model_dump() for edge, costs in snapshot.edges.items()}
        ledger._cloud_flops = dict(snapshot.cloud_flops)
        ledger._phases = {phase: totals.model_dump() for phase, totals in snapshot.phases.items()}
        ledger._uploads = [upload.model_dump() for upload in snapshot.uploads[-MAX_UPLOAD_RECORDS:]]
        ledger._accepted_uploads = snapshot.upload_counts.accepted
        ledger._rejected_uploads = dict(snapshot.upload_counts.rejected)
        ledger._events = [dict(event) for event in snapshot.events]
        return ledger

    def merge(self, other: Ledger) -> None:
        """Add `other`'s costs to this ledger (bytes, FLOPs and seconds add; uploads and events are
        interleaved by time). If this ledger exports metrics, the merged amounts are exported too:
        `other` normally comes from another process, whose Prometheus counters nobody scrapes."""
        if not isinstance(other, Ledger):
            raise ValueError(f"can only merge a Ledger, received {type(other).__name__}")
        if other is self:
            raise ValueError("cannot merge a ledger into itself")
        snapshot = other.to_dict()
        for edge, costs in snapshot["edges"].items():
            self.record_bytes(edge, "sent", costs["bytes_sent"])
            self.record_bytes(edge, "received", costs["bytes_received"])
            self.record_edge_flops(edge, costs["flops"])
            per_edge = self._edge(edge)["seconds"]
            for phase, seconds in costs["seconds"].items():
                per_edge[phase] = per_edge.get(phase, 0.0) + seconds
        for strategy, flops in snapshot["cloud_flops"].items():
            self.record_cloud_flops(strategy, flops)
        for phase, totals in snapshot["phases"].items():
            mine = self._phases.setdefault(phase, {"seconds": 0.0, "count": 0})
            mine["seconds"] += totals["seconds"]
            mine["count"] += totals["count"]
            if self.export_metrics:
                PHASE_SECONDS_TOTAL.labels(phase=phase).inc(totals["seconds"])
        counts = snapshot["upload_counts"]
        self._count_upload("accepted", "", counts["accepted"])
        for reason, count in counts["rejected"].items():
            self._count_upload("rejected", reason, count)
        self._uploads.extend(snapshot["uploads"])
        self._events.extend(snapshot["events"])
        # Stable sorts: records with equal times keep their order (this ledger's first).
        self._uploads.sort(key=lambda record: record["time"])
        del self._uploads[:-MAX_UPLOAD_RECORDS]
        self._events.sort(key=lambda record: record["time"])

    def _edge(self, edge: str) -> dict[str, Any]:
        if edge not in self._edges:
            self._edges[edge] = _new_edge()
        return self._edges[edge]
