"""The coordinator's state document (`coordinator/state` in the registry): typed, group-committed, resumed.

What it holds and how a restart rebuilds from it: docs/design/coordinator.md, "Durability".
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from pydantic import Field

from actors.uploads import upload_key
from orchestrator.core.metrics import LedgerSnapshot
from orchestrator.core.names import EDGE_OWNER_PREFIX, version_number
from orchestrator.core.receipts import (
    LearnerPruning,
    NewTaskRecord,
    RoundError,
    RoundRecord,
    UploadReceipt,
)
from orchestrator.core.registry import Registry
from orchestrator.core.scenario import NewTaskEvent, StrictModel

logger = logging.getLogger(__name__)

STATE_KEY = "coordinator/state"


class RegistryHeldByAnotherRun(Exception):  # noqa: N818 (reads as the situation it reports)
    """The registry already holds the coordinator state of another run (another `run_id`).

    Resuming it would load that run's ledger, rounds and BAIM into this one (then reject every upload as a
    `version_conflict`, or fail on edge ids it does not know). `held_run_id` is the id found there (None for a
    state written without one).
    """

    def __init__(self, message: str, held_run_id: str | None) -> None:
        self.held_run_id = held_run_id
        super().__init__(message)

    def __reduce__(self) -> tuple[type[RegistryHeldByAnotherRun], tuple[str, str | None]]:
        return (type(self), (str(self), self.held_run_id))


def held_run_id(state: dict[str, Any]) -> str | None:
    """The run id a state document belongs to (None: written before run ids existed, or without one)."""
    run_id = state.get("run_id")
    return run_id if isinstance(run_id, str) else None


class CoordinatorState(StrictModel):
    """Everything a restarted coordinator needs besides the registry's artifacts and its receipt log
    (`actors.receipt_log`): only small things, so writing it costs the same at the first upload and the
    thousandth. Uploads are not in it: their receipts (and the ledger's upload counts) are replayed from
    the log."""

    run_id: str | None = Field(default=None, description="The run this state belongs to.")
    rounds: list[RoundRecord] = Field(description="The trained rounds.")
    round_errors: list[RoundError] = Field(default_factory=list, description="Failed round indices.")
    baim_version: str | None = Field(description="Registry version of the last trained BAIM (owner baim).")
    trained_learners: list[str] = Field(description="Learners inside that BAIM, sorted.")
    restarts: int = Field(default=0, ge=0, description="How often the coordinator resumed from this state.")
    ledger: LedgerSnapshot = Field(
        description="The coordinator's cost ledger without its upload records and counts (from the log)."
    )
    new_tasks: list[NewTaskRecord] = Field(default_factory=list, description="Few-shot tasks added so far.")
    queued_new_tasks: list[NewTaskEvent] = Field(
        default_factory=list, description="new_task events received, waiting for a trained BAIM."
    )
    learner_pruning: LearnerPruning | None = Field(
        default=None, description="The model-level pruning finish() did (None: none yet)."
    )


class RoundLog:
    """The trained rounds and, per failed round index, its attempts and last error."""

    def __init__(self, rounds: list[RoundRecord], errors: list[RoundError]) -> None:
        self.rounds = list(rounds)
        self.errors = list(errors)

    @property
    def next_round(self) -> int:
        return len(self.rounds) + 1

    def failed(self, round_index: int, learners: list[str], error: str) -> RoundError:
        """Record an attempt's failure under its round index (one entry per index); returns the entry."""
        for position, entry in enumerate(self.errors):
            if entry.round == round_index:
                self.errors[position] = RoundError(
                    round=round_index, attempts=entry.attempts + 1, learners=learners, error=error
                )
                return self.errors[position]
        self.errors.append(RoundError(round=round_index, attempts=1, learners=learners, error=error))
        return self.errors[-1]

    def failure_of_next_round(self) -> RoundError | None:
        """The recorded failure of the round that is due (finish() raises it), if there is one."""
        failed = self.errors[-1] if self.errors else None
        return failed if failed is not None and failed.round == self.next_round else None


class StateStore:
    """Reads and writes the state document of one run; `checkpoint` group-commits writes."""

    def __init__(self, registry: Registry, run_id: str | None) -> None:
        self.registry = registry
        self.run_id = run_id
        self._lock = asyncio.Lock()  # orders writes
        self._changes = 0  # bumped by every checkpoint request ...
        self._written = 0  # ... and the change count the last write covered

    def read(self) -> CoordinatorState | None:
        """This run's state (None on a fresh registry); RegistryHeldByAnotherRun for another run's."""
        document = self.registry.get_json(STATE_KEY)
        if document is None:
            return None
        if held_run_id(document) != self.run_id:
            held = held_run_id(document) or "(none recorded)"
            raise RegistryHeldByAnotherRun(
                f"registry {self.registry.uri} holds the coordinator state of run {held}, not of this run "
                f"({self.run_id or 'no run id'}); refusing to resume another run's uploads, rounds and BAIM",
                held_run_id(document),
            )
        return CoordinatorState.model_validate(document)

    def write(self, state: CoordinatorState) -> None:
        self.registry.put_json(STATE_KEY, state.model_dump())

    async def checkpoint(self, snapshot: Callable[[], CoordinatorState]) -> None:
        """Write `snapshot()`; returns once a write that includes this call's changes is durable.

        Group commit: callers whose changes a later snapshot already covered return without writing again,
        so a burst of uploads costs a few writes, not one each. The snapshot is taken in the event loop, so
        it is consistent.
        """
        self._changes += 1
        mine = self._changes
        async with self._lock:
            if self._written >= mine:
                return
            covered = self._changes
            await asyncio.to_thread(self.write, snapshot())
            self._written = covered


def stored_uploads(registry: Registry, learner_names: dict[str, str]) -> list[UploadReceipt]:
    """An accepted receipt for every edge upload the registry holds (owner edge/<id>, oldest first);
    `learner_names` maps the scenario's edge ids to their learners. A resuming coordinator accepts those its
    receipt log does not list (stored by hand, or by a coordinator before receipt logs)."""
    receipts = []
    for owner in registry.owners(EDGE_OWNER_PREFIX):
        edge_id = owner.removeprefix(EDGE_OWNER_PREFIX)
        for vname in registry.versions(owner):
            ref = registry.ref(owner, vname)
            version = version_number(vname)
            receipts.append(
                UploadReceipt(
                    key=upload_key(edge_id, version, ref.sha256),
                    edge_id=edge_id,
                    version=version,
                    sha256=ref.sha256,
                    status="accepted",
                    accepted=True,
                    reason="",
                    detail="",
                    learner=learner_names.get(edge_id),
                    artifact=f"{owner}@{vname}",
                )
            )
    return receipts
