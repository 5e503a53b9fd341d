"""Availability traces: CSV and Parquet round trips, row errors named, the seeded synthesiser, the CLI."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from orchestrator.cli.main import main
from orchestrator.core.errors import ScenarioError
from orchestrator.core.scenario import load_scenario
from orchestrator.data.traces import OnlineInterval, read_trace, synthesise_trace, write_trace

REPO = Path(__file__).resolve().parents[2]
ROWS = [OnlineInterval("a", 0.0, 10.0, 1.5, None), OnlineInterval("a", 20.0, 30.0, 1.5, 8.0),
        OnlineInterval("b", 5.0, 6.0, 0.5, 2.0)]  # fmt: skip


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_a_trace_round_trips(tmp_path: Path, suffix: str) -> None:
    assert read_trace(write_trace(ROWS, tmp_path / f"t{suffix}")) == ROWS


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("edge_id,start_s,end_s,speed\na,0,1,1\n", "missing column"),
        ("edge_id,start_s,end_s,speed,bandwidth_mbps\na,5,1,1,\n", "row 1: expected 0 <= start_s < end_s"),
        ("edge_id,start_s,end_s,speed,bandwidth_mbps\na,0,1,0,\n", "row 1: speed must be > 0"),
        ("edge_id,start_s,end_s,speed,bandwidth_mbps\na,0,5,1,\na,4,9,1,\n", "row 2: edge 'a' overlaps"),
        ("edge_id,start_s,end_s,speed,bandwidth_mbps\na,0,5,1,-3\n", "bandwidth_mbps must be > 0"),
    ],
)
def test_bad_rows_are_named(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(ScenarioError, match=message):
        read_trace(path)


def test_synthesised_traces_are_seeded_and_follow_their_parameters() -> None:
    edges = [f"e{i}" for i in range(200)]
    first = synthesise_trace(edges, hours=48, seed=1, dropout_rate=0.5)
    assert synthesise_trace(edges, hours=48, seed=1, dropout_rate=0.5) == first
    assert synthesise_trace(edges, hours=48, seed=2, dropout_rate=0.5) != first
    for rows in (first, synthesise_trace(edges, hours=48, seed=1, mean_online=0.3)):
        by_edge: dict[str, list[OnlineInterval]] = {}
        for row in rows:
            by_edge.setdefault(row.edge_id, []).append(row)
        for intervals in by_edge.values():  # sorted, disjoint, not touching (adjacent sessions merge)
            assert all(a.end_s < b.start_s for a, b in itertools.pairwise(intervals))
    online = {p: sum(r.end_s - r.start_s for r in synthesise_trace(edges, hours=48, seed=1, mean_online=p))
              for p in (0.3, 0.8)}  # fmt: skip
    assert online[0.3] < online[0.8]
    never_gone = max(r.end_s for r in synthesise_trace(edges, hours=48, seed=1, mean_online=1.0,
                                                        diurnal_amplitude=0.0))  # fmt: skip
    gone = synthesise_trace(edges, hours=48, seed=1, mean_online=1.0, diurnal_amplitude=0.0, dropout_rate=1.0)
    assert never_gone == 48 * 3600
    assert sum(r.end_s for r in gone) < sum(r.end_s for r in synthesise_trace(
        edges, hours=48, seed=1, mean_online=1.0, diurnal_amplitude=0.0))  # fmt: skip


def test_baim_traces_synth_writes_a_trace_for_the_scenarios_edges(tmp_path: Path) -> None:
    out = tmp_path / "trace.parquet"
    assert main(["traces", "synth", str(REPO / "scenarios" / "churn.yaml"), "--out", str(out),
                 "--hours", "6", "--bandwidth", "1", "20"]) == 0  # fmt: skip
    rows = read_trace(out)
    scenario_edges = {edge.id for edge in load_scenario(REPO / "scenarios" / "churn.yaml").all_edges()}
    assert rows and {r.edge_id for r in rows} <= scenario_edges
    assert all(1 <= (r.bandwidth_mbps or 0) <= 20 for r in rows)
    assert main(["traces", "synth", str(REPO / "scenarios" / "churn.yaml"), "--out", str(out),
                 "--hours", "0"]) == 2  # fmt: skip
