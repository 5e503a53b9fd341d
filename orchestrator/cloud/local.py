"""The in-process round runner: `baim.loop.train_strategy` in the coordinator's process, once per strategy.

For small runs and tests (`EngineOptions(cloud_trainer="local")`); deterministic: the result depends only
on the request (docs/design/training.md, "Noise").
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from actors.rounds import RoundRequest, RoundResult
from baim.loop import EpochOutcome, Evaluation, LoopSchedule, on_cadence, start_strategy, train_strategy
from baim.model import BAIM
from baim.model_config import ConnectionSpec
from baim.seeding import noise_seed
from baim.training import evaluate, make_optimizer
from orchestrator.cloud.data import CachedFaces
from orchestrator.core.artifacts import ArtifactPayload, load_module, pack_module
from orchestrator.core.receipts import LocalStrategyRun, StrategyRun

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
        test: DataLoader[Any],
        seed: int,
        round_index: int,
        evaluated: Callable[[int], bool],
    ):
        self.baim = baim
        self.train = train
        self.test = test
        self.seed = seed
        self.evaluated = evaluated  # whether the test loss is measured after an epoch
        self._train_loss = seeded_loss(noise_seed(seed, f"round {round_index} train"))
        self.train_loss: list[float] = []
        self.test_loss: list[float | None] = []
        self.flops = 0
        self.connections: list[int] = []

    def batches(self, epoch: int) -> Iterable[Any]:
        return self.train  # the loader's own seeded generator orders every epoch

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        return self._train_loss(model, batch)

    def pruned(self, epoch: int, removed: list[ConnectionSpec]) -> nn.Module:
        return self.baim

    def evaluate(self, epoch: int) -> Evaluation | None:
        if not self.evaluated(epoch):
            return None
        # The same test noise every epoch (comparable epochs); seed=None: the noise is seeded already, and
        # evaluate must not reseed the shared global RNG.
        test_loss = seeded_loss(noise_seed(self.seed, "test"))
        return Evaluation(evaluate(self.baim, self.test, test_loss, seed=None))

    def epoch_done(self, outcome: EpochOutcome, optimizer: torch.optim.Optimizer) -> None:
        self.train_loss.append(outcome.train_loss)
        self.test_loss.append(None if outcome.evaluation is None else outcome.evaluation.loss)
        self.flops += outcome.flops
        self.connections.append(len(self.baim.connections.specs))


def local_training_round(request: RoundRequest, chosen_by: str = TRAINER_NAMED) -> RoundResult:
    """Train the fused BAIM once per strategy, each from the same fused BAIM; the first strategy's result
    is what the coordinator continues from. FLOPs are counted on the first step and the first after each
    pruning, scaled by samples (`LoopSchedule.flop_counting="after_change"`); the test loss is
    measured every `cloud.evaluate_every` epochs and after the last. `chosen_by` (why this runner runs the
    round) goes into each strategy's record."""
    cloud, seed = request.scenario.cloud, request.scenario.seed
    # FLOPs as the Ray Train runner counts them (a counted step costs about two uncounted ones).
    schedule = LoopSchedule(cloud.epochs, cloud.lr, cloud.prune_interval, cloud.prune_ratio, "after_change")
    resolution = request.scenario.data.resolution
    results: dict[str, StrategyRun] = {}
    trained: ArtifactPayload | None = None
    for strategy in request.strategies:
        model = load_module(request.baim, BAIM, artifact_id=f"baim round {request.round_index}")
        if trained is None:  # one image cache for every strategy
            tasks = list(model.config.tasks)
            train_set = CachedFaces(request.source, request.partitions.cloud, tasks, resolution)
            test_set = CachedFaces(request.source, request.partitions.test, tasks, resolution)
        start_strategy(model, strategy, seed, request.frozen_learners)
        order = torch.Generator().manual_seed(seed + request.round_index)
        hooks = LocalHooks(
            model,
            DataLoader(train_set, batch_size=cloud.batch_size, shuffle=True, generator=order),
            DataLoader(test_set, batch_size=cloud.batch_size),
            seed,
            request.round_index,
            lambda epoch: on_cadence(epoch, cloud.evaluate_every, cloud.epochs),
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
        )
        if trained is None:
            trained = pack_module(model, model.spec())
    assert trained is not None  # strategies is non-empty (schema: min_length=1)
    return RoundResult(trained=trained, strategies=results)
