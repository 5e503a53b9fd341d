"""Self-maintenance of a long-lived BAIM: forgetting per task, few-shot tasks, model-level pruning.

Plain functions the coordinator calls in a thread (no asyncio, no Ray), over `baim.continual` and
`baim.pruning`:
- `task_test_losses`: every task's test loss, with the noise `actors.publishing` measures task models with, so
  the numbers before and after a continual round (and of a published task model) are comparable.
- `adapt_new_task`: a new squad over the existing learners with a fresh LSGate trained alone on the k shots
  (every other task's output unchanged), and a VAE trained in the cloud on the same k images to compare with.
- `prune_by_selection`: learners whose LSGate selection rate on the cloud's common data is below a threshold
  leave their squads (`baim.pruning.prune_learners`: cut feeders are kept).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch.utils.data import DataLoader

from actors.publishing import publish_baim, publish_task_models
from actors.rounds import RoundRequest
from baim.config import LearnerSpec
from baim.continual import add_task, few_shot_adapt
from baim.costs import count_params
from baim.learners import VAELearner, noise_for
from baim.loop import start_strategy
from baim.model import BAIM
from baim.pruning import prune_learners, selection_frequency
from baim.training import Strategy
from orchestrator.core.artifacts import load_module, pack_module
from orchestrator.core.receipts import (
    CloudOnlyVAE,
    ContinualRound,
    LearnerPruning,
    NewTaskRecord,
    RemovedLearner,
)
from orchestrator.core.registry import Registry
from orchestrator.core.scenario import NewTaskEvent, Scenario
from orchestrator.data.datasets import FaceDataset
from orchestrator.data.partitions import Partitions
from orchestrator.data.sources import DataSource

logger = logging.getLogger(__name__)

VAE_NOISE = "few-shot-vae"  # noise keys of the cloud-only VAE (training, then test)
VAE_TEST_NOISE = "few-shot-vae-test"


def _images(source: DataSource, indices: list[int], resolution: int) -> torch.Tensor:
    dataset = FaceDataset(source, indices, resolution)
    return torch.stack([dataset[i] for i in range(len(dataset))])  # type: ignore[misc]


def _test_batches(
    source: DataSource, indices: list[int], resolution: int, batch_size: int
) -> Iterator[torch.Tensor]:
    yield from DataLoader(FaceDataset(source, indices, resolution), batch_size=batch_size)


@torch.no_grad()
def task_test_losses(
    baim: BAIM,
    tasks: Sequence[str],
    *,
    source: DataSource,
    test_indices: dict[str, list[int]],
    resolution: int,
    batch_size: int,
    seed: int,
) -> dict[str, float]:
    """Mean test loss per task of `tasks`, batch b with noise seed + b (as `publish_task_models` measures)."""
    was_training = baim.training
    baim.eval()
    losses = {}
    try:
        for task in tasks:
            task_id = baim.config.tasks.index(task)
            total, count = 0.0, 0
            for batch_index, images in enumerate(
                _test_batches(source, test_indices[task], resolution, batch_size)
            ):
                out = baim(images, task_id, seed=seed + batch_index)
                total += float(out.loss) * images.shape[0]
                count += images.shape[0]
            losses[task] = total / count if count else float("nan")
    finally:
        baim.train(was_training)
    return losses


@dataclass(frozen=True)
class FewShotOutcome:
    """What `adapt_new_task` did to the BAIM (in place) and measured."""

    members: list[str]
    gate_parameters: int
    test_loss_untrained_gate: float
    other_tasks_before: dict[str, float]
    other_tasks_after: dict[str, float]
    cloud_only_vae: CloudOnlyVAE


def largest_edge_spec(scenario: Scenario) -> LearnerSpec:
    """The scenario's largest edge model by parameter count (the first of equals)."""
    specs = [
        LearnerSpec(tuple(edge.model.widths), edge.model.latent_dim, scenario.data.resolution)
        for edge in scenario.all_edges()
    ]
    return max(specs, key=lambda spec: count_params(VAELearner(spec)))


def adapt_new_task(
    baim: BAIM,
    event: NewTaskEvent,
    scenario: Scenario,
    source: DataSource,
    partitions: Partitions,
) -> FewShotOutcome:
    """Add `event`'s task to `baim` (in place) as a squad over every full learner, train its LSGate alone on
    the k shots (the task's cloud shard), and train the cloud-only VAE on the same images."""
    cloud, seed, resolution = scenario.cloud, scenario.seed, scenario.data.resolution
    task = event.task.name
    if task in baim.config.tasks:
        raise ValueError(f"task: {task!r} is in the BAIM already")
    shots = partitions.cloud.get(task, [])
    if len(shots) != event.shots:
        raise ValueError(
            f"task {task!r}: expected {event.shots} shots in the cloud shard, found {len(shots)}"
        )
    measure = _measure(scenario, source, partitions)
    others = list(baim.config.tasks)
    before = task_test_losses(baim, others, **measure)
    add_task(baim, task)
    untrained = task_test_losses(baim, [task], **measure)[task]
    images = _images(source, shots, resolution)
    baim.train()
    few_shot_adapt(baim, task, images, steps=cloud.few_shot_steps, lr=cloud.lr, seed=seed)
    baim.eval()
    after = task_test_losses(baim, others, **measure)
    vae = train_cloud_only_vae(scenario, images, partitions.test[task], source)
    logger.info(
        "few-shot task %s: %d shots, untrained gate %.5f, cloud-only VAE %.5f",
        task, len(shots), untrained, vae.test_loss,
    )  # fmt: skip
    return FewShotOutcome(
        members=list(baim.config.squad(task).members),
        gate_parameters=count_params(baim.gate.squad_gate(task)),
        test_loss_untrained_gate=untrained,
        other_tasks_before=before,
        other_tasks_after=after,
        cloud_only_vae=vae,
    )


