"""The engine's bookkeeping without Ray: start probes that fail, report rows, a registry held by another run.

Ray's functions are replaced with fakes where the engine would call them, so no Ray instance starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import ray
from ray.exceptions import RayActorError, RayTaskError

from actors.coordinator import STATE_KEY, RegistryHeldByAnotherRun
from orchestrator.core.metrics import Ledger
from orchestrator.core.registry import Registry
from orchestrator.core.reports import EdgeReport
from orchestrator.runtime.engine import Engine, EngineOptions, upload_record
from tests.support.fake_ray import FakeRay, FakeRef
from tests.support.scenarios import tiny_scenario


def edge_report(edge_id: str, status: Any, *, epoch: int, receipt: Any = None) -> EdgeReport:
    return EdgeReport(
        edge_id=edge_id, task="male", status=status, epoch=epoch, epochs=2, steps=3, train_loss=0.5,
        shard_size=8, receipt=receipt, error=None, ledger=Ledger(export_metrics=False).to_dict(),
    )  # fmt: skip


def no_ray(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("the engine must not start or use Ray here")


@pytest.fixture
def engine(tmp_path: Path) -> Engine:
    return Engine(tiny_scenario(tmp_path), tmp_path / "out", EngineOptions())


def probes_answer_with(monkeypatch: pytest.MonkeyPatch, error: Exception) -> FakeRay:
    def answer(ref: FakeRef) -> Any:
        raise error

    return FakeRay(answer).install(monkeypatch)


def test_edge_whose_start_probe_dies_is_final_at_once(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: edge-0's process died while starting (its first progress() call answers with the death).
    fake = probes_answer_with(monkeypatch, RayActorError())
    track = engine.edges["edge-0"]
    engine._spawn(track, reason="start")

    # Execute
    engine._check_starts()

    # Assert: final now, not "pending" until the 300 s startup timeout.
    assert track.status == "died"
    assert track.error is not None and track.error.startswith("RayActorError: The actor")
    assert [e.kind for e in engine.event_log] == ["edge_spawned", "edge_final"]
    assert track.final and not engine.fleet.starting("edge-0")
    assert fake.killed == []  # a dead process is not killed again


def test_edge_whose_start_probe_raises_is_failed_at_once(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    traceback = 'Traceback (most recent call last):\n  File "edge.py", line 1\nValueError: shard unreadable'
    error = RayTaskError("progress", traceback, ValueError("shard unreadable"))
    fake = probes_answer_with(monkeypatch, error)
    track = engine.edges["edge-1"]
    engine._spawn(track, reason="start")

    engine._check_starts()

    assert track.status == "failed"
    assert track.error == "ValueError: shard unreadable"
    assert fake.killed == ["edge-1"] and not engine.fleet.has_actor("edge-1")


def test_edge_row_falls_back_to_the_coordinators_accepted_receipt(engine: Engine) -> None:
    # Prepare: edge-0 died after the coordinator stored (and fused) its upload, before the receipt arrived;
    # edge-1 got its own rejection receipt.
    died = engine.edges["edge-0"]
    died.status, died.report = "died", edge_report("edge-0", "training", epoch=2)
    accepted = upload_record({"edge_id": "edge-0", "version": 1, "accepted": True, "reason": "", "detail": "",
                              "sha256": "ab" * 32, "artifact": "edge/edge-0@v000001",
                              "admission": "admitted"})  # fmt: skip
    rejected = engine.edges["edge-1"]
    own = {"key": "edge-1@1#cd", "edge_id": "edge-1", "version": 1, "accepted": False, "reason": "non_finite",
           "detail": "NaN", "sha256": "cd" * 32, "learner": None, "artifact": None}  # fmt: skip
    rejected.status, rejected.report = "rejected", edge_report("edge-1", "rejected", epoch=1, receipt=own)

    # Execute
    died_row = engine._edge_row(died, accepted)
    rejected_row = engine._edge_row(rejected, None)
    never_row = engine._edge_row(engine.edges["edge-2"], None)

    # Assert
    assert died_row.upload.model_dump() == {"outcome": "accepted", "reason": "", "detail": "",
                                            "sha256": "ab" * 32, "artifact": "edge/edge-0@v000001",
                                            "receipt_from": "coordinator",
                                            "admission": "admitted", "decision_seconds": None}  # fmt: skip
    assert died_row.status == "died" and died_row.costs_are_final is False and died_row.epochs_done == 2
    assert (rejected_row.upload.outcome, rejected_row.upload.receipt_from) == ("rejected", "edge")
    assert (rejected_row.upload.reason, rejected_row.upload.detail) == ("non_finite", "NaN")
    assert (never_row.upload.outcome, never_row.upload.receipt_from) == ("none", "none")


def test_edge_row_takes_the_admission_from_the_coordinators_last_word(engine: Engine) -> None:
    # Prepare: edge-0's receipt said admitted; a better upload displaced it later (the coordinator's receipt).
    own = {"key": "edge-0@1#ab", "edge_id": "edge-0", "version": 1, "accepted": True, "reason": "",
           "detail": "", "sha256": "ab" * 32, "learner": "edge-0", "artifact": "edge/edge-0@v000001",
           "holdout_loss": 0.5, "admission": "admitted", "admission_detail": ""}  # fmt: skip
    track = engine.edges["edge-0"]
    track.status, track.report = "accepted", edge_report("edge-0", "accepted", epoch=1, receipt=own)
    final = upload_record({**own, "admission": "registry_only", "admission_detail": "displaced by edge-1"})

    # Execute
    row = engine._edge_row(track, final)

    # Assert: the edge's own receipt, with the coordinator's final admission
    assert (row.upload.receipt_from, row.upload.admission) == ("edge", "registry_only")


def test_registry_holding_another_run_is_refused_before_ray_starts(
    engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: out/registry holds the coordinator state of an earlier run.
    state = {"run_id": "20240101T000000Z-abcdef", "accepted": [], "rounds": []}
    Registry(str(tmp_path / "out" / "registry")).put_json(STATE_KEY, state)
    monkeypatch.setattr(ray, "init", no_ray)
    monkeypatch.setattr(ray, "put", no_ray)

    # Execute / Assert
    with pytest.raises(RegistryHeldByAnotherRun) as caught:
        engine.run()
    assert str(caught.value) == (
        f"--out {tmp_path / 'out'} already holds a run (id 20240101T000000Z-abcdef, registry "
        f"{(tmp_path / 'out' / 'registry').resolve()}); pick a new --out or delete it"
    )
    assert Registry(str(tmp_path / "out" / "registry")).get_json(STATE_KEY) == state


def test_each_engine_gets_its_own_run_id(tmp_path: Path) -> None:
    scenario = tiny_scenario(tmp_path)

    first = Engine(scenario, tmp_path / "a", EngineOptions())
    second = Engine(scenario, tmp_path / "b", EngineOptions())

    assert first.run_id != second.run_id
    assert first.run_id[:8].isdigit() and len(first.run_id.split("-")[-1]) == 6
