"""Which accepted uploads become BAIM learners when `cloud.max_learners_per_task` bounds a task's squad.

Best holdout loss first: the loss the plausibility check measured on the task's held-out images ranks the
uploads of a task. A pure function of the task's admitted learners; why this policy: docs/scale.md,
"A bounded BAIM".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Seat:
    """A learner admitted to its task's squad."""

    learner: str
    holdout_loss: float
    arrival: int  # the position of its upload in arrival order: on equal losses the earlier one ranks better
    replaceable: bool  # no cloud round has trained it or is training it


@dataclass(frozen=True)
class Admission:
    """The decision for one accepted upload."""

    admitted: bool
    displaces: str | None  # the admitted learner it replaces (then leaves the BAIM for the registry only)
    detail: str  # why it is kept only in the registry, or whom it replaced ('' when simply admitted)


def admit(learner: str, holdout_loss: float, seats: Sequence[Seat], max_learners: int | None) -> Admission:
    """Admit `learner` (its upload's holdout loss) to a task whose admitted learners are `seats`.

    Its learner admitted already (an earlier version): registry only, the BAIM keeps the learner it has.
    Room left (or no bound): admitted. Full: it replaces the worst replaceable seat (highest loss; among
    equal losses the latest arrival) if its loss is strictly lower, else registry only; a tie keeps the
    admitted learner, so equal uploads never churn the squad.
    """
    if any(seat.learner == learner for seat in seats):
        return Admission(False, None, f"learner {learner} is in the BAIM already, from an earlier upload")
    if max_learners is None or len(seats) < max_learners:
        return Admission(True, None, "")
    replaceable = [seat for seat in seats if seat.replaceable]
    if not replaceable:
        return Admission(
            False,
            None,
            f"its task has max_learners_per_task={max_learners} learners, all trained by a cloud round",
        )
    worst = max(replaceable, key=lambda seat: (seat.holdout_loss, seat.arrival))
    if holdout_loss < worst.holdout_loss:
        return Admission(
            True,
            worst.learner,
            f"replaced {worst.learner} (holdout loss {worst.holdout_loss:.6g} > {holdout_loss:.6g})",
        )
    return Admission(
        False,
        None,
        f"its task has max_learners_per_task={max_learners} learners; holdout loss {holdout_loss:.6g} is not "
        f"below {worst.holdout_loss:.6g}, the worst not yet trained ({worst.learner})",
    )


class Squads:
    """Per task, the admitted learners (holdout loss, arrival, the key of the upload admitted)."""

    def __init__(self, max_learners: int | None) -> None:
        self.max_learners = max_learners
        self._seats: dict[str, dict[str, tuple[float, int, str]]] = {}  # task -> learner -> seat
        self._arrivals = 0

    def decide(self, task: str, learner: str, key: str, holdout_loss: float, fixed: set[str]) -> Admission:
        """Decide one accepted upload (in arrival order) and seat it when admitted. `fixed`: the learners a
        cloud round trained or is training (they keep their seats)."""
        squad = self._seats.setdefault(task, {})
        seats = [Seat(name, loss, arrival, name not in fixed) for name, (loss, arrival, _) in squad.items()]
        decision = admit(learner, holdout_loss, seats, self.max_learners)
        if decision.displaces is not None:
            del squad[decision.displaces]
        if decision.admitted:
            self.seat(task, learner, key, holdout_loss)
        return decision

    def seat(self, task: str, learner: str, key: str, holdout_loss: float) -> None:
        """Seat an upload admitted earlier (a resumed coordinator replaying its receipts)."""
        self._seats.setdefault(task, {})[learner] = (holdout_loss, self._arrivals, key)
        self._arrivals += 1

    def admitted_keys(self) -> dict[str, str]:
        """Learner -> the key of its admitted upload, every task."""
        return {name: seat[2] for squad in self._seats.values() for name, seat in squad.items()}
