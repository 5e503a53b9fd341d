"""report.json: builds the `RunReport` (orchestrator.core.reports) of a run and writes it."""

from __future__ import annotations

import collections
import json
import os
from collections.abc import Sequence
from pathlib import Path

from orchestrator.core.metrics import Ledger
from orchestrator.core.receipts import CoordinatorSummary
from orchestrator.core.reports import (
    REPORT_FORMAT_VERSION,
    CloudReport,
    DataReport,
    EdgeRow,
    RunEvent,
    RunReport,
    StrategyRound,
    StrategyTotals,
    Totals,
    UploadCounts,
    UploadRecord,
)
from orchestrator.core.scenario import Scenario
from orchestrator.data.partitions import Partitions
from orchestrator.data.sources import DataSource
from orchestrator.report.scale import EDGE_TABLE_LIMIT


def build_report(
    *,
    scenario: Scenario,
    source: DataSource,
    partitions: Partitions,
    edges: dict[str, EdgeRow],
    coordinator: CoordinatorSummary,
    ledger: Ledger,
    events: list[RunEvent],
    registry_uri: str,
    wall_seconds: float,
    simulated_seconds: float | None = None,
    run_id: str | None = None,
    failure: str | None = None,
) -> RunReport:
    """The report from the engine's per-edge rows and the coordinator's summary (of `finish()`, or of
    `summary()` when finish() failed: then `failure` says why)."""
    snapshot = ledger.to_dict()
    cloud_seconds = {
        phase.removeprefix("train/"): totals["seconds"]
        for phase, totals in snapshot["phases"].items()
        if phase.startswith("train/")
    }
    cloud_flops = ledger.cloud_flops()
    strategies: dict[str, StrategyTotals] = {}
    for cloud_round in coordinator.rounds:
        for strategy, result in cloud_round.strategies.items():
            entry = strategies.setdefault(
                strategy,
                StrategyTotals(
                    flops=cloud_flops.get(strategy, 0), seconds=cloud_seconds.get(strategy, 0.0), rounds=[]
                ),
            )
            entry.rounds.append(StrategyRound(round=cloud_round.round, run=result))
    return RunReport(
        format_version=REPORT_FORMAT_VERSION,
        run_id=run_id,
        failure=failure,
        scenario=scenario,
        seed=scenario.seed,
        data=DataReport.model_validate(
            {
                **source.describe(),
                "resolution": scenario.data.resolution,
                "shards": {
                    group: {k: len(v) for k, v in shards.items()}
                    for group, shards in partitions.groups().items()
                },
            }
        ),
        edges=edges,
        uploads=[
            UploadRecord.from_receipt(r)
            for r in (*coordinator.accepted, *coordinator.rejected, *coordinator.received)
        ],
        cloud=CloudReport(
            strategies=strategies,
            flops=cloud_flops,
            seconds=cloud_seconds,
            rounds=coordinator.rounds,
            round_errors=coordinator.round_errors,
            baim_version=coordinator.baim_version,
            baim_params=coordinator.baim_params,
            learners=coordinator.learners,
            untrained_learners=coordinator.untrained_learners,
            coordinator_restarts=coordinator.restarts,
            new_tasks=coordinator.new_tasks,
            learner_pruning=coordinator.learner_pruning,
        ),
        tasks=coordinator.tasks,
        totals=Totals(
            edge_bytes_sent=sum(row.bytes_sent for row in edges.values()),
            edge_bytes_received=sum(row.bytes_received for row in edges.values()),
            edge_flops=sum(row.flops for row in edges.values()),
            cloud_flops=sum(cloud_flops.values()),
            uploads=UploadCounts.model_validate(ledger.upload_counts()),
            wall_seconds=wall_seconds,
            simulated_seconds=simulated_seconds,
        ),
        events=events,
        registry=registry_uri,
        ledger=snapshot,
    )


def write_report(report: RunReport, path: Path) -> None:
    """Write atomically (temporary file, then rename) so a reader never sees half a report."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".json.tmp")
    document = report.model_dump(mode="json")
    temporary.write_text(json.dumps(document, indent=1, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(temporary, path)


def summary_table(report: RunReport) -> str:
    """A plain-text table of edges, then tasks, for the terminal."""
    rows: list[tuple[str, ...]]
    if len(report.edges) > EDGE_TABLE_LIMIT:  # counts only: every row is in edges.parquet
        counts = collections.Counter(row.status for row in report.edges.values())
        rows = [("edges", "status"), *((f"{n:,}", status) for status, n in counts.most_common())]
    else:
        rows = [("edge", "task", "status", "upload", "bytes sent", "GFLOPs", "train s")]
        for edge_id, row in report.edges.items():
            upload = row.upload.outcome + (f" ({row.upload.reason})" if row.upload.reason else "")
            gflops, seconds = f"{row.flops / 1e9:.3f}", f"{row.train_seconds:.2f}"
            rows.append((edge_id, row.task, row.status, upload, f"{row.bytes_sent:,}", gflops, seconds))
    lines = _format(rows)
    task_rows: list[tuple[str, ...]] = [
        ("task", "params", "BAIM params", "test loss", "max abs diff", "learners")
    ]
    for task, info in report.tasks.items():
        loss = "n/a" if info.test_loss is None else f"{info.test_loss:.5f}"
        diff, learners = f"{info.decomposition_max_abs_diff:.2e}", ",".join(info.learners)
        task_rows.append((task, f"{info.params:,}", f"{info.baim_params:,}", loss, diff, learners))
    cloud = report.cloud
    flops = ", ".join(f"{s} {f / 1e9:.2f} GFLOPs" for s, f in cloud.flops.items()) or "no training"
    failed_rounds = [f"cloud round {e.round} failed {e.attempts}x: {e.error}" for e in cloud.round_errors]
    failure = [f"RUN FAILED: {report.failure}"] if report.failure else []
    return "\n".join(
        [
            *lines,
            "",
            *_format(task_rows),
            "",
            f"cloud: {len(cloud.rounds)} rounds, BAIM {cloud.baim_version} "
            f"({cloud.baim_params:,} params), {flops}; "
            f"coordinator restarts: {cloud.coordinator_restarts}",
            *failed_rounds,
            f"data: {report.data.kind} at {report.data.root}",
            *failure,
        ]
    )


def _format(rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)) for row in rows
    ]