def train_cloud_only_vae(
    scenario: Scenario, images: torch.Tensor, test_indices: list[int], source: DataSource
) -> CloudOnlyVAE:
    """The scenario's largest edge model, seeded, trained with Adam (cloud.lr) on `images` alone for
    cloud.few_shot_steps full-batch steps; its mean test loss on `test_indices` (seeded noise)."""
    cloud, seed = scenario.cloud, scenario.seed
    spec = largest_edge_spec(scenario)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        learner = VAELearner(spec)
    optimizer = torch.optim.Adam(learner.parameters(), lr=cloud.lr)
    learner.train()
    for step in range(cloud.few_shot_steps):
        optimizer.zero_grad(set_to_none=True)
        eps = noise_for(VAE_NOISE, seed + step, images.shape[0], spec.latent_dim)
        learner.loss(images, cloud.kld_weight, eps=eps).loss.backward()
        optimizer.step()
    learner.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for b, batch in enumerate(
            _test_batches(source, test_indices, scenario.data.resolution, cloud.batch_size)
        ):
            eps = noise_for(VAE_TEST_NOISE, seed + b, batch.shape[0], spec.latent_dim)
            total += float(learner.loss(batch, cloud.kld_weight, eps=eps).loss) * batch.shape[0]
            count += batch.shape[0]
    return CloudOnlyVAE(
        widths=list(spec.widths),
        latent_dim=spec.latent_dim,
        params=count_params(learner),
        steps=cloud.few_shot_steps,
        test_loss=total / count if count else float("nan"),
    )


@dataclass(frozen=True)
class SelectionPruning:
    """What `prune_by_selection` measured and removed."""

    images: int
    selection_rates: dict[str, float]
    removed: list[RemovedLearner]
    params_before: int
    params_after: int


@torch.no_grad()
def selection_rates(
    baim: BAIM,
    *,
    source: DataSource,
    cloud_indices: dict[str, list[int]],
    resolution: int,
    batch_size: int,
    seed: int,
) -> tuple[dict[str, float], int]:
    """Each learner's LSGate selection rate (inference top K) on every task's cloud images; their count."""
    batches: list[tuple[torch.Tensor, torch.Tensor]] = []
    for task_id, task in enumerate(baim.config.tasks):
        for images in _test_batches(source, cloud_indices.get(task, []), resolution, batch_size):
            batches.append((images, torch.full((images.shape[0],), task_id, dtype=torch.long)))
    was_training = baim.training
    baim.eval()
    try:
        rates = selection_frequency(baim, batches, seed=seed)
    finally:
        baim.train(was_training)
    return rates, sum(int(images.shape[0]) for images, _ in batches)


def prune_by_selection(
    baim: BAIM,
    threshold: float,
    *,
    source: DataSource,
    cloud_indices: dict[str, list[int]],
    resolution: int,
    batch_size: int,
    seed: int,
) -> SelectionPruning:
    """Take learners selected less often than `threshold` out of their squads (in place); see
    `baim.pruning.prune_learners` (every squad keeps its most selected member, feeders are kept cut)."""
    rates, images = selection_rates(
        baim,
        source=source,
        cloud_indices=cloud_indices,
        resolution=resolution,
        batch_size=batch_size,
        seed=seed,
    )
    tasks = {entry.name: entry.task for entry in baim.config.learners}
    params_before = count_params(baim)
    result = prune_learners(baim, rates, threshold)
    removed = [
        RemovedLearner(
            learner=name,
            task=tasks[name],
            selection_rate=rates[name],
            kept_as_feeder=name in result.feeders,
        )
        for name in result.removed
    ]
    return SelectionPruning(images, rates, removed, params_before, count_params(baim))


# ---- the coordinator's steps (each runs in one of its threads) -----------------------------------------


@dataclass(frozen=True)
class ContinualStart:
    """A continual round's figures before it trains; `finish(trained)` adds those after."""

    mode: Literal["gate_only", "finetune_all"]
    frozen_learners: list[str]
    new_learners: list[str]
    trainable_parameters: int
    test_loss_before: dict[str, float]
    measure: dict[str, Any]

    def finish(self, trained: BAIM) -> ContinualRound:
        after = task_test_losses(trained, list(self.test_loss_before), **self.measure)
        return ContinualRound(
            mode=self.mode,
            frozen_learners=self.frozen_learners,
            new_learners=self.new_learners,
            trainable_parameters=self.trainable_parameters,
            test_loss_before=self.test_loss_before,
            test_loss_after=after,
            forgetting={task: after[task] - before for task, before in self.test_loss_before.items()},
        )


