"""report.json: what a run did and what it cost, in one JSON document (DESIGN.md, Interfaces).

Top-level keys:
- `run_id`: the engine's id of this run (the registry's coordinator state carries the same);
- `failure`: None, or why the run failed (a cloud round failed: learners untrained, no task models published);
- `scenario` (as validated, JSON) and `seed`; `data` (which data source, partition sizes);
- `edges`: per edge id: task, status, bytes_sent / bytes_received, flops, train_seconds, upload outcome
  (accepted, or rejected with reason code and detail; `receipt_from`: "edge", or "coordinator" when the
  edge died before its receipt arrived), epochs done, declared resources;
- `uploads`: the coordinator's upload receipts (every accepted one; the newest
  `cloud.uploads.rejected_receipts_per_edge` rejected ones per edge; exact counts are in `totals`);
- `cloud`: FLOPs and seconds per strategy, the rounds (learners trained, per-epoch losses per strategy),
  `round_errors` (per failed round index: attempts, learners, the last error), BAIM version and parameter
  count, the coordinator's restarts, untrained learners;
- `tasks`: per task: decomposed model's parameter count, test loss, decomposition max abs difference,
  learners kept, registry artifact;
- `totals`: bytes, FLOPs (edge, cloud), upload counts; `events`: the timeline as it was played;
- `ledger`: the merged cost ledger (orchestrator.core.metrics.Ledger.to_dict()).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from orchestrator.core.metrics import Ledger
from orchestrator.core.scenario import Scenario
from orchestrator.data.partitions import Partitions
from orchestrator.data.sources import DataSource

REPORT_FORMAT_VERSION = 1


def build_report(
    *,
    scenario: Scenario,
    source: DataSource,
    partitions: Partitions,
    edges: dict[str, dict[str, Any]],
    coordinator: dict[str, Any],
    ledger: Ledger,
    events: list[dict[str, Any]],
    registry_uri: str,
    wall_seconds: float,
    run_id: str | None = None,
    failure: str | None = None,
) -> dict[str, Any]:
    """Assemble the report from the engine's per-edge rows and the coordinator's finish() summary (or its
    summary() when finish() failed: then `failure` says why)."""
    cloud_seconds = {
        phase.removeprefix("train/"): totals["seconds"]
        for phase, totals in ledger.to_dict()["phases"].items()
        if phase.startswith("train/")
    }
    strategies: dict[str, dict[str, Any]] = {}
    for round_summary in coordinator["rounds"]:
        for strategy, result in round_summary["strategies"].items():
            entry = strategies.setdefault(strategy, {"flops": 0, "seconds": 0.0, "rounds": []})
            entry["rounds"].append({"round": round_summary["round"], **result})
    for strategy, entry in strategies.items():
        entry["flops"] = ledger.cloud_flops().get(strategy, 0)
        entry["seconds"] = cloud_seconds.get(strategy, 0.0)
    uploads = [
        {
            key: receipt[key]
            for key in ("edge_id", "version", "accepted", "reason", "detail", "sha256", "artifact")
        }
        for receipt in [*coordinator["accepted"], *coordinator["rejected"]]
    ]
    return {
        "format_version": REPORT_FORMAT_VERSION,
        "run_id": run_id,
        "failure": failure,
        "scenario": scenario.model_dump(mode="json"),
        "seed": scenario.seed,
        "data": {
            **source.describe(),
            "resolution": scenario.data.resolution,
            "shards": {
                group: {k: len(v) for k, v in shards.items()} for group, shards in partitions.groups().items()
            },
        },
        "edges": edges,
        "uploads": uploads,
        "cloud": {
            "strategies": strategies,
            "flops": ledger.cloud_flops(),
            "seconds": cloud_seconds,
            "rounds": coordinator["rounds"],
            "round_errors": coordinator.get("round_errors", []),
            "baim_version": coordinator["baim_version"],
            "baim_params": coordinator["baim_params"],
            "learners": coordinator["learners"],
            "untrained_learners": coordinator["untrained_learners"],
            "coordinator_restarts": coordinator["restarts"],
        },
        "tasks": coordinator["tasks"],
        "totals": {
            "edge_bytes_sent": sum(row["bytes_sent"] for row in edges.values()),
            "edge_bytes_received": sum(row["bytes_received"] for row in edges.values()),
            "edge_flops": sum(row["flops"] for row in edges.values()),
            "cloud_flops": sum(ledger.cloud_flops().values()),
            "uploads": ledger.upload_counts(),
            "wall_seconds": wall_seconds,
        },
        "events": events,
        "registry": registry_uri,
        "ledger": ledger.to_dict(),
    }


def write_report(report: dict[str, Any], path: Path) -> None:
    """Write atomically (temporary file, then rename) so a reader never sees half a report."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(report, indent=1, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(temporary, path)


def summary_table(report: dict[str, Any]) -> str:
    """A plain-text table of edges, then tasks, for the terminal."""
    rows: list[tuple[str, ...]] = [("edge", "task", "status", "upload", "bytes sent", "GFLOPs", "train s")]
    for edge_id, row in report["edges"].items():
        upload = row["upload"]["outcome"] + (
            f" ({row['upload']['reason']})" if row["upload"]["reason"] else ""
        )
        gflops, seconds = f"{row['flops'] / 1e9:.3f}", f"{row['train_seconds']:.2f}"
        rows.append((edge_id, row["task"], row["status"], upload, f"{row['bytes_sent']:,}", gflops, seconds))
    lines = _format(rows)
    task_rows: list[tuple[str, ...]] = [
        ("task", "params", "BAIM params", "test loss", "max abs diff", "learners")
    ]
    for task, info in report["tasks"].items():
        loss = "n/a" if info["test_loss"] is None else f"{info['test_loss']:.5f}"
        diff, learners = f"{info['decomposition_max_abs_diff']:.2e}", ",".join(info["learners"])
        task_rows.append((task, f"{info['params']:,}", f"{info['baim_params']:,}", loss, diff, learners))
    cloud = report["cloud"]
    flops = ", ".join(f"{s} {f / 1e9:.2f} GFLOPs" for s, f in cloud["flops"].items()) or "no training"
    failed_rounds = [
        f"cloud round {e['round']} failed {e['attempts']}x: {e['error']}"
        for e in cloud.get("round_errors") or []
    ]
    failure = [f"RUN FAILED: {report['failure']}"] if report.get("failure") else []
    return "\n".join(
        [
            *lines,
            "",
            *_format(task_rows),
            "",
            f"cloud: {len(cloud['rounds'])} rounds, BAIM {cloud['baim_version']} "
            f"({cloud['baim_params']:,} params), {flops}; "
            f"coordinator restarts: {cloud['coordinator_restarts']}",
            *failed_rounds,
            f"data: {report['data']['kind']} at {report['data']['root']}",
            *failure,
        ]
    )


def _format(rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)) for row in rows
    ]
