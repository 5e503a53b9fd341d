"""The engine's bookkeeping without Ray: start probes that fail.

Ray's functions are replaced with fakes where the engine would call them, so no Ray instance starts.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import ray
from ray.exceptions import RayActorError, RayTaskError

from orchestrator.engine import EdgeTrack, Engine, EngineOptions
from tests.unit.test_coordinator import tiny_scenario


def no_ray(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("the engine must not start or use Ray here")


@pytest.fixture
def engine(tmp_path: Path) -> Engine:
    return Engine(tiny_scenario(tmp_path), tmp_path / "out", EngineOptions())


def pending_probe(track: EdgeTrack) -> None:
    """The state `_spawn` leaves an edge in: process requested, first progress() call outstanding."""
    track.status = "pending"
    track.spawned_at = time.monotonic()
    track.probe_ref = object()


def answer_probes_with(monkeypatch: pytest.MonkeyPatch, error: Exception) -> None:
    monkeypatch.setattr(ray, "wait", lambda refs, timeout=None: (list(refs), []))

    def failing_get(ref: Any, timeout: Any = None) -> Any:
        raise error

    monkeypatch.setattr(ray, "get", failing_get)
    monkeypatch.setattr(ray, "kill", lambda *args, **kwargs: None)
    monkeypatch.setattr(ray, "nodes", no_ray)


def test_edge_whose_start_probe_dies_is_final_at_once(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: edge-0's process died while starting (its first progress() call answers with the death).
    track = engine.edges["edge-0"]
    pending_probe(track)
    answer_probes_with(monkeypatch, RayActorError())

    # Execute
    engine._check_starts()

    # Assert: final now, not "pending" until the 300 s startup timeout.
    assert track.status == "died"
    assert track.error is not None and track.error.startswith("RayActorError: The actor")
    assert [e["kind"] for e in engine.event_log] == ["edge_final"]
    assert track.final and track.probe_ref is None


def test_edge_whose_start_probe_raises_is_failed_at_once(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    track = engine.edges["edge-1"]
    pending_probe(track)
    track.handle = object()
    traceback = 'Traceback (most recent call last):\n  File "edge.py", line 1\nValueError: shard unreadable'
    answer_probes_with(monkeypatch, RayTaskError("progress", traceback, ValueError("shard unreadable")))

    engine._check_starts()

    assert track.status == "failed"
    assert track.error == "ValueError: shard unreadable"
    assert track.handle is None
