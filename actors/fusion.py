"""Fusion into the live BAIM, its canonical re-fusion for a round, and the fusion policy with its back-off.

Plain parts of the coordinator (no asyncio, no Ray); why the canonical order and the back-off exist:
docs/design/coordinator.md, "Fusion and rounds".
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from baim.learners import VAELearner
from baim.model import BAIM
from orchestrator.core.scenario import CloudConfig

logger = logging.getLogger(__name__)


class LiveBAIM:
    """The BAIM that accepted learners join as they arrive, and which of them a trained BAIM holds.

    `rank` orders learners canonically (the scenario's edge order); names it lacks come after, by name.
    """

    def __init__(self, cloud: CloudConfig, seed: int, rank: dict[str, int]) -> None:
        self.cloud = cloud
        self.seed = seed
        self.rank = rank
        self.baim: BAIM | None = None
        self.trained: set[str] = set()  # learners inside the last trained BAIM
        self.pending_since: float | None = None  # when the oldest untrained learner arrived (monotonic)

    @property
    def learners(self) -> list[str]:
        return list(self.baim.config.learner_names) if self.baim is not None else []

    def pending(self) -> list[str]:
        """Learners not in the last trained BAIM, in fusion order."""
        return [name for name in self.learners if name not in self.trained]

    def fuse(self, name: str, task: str, learner: VAELearner) -> None:
        """Add `learner` (function-preserving); a learner already in is left as it is."""
        if name in self.learners:
            return
        self.baim = self._fuse_into(self.baim, name, task, learner)
        if self.pending_since is None:
            self.pending_since = time.monotonic()

    def drop_pending(self, admitted: set[str], last_trained: Callable[[], BAIM | None]) -> list[str]:
        """Remove the pending learners not in `admitted` (an admission displaced them before a round trained
        them): the live BAIM becomes `last_trained()` plus the pending learners that stay, in their order.
        Returns the dropped names."""
        pending = self.pending()
        dropped = [name for name in pending if name not in admitted]
        if not dropped:
            return []
        assert self.baim is not None  # something is pending
        old, base = self.baim, last_trained()
        for name in pending:
            if name in admitted:
                base = self._fuse_into(base, name, old.config.learner(name).task, old.learner(name))
        self.baim = base
        if len(dropped) == len(pending):
            self.pending_since = None
        logger.info("dropped displaced learners from the BAIM: %s", dropped)
        return dropped

    def canonical(self, last_trained: Callable[[], BAIM | None]) -> BAIM:
        """The live BAIM with its pending learners fused in canonical order on top of `last_trained()` (the
        registry's trained BAIM); the live BAIM itself when they arrived in that order already."""
        assert self.baim is not None  # a round starts only once something was fused
        baim, pending = self.baim, self.pending()
        unknown = len(self.rank)
        ordered = sorted(pending, key=lambda name: (self.rank.get(name, unknown), name))
        if pending == ordered:
            return baim
        base = last_trained()
        for name in ordered:
            base = self._fuse_into(base, name, baim.config.learner(name).task, baim.learner(name))
        assert base is not None  # ordered is non-empty: pending != ordered
        logger.info("round learners re-fused in canonical order: %s (arrived as %s)", ordered, pending)
        self.baim = base
        return base

    def trained_round(self, trained: BAIM, members: list[str]) -> None:
        """A round trained `members`: continue from `trained`, with the learners that arrived meanwhile
        fused again on top of it (they join the next round)."""
        assert self.baim is not None
        late = [name for name in self.learners if name not in members]
        for name in late:
            trained.add_learner(name, self.baim.config.learner(name).task, self.baim.learner(name))
        self.baim = trained
        self.trained = set(members)
        self.pending_since = time.monotonic() if late else None

    def _fuse_into(self, baim: BAIM | None, name: str, task: str, learner: VAELearner) -> BAIM:
        if baim is None:
            return BAIM.from_learners(
                [task],
                [(name, task, learner)],
                top_k=self.cloud.top_k,
                connection_height=self.cloud.connection_height,
                kld_weight=self.cloud.kld_weight,
                seed=self.seed,
            )
        baim.add_learner(name, task, learner)
        return baim


class RoundPolicy:
    """When a round starts: after `min_new_models` pending learners, or once the oldest waited
    `max_wait_seconds`; but not for the very pending set whose round failed less than `max_wait_seconds` ago.

    The failure is not checkpointed: a restarted coordinator tries once more (the restart may have cured it).
    """

    def __init__(self, cloud: CloudConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.min_new_models = cloud.fusion.min_new_models
        self.max_wait_seconds = cloud.fusion.max_wait_seconds
        self.clock = clock
        self._last_failure: tuple[frozenset[str], float] | None = None

    def due(self, pending: list[str], pending_since: float | None) -> bool:
        if not pending or self.backing_off(pending):
            return False
        waited = self.clock() - (pending_since if pending_since is not None else self.clock())
        return len(pending) >= self.min_new_models or waited >= self.max_wait_seconds

    def backing_off(self, pending: list[str]) -> bool:
        """True while `pending` is the set whose round failed last, less than max_wait_seconds ago."""
        if self._last_failure is None:
            return False
        failed_set, failed_at = self._last_failure
        return self.clock() - failed_at < self.max_wait_seconds and frozenset(pending) == failed_set

    def failed(self, pending: list[str]) -> None:
        self._last_failure = (frozenset(pending), self.clock())

    def succeeded(self) -> None:
        self._last_failure = None
