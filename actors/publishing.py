"""The one publish path: a trained BAIM as `baim@vN`, then per task its generation-only artifact as
`generation/<task>@vN` and its full task model as `task/<task>@vN`.

Task models carry the version of the BAIM they were decomposed from. Each is checked against the BAIM on its
task's test images (same noise) and its test loss measured before it is published; the generation-only
artifact is checked against the task model's `generate(n, seed)`. The generation artifact is committed
first, so whoever sees a new task model version (Serve follows `task/<task>`) finds its generation artifact.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import DataLoader

from baim.compaction import budget_limits, squad_params
from baim.costs import count_params
from baim.decompose import TaskModel, decompose, generation_model
from baim.model import BAIM
from orchestrator.core.artifacts import ArtifactPayload, pack_module
from orchestrator.core.names import BAIM_OWNER, generation_owner, task_owner
from orchestrator.core.receipts import PublishedGenerationModel, PublishedTaskModel
from orchestrator.core.registry import Registry
from orchestrator.data.datasets import FaceDataset
from orchestrator.data.sources import DataSource

GENERATION_CHECK_IMAGES = 8  # images generate(n, seed) draws to compare the generation artifact with


def publish_baim(registry: Registry, trained: ArtifactPayload) -> str:
    """Store a trained BAIM as the next `baim` version; returns the version."""
    version = registry.next_version(BAIM_OWNER)
    registry.put(BAIM_OWNER, version, trained)
    return version


@torch.no_grad()
def publish_task_models(
    registry: Registry,
    baim: BAIM,
    baim_version: str,
    *,
    source: DataSource,
    test_indices: dict[str, list[int]],
    resolution: int,
    batch_size: int,
    seed: int,
    task_model_budget: float | None = None,
    only: Sequence[str] | None = None,
) -> dict[str, PublishedTaskModel]:
    """Decompose each task of `baim` (the registry's `baim@baim_version`; `only` these tasks when given),
    check each task model against the BAIM on the task's test images, measure its test loss, publish its
    generation-only artifact as `generation/<task>@baim_version` and itself as `task/<task>@baim_version`.
    `task_model_budget` (the scenario's) is only recorded: the limit each task model was pruned to."""
    baim.eval()
    limits = budget_limits(baim.config, task_model_budget) if task_model_budget is not None else {}
    published: dict[str, PublishedTaskModel] = {}
    for task_id, task in enumerate(baim.config.tasks):
        if only is not None and task not in only:
            continue
        model = decompose(baim, task).eval()  # as the BAIM: inference routing (top K), not training's
        test = FaceDataset(source, test_indices[task], resolution)
        max_diff, total, count = 0.0, 0.0, 0
        for batch_index, images in enumerate(DataLoader(test, batch_size=batch_size)):
            noise = seed + batch_index  # the same noise for the BAIM and the task model
            full = baim(images, task_id, seed=noise)
            alone = model(images, seed=noise)
            max_diff = max(max_diff, float((full.recon - alone.recon).abs().max()))
            total += float(alone.loss) * images.shape[0]
            count += images.shape[0]
        generation = publish_generation_model(registry, model, baim_version, seed=seed)
        ref = registry.put(task_owner(task), baim_version, pack_module(model, model.spec()))
        published[task] = PublishedTaskModel(
            params=count_params(model),
            baim_params=count_params(baim),
            learners=list(model.config.learner_names),
            test_loss=total / count if count else None,
            test_images=count,
            decomposition_max_abs_diff=max_diff,
            artifact=f"{ref.owner}@{ref.version}",
            sha256=ref.sha256,
            nbytes=ref.nbytes,
            squad_params=squad_params(baim.config, task),
            budget_params=limits.get(task),
            generation=generation,
        )
    return published


@torch.no_grad()
def publish_generation_model(
    registry: Registry, model: TaskModel, version: str, *, seed: int
) -> PublishedGenerationModel:
    """The generation-only artifact of `model`, checked against its `generate(n, seed)`, stored as
    `generation/<task>@version`."""
    generator = generation_model(model)
    full = model.generate(GENERATION_CHECK_IMAGES, seed=seed)
    alone = generator.generate(GENERATION_CHECK_IMAGES, seed=seed)
    ref = registry.put(generation_owner(model.task), version, pack_module(generator, generator.spec()))
    return PublishedGenerationModel(
        artifact=f"{ref.owner}@{ref.version}",
        sha256=ref.sha256,
        params=count_params(generator),
        nbytes=ref.nbytes,
        max_abs_diff=float((full - alone).abs().max()),
        images_checked=GENERATION_CHECK_IMAGES,
    )
