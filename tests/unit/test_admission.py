"""The bounded BAIM's admission policy (cloud.max_learners_per_task), as pure functions on hand cases."""

from __future__ import annotations

import pytest

from actors.admission import Admission, Seat, Squads, admit
from orchestrator.core.scenario import CloudConfig


def seat(learner: str, loss: float, arrival: int, replaceable: bool = True) -> Seat:
    return Seat(learner=learner, holdout_loss=loss, arrival=arrival, replaceable=replaceable)


def test_without_a_bound_every_new_learner_is_admitted() -> None:
    seats = [seat(f"e{i}", 1.0, i) for i in range(500)]

    assert admit("new", 9.0, seats, None) == Admission(True, None, "")


def test_room_left_admits_whatever_the_loss() -> None:
    assert admit("c", 99.0, [seat("a", 0.1, 0), seat("b", 0.2, 1)], 3) == Admission(True, None, "")


def test_a_learner_already_seated_is_kept_only_in_the_registry_even_with_room() -> None:
    decision = admit("a", 0.01, [seat("a", 0.5, 0)], 3)

    assert (decision.admitted, decision.displaces) == (False, None)
    assert "learner a is in the BAIM already" in decision.detail


def test_full_task_replaces_the_worst_replaceable_seat_when_strictly_better() -> None:
    seats = [seat("a", 0.3, 0), seat("b", 0.5, 1), seat("c", 0.4, 2)]

    decision = admit("d", 0.45, seats, 3)

    assert (decision.admitted, decision.displaces) == (True, "b")
    assert decision.detail == "replaced b (holdout loss 0.5 > 0.45)"


def test_a_tie_with_the_worst_seat_keeps_the_seated_learner() -> None:
    decision = admit("d", 0.5, [seat("a", 0.3, 0), seat("b", 0.5, 1)], 2)

    assert (decision.admitted, decision.displaces) == (False, None)
    assert "holdout loss 0.5 is not below 0.5, the worst not yet trained (b)" in decision.detail


def test_among_equally_bad_seats_the_latest_arrival_is_replaced() -> None:
    seats = [seat("late", 0.5, 7), seat("early", 0.5, 2), seat("good", 0.1, 5)]

    assert admit("d", 0.2, seats, 3).displaces == "late"


def test_trained_seats_are_never_replaced() -> None:
    # The worst seat was trained by a round: the worst replaceable one goes instead, and a full task of
    # trained learners admits nothing more.
    seats = [seat("trained", 0.9, 0, replaceable=False), seat("b", 0.4, 1)]

    assert admit("d", 0.3, seats, 2).displaces == "b"
    assert admit("d", 0.5, seats, 2).admitted is False
    everything_trained = [seat("a", 0.9, 0, replaceable=False), seat("b", 0.8, 1, replaceable=False)]
    decision = admit("d", 0.01, everything_trained, 2)
    assert (decision.admitted, decision.displaces) == (False, None)
    assert "all trained by a cloud round" in decision.detail


def test_squads_bound_each_task_separately_and_follow_replacements() -> None:
    squads = Squads(max_learners=2)
    losses = [("m", "m0", 0.5), ("m", "m1", 0.4), ("f", "f0", 0.9), ("m", "m2", 0.45), ("m", "m3", 0.6)]

    decisions = [squads.decide(task, name, f"{name}@1", loss, fixed=set()) for task, name, loss in losses]

    assert [(d.admitted, d.displaces) for d in decisions] == [
        (True, None), (True, None), (True, None), (True, "m0"), (False, None),
    ]  # fmt: skip
    assert squads.admitted_keys() == {"m1": "m1@1", "m2": "m2@1", "f0": "f0@1"}


def test_squads_keep_fixed_learners_and_readmit_a_displaced_learners_new_upload() -> None:
    squads = Squads(max_learners=1)
    squads.seat("m", "m0", "m0@1", 0.5)

    kept = squads.decide("m", "m1", "m1@1", 0.1, fixed={"m0"})
    assert kept.admitted is False and squads.admitted_keys() == {"m0": "m0@1"}
    replaced = squads.decide("m", "m1", "m1@1", 0.1, fixed=set())
    assert replaced.displaces == "m0"
    back = squads.decide("m", "m0", "m0@2", 0.05, fixed=set())
    assert back.displaces == "m1" and squads.admitted_keys() == {"m0": "m0@2"}


def test_the_bound_must_be_positive_and_at_least_top_k() -> None:
    assert CloudConfig.model_validate({"max_learners_per_task": 3}).max_learners_per_task == 3
    with pytest.raises(ValueError, match="max_learners_per_task"):
        CloudConfig.model_validate({"max_learners_per_task": 0})
    with pytest.raises(ValueError, match="max_learners_per_task: 2 is below top_k 3"):
        CloudConfig.model_validate({"max_learners_per_task": 2, "top_k": 3})
