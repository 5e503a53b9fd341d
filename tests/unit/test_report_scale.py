"""report.md and edges.parquet at 1,000 edges: a summary in the page, every row in the table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from orchestrator.report.build import summary_table
from orchestrator.report.markdown import read_report, write_report_markdown
from orchestrator.report.scale import EDGES_PARQUET, distribution
from tests.support.reports import bare_report, edge_row, write_report_json


def many_edges_report(count: int) -> dict[str, Any]:
    report = bare_report()
    edges = {}
    for i in range(count):
        row = edge_row(1_000 + i, 10 * i, status="crashed" if i % 10 == 0 else "accepted")
        row["train_seconds"] = float(i)
        edges[f"e{i:04d}"] = row
    report["edges"] = edges
    return report


def test_a_thousand_edges_are_summarised_and_tabled_in_full(tmp_path: Path) -> None:
    out = tmp_path / "run"
    write_report_json(out, many_edges_report(1000))

    markdown = write_report_markdown(out).read_text()

    table = pq.read_table(out / EDGES_PARQUET).to_pydict()
    assert table["edge_id"] == [f"e{i:04d}" for i in range(1000)]
    assert table["bytes_sent"] == [1_000 + i for i in range(1000)]
    assert table["flops"] == [10 * i for i in range(1000)]
    assert table["status"].count("crashed") == 100
    assert table["fedavg_flops"] == [None] * 1000
    assert "| crashed | 100 |" in markdown and "| accepted | 900 |" in markdown
    assert "| none | 100 |" in markdown  # the crashed edges' upload outcome
    assert markdown.count("| e0") == 10  # 5 slowest + 5 fastest, not 1,000 rows
    assert "| e0999 | smile | accepted | 999.000 |" in markdown  # the slowest
    assert len(summary_table(read_report(out / "report.json")).splitlines()) < 40


def test_a_few_edges_keep_their_table_in_the_page(tmp_path: Path) -> None:
    out = tmp_path / "run"
    write_report_json(out, many_edges_report(3))
    markdown = write_report_markdown(out).read_text()
    assert all(f"| e000{i} |" in markdown for i in range(3))
    assert pq.read_table(out / EDGES_PARQUET).num_rows == 3


def test_distribution_is_min_deciles_median_max() -> None:
    assert distribution([float(v) for v in range(11)]) == [0.0, 1.0, 5.0, 9.0, 10.0]


def test_admissions_are_counted_per_task_and_written_per_edge(tmp_path: Path) -> None:
    # Prepare: 900 accepted uploads of one task, of which a bound of 30 admitted the first 30.
    report = many_edges_report(1000)
    report["scenario"]["cloud"]["max_learners_per_task"] = 30
    accepted = [e for e, row in report["edges"].items() if row["upload"]["outcome"] == "accepted"]
    for position, edge_id in enumerate(accepted):
        admission = "admitted" if position < 30 else "registry_only"
        report["edges"][edge_id]["upload"]["admission"] = admission
        report["uploads"].append({
            "edge_id": edge_id, "version": 1, "accepted": True, "reason": "", "detail": "",
            "sha256": "ab" * 32, "artifact": f"edge/{edge_id}@v000001", "holdout_loss": 0.5,
            "admission": admission, "admission_detail": "",
        })  # fmt: skip
    out = tmp_path / "run"
    write_report_json(out, report)

    markdown = write_report_markdown(out).read_text()

    assert "(cloud.max_learners_per_task: 30)" in markdown
    assert "| smile | 30 | 870 |" in markdown
    admissions = pq.read_table(out / EDGES_PARQUET).to_pydict()["upload_admission"]
    assert admissions.count("admitted") == 30 and admissions.count("registry_only") == 870
    assert admissions.count(None) == 100  # the crashed edges uploaded nothing


def test_a_few_edges_show_their_admissions_under_the_edge_table(tmp_path: Path) -> None:
    report = many_edges_report(3)  # e0000 crashed; e0001 and e0002 accepted, unbounded
    for edge_id in ("e0001", "e0002"):
        report["uploads"].append({
            "edge_id": edge_id, "version": 1, "accepted": True, "reason": "", "detail": "",
            "sha256": "ab" * 32, "artifact": f"edge/{edge_id}@v000001", "holdout_loss": 0.5,
            "admission": "admitted", "admission_detail": "",
        })  # fmt: skip
    out = tmp_path / "run"
    write_report_json(out, report)

    markdown = write_report_markdown(out).read_text()

    assert "(cloud.max_learners_per_task: unbounded)" in markdown
    assert "| smile | 2 | 0 |" in markdown
