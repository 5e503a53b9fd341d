"""The one cloud training loop: per epoch, train, prune on the schedule, evaluate, hand the epoch to hooks.

Every runner (in-process, Ray Train worker) calls `train_strategy` with its own `TrainingHooks`: where the
batches come from (and the fixed batches pruning scores connections on), the loss (its noise), what follows a
pruning (e.g. a new DDP wrapper), how the test loss is measured, and what an epoch's end does (report,
checkpoint). Pruning is `baim.compaction.prune_on_schedule`: scored on data, and with a task-model budget it
reaches the budget by the last pruning epoch, recovery epochs following. docs/design/training.md says why.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch
from torch import nn

from baim.compaction import Batch, PruningSchedule, prune_on_schedule
from baim.continual import admit, freeze_for_continual
from baim.model import BAIM
from baim.model_config import ConnectionSpec
from baim.training import FlopCounting, Strategy, apply_strategy, make_optimizer, train_steps

# FlopCounting per epoch, or "after_change": count the first step of the run and the first step after each
# pruning (the only events that change the architecture), and scale the per-sample FLOPs of that step to the
# other steps and epochs; it saves FlopCounterMode's dispatch overhead (a counted step costs about two) on
# every epoch that follows an unchanged one.
LoopFlopCounting = FlopCounting | Literal["after_change"]


@dataclass(frozen=True)
class LoopSchedule:
    """How long to train and when to prune."""

    epochs: int  # the last epoch (1-based) to train
    lr: float  # Adam learning rate; the optimiser rebuilt after a pruning keeps it
    pruning: PruningSchedule  # when and how much to prune (interval, ratio, task-model budget, recovery)
    flop_counting: LoopFlopCounting = "every_batch"
    score_seed: int = 0  # connection scores draw their noise from noise_for(..., score_seed + batch index)


@dataclass(frozen=True)
class Evaluation:
    """The test loss after an epoch."""

    loss: float  # mean over every test image
    per_task: dict[str, float] = field(default_factory=dict)  # when the runner measures it per task


@dataclass(frozen=True)
class EpochOutcome:
    """One epoch, as this process saw it (a Ray Train rank sums and maxes these across ranks)."""

    epoch: int
    loss_sum: float  # sum over trained samples of the step losses
    samples: int
    flops: int
    train_seconds: float  # the training steps
    seconds: float  # training, pruning and evaluation
    pruned: list[ConnectionSpec]  # connections removed at the end of this epoch
    evaluation: Evaluation | None  # None: the hooks did not evaluate this epoch

    @property
    def train_loss(self) -> float:
        return self.loss_sum / self.samples


class TrainingHooks(Protocol):
    """What a runner plugs into `train_strategy`. Implement every method; share no implementation."""

    def batches(self, epoch: int) -> Iterable[Any]:
        """The epoch's training batches (seed the epoch's randomness here)."""
        ...

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """The scalar training loss of `model` (the BAIM or its wrapper) on `batch`."""
        ...

    def score_batches(self) -> Sequence[Batch]:
        """Fixed (images, task ids) batches pruning scores connections on; the same on every rank and call."""
        ...

    def pruned(self, epoch: int, removed: list[ConnectionSpec]) -> nn.Module:
        """Called after each pruning that removed connections; returns the module to train from now on (the
        BAIM or a new wrapper)."""
        ...

    def evaluate(self, epoch: int) -> Evaluation | None:
        """The test loss after the epoch (and its pruning), or None to skip this epoch."""
        ...

    def epoch_done(self, outcome: EpochOutcome, optimizer: torch.optim.Optimizer) -> None:
        """The epoch's end: report it, checkpoint (the optimiser is the one the next epoch continues)."""
        ...


def on_cadence(epoch: int, every: int, last_epoch: int) -> bool:
    """Whether a per-epoch action (a checkpoint, an evaluation) is due after `epoch`: after every `every`-th
    epoch and after the last one always."""
    return epoch % every == 0 or epoch == last_epoch


def start_strategy(
    baim: BAIM, strategy: Strategy, seed: int, frozen_learners: Sequence[str] | None = None
) -> None:
    """Prepare a fused BAIM for a round: pending learners compete from the first step, then the strategy.

    `frozen_learners` (a continual gate_only round): those learners and the connections among them stay
    fixed; the gates and the rest train (the other learners only with finetune). Scratch would re-initialise
    what the round keeps, so it is refused there.
    """
    admit(baim)
    if frozen_learners is None:
        apply_strategy(baim, strategy, baim.learner_modules(), seed=seed)
        return
    if strategy == "scratch":
        raise ValueError("strategy: a continual round keeps its learners; scratch would re-initialise them")
    freeze_for_continual(baim, frozen_learners, train_new_learners=strategy == "finetune")


def train_strategy(
    baim: BAIM,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    hooks: TrainingHooks,
    schedule: LoopSchedule,
    *,
    first_epoch: int = 1,
) -> torch.optim.Optimizer:
    """Train epochs first_epoch..schedule.epochs of `baim` through `model` (the BAIM, or a wrapper of it).

    After the training of each pruning epoch (`schedule.pruning`), connections are scored on
    `hooks.score_batches()` and removed. Pruning deletes parameters, so after one that removed any the
    optimiser is rebuilt over the surviving trainable ones, each survivor keeping its Adam state, and
    `hooks.pruned` gives the module to train next. Evaluation follows pruning, so a test loss is that of the
    model the epoch ends with. Returns the last optimiser. Raises ValueError when a budget is set and the
    schedule has no pruning epoch.
    """
    pruning_epochs = set(schedule.pruning.pruning_epochs(schedule.epochs))
    per_sample_flops: float | None = None  # "after_change": the counted step's, until the next pruning
    for epoch in range(first_epoch, schedule.epochs + 1):
        started = time.perf_counter()
        counting = schedule.flop_counting
        if counting == "after_change":
            counting = "first_batch" if per_sample_flops is None else "none"
        totals = train_steps(model, hooks.batches(epoch), optimizer, hooks.loss, counting)
        train_seconds = time.perf_counter() - started
        flops = totals.flops
        if schedule.flop_counting == "after_change":
            if per_sample_flops is None:
                per_sample_flops = totals.flops / totals.samples
            else:
                flops = round(per_sample_flops * totals.samples)
        removed: list[ConnectionSpec] = []
        if epoch in pruning_epochs:
            removed = prune_on_schedule(
                baim,
                epoch,
                schedule.epochs,
                schedule.pruning,
                hooks.score_batches(),
                seed=schedule.score_seed,
            )
        if removed:
            per_sample_flops = None  # connections went: count the next step again
            optimizer = make_optimizer(baim, schedule.lr, previous=optimizer)
            del model  # a DDP wrapper's gradient hooks go with it, before the next one registers its own
            model = hooks.pruned(epoch, removed)
        evaluation = hooks.evaluate(epoch)
        outcome = EpochOutcome(
            epoch=epoch,
            loss_sum=totals.loss_sum,
            samples=totals.samples,
            flops=flops,
            train_seconds=train_seconds,
            seconds=time.perf_counter() - started,
            pruned=removed,
            evaluation=evaluation,
        )
        hooks.epoch_done(outcome, optimizer)
    return optimizer
