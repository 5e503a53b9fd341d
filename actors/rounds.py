"""The coordinator's contract with a round runner: what a round gets, what it returns, how it fails.

The runners themselves (`orchestrator.cloud.local`, `orchestrator.cloud.ray_train`) sit in the driver layer;
the engine hands one to the coordinator.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from baim.training import Strategy
from orchestrator.core.artifacts import ArtifactPayload
from orchestrator.core.receipts import StrategyRun
from orchestrator.core.scenario import Scenario
from orchestrator.data.partitions import Partitions
from orchestrator.data.sources import DataSource

MAX_ROUND_ERROR_CHARS = 2000  # a Ray Train error can carry whole tracebacks; the state document stays small


@dataclass
class RoundRequest:
    """Everything one cloud training round needs (all of it picklable, nothing an edge sent unchecked)."""

    round_index: int
    baim: ArtifactPayload  # the fused BAIM to train, as verified artifact bytes
    strategies: list[Strategy]
    scenario: Scenario
    source: DataSource
    partitions: Partitions
    registry_uri: str
    # A continual gate_only round: the learners an earlier round trained, kept fixed (None: train as the
    # first round did).
    frozen_learners: list[str] | None = None


@dataclass
class RoundResult:
    trained: ArtifactPayload  # the kept strategy's trained BAIM: the coordinator continues from it
    strategies: dict[str, StrategyRun] = field(default_factory=dict)  # per strategy: curves, FLOPs, seconds
    kept: str | None = None  # the strategy whose BAIM `trained` is (cloud.keep); None: the first
    holdout_loss: dict[str, float] | None = None  # per strategy, when cloud.keep is best


RoundRunner = Callable[[RoundRequest], RoundResult]  # blocking; the coordinator calls it in a thread


class RoundFailed(Exception):  # noqa: N818 (reads as what happened: "round failed")
    """`finish()` found learners still untrained after its last round attempt: no task model was published.

    `round` is the round index that failed, `error` the cause's text (type and message), `attempts` how many
    times that round was tried, `learners` the learners it was to train.
    """

    def __init__(self, round_index: int, error: str, attempts: int, learners: list[str]) -> None:
        self.round = round_index
        self.error = error
        self.attempts = attempts
        self.learners = list(learners)
        tries = "once" if attempts == 1 else f"{attempts} times"
        super().__init__(
            f"cloud round {round_index} failed (tried {tries}; learners {', '.join(learners) or 'none'}): "
            f"{error}; no task models were published"
        )

    def __reduce__(self) -> tuple[type[RoundFailed], tuple[int, str, int, list[str]]]:
        # Exception pickling replays `args` (the message alone); Ray ships errors between processes.
        return (type(self), (self.round, self.error, self.attempts, self.learners))


def round_error_text(err: BaseException) -> str:
    """`Type: message`, cut to MAX_ROUND_ERROR_CHARS."""
    text = f"{type(err).__name__}: {err}"
    if len(text) > MAX_ROUND_ERROR_CHARS:
        text = text[: MAX_ROUND_ERROR_CHARS - 20] + " ... (cut)"
    return text
