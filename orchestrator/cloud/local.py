"""The in-process round runner: `baim.loop.train_strategy` in the coordinator's process, once per strategy;
the strategy `cloud.keep` chooses (`orchestrator.cloud.keep`) is the round's trained BAIM.

For small runs and tests (`EngineOptions(cloud_trainer="local")`); deterministic: the result depends only
on the request (docs/design/training.md, "Noise").
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from actors.rounds import RoundRequest, RoundResult
from baim.compaction import Batch
from baim.loop import EpochOutcome, Evaluation, LoopSchedule, on_cadence, start_strategy, train_strategy
from baim.model import BAIM
from baim.model_config import ConnectionSpec
from baim.seeding import noise_seed
from baim.training import evaluate, make_optimizer
from orchestrator.cloud.data import CachedFaces
from orchestrator.cloud.keep import holdout_loss, kept_strategy
from orchestrator.cloud.pruning import pruning_schedule, score_batches, score_seed
from orchestrator.core.artifacts import ArtifactPayload, load_module, pack_module
from orchestrator.core.progress import CloudEpochProgress, publish_epoch
from orchestrator.core.receipts import LocalStrategyRun, StrategyRun
from orchestrator.core.registry import Registry

TRAINER_NAMED = "cloud.trainer: local"


def seeded_loss(base_seed: int) -> Callable[[nn.Module, Any], torch.Tensor]:
    """A loss_fn whose i-th call draws all its noise (the gate code, each learner's eps) from
    `noise_for(name, base_seed + i)`, never from torch's global RNG (which other threads of the coordinator
    draw from)."""
    calls = itertools.count()

    def loss_fn(model: nn.Module, batch: Any) -> torch.Tensor:
        images, task_ids = batch
        return model(images, task_ids, seed=base_seed + next(calls)).loss

    return loss_fn


class LocalHooks:
    """`baim.loop.TrainingHooks` of one strategy trained in this process."""

    def __init__(
        self,
        baim: BAIM,
        train: DataLoader[Any],
        test: dict[str, DataLoader[Any]],
        scores: Sequence[Batch],
        seed: int,
        round_index: int,
        evaluated: Callable[[int], bool],
        on_epoch: Callable[[EpochOutcome], None] | None = None,
    ):
        self.baim = baim
        self.train = train
        self.test = test  # per task
        self.scores = scores
        self.on_epoch = on_epoch
        self.seed = seed
        self.evaluated = evaluated  # whether the test loss is measured after an epoch
        self._train_loss = seeded_loss(noise_seed(seed, f"round {round_index} train"))
        self.train_loss: list[float] = []
        self.test_loss: list[float | None] = []  # None: not evaluated after that epoch
        self.test_loss_per_task: list[dict[str, float]] = []  # {}: not evaluated
        self.flops_per_epoch: list[int] = []
        self.seconds_per_epoch: list[float] = []
        self.flops = 0
        self.connections: list[int] = []

    def batches(self, epoch: int) -> Iterable[Any]:
        return self.train  # the loader's own seeded generator orders every epoch

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        return self._train_loss(model, batch)

    def score_batches(self) -> Sequence[Batch]:
        return self.scores

    def pruned(self, epoch: int, removed: list[ConnectionSpec]) -> nn.Module:
        return self.baim

    def evaluate(self, epoch: int) -> Evaluation | None:
        if not self.evaluated(epoch):
            return None
        # The same test noise every epoch (comparable epochs); seed=None: the noise is seeded already, and
        # evaluate must not reseed the shared global RNG.
        test_loss = seeded_loss(noise_seed(self.seed, "test"))
        per_task = {
            task: evaluate(self.baim, loader, test_loss, seed=None) for task, loader in self.test.items()
        }
        sizes = {task: len(loader.dataset) for task, loader in self.test.items()}  # type: ignore[arg-type]
        total = sum(sizes.values())
        return Evaluation(sum(per_task[t] * sizes[t] for t in per_task) / total, per_task)

    def epoch_done(self, outcome: EpochOutcome, optimizer: torch.optim.Optimizer) -> None:
        self.train_loss.append(outcome.train_loss)
        evaluation = outcome.evaluation
        self.test_loss.append(None if evaluation is None else evaluation.loss)
        self.test_loss_per_task.append({} if evaluation is None else evaluation.per_task)
        self.flops_per_epoch.append(outcome.flops)
        self.seconds_per_epoch.append(outcome.seconds)
        self.flops += outcome.flops
        self.connections.append(len(self.baim.connections.specs))
        if self.on_epoch is not None:
            self.on_epoch(outcome)


def epoch_reporter(
    registry: Registry, round_index: int, strategy: str, epochs: int
) -> Callable[[EpochOutcome], None]:
    """Publish each finished epoch as live progress (orchestrator.core.progress)."""

    def report(outcome: EpochOutcome) -> None:
        test_loss = None if outcome.evaluation is None else outcome.evaluation.loss
        progress = CloudEpochProgress(
            round=round_index, strategy=strategy, epoch=outcome.epoch, epochs=epochs,
            train_loss=outcome.train_loss, test_loss=test_loss, seconds=outcome.seconds,
        )  # fmt: skip
        publish_epoch(registry, progress)

    return report


def local_training_round(request: RoundRequest, chosen_by: str = TRAINER_NAMED) -> RoundResult:
    """Train the fused BAIM once per strategy, each from the same fused BAIM; the strategy `cloud.keep`
    names (or, for best, the lowest held-out loss) is what the coordinator continues from. FLOPs are counted
    on the first step and the first after each pruning, scaled by samples
    (`LoopSchedule.flop_counting="after_change"`); the test loss is measured every `cloud.evaluate_every`
    epochs and after the last. `chosen_by` (why this runner runs the round) goes into each strategy's
    record."""
    cloud, seed = request.scenario.cloud, request.scenario.seed
    pruning = pruning_schedule(
        cloud.prune_interval,
        cloud.prune_ratio,
        cloud.task_model_budget,
        cloud.recovery_epochs,
        cloud.prune_shape,
    )
    # FLOPs as the Ray Train runner counts them (a counted step costs about two uncounted ones).
    schedule = LoopSchedule(cloud.epochs, cloud.lr, pruning, "after_change", score_seed(seed))
    resolution = request.scenario.data.resolution
    results: dict[str, StrategyRun] = {}
    registry = Registry(request.registry_uri)
    trained: dict[str, ArtifactPayload] = {}
    losses: dict[str, float] | None = {} if cloud.keep == "best" else None
    fused = load_module(request.baim, BAIM, artifact_id=f"baim round {request.round_index}")
    tasks = list(fused.config.tasks)
    train_set = CachedFaces(request.source, request.partitions.cloud, tasks, resolution)  # one image cache
    test_set = CachedFaces(request.source, request.partitions.test, tasks, resolution)
    holdout = CachedFaces(request.source, request.partitions.holdout, tasks, resolution)
    scores = score_batches(train_set, tasks, cloud.prune_score_images, cloud.batch_size)
    for strategy in request.strategies:
        model = load_module(request.baim, BAIM, artifact_id=f"baim round {request.round_index}")
        start_strategy(model, strategy, seed, request.frozen_learners)
        order = torch.Generator().manual_seed(seed + request.round_index)
        hooks = LocalHooks(
            model,
            DataLoader(train_set, batch_size=cloud.batch_size, shuffle=True, generator=order),
            {
                task: DataLoader(Subset(test_set, positions), batch_size=cloud.batch_size)
                for task, positions in test_set.positions().items()
            },
            scores,
            seed,
            request.round_index,
            lambda epoch: on_cadence(epoch, cloud.evaluate_every, cloud.epochs),
            on_epoch=epoch_reporter(registry, request.round_index, strategy, cloud.epochs),
        )
        started = time.perf_counter()
        train_strategy(model, model, make_optimizer(model, cloud.lr), hooks, schedule)
        results[strategy] = LocalStrategyRun(
            train_loss=hooks.train_loss,
            test_loss=hooks.test_loss,
            flops=hooks.flops,
            seconds=time.perf_counter() - started,
            epochs=cloud.epochs,
            connections=hooks.connections,
            runner="local",
            chosen_by=chosen_by,
            test_loss_per_task=hooks.test_loss_per_task,
            flops_per_epoch=hooks.flops_per_epoch,
            seconds_per_epoch=hooks.seconds_per_epoch,
        )
        if losses is not None:
            losses[strategy] = holdout_loss(model, holdout, cloud.batch_size, seed)
        if cloud.keep in (strategy, "best"):
            trained[strategy] = pack_module(model, model.spec())
    kept = kept_strategy(cloud.keep, list(request.strategies), losses)
    return RoundResult(trained=trained[kept], strategies=results, kept=kept, holdout_loss=losses)
