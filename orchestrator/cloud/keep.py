"""Which strategy's trained BAIM a round keeps (`cloud.keep`): the coordinator continues from it, and the run
decomposes and publishes its task models.

`keep` names a strategy (default finetune, the paper's best), or is `best`: the strategy whose trained BAIM
has the lowest mean loss on the cloud's held-out images (`data.holdout_per_task`, disjoint from the common
shard it trained on and from the test split the report measures), with seeded noise so that every strategy
is measured on the same draws. Ties go to the earlier strategy in `cloud.strategies`.
"""

from __future__ import annotations

import math

import torch

from baim.model import BAIM
from baim.seeding import eval_seed, noise_seed
from orchestrator.cloud.data import CachedFaces


@torch.no_grad()
def holdout_loss(baim: BAIM, holdout: CachedFaces, batch_size: int, seed: int) -> float:
    """Mean loss of `baim` (eval mode, restored after) over every held-out image; NaN when there are none."""
    was_training = baim.training
    baim.eval()
    device = next(baim.parameters()).device
    base = noise_seed(seed, "holdout")
    total, count = 0.0, 0
    try:
        for task in holdout.faces:
            task_id = baim.config.tasks.index(task)
            size = len(holdout.faces[task])
            for b, start in enumerate(range(0, size, batch_size)):
                stop = min(start + batch_size, size)
                images = torch.stack([holdout.image(task, i) for i in range(start, stop)]).to(device)
                out = baim(images, task_id, seed=eval_seed(base, task_id, b))
                total += float(out.loss) * (stop - start)
                count += stop - start
    finally:
        baim.train(was_training)
    return total / count if count else math.nan


def kept_strategy(keep: str, strategies: list[str], holdout_losses: dict[str, float] | None) -> str:
    """The strategy to keep: `keep` itself, or for `best` the lowest of `holdout_losses` (ties: the first)."""
    if keep != "best":
        if keep not in strategies:
            ran = ", ".join(strategies)
            raise ValueError(f"keep: {keep!r} is not one of the strategies that ran ({ran})")
        return keep
    if not holdout_losses or any(math.isnan(holdout_losses.get(s, math.nan)) for s in strategies):
        raise ValueError(
            "keep: best needs a held-out loss for every strategy; the cloud has no held-out images "
            "(set data.holdout_per_task > 0)"
        )
    return min(strategies, key=lambda s: (holdout_losses[s], strategies.index(s)))
