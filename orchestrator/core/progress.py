"""Live progress of the cloud's training epochs: a small JSON document in the registry.

Why the registry: a round trains in the coordinator's process or in Ray Train workers, whose logs do not reach
the terminal (the driver runs with log_to_driver=False); both can write the registry, and the driver already
polls every few seconds. The last epoch of each (round, strategy) is kept; a reader prints what is new.
"""

from __future__ import annotations

import logging

from pydantic import Field

from orchestrator.core.registry import Registry
from orchestrator.core.scenario import StrictModel

logger = logging.getLogger(__name__)

CLOUD_PROGRESS_KEY = "cloud-progress"


class CloudEpochProgress(StrictModel):
    """One finished cloud epoch."""

    round: int = Field(ge=0, description="The coordinator's round.")
    strategy: str = Field(description="finetune, freeze or scratch.")
    epoch: int = Field(ge=1, description="The epoch just finished (1-based).")
    epochs: int = Field(ge=1, description="Epochs of the run.")
    train_loss: float = Field(description="Mean training loss of the epoch.")
    test_loss: float | None = Field(
        description="Mean test loss after the epoch (None: not evaluated, cloud.evaluate_every)."
    )
    seconds: float = Field(ge=0, description="Wall-clock seconds of the epoch.")

    def line(self) -> str:
        test = "not evaluated" if self.test_loss is None else f"test loss {self.test_loss:.5f}"
        return (
            f"cloud round {self.round} {self.strategy} epoch {self.epoch}/{self.epochs}: train loss "
            f"{self.train_loss:.5f}, {test} ({self.seconds:.1f}s)"
        )


def publish_epoch(registry: Registry, progress: CloudEpochProgress) -> None:
    """Record a finished epoch (keeps the newest epoch of every round and strategy). Never raises: progress
    must not fail a training round."""
    try:
        document = registry.get_json(CLOUD_PROGRESS_KEY, default={}) or {}
        document[f"{progress.round}/{progress.strategy}"] = progress.model_dump()
        registry.put_json(CLOUD_PROGRESS_KEY, document)
    except Exception as err:  # a full disk or a flaky store: the round goes on without live progress
        logger.warning("cloud progress not recorded: %s", err)


def read_epochs(registry: Registry) -> list[CloudEpochProgress]:
    """Every recorded (round, strategy)'s newest epoch; malformed entries are skipped (progress only)."""
    document = registry.get_json(CLOUD_PROGRESS_KEY, default={}) or {}
    found = []
    for value in document.values() if isinstance(document, dict) else []:
        try:
            found.append(CloudEpochProgress.model_validate(value))
        except ValueError:
            continue
    return found
