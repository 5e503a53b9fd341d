"""A scenario's BAIM trained in this process (no Ray), for the model benchmarks.

What `baim run` does, minus the actors: the scenario's partitions (orchestrator.data, the shared CelebA subset
by default), each edge's VAE trained on its shard (Adam, the edge's lr, batch size and local epochs), fusion
in edge order (`BAIM.from_learners`), then cloud training on the common shard with a pruning schedule
(`baim.compaction.prune_on_schedule`). Images are decoded once and kept as tensors. Not a module of the
product: benchmarks import it (`from inprocess_baim import ...` with benchmarks/ on sys.path).
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

from baim.compaction import PruningSchedule, prune_on_schedule
from baim.config import LearnerSpec
from baim.distill import Distillation
from baim.learners import VAELearner
from baim.model import BAIM
from baim.training import apply_strategy, make_optimizer, train_epoch, vae_batch_loss
from orchestrator.core.scenario import Scenario, load_scenario
from orchestrator.data.datasets import to_square_tensor
from orchestrator.data.partitions import make_partitions
from orchestrator.data.sources import DataSource, resolve_source

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = REPO_ROOT / "scenarios" / "quickstart.yaml"
EVAL_NOISE_SEED = 10_000  # test-loss noise: noise_for(..., EVAL_NOISE_SEED + batch index)


@dataclass
class ScenarioData:
    """A scenario's images, decoded once: (N, 3, R, R) float tensors in [0, 1]."""

    scenario: Scenario
    source_kind: str
    tasks: list[str]
    edges: dict[str, torch.Tensor]
    cloud: dict[str, torch.Tensor]
    test: dict[str, torch.Tensor]

    def cloud_batches(self) -> TensorDataset:
        images = torch.cat([self.cloud[t] for t in self.tasks])
        task_ids = torch.cat([torch.full((len(self.cloud[t]),), i) for i, t in enumerate(self.tasks)])
        return TensorDataset(images, task_ids)

    def score_batches(self, per_task: int, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The first `per_task` cloud images of each task, in fixed batches (the same on every call)."""
        images = torch.cat([self.cloud[t][:per_task] for t in self.tasks])
        task_ids = torch.cat(
            [torch.full((len(self.cloud[t][:per_task]),), i) for i, t in enumerate(self.tasks)]
        )
        return [
            (images[s : s + batch_size], task_ids[s : s + batch_size])
            for s in range(0, len(images), batch_size)
        ]


def load_images(source: DataSource, indices: list[int], resolution: int) -> torch.Tensor:
    return torch.stack([to_square_tensor(source.load_image(i), resolution) for i in indices])


def load_data(scenario: Scenario) -> ScenarioData:
    source = resolve_source(scenario.data)
    partitions = make_partitions(source, scenario)
    resolution = scenario.data.resolution
    tasks = scenario.task_names()
    return ScenarioData(
        scenario=scenario,
        source_kind=source.kind,
        tasks=tasks,
        edges={e.id: load_images(source, partitions.edges[e.id], resolution) for e in scenario.all_edges()},
        cloud={t: load_images(source, partitions.cloud[t], resolution) for t in tasks},
        test={t: load_images(source, partitions.test[t], resolution) for t in tasks},
    )


def train_edges(data: ScenarioData) -> list[tuple[str, str, VAELearner]]:
    """Every edge's VAE trained on its own shard, in edge order: [(edge id, task, learner)]."""
    scenario = data.scenario
    learners = []
    for n, edge in enumerate(scenario.all_edges()):
        spec = LearnerSpec(tuple(edge.model.widths), edge.model.latent_dim, scenario.data.resolution)
        torch.manual_seed(scenario.seed * 1000 + n)
        learner = VAELearner(spec)
        optimizer = torch.optim.Adam(learner.parameters(), lr=edge.lr)
        order = torch.Generator().manual_seed(scenario.seed * 1000 + n)
        loader = DataLoader(data.edges[edge.id], batch_size=edge.batch_size, shuffle=True, generator=order)
        for _ in range(edge.local_epochs):
            train_epoch(learner, loader, optimizer, vae_batch_loss(scenario.cloud.kld_weight))
        learners.append((edge.id, edge.task, learner))
    return learners


def fuse(
    data: ScenarioData,
    learners: list[tuple[str, str, VAELearner]],
    mixture: str,
    top_k: int | None = None,
    connection_scope: str = "all",
) -> BAIM:
    """The fused BAIM of copies of `learners` (cloud settings of the scenario; `top_k` overrides)."""
    cloud = data.scenario.cloud
    baim = BAIM.from_learners(
        data.tasks,
        [(name, task, copy.deepcopy(learner)) for name, task, learner in learners],
        top_k=cloud.top_k if top_k is None else top_k,
        connection_height=cloud.connection_height,
        kld_weight=cloud.kld_weight,
        seed=data.scenario.seed,
        mixture=mixture,
        connection_scope=connection_scope,
    )
    return baim


def schedule_of(scenario: Scenario) -> PruningSchedule:
    cloud = scenario.cloud
    return PruningSchedule(
        interval=cloud.prune_interval,
        ratio=cloud.prune_ratio,
        budget=cloud.task_model_budget,
        recovery_epochs=cloud.recovery_epochs,
    )


@dataclass
class EpochLog:
    epoch: int
    train_loss: float
    test_loss: dict[str, float]
    connections: int
    pruned: int
    seconds: float


def train_cloud(
    baim: BAIM,
    data: ScenarioData,
    schedule: PruningSchedule,
    epochs: int,
    report: Callable[[EpochLog], None] | None = None,
    max_batches: int | None = None,
    test_every_epoch: bool = True,
    distill_weight: float = 0.0,
) -> list[EpochLog]:
    """Finetune `baim` on the cloud shard for `epochs`, pruning on `schedule`; per-epoch logs.

    `max_batches` cuts every epoch short (a structural run of a long schedule); without `test_every_epoch`
    the test loss is measured after the last epoch only (empty elsewhere). `distill_weight` > 0: from the
    first pruning on, distil from the BAIM as it was just before it (`baim.distill`).
    """
    scenario = data.scenario
    cloud = scenario.cloud
    apply_strategy(baim, "finetune", baim.learner_modules(), seed=scenario.seed)
    optimizer = make_optimizer(baim, cloud.lr)
    order = torch.Generator().manual_seed(scenario.seed)
    loader = DataLoader(data.cloud_batches(), batch_size=cloud.batch_size, shuffle=True, generator=order)
    score_batches = data.score_batches(cloud.prune_score_images, cloud.batch_size)
    pruning_epochs = schedule.pruning_epochs(epochs)
    distillation: Distillation | None = None

    def loss(model: torch.nn.Module, b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        target = None if distillation is None else distillation.target(b[0], b[1])
        return model(b[0], b[1], target=target).loss

    logs = []
    for epoch in range(1, epochs + 1):
        started = time.perf_counter()
        torch.manual_seed(scenario.seed * 7919 + epoch)  # training noise
        batches = list(loader)[:max_batches]
        train_loss = train_epoch(baim, batches, optimizer, loss)
        if distill_weight > 0 and distillation is None and epoch in pruning_epochs:
            distillation = Distillation.snapshot(baim, distill_weight)
        removed = prune_on_schedule(baim, epoch, epochs, schedule, score_batches, seed=scenario.seed)
        if removed:
            optimizer = make_optimizer(baim, cloud.lr, previous=optimizer)
        log = EpochLog(
            epoch=epoch,
            train_loss=train_loss,
            test_loss={t: test_loss(baim, data, t) for t in data.tasks}
            if test_every_epoch or epoch == epochs
            else {},
            connections=len(baim.connections.specs),
            pruned=len(removed),
            seconds=time.perf_counter() - started,
        )
        logs.append(log)
        if report is not None:
            report(log)
    return logs


@torch.no_grad()
def test_loss(model: torch.nn.Module, data: ScenarioData, task: str, batch_size: int = 100) -> float:
    """Mean test loss of a BAIM (for `task`) or of a task model, eval mode, seeded noise per batch."""
    was_training = model.training
    model.eval()
    images = data.test[task]
    total = 0.0
    for b, start in enumerate(range(0, len(images), batch_size)):
        x = images[start : start + batch_size]
        seed = EVAL_NOISE_SEED + b
        out = model(x, task, seed=seed) if isinstance(model, BAIM) else model(x, seed=seed)
        total += float(out.loss) * len(x)
    model.train(was_training)
    return total / len(images)


def quickstart() -> Scenario:
    return load_scenario(QUICKSTART)
