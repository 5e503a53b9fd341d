"""Knowledge updating over time: continual learning (new learners) and few-shot tasks (new LSGates).

Continual learning, in three steps:
1. `baim.add_learner(name, task, learner)` fuses an upload, function-preserving (baim.model): the BAIM's
   outputs are unchanged until training starts.
2. `admit(baim)` removes the pending learners' gate logit offset so that they can be selected (and so get
   gradients). Call it when training of the fused BAIM starts, not before.
3. Train only `continual_parameters(baim, new_learners)`: every gate parameter and the new connections
   (those touching a new learner); the learners themselves stay fixed. `train_only` is a small loop for that
   (the cloud's Ray Train loop may use the same parameter list instead).

Few-shot: `add_task(baim, task)` creates a new squad over existing learners (all full learners by default)
with a fresh LSGate; nothing else changes, so every other task's output is unchanged. `few_shot_adapt` then
trains that LSGate alone on the k given samples. The LSGate learns through the softmax weights of the
learners it evaluates: with the "sample" mixture training evaluates max(K, 2) of them, so any K works; the
legacy "blend" needs top_k >= 2 (with K = 1 the single weight is always 1 and carries no gradient: the
selection itself is not differentiable).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

from baim.model import BAIM
from baim.model_config import SquadSpec

logger = logging.getLogger(__name__)


@torch.no_grad()
def admit(baim: BAIM, names: Sequence[str] | None = None) -> list[str]:
    """Let pending learners (all when `names` is None) compete in their squads' gates; returns them."""
    pending = baim.pending_learners()
    chosen = pending if names is None else list(names)
    unknown = [name for name in chosen if name not in pending]
    if unknown:
        raise ValueError(f"names: {unknown} are not pending; pending learners are {pending}")
    for squad in baim.config.squads:
        gate = baim.gate.squad_gate(squad.task)
        for position, member in enumerate(squad.members):
            if member in chosen:
                gate.admission_offset[position] = 0.0
    logger.info("admitted learners %s", chosen)
    return chosen


def continual_parameters(baim: BAIM, new_learners: Sequence[str]) -> list[nn.Parameter]:
    """Gate parameters plus the parameters of every connection touching one of `new_learners`."""
    unknown = [name for name in new_learners if name not in baim.config.learner_names]
    if unknown:
        raise ValueError(f"new_learners: unknown learners {unknown}")
    new = set(new_learners)
    params = baim.gate_parameters()
    for spec in baim.connections.specs:
        if spec.src in new or spec.dst in new:
            params += list(baim.connections.projection(spec).parameters())
    return params


def freeze_for_continual(baim: BAIM, frozen_learners: Sequence[str], train_new_learners: bool) -> int:
    """A continual round's trainable set, in place: the gates, every connection touching a learner not in
    `frozen_learners` and, with `train_new_learners`, those learners themselves; every other parameter gets
    requires_grad=False (its .grad cleared). Returns the number of trainable parameters."""
    unknown = sorted(set(frozen_learners) - set(baim.config.learner_names))
    if unknown:
        raise ValueError(f"frozen_learners: unknown learners {unknown}")
    new = [name for name in baim.config.learner_names if name not in set(frozen_learners)]
    trainable = {id(p) for p in continual_parameters(baim, new)}
    if train_new_learners:
        trainable |= {id(p) for name in new for p in baim.learner(name).parameters()}
    for p in baim.parameters():
        p.requires_grad_(id(p) in trainable)
        if id(p) not in trainable:
            p.grad = None
    count = sum(p.numel() for p in baim.parameters() if p.requires_grad)
    logger.info("continual round: %d trainable parameters, learners %s frozen", count, list(frozen_learners))
    return count


def add_task(baim: BAIM, task: str, members: Sequence[str] | None = None) -> None:
    """A new squad for `task` over existing full learners (all of them, in arrival order, by default)."""
    if task in baim.config.tasks:
        raise ValueError(f"task: {task!r} already has a squad")
    if members is None:
        members = [entry.name for entry in baim.config.learners if entry.depth is None]
    squads = (*baim.config.squads, SquadSpec(task, tuple(members)))
    baim.config = baim.config.with_changes(squads=squads)  # validates the members
    baim.gate.add_squad(task, len(members))
    logger.info("added few-shot task %s over %d learners", task, len(members))


def train_only(
    baim: BAIM,
    params: Sequence[nn.Parameter],
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    steps: int,
    lr: float,
    seed: int = 0,
) -> list[float]:
    """Adam on `params` alone for `steps` steps, cycling over `batches` of (images, task_ids).

    Every other parameter gets requires_grad=False for the duration (restored after), so no gradient is
    computed for it. The noise of step t is noise_for(..., seed + t): runs are reproducible. Returns the
    training losses.
    """
    if steps < 1 or not batches:
        raise ValueError(
            f"steps and batches: expected steps >= 1 and a batch, received {steps} and {len(batches)}"
        )
    chosen = {id(p) for p in params}
    if not chosen:
        raise ValueError("params: expected at least one parameter to train")
    saved = {id(p): p.requires_grad for p in baim.parameters()}
    for p in baim.parameters():
        p.requires_grad_(id(p) in chosen)
    optimizer = torch.optim.Adam(list(params), lr=lr)
    losses = []
    try:
        for step in range(steps):
            x, task_ids = batches[step % len(batches)]
            optimizer.zero_grad(set_to_none=True)
            out = baim(x, task_ids, seed=seed + step)
            out.loss.backward()
            optimizer.step()
            losses.append(float(out.loss.detach()))
    finally:
        for p in baim.parameters():
            p.requires_grad_(saved[id(p)])
    return losses


def few_shot_adapt(
    baim: BAIM, task: str, images: torch.Tensor, steps: int = 50, lr: float = 0.01, seed: int = 0
) -> list[float]:
    """Train task's LSGate alone on its k samples `images` (k, C, R, R); returns the losses."""
    if task not in baim.config.tasks:
        raise ValueError(f"task: expected one of {list(baim.config.tasks)}, received {task!r}")
    task_ids = torch.full((images.shape[0],), baim.config.tasks.index(task), dtype=torch.long)
    params = list(baim.gate.squad_gate(task).parameters())
    return train_only(baim, params, [(images, task_ids.to(images.device))], steps, lr, seed)
