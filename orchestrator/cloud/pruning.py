"""What both round runners hand the one training loop for pruning: the schedule and the score batches.

The schedule comes from the scenario's cloud settings (`prune_interval`, `prune_ratio`, `task_model_budget`,
`recovery_epochs`, `prune_shape`); connections are scored on the first `prune_score_images` images of each
task's common shard, in fixed batches, so every Ray Train rank (and a resumed attempt) scores on the same
images and removes the same connections.
"""

from __future__ import annotations

import torch

from baim.compaction import Batch, PruningSchedule, PruningShape
from baim.seeding import noise_seed
from orchestrator.cloud.data import CachedFaces


def pruning_schedule(
    prune_interval: int,
    prune_ratio: float,
    task_model_budget: float | None,
    recovery_epochs: int,
    prune_shape: PruningShape = "cubic",
) -> PruningSchedule:
    """The loop's pruning schedule from the cloud settings of the same names."""
    return PruningSchedule(
        interval=prune_interval,
        ratio=prune_ratio,
        budget=task_model_budget,
        recovery_epochs=recovery_epochs,
        shape=prune_shape,
    )


def score_seed(seed: int) -> int:
    """Base noise seed of connection scoring (one stream of the scenario's seed, the same in every runner)."""
    return noise_seed(seed, "prune scores")


def score_batches(faces: CachedFaces, tasks: list[str], per_task: int, batch_size: int) -> list[Batch]:
    """The first `per_task` images of each task in `faces`, task by task, cut into fixed batches of
    (images, task ids); task ids index `tasks` (the BAIM's task order)."""
    if per_task < 1 or batch_size < 1:
        raise ValueError(f"per_task and batch_size: expected >= 1, received {per_task} and {batch_size}")
    images: list[torch.Tensor] = []
    task_ids: list[int] = []
    for task in faces.faces:
        count = min(per_task, len(faces.faces[task]))
        images += [faces.image(task, i) for i in range(count)]
        task_ids += [tasks.index(task)] * count
    if not images:
        return []
    stacked, ids = torch.stack(images), torch.tensor(task_ids)
    return [(stacked[s : s + batch_size], ids[s : s + batch_size]) for s in range(0, len(ids), batch_size)]
