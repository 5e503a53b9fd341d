"""Reports that scale: the full per-edge table as edges.parquet, and report.md's summary of many edges
(counts per outcome, distributions, the slowest and fastest edges) instead of one row per edge."""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from orchestrator.core.reports import RunReport

EDGES_PARQUET = "edges.parquet"
EDGE_TABLE_LIMIT = 50  # above this many edges report.md summarises; edges.parquet has every row
EXTREMES = 5  # slowest and fastest edges listed


def edge_table(report: RunReport) -> pa.Table:
    """One row per edge of the BAIM run, with the FedAvg baseline's figures beside when it ran."""
    rows = list(report.edges.items())
    fedavg = report.baselines.fedavg if report.baselines is not None else None
    fedavg_edges: dict[str, object] = dict(getattr(fedavg, "edges", None) or {})
    columns: dict[str, pa.Array] = {
        "edge_id": pa.array([e for e, _ in rows], pa.string()),
        "task": pa.array([r.task for _, r in rows], pa.string()),
        "status": pa.array([r.status for _, r in rows], pa.string()),
        "error": pa.array([r.error for _, r in rows], pa.string()),
        "shard_size": pa.array([r.shard_size for _, r in rows], pa.int64()),
        "epochs_done": pa.array([r.epochs_done for _, r in rows], pa.int64()),
        "local_epochs": pa.array([r.local_epochs for _, r in rows], pa.int64()),
        "bytes_sent": pa.array([r.bytes_sent for _, r in rows], pa.int64()),
        "bytes_received": pa.array([r.bytes_received for _, r in rows], pa.int64()),
        "flops": pa.array([r.flops for _, r in rows], pa.int64()),
        "train_seconds": pa.array([r.train_seconds for _, r in rows], pa.float64()),
        "upload_seconds": pa.array([r.upload_seconds for _, r in rows], pa.float64()),
        "upload_outcome": pa.array([r.upload.outcome for _, r in rows], pa.string()),
        "upload_reason": pa.array([r.upload.reason for _, r in rows], pa.string()),
        "upload_sha256": pa.array([r.upload.sha256 for _, r in rows], pa.string()),
        "upload_admission": pa.array([r.upload.admission for _, r in rows], pa.string()),
        "upload_decision_seconds": pa.array([r.upload.decision_seconds for _, r in rows], pa.float64()),
        "fedavg_bytes_sent": pa.array([_fedavg(fedavg_edges, e, "bytes_sent") for e, _ in rows], pa.int64()),
        "fedavg_bytes_received": pa.array(
            [_fedavg(fedavg_edges, e, "bytes_received") for e, _ in rows], pa.int64()
        ),
        "fedavg_flops": pa.array([_fedavg(fedavg_edges, e, "flops") for e, _ in rows], pa.int64()),
    }
    return pa.table(columns)


def _fedavg(edges: dict[str, object], edge_id: str, field: str) -> int | None:
    row = edges.get(edge_id)
    return None if row is None else int(getattr(row, field))


def write_edges_parquet(report: RunReport, out_dir: Path) -> Path:
    path = Path(out_dir) / EDGES_PARQUET
    pq.write_table(edge_table(report), path)
    return path


def distribution(values: list[float]) -> list[float]:
    """min, p10, median, p90, max."""
    return [float(v) for v in np.quantile(np.asarray(values, dtype=np.float64), [0, 0.1, 0.5, 0.9, 1.0])]


Formatter = Callable[[float | None], str]
Table = Callable[[Sequence[str], Sequence[Sequence[object]]], list[str]]


def edges_summary(report: RunReport, fmt_bytes: Formatter, fmt_flops: Formatter, table: Table) -> list[str]:
    """report.md's edges section for many edges: counts, distributions and the extremes (report.md's own
    number formats and table layout are passed in)."""
    rows = report.edges
    statuses = collections.Counter(r.status for r in rows.values())
    outcomes = collections.Counter(
        r.upload.outcome + (f" ({r.upload.reason})" if r.upload.reason else "") for r in rows.values()
    )
    lines = [
        f"{len(rows):,} edges; the full per-edge table is in `{EDGES_PARQUET}` "
        f"(e.g. `pyarrow.parquet.read_table('{EDGES_PARQUET}').to_pandas()`).",
        "",
        *table(["status", "edges"], [[s, f"{n:,}"] for s, n in statuses.most_common()]),
        "",
        *table(["upload outcome", "edges"], [[o, f"{n:,}"] for o, n in outcomes.most_common()]),
        "",
    ]
    measured = [r for r in rows.values() if r.epochs_done > 0]
    if measured:
        header = ["per edge (edges that trained)", "min", "p10", "median", "p90", "max"]
        figures: list[tuple[str, list[float], Formatter]] = [
            ("bytes sent", [r.bytes_sent for r in measured], fmt_bytes),
            ("FLOPs", [r.flops for r in measured], fmt_flops),
            ("train seconds", [r.train_seconds for r in measured], lambda v: f"{v or 0:.3f}"),
            ("shard size", [r.shard_size for r in measured], lambda v: f"{v or 0:g}"),
        ]
        lines += table(header, [[name, *(fmt(v) for v in distribution(vals))] for name, vals, fmt in figures])
        ordered = sorted(measured, key=lambda r: r.train_seconds)
        by_id = {id(r): e for e, r in rows.items()}
        extremes = [("slowest", list(reversed(ordered[-EXTREMES:]))), ("fastest", ordered[:EXTREMES])]
        lines += [""]
        for label, chosen in extremes:
            lines += table(
                [f"{label} edges", "task", "status", "train s", "FLOPs"],
                [
                    [by_id[id(r)], r.task, r.status, f"{r.train_seconds:.3f}", fmt_flops(r.flops)]
                    for r in chosen
                ],
            )
            lines += [""]
    return lines