def _measure(scenario: Scenario, source: DataSource, partitions: Partitions) -> dict[str, Any]:
    return {
        "source": source,
        "test_indices": partitions.test,
        "resolution": scenario.data.resolution,
        "batch_size": scenario.cloud.batch_size,
        "seed": scenario.seed,
    }


def continual_strategy(keep: str, strategies: Sequence[Strategy], last_kept: str | None) -> Strategy:
    """The one strategy a gate_only round runs: the one whose BAIM it continues from (`cloud.keep`; for
    `best`, the one the last round kept). A BAIM scratch trained continues as finetune: its learners are
    trained now, and scratch would re-initialise what the round keeps."""
    chosen = last_kept if keep == "best" else keep
    if chosen is None:  # a round recorded before cloud.keep existed kept the first strategy
        chosen = strategies[0]
    if chosen not in ("finetune", "freeze", "scratch"):
        raise ValueError(f"continual_strategy: {chosen!r} is not a strategy")
    return "freeze" if chosen == "freeze" else "finetune"


def start_continual(
    request: RoundRequest, trained_learners: Sequence[str], mode: Literal["gate_only", "finetune_all"]
) -> ContinualStart:
    """Every task's test loss on the round's fused BAIM (function-preserving: the trained BAIM's numbers), and
    what the round's first strategy will train."""
    measure = _measure(request.scenario, request.source, request.partitions)
    fused = load_module(request.baim, BAIM, artifact_id=f"baim round {request.round_index}")
    before = task_test_losses(fused, list(fused.config.tasks), **measure)
    start_strategy(fused, request.strategies[0], request.scenario.seed, request.frozen_learners)
    return ContinualStart(
        mode=mode,
        frozen_learners=list(request.frozen_learners or []),
        new_learners=[name for name in fused.config.learner_names if name not in set(trained_learners)],
        trainable_parameters=sum(p.numel() for p in fused.parameters() if p.requires_grad),
        test_loss_before=before,
        measure=measure,
    )


@dataclass(frozen=True)
class FewShotPublisher:
    """A new task's few-shot round: adapt, publish the BAIM with the new squad and the task's model."""

    registry: Registry
    scenario: Scenario
    source: DataSource
    partitions: Partitions

    def run(self, event: NewTaskEvent, trained: BAIM | None) -> tuple[BAIM, NewTaskRecord]:
        """`trained` (the last trained BAIM) gains the task's squad; returns it and the record."""
        if trained is None:
            raise ValueError(f"new task {event.task.name!r}: expected a trained BAIM to adapt, found none")
        started = time.perf_counter()
        task = event.task.name
        outcome = adapt_new_task(trained, event, self.scenario, self.source, self.partitions)
        version = publish_baim(self.registry, pack_module(trained, trained.spec()))
        measure = _measure(self.scenario, self.source, self.partitions)
        published = publish_task_models(self.registry, trained, version, only=[task], **measure)[task]
        record = NewTaskRecord(
            task=task,
            expression=event.task.expression,
            shots=event.shots,
            members=outcome.members,
            steps=self.scenario.cloud.few_shot_steps,
            gate_parameters=outcome.gate_parameters,
            test_images=published.test_images,
            test_loss_untrained_gate=outcome.test_loss_untrained_gate,
            test_loss=published.test_loss,
            cloud_only_vae=outcome.cloud_only_vae,
            baim_version=version,
            artifact=published.artifact,
            other_tasks_unchanged=outcome.other_tasks_before == outcome.other_tasks_after,
            seconds=time.perf_counter() - started,
        )
        return trained, record


def prune_and_record(
    registry: Registry,
    trained: BAIM | None,
    trained_version: str,
    threshold: float,
    scenario: Scenario,
    source: DataSource,
    partitions: Partitions,
) -> LearnerPruning:
    """Model-level pruning of `trained` (baim@trained_version); a BAIM that lost learners is published as
    the next `baim` version, which the task models are then decomposed from."""
    if trained is None:
        raise ValueError(f"baim@{trained_version}: not in the registry")
    outcome = prune_by_selection(
        trained,
        threshold,
        source=source,
        cloud_indices=partitions.cloud,
        resolution=scenario.data.resolution,
        batch_size=scenario.cloud.batch_size,
        seed=scenario.seed,
    )
    version = trained_version
    if outcome.removed:
        version = publish_baim(registry, pack_module(trained, trained.spec()))
    logger.info(
        "model-level pruning (rate < %g): removed %s; task models from baim@%s",
        threshold, [r.learner for r in outcome.removed], version,
    )  # fmt: skip
    return LearnerPruning(
        threshold=threshold,
        from_version=trained_version,
        baim_version=version,
        images=outcome.images,
        selection_rates=outcome.selection_rates,
        removed=outcome.removed,
        params_before=outcome.params_before,
        params_after=outcome.params_after,
    )
