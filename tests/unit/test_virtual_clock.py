"""The virtual clock: simulated time from the timeline, link delays, slow-downs and traces, exactly."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import TypeAdapter

from orchestrator.core.scenario import Event
from orchestrator.data.traces import OnlineInterval
from orchestrator.runtime.virtual_clock import EdgeWork, simulate

EVENTS: TypeAdapter[list[Event]] = TypeAdapter(list[Event])
MBIT = 1_000_000 // 8  # bytes that take 1 s at 1 Mbit/s


def work(edge_id: str, *, starts: bool = True, epochs: int = 2, latency_ms: float = 0.0) -> EdgeWork:
    """2 epochs of 10 s, 4 Mbit over 1 Mbit/s: trained at 20 s, uploaded at 24 s (+ latency)."""
    return EdgeWork(edge_id, starts, epochs, 10.0, 4 * MBIT, 1.0, latency_ms)


def timeline(*events: dict[str, Any]) -> list[Event]:
    return EVENTS.validate_python(list(events))


def test_an_edge_uploads_after_its_training_and_its_link_delay() -> None:
    # 2 epochs x 10 s, then 4 Mbit over 1 Mbit/s plus 500 ms latency.
    sim = simulate([work("a", latency_ms=500.0)], [])
    fate = sim.fates["a"]
    assert (fate.status, fate.at, fate.epochs_done, fate.upload_attempts) == ("uploads", 24.5, 2, 1)
    assert [(e.t, e.kind) for e in sim.events] == [
        (0.0, "start"),
        (20.0, "upload_start"),
        (24.5, "upload_arrived"),
    ]
    assert sim.end_s == 24.5


def test_timeline_events_act_in_simulated_time_in_the_timelines_order() -> None:
    events = timeline(
        {"kind": "slow", "at_seconds": 5, "edge": "slow", "factor": 3},  # 5 s done, 15 left at 1/3: ends 50
        {"kind": "crash", "at_seconds": 12, "edge": "doomed"},  # mid-training: after 1 epoch
        {"kind": "join", "at_seconds": 30, "edge": "late"},  # starts at 30, uploads at 54
        {"kind": "link", "at_seconds": 40, "edge": "slow", "bandwidth_mbps": 2},  # before its upload: 2 s
        {"kind": "leave", "at_seconds": 25, "edge": "fast"},  # after its upload arrived: not applied
        {"kind": "crash", "at_seconds": 24, "edge": "tie"},  # same instant as its arrival: the crash wins
        {"kind": "poison", "at_seconds": 1, "edge": "fast", "mode": "nan"},
    )
    works = [work("slow"), work("doomed"), work("late", starts=False), work("fast"), work("tie")]
    sim = simulate(works, events)
    fates = sim.fates
    assert (fates["slow"].status, fates["slow"].at) == ("uploads", 52.0)
    assert (fates["doomed"].status, fates["doomed"].at, fates["doomed"].epochs_done) == ("crashed", 12.0, 1)
    assert (fates["late"].status, fates["late"].started_at, fates["late"].at) == ("uploads", 30.0, 54.0)
    assert (fates["fast"].status, fates["fast"].at, [(p.mode, p.scale) for p in fates["fast"].poison]) == (
        "uploads",
        24.0,
        [("nan", 10.0)],
    )
    assert fates["tie"].status == "crashed"
    assert [f.edge_id for f in sim.uploads_in_order()] == ["fast", "slow", "late"]
    played = [(e.t, e.kind, e.edge, e.detail.get("applied")) for e in sim.events if e.kind in
              ("slow", "crash", "join", "link", "leave", "poison")]  # fmt: skip
    assert played == [
        (1.0, "poison", "fast", True), (5.0, "slow", "slow", True), (12.0, "crash", "doomed", True),
        (24.0, "crash", "tie", True), (25.0, "leave", "fast", False), (30.0, "join", "late", None),
        (40.0, "link", "slow", True),
    ]  # fmt: skip
    times = [e.t for e in sim.events]
    assert times == sorted(times)


def test_a_trace_drives_joins_speed_and_drop_outs() -> None:
    trace = [
        OnlineInterval("joins-late", 100.0, 1000.0, speed=2.0),  # online from 100 s at twice the speed
        OnlineInterval("pauses", 0.0, 5.0), OnlineInterval("pauses", 50.0, 1000.0, bandwidth_mbps=4.0),
        OnlineInterval("drops", 0.0, 8.0),  # drops out for good mid-training
    ]  # fmt: skip
    sim = simulate([work("joins-late"), work("pauses"), work("drops"), work("always")], [], trace)
    fates = sim.fates
    assert (fates["joins-late"].status, fates["joins-late"].at) == ("uploads", 114.0)  # 10 s work + 4 s
    assert (fates["pauses"].status, fates["pauses"].at) == ("uploads", 66.0)  # 5 s, pause, 15 s, 1 s upload
    assert (fates["drops"].status, fates["drops"].at, fates["drops"].epochs_done) == ("offline", 8.0, 0)
    assert (fates["always"].status, fates["always"].at) == ("uploads", 24.0)


@pytest.mark.parametrize(
    ("mode", "status", "at", "attempts"), [("retry", "uploads", 64.0, 2), ("lost", "offline", 22.0, 1)]
)
def test_offline_at_upload_retries_when_back_or_is_lost(
    mode: str, status: str, at: float, attempts: int
) -> None:
    # Trained at 20 s, offline at 22 s mid-upload (4 s), back at 60 s.
    trace = [OnlineInterval("e", 0.0, 22.0), OnlineInterval("e", 60.0, 500.0)]
    fate = simulate([work("e")], [], trace, offline_upload=mode).fates["e"]  # type: ignore[arg-type]
    assert (fate.status, fate.at, fate.upload_attempts) == (status, at, attempts)


def test_the_same_inputs_give_the_same_simulation() -> None:
    events = timeline({"kind": "slow", "at_seconds": 3, "edge": "a", "factor": 2})
    works = [work(f"e{i}", epochs=1 + i % 3) for i in range(50)] + [work("a")]
    trace = [OnlineInterval(f"e{i}", float(i), 1000.0) for i in range(0, 50, 7)]
    assert simulate(works, events, trace) == simulate(works, events, trace)
