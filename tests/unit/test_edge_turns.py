"""A pool worker's compute turns: calls compute in turn order, and an edge gives its turn back at its upload's
acknowledgement (the next edge trains while the coordinator decides)."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest

from actors.edge_worker import Turns
from tests.support.coordinator import SyncCoordinator, hold_validation, make_coordinator
from tests.support.loop import LoopThread
from tests.support.scenarios import tiny_scenario
from tests.unit.test_edge import make_edge

NEVER = {"min_new_models": 10, "max_wait_seconds": 1000}


def test_calls_compute_in_turn_order_whatever_order_their_threads_start() -> None:
    turns = Turns()
    order: list[int] = []
    started = []

    def call(number: int) -> None:
        with turns.slot(number):
            order.append(number)

    for number in (3, 1, 2, 0):  # started out of order
        thread = threading.Thread(target=call, args=(number,))
        thread.start()
        started.append(thread)
    for thread in started:
        thread.join(timeout=30)

    assert order == [0, 1, 2, 3]


def test_a_turn_released_twice_passes_on_once() -> None:
    turns = Turns()
    first = turns.slot(0)
    first.acquire()
    first.release()
    first.release()
    came = threading.Event()

    threading.Thread(target=lambda: (turns.slot(1).acquire(), came.set()), daemon=True).start()

    assert came.wait(timeout=30)  # turn 1 came: the second release did not skip it


def test_a_call_that_ends_before_its_turn_passes_it_on_only_when_it_came() -> None:
    turns = Turns()
    first = turns.slot(0)
    first.acquire()
    early = turns.slot(2)
    threading.Thread(target=early.release, daemon=True).start()  # call 2 failed before its turn
    second_came, third_passed = threading.Event(), threading.Event()
    threading.Thread(target=lambda: (turns.slot(1).acquire(), second_came.set()), daemon=True).start()
    threading.Thread(target=lambda: (turns.slot(3).acquire(), third_passed.set()), daemon=True).start()

    assert not second_came.wait(timeout=0.5)  # call 0 still computes: call 1 must not start beside it
    first.release()
    assert second_came.wait(timeout=30)
    assert not third_passed.wait(timeout=0.5)  # call 1 computes now; call 2 waits for it before passing on


def test_an_edge_gives_its_compute_slot_back_at_the_acknowledgement(
    tmp_path: Path, loop: LoopThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: a real coordinator whose validation is held; the edge computes under a shared slot.
    scenario = tiny_scenario(tmp_path, fusion=NEVER)
    coordinator = make_coordinator(scenario, tmp_path / "registry")
    held = hold_validation(coordinator, monkeypatch)
    edge = make_edge(scenario, "edge-0")
    slot = threading.Lock()
    edge.compute_slot = slot
    reports: list[dict[str, Any]] = []
    running = threading.Thread(
        target=lambda: reports.append(json.loads(edge.run(SyncCoordinator(coordinator, loop))))
    )

    # Execute: while its upload's validation is held, the slot comes free.
    running.start()
    assert held.started.acquire(timeout=60)
    free_while_deciding = slot.acquire(timeout=60)
    slot.release()
    held.release.set()
    running.join(timeout=120)

    # Assert
    assert free_while_deciding  # the decision could not come before the release: the slot was given back
    assert reports[0]["status"] == "accepted" and reports[0]["receipt"]["status"] == "accepted"
    assert slot.acquire(blocking=False)  # and it is free after the run
