"""Two-phase upload receipts and the append-only receipt log: `received` before validation ends, then
`accepted` or `rejected`; nothing received is lost across a restart; a torn last line is skipped."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest

from actors.coordinator import STATE_KEY
from actors.receipt_log import INBOX, RECEIPT_LOG_KEY, DecidedRecord, ReceiptLog, ReceivedRecord
from orchestrator.core.registry import Registry
from tests.support.coordinator import hold_validation, learner_payload, make_coordinator, upload_kwargs
from tests.support.loop import LoopThread
from tests.support.scenarios import tiny_scenario

NEVER = {"min_new_models": 10, "max_wait_seconds": 1000}


def records(registry_dir: Path) -> list[Any]:
    return ReceiptLog(Registry(str(registry_dir))).replay()


def test_the_acknowledgement_is_received_before_validation_finishes(
    tmp_path: Path, loop: LoopThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: validation blocks until released.
    scenario = tiny_scenario(tmp_path, fusion=NEVER)
    coordinator = make_coordinator(scenario, tmp_path / "registry")
    held = hold_validation(coordinator, monkeypatch)
    payload = learner_payload(scenario, "edge-0")

    # Execute: the acknowledgement comes back while its validation is still held.
    ack = loop.run(coordinator.receive(**upload_kwargs("edge-0", payload)))
    assert held.started.acquire(timeout=30)
    status_while_held = loop.run(coordinator.status())
    again_while_held = loop.run(coordinator.receive(**upload_kwargs("edge-0", payload)))
    held.release.set()
    final = loop.run(coordinator.outcome(ack["key"]))

    # Assert: received (durable bytes, nothing decided), then accepted; both phases in the receipt.
    assert (ack["status"], ack["accepted"], ack["artifact"]) == ("received", False, None)
    assert ack["decided_at"] is None
    assert ack["received_at"] is not None
    assert again_while_held == ack  # idempotent while undecided
    assert status_while_held["received"] == ["edge-0"] and status_while_held["accepted"] == []
    assert (final["status"], final["artifact"]) == ("accepted", "edge/edge-0@v000001")
    assert final["received_at"] == ack["received_at"] <= final["decided_at"]
    assert loop.run(coordinator.receive(**upload_kwargs("edge-0", payload))) == final
    assert loop.run(coordinator.upload(**upload_kwargs("edge-0", payload))) == final
    assert loop.run(coordinator.outcome("edge-0@1#" + "0" * 64)) is None  # never received
    # The inbox blob is gone once its upload is decided; the log holds both phases.
    assert Registry(str(tmp_path / "registry")).blobs(INBOX) == []
    assert [r.kind for r in records(tmp_path / "registry")] == ["received", "decided"]


def test_a_poisoned_upload_is_received_then_rejected_with_its_reason(
    tmp_path: Path, loop: LoopThread
) -> None:
    scenario = tiny_scenario(tmp_path, fusion=NEVER)
    coordinator = make_coordinator(scenario, tmp_path / "registry")
    poisoned = learner_payload(scenario, "edge-0", mode="nan")

    ack = loop.run(coordinator.receive(**upload_kwargs("edge-0", poisoned)))
    final = loop.run(coordinator.outcome(ack["key"]))

    assert ack["status"] == "received"
    assert (final["status"], final["accepted"], final["reason"]) == ("rejected", False, "non_finite")
    assert "NaN or Inf" in final["detail"] and final["received_at"] == ack["received_at"]
    assert Registry(str(tmp_path / "registry")).versions("edge/edge-0") == []  # never stored as an artifact
    logged = records(tmp_path / "registry")
    assert [r.kind for r in logged] == ["received", "decided"]
    assert logged[1].receipt.model_dump() == final
    assert coordinator.ledger.upload_counts() == {"accepted": 0, "rejected": {"non_finite": 1}}


def test_an_upload_that_fails_the_checks_before_storing_is_rejected_at_once(
    tmp_path: Path, loop: LoopThread
) -> None:
    scenario = tiny_scenario(tmp_path, fusion=NEVER)
    coordinator = make_coordinator(scenario, tmp_path / "registry")

    receipt = loop.run(coordinator.receive(**upload_kwargs("edge-99", learner_payload(scenario, "edge-0"))))

    assert (receipt["status"], receipt["reason"]) == ("rejected", "unknown_edge")
    assert receipt["received_at"] is None
    assert [r.kind for r in records(tmp_path / "registry")] == ["decided"]
    assert Registry(str(tmp_path / "registry")).blobs(INBOX) == []


def test_a_coordinator_killed_between_received_and_decided_decides_it_after_restart(
    tmp_path: Path, loop: LoopThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: two uploads received; their validation never finishes in the first coordinator.
    scenario = tiny_scenario(tmp_path, strategies=["finetune"], epochs=1, fusion=NEVER)
    registry_dir = tmp_path / "registry"
    first = make_coordinator(scenario, registry_dir)
    held = hold_validation(first, monkeypatch)
    good = learner_payload(scenario, "edge-0")
    poisoned = learner_payload(scenario, "edge-2", mode="nan")
    acks = [
        loop.run(first.receive(**upload_kwargs("edge-0", good))),
        loop.run(first.receive(**upload_kwargs("edge-2", poisoned))),
    ]
    assert held.started.acquire(timeout=30)

    # Execute: the first coordinator dies (its pending decisions are cancelled: nothing after them runs),
    # a new one resumes from the registry and finishes the run.
    async def kill() -> None:
        for future in list(first._decisions.values()):
            future.cancel()

    loop.run(kill())
    held.release.set()
    assert [r.kind for r in records(registry_dir)] == ["received", "received"]
    assert len(Registry(str(registry_dir)).blobs(INBOX)) >= 1
    second = make_coordinator(scenario, registry_dir)
    decided = [loop.run(second.outcome(ack["key"])) for ack in acks]
    summary = loop.run(second.finish(), timeout=300)

    # Assert: both decided (nothing received was lost), the good one trained, the log and ledger agree.
    assert [r["status"] for r in acks] == ["received", "received"]
    assert [(r["status"], r["reason"]) for r in decided] == [("accepted", ""), ("rejected", "non_finite")]
    assert [r["received_at"] for r in decided] == [r["received_at"] for r in acks]
    assert [r["learners"] for r in summary["rounds"]] == [["edge-0"]]
    assert summary["received"] == [] and summary["restarts"] == 1
    assert [r.kind for r in records(registry_dir)] == ["received", "received", "decided", "decided"]
    assert second.ledger.upload_counts() == {"accepted": 1, "rejected": {"non_finite": 1}}
    assert Registry(str(registry_dir)).blobs(INBOX) == []


def test_finish_decides_every_received_upload_before_the_last_round(
    tmp_path: Path, loop: LoopThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: an upload received and still validating when finish() is called.
    scenario = tiny_scenario(tmp_path, strategies=["finetune"], epochs=1, fusion=NEVER)
    coordinator = make_coordinator(scenario, tmp_path / "registry")
    held = hold_validation(coordinator, monkeypatch)
    loop.run(coordinator.receive(**upload_kwargs("edge-0", learner_payload(scenario, "edge-0"))))
    assert held.started.acquire(timeout=30)

    # Execute
    finishing = asyncio.run_coroutine_threadsafe(coordinator.finish(), loop.loop)
    held.release.set()
    summary = finishing.result(timeout=300)

    # Assert: the round trained it.
    assert [r["learners"] for r in summary["rounds"]] == [["edge-0"]]
    assert [r["status"] for r in summary["accepted"]] == ["accepted"]


def test_a_torn_last_line_is_skipped_with_a_warning_and_the_run_resumes(
    tmp_path: Path, loop: LoopThread, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: one accepted upload, then a crash mid-append leaves half a record at the log's end.
    scenario = tiny_scenario(tmp_path, fusion=NEVER)
    registry_dir = tmp_path / "registry"
    first = make_coordinator(scenario, registry_dir)
    receipt = loop.run(first.upload(**upload_kwargs("edge-0", learner_payload(scenario, "edge-0"))))
    (segment,) = (registry_dir / "logs" / RECEIPT_LOG_KEY).glob("*.jsonl")
    whole = segment.read_bytes().splitlines(keepends=True)
    with segment.open("ab") as stream:
        stream.write(whole[-1][: len(whole[-1]) // 2])  # the first half of a decided record, no newline

    # Execute: resume, accept another upload (into a new segment), resume again.
    with caplog.at_level(logging.WARNING, logger="actors.receipt_log"):
        second = make_coordinator(scenario, registry_dir)
    other = loop.run(second.upload(**upload_kwargs("edge-2", learner_payload(scenario, "edge-2"))))
    third = make_coordinator(scenario, registry_dir)

    # Assert
    assert "skipped a torn last line" in caplog.text and str(segment) in caplog.text
    assert [r.model_dump() for r in second.accepted][:1] == [receipt]
    assert [r.model_dump() for r in third.accepted] == [receipt, other]
    # The second coordinator appended to a segment of its own, so the torn tail stays at an end.
    assert len(list((registry_dir / "logs" / RECEIPT_LOG_KEY).glob("*.jsonl"))) == 2
    assert third.restarts == 2 and "accepted" not in Registry(str(registry_dir)).get_json(STATE_KEY)


def test_a_complete_line_that_is_not_a_record_stops_the_resume_naming_it(
    tmp_path: Path, loop: LoopThread
) -> None:
    scenario = tiny_scenario(tmp_path, fusion=NEVER)
    registry_dir = tmp_path / "registry"
    first = make_coordinator(scenario, registry_dir)
    loop.run(first.upload(**upload_kwargs("edge-0", learner_payload(scenario, "edge-0"))))
    Registry(str(registry_dir)).append_log(RECEIPT_LOG_KEY, [b'{"kind": "accepted"}'])

    with pytest.raises(ValueError, match="line 3 is not a receipt record"):
        make_coordinator(scenario, registry_dir)


def test_the_state_document_stays_the_same_size_as_uploads_arrive(tmp_path: Path, loop: LoopThread) -> None:
    scenario = tiny_scenario(tmp_path, fusion=NEVER)
    registry_dir = tmp_path / "registry"
    coordinator = make_coordinator(scenario, registry_dir)
    before = Registry(str(registry_dir)).get_json(STATE_KEY)

    for edge_id in ("edge-0", "edge-1", "edge-2", "edge-3"):
        loop.run(coordinator.upload(**upload_kwargs(edge_id, learner_payload(scenario, edge_id))))

    assert Registry(str(registry_dir)).get_json(STATE_KEY) == before  # uploads never rewrite it
    # One received and one decided record per upload, the decision after its receipt.
    logged = records(registry_dir)
    received = [r.key for r in logged if isinstance(r, ReceivedRecord)]
    decided = [r.receipt.key for r in logged if isinstance(r, DecidedRecord)]
    assert len(logged) == 8 and sorted(received) == sorted(decided) and len(set(received)) == 4
    for key in received:
        position = {id(r): n for n, r in enumerate(logged)}
        got = next(r for r in logged if isinstance(r, ReceivedRecord) and r.key == key)
        done = next(r for r in logged if isinstance(r, DecidedRecord) and r.receipt.key == key)
        assert position[id(got)] < position[id(done)]


def test_a_decision_that_failed_is_tried_again_by_the_next_outcome_call(
    tmp_path: Path, loop: LoopThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: the first artifact write fails (a full disk, say); the real registry writes the second.
    scenario = tiny_scenario(tmp_path, fusion=NEVER)
    coordinator = make_coordinator(scenario, tmp_path / "registry")
    put = coordinator.registry.put
    failures = [OSError("No space left on device")]

    def put_failing_once(*args: Any, **kwargs: Any) -> Any:
        if failures:
            raise failures.pop()
        return put(*args, **kwargs)

    monkeypatch.setattr(coordinator.registry, "put", put_failing_once)
    ack = loop.run(coordinator.receive(**upload_kwargs("edge-0", learner_payload(scenario, "edge-0"))))

    # Execute / Assert: the first outcome call sees the failure, the upload stays received, the next decides.
    with pytest.raises(OSError, match="No space left"):
        loop.run(coordinator.outcome(ack["key"]))
    assert loop.run(coordinator.status())["received"] == ["edge-0"]
    final = loop.run(coordinator.outcome(ack["key"]))
    assert (final["status"], final["received_at"]) == ("accepted", ack["received_at"])
    assert [r.kind for r in records(tmp_path / "registry")] == ["received", "decided"]
    assert Registry(str(tmp_path / "registry")).blobs(INBOX) == []
