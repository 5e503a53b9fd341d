"""The edge fleet without Ray: start probes, lost edges, timeline events, unschedulable edges."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from ray.exceptions import RayActorError

from orchestrator.core.scenario import CrashEvent, LeaveEvent, Scenario, SlowEvent
from orchestrator.data.partitions import make_partitions
from orchestrator.data.sources import resolve_source
from orchestrator.runtime.fleet import EdgeFleet, EdgeLost, EdgeStarted, Timeline
from tests.support.fake_ray import FakeRay, FakeRef
from tests.support.scenarios import tiny_scenario


def make_fleet(scenario: Scenario, **options: Any) -> EdgeFleet:
    source = resolve_source(scenario.data)
    return EdgeFleet(scenario, source, make_partitions(source, scenario), **options)


def test_timeline_fires_by_time_then_by_position_in_the_file() -> None:
    # Prepare: two events at 5 s (file order: slow, crash) and one at 1 s.
    events = [
        SlowEvent(kind="slow", at_seconds=5, edge="a", factor=2),
        CrashEvent(kind="crash", at_seconds=5, edge="b"),
        LeaveEvent(kind="leave", at_seconds=1, edge="c"),
    ]
    timeline = Timeline(events)

    # Execute / Assert
    assert timeline.due(0.5) == []
    assert [index for index, _ in timeline.due(1.0)] == [2]
    assert [index for index, _ in timeline.due(10.0)] == [0, 1]
    assert not timeline and timeline.rest() == []


def test_timeline_rest_returns_what_never_fired() -> None:
    timeline = Timeline([LeaveEvent(kind="leave", at_seconds=9, edge="c")])

    assert [index for index, _ in timeline.rest()] == [0]
    assert not timeline


def test_started_edge_is_up_and_its_probe_answer_is_returned(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeRay(lambda ref: f"progress of {ref.edge_id}").install(monkeypatch)
    fleet = make_fleet(tiny_scenario(tmp_path))
    fleet.spawn("edge-0")

    settled = fleet.poll_starts()

    assert settled == [EdgeStarted("edge-0", "progress of edge-0")]
    assert fleet.up("edge-0") and not fleet.starting("edge-0")
    assert [(ref.edge_id, ref.method) for ref in fake.calls] == [("edge-0", "progress")]


def test_crashed_edge_answers_crashed_and_takes_no_further_events(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: edge-0 is up and running; then the timeline crashes it while run() is outstanding.
    def answer(ref: FakeRef) -> Any:
        if ref.method == "run":
            raise RayActorError()
        return "{}"

    fake = FakeRay(answer).install(monkeypatch)
    fleet = make_fleet(tiny_scenario(tmp_path))
    fleet.spawn("edge-0")
    fleet.poll_starts()
    run_ref = fleet.call("edge-0", "run", "coordinator")

    # Execute
    fleet.apply("edge-0", CrashEvent(kind="crash", at_seconds=1, edge="edge-0"))
    lost = fleet.answer("edge-0", run_ref)

    # Assert
    assert isinstance(lost, EdgeLost) and (lost.edge_id, lost.status) == ("edge-0", "crashed")
    assert lost.error.startswith("RayActorError: ")
    assert fake.killed == ["edge-0"] and not fleet.has_actor("edge-0")
    with pytest.raises(ValueError, match="edge edge-0: expected a running edge for slow"):
        fleet.apply("edge-0", SlowEvent(kind="slow", at_seconds=2, edge="edge-0", factor=2))


def test_edge_that_dies_without_a_crash_event_is_died(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def answer(ref: FakeRef) -> Any:
        raise RayActorError()

    FakeRay(answer).install(monkeypatch)
    fleet = make_fleet(tiny_scenario(tmp_path))
    fleet.spawn("edge-1")

    [lost] = fleet.poll_starts()

    assert isinstance(lost, EdgeLost) and lost.status == "died"


def test_edge_no_node_can_host_is_unschedulable_after_the_wait(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: the probe never answers; the only node offers less CPU than edge-0 declares (0.25).
    fake = FakeRay(lambda ref: None, nodes=[{"Alive": True, "Resources": {"CPU": 0.1}}]).install(monkeypatch)
    monkeypatch.setattr("ray.wait", lambda refs, num_returns=1, timeout=None: ([], list(refs)))
    waiting = make_fleet(tiny_scenario(tmp_path), unschedulable_after_s=1000.0)
    hopeless = make_fleet(tiny_scenario(tmp_path), unschedulable_after_s=0.0)
    waiting.spawn("edge-0")
    hopeless.spawn("edge-0")

    # Execute
    not_yet = waiting.poll_starts()
    [lost] = hopeless.poll_starts()

    # Assert
    assert not_yet == [] and waiting.starting("edge-0")
    assert isinstance(lost, EdgeLost) and lost.status == "unschedulable"
    assert lost.error == "no node offers {'CPU': 0.25} (largest offer per node: {'CPU': 0.1})"
    assert fake.killed == ["edge-0"] and not hopeless.has_actor("edge-0")


def test_calling_an_edge_without_a_process_names_it(tmp_path: Path) -> None:
    fleet = make_fleet(tiny_scenario(tmp_path))

    with pytest.raises(ValueError, match="edge edge-2: expected a running edge, it has no process"):
        fleet.call("edge-2", "progress")
