"""The relay round: what an edge learned after its upload goes back into the BAIM (GaisNet's edge -> cloud).

An edge personalises its downloaded task model with LoRA adapters (baim.adapters) and relays the adapters. The
cloud has three ways to take that knowledge in (`RELAY_METHODS`):

- "average": every merged adapter delta of every relaying edge, averaged per parameter (`mean_deltas`), is
  added to the BAIM. An edge's adapter covers its whole task model, so this also moves the feeders other
  squads read and the other edges' learners.
- "fold_own": each edge's delta is added to the learner that edge uploaded (its own expert, keys
  `learners.<its learner>.`) and nowhere else (`own_learner_deltas`); shared feeders, connections, gates
  and other learners keep their weights.
- "distil": no weights are copied. The personalised models (base + merged adapter) are teachers, the BAIM is
  the student, trained on the cloud's common data with its own loss plus `distil_weight` times the mean
  squared difference between its reconstruction and the mean reconstruction of the task's teachers
  (`distil`). Rows of tasks without a teacher get the BAIM's own loss only. With `generated`, each teacher
  also draws images from its prior that the student learns to reconstruct (a data-free relay of what the
  edge's data looks like).

Measured (docs/results.md, "GaisNet relay"): fold_own is the only method whose gain over the same cloud work
without the edges' adapters was positive on every task; distillation on the cloud's own images adds nothing
that the BAIM's own loss on them does not, since the cloud has the images themselves.

Whatever the method, `guarded_update` applies it to a copy and keeps the copy only if no task's held-out loss
got worse: the cloud never publishes a BAIM that is worse on its held-out images than the one it had.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from baim.adapters import add_weight_deltas
from baim.continual import train_only
from baim.model import BAIM

RELAY_METHODS = ("fold_own", "distil", "average")
GATE_PREFIX = "gate."  # the BAIM's gate module (state_dict keys)
LEARNERS_PREFIX = "learners."  # the BAIM's learners (state_dict keys "learners.<name>.")

Batch = tuple[torch.Tensor, torch.Tensor]  # (images (B, C, R, R), task indices (B,))


def mean_deltas(deltas: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Per parameter, the mean delta over the edges that adapted it (FedAvg per parameter: a module two tasks'
    models share, such as a feeder a connection pins, averages over both tasks' edges instead of summing).

    Gate parameters are left out: the gates are retrained on the cloud's data after the fold.
    """
    keys = sorted({key for delta in deltas for key in delta if not key.startswith(GATE_PREFIX)})
    return {key: torch.stack([d[key] for d in deltas if key in d]).mean(0) for key in keys}


def own_learner_deltas(deltas: Mapping[str, torch.Tensor], learner: str) -> dict[str, torch.Tensor]:
    """The part of one edge's BAIM-keyed deltas that belongs to its own learner `learner`."""
    prefix = f"{LEARNERS_PREFIX}{learner}."
    return {key: delta for key, delta in deltas.items() if key.startswith(prefix)}


def fold_deltas(
    method: str, relayed: Sequence[tuple[str, Mapping[str, torch.Tensor]]]
) -> dict[str, torch.Tensor]:
    """What a weight-folding relay adds to the BAIM, from [(the edge's own learner, its BAIM-keyed deltas)].

    "average": `mean_deltas` of everything; "fold_own": each edge's own learner only (two uploads of the same
    learner average).
    """
    if method == "average":
        return mean_deltas([deltas for _, deltas in relayed])
    if method == "fold_own":
        return mean_deltas([own_learner_deltas(deltas, learner) for learner, deltas in relayed])
    raise ValueError(f"method: expected 'average' or 'fold_own' for a fold, received {method!r}")


@torch.no_grad()
def teacher_targets(
    teachers: Mapping[int, Sequence[nn.Module]], batches: Sequence[Batch], seed: int
) -> list[torch.Tensor | None]:
    """Per batch, the mean reconstruction of each row's task's teachers (eval mode, noise seeded by batch),
    NaN in rows whose task has no teacher; None for a batch with no such row at all.

    `teachers` maps a task index to its personalised task models (forward(x, seed=...) -> .recon).
    """
    targets: list[torch.Tensor | None] = []
    for index, (x, task_ids) in enumerate(batches):
        target = torch.full_like(x, float("nan"))
        for task, models in teachers.items():
            rows = task_ids == task
            if not models or not bool(rows.any()):
                continue
            recons = [model.eval()(x[rows], seed=seed + index).recon for model in models]
            target[rows] = torch.stack(recons).mean(0).to(x.dtype)
        targets.append(target if bool(torch.isfinite(target).any()) else None)
    return targets


@torch.no_grad()
def generated_batches(teachers: Mapping[int, Sequence[nn.Module]], settings: RelaySettings) -> list[Batch]:
    """`settings.generated` images per teacher per epoch, drawn from its prior (generate(n, seed)), in
    batches of (images, task index): the edges' data as their personalised models see it, without any of it
    leaving the edge (GaisNet's data-free relay). One list of batches per epoch, concatenated."""
    if settings.generated == 0:
        return []
    batches: list[Batch] = []
    for epoch in range(settings.epochs):
        images, tasks = [], []
        for task, models in teachers.items():
            for number, model in enumerate(models):
                seed = settings.seed + 1000 * epoch + number
                images.append(model.eval().generate(settings.generated, seed=seed))  # type: ignore[operator]
                tasks.append(torch.full((settings.generated,), task, dtype=torch.long))
        x, t = torch.cat(images), torch.cat(tasks)
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(settings.seed + epoch))
        size = settings.batch_size
        batches += [(x[order[i : i + size]], t[order[i : i + size]]) for i in range(0, len(x), size)]
    return batches


def with_generated(
    batches: list[Batch],
    targets: list[torch.Tensor | None],
    teachers: Mapping[int, Sequence[nn.Module]],
    settings: RelaySettings,
) -> tuple[list[Batch], list[torch.Tensor | None]]:
    """The cloud batches (with their teacher targets) and, after each epoch's, that epoch's generated batches
    (target None: the student learns to reconstruct them, its own loss only)."""
    generated = generated_batches(teachers, settings)
    if not generated:
        return batches, targets
    cloud_per_epoch, generated_per_epoch = len(batches) // settings.epochs, len(generated) // settings.epochs
    out_batches: list[Batch] = []
    out_targets: list[torch.Tensor | None] = []
    for epoch in range(settings.epochs):
        cloud = slice(epoch * cloud_per_epoch, (epoch + 1) * cloud_per_epoch)
        out_batches += (
            batches[cloud] + generated[epoch * generated_per_epoch : (epoch + 1) * generated_per_epoch]
        )
        out_targets += targets[cloud] + [None] * generated_per_epoch
    return out_batches, out_targets


def distillation_loss(recon: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
    """Mean squared difference to the teachers' reconstruction over rows that have one (0 if none)."""
    if target is None:
        return recon.new_zeros(())
    rows = torch.isfinite(target).flatten(1).all(1)
    if not bool(rows.any()):
        return recon.new_zeros(())
    return F.mse_loss(recon[rows], target[rows])


def distil(
    student: BAIM,
    params: Sequence[nn.Parameter],
    batches: Sequence[Batch],
    targets: Sequence[torch.Tensor | None],
    steps: int,
    lr: float,
    distil_weight: float,
    seed: int = 0,
) -> list[float]:
    """Adam on `params` of `student` for `steps` steps over `batches` (cycled) with loss = the BAIM's own
    loss + distil_weight * `distillation_loss` to `targets` (from `teacher_targets`). Every other parameter
    is frozen for the duration. Noise of step t is seeded with seed + t. Returns each step's distillation
    loss (before the step's update)."""
    if steps < 1 or not batches or len(targets) != len(batches):
        raise ValueError(
            f"steps, batches, targets: expected steps >= 1 and one target per batch, received {steps}, "
            f"{len(batches)} and {len(targets)}"
        )
    if not distil_weight >= 0:
        raise ValueError(f"distil_weight: expected >= 0, received {distil_weight!r}")
    chosen = {id(p) for p in params}
    if not chosen:
        raise ValueError("params: expected at least one parameter to train")
    saved = {id(p): p.requires_grad for p in student.parameters()}
    for p in student.parameters():
        p.requires_grad_(id(p) in chosen)
    optimizer = torch.optim.Adam(list(params), lr=lr)
    losses = []
    try:
        for step in range(steps):
            index = step % len(batches)
            x, task_ids = batches[index]
            optimizer.zero_grad(set_to_none=True)
            out = student(x, task_ids, seed=seed + step)
            distilled = distillation_loss(out.recon, targets[index])
            (out.loss + distil_weight * distilled).backward()
            optimizer.step()
            losses.append(float(distilled.detach()))
    finally:
        for p in student.parameters():
            p.requires_grad_(saved[id(p)])
    return losses


@torch.no_grad()
def mean_distillation_loss(
    student: BAIM, batches: Sequence[Batch], targets: Sequence[torch.Tensor | None], seed: int = 0
) -> float:
    """The student's distillation loss averaged over batches (eval mode, noise seeded by batch)."""
    was_training = student.training
    student.eval()
    try:
        values = [
            float(distillation_loss(student(x, t, seed=seed + i).recon, targets[i]))
            for i, (x, t) in enumerate(batches)
            if targets[i] is not None
        ]
    finally:
        student.train(was_training)
    if not values:
        raise ValueError("targets: expected at least one batch with a teacher")
    return sum(values) / len(values)


@dataclass(frozen=True)
class GuardedUpdate:
    """The BAIM the cloud keeps after a guarded update, and why."""

    baim: BAIM  # the candidate if accepted, else the BAIM it started from (the same object)
    accepted: bool
    loss_before: dict[str, float]  # per task: held-out loss of the BAIM before the update
    loss_after: dict[str, float]  # per task: held-out loss of the candidate (kept or not)


def guarded_update(
    baim: BAIM, update: Callable[[BAIM], None], held_out_loss: Callable[[BAIM], dict[str, float]]
) -> GuardedUpdate:
    """Apply `update` to a deep copy of `baim`; keep the copy only if no task's held-out loss rose.

    `held_out_loss` must be deterministic (seeded), so that the same BAIM gives the same numbers: then the
    BAIM returned never has a higher held-out loss than `baim` on any task. `baim` itself is not changed.
    """
    before = held_out_loss(baim)
    candidate = copy.deepcopy(baim)
    update(candidate)
    after = held_out_loss(candidate)
    if set(after) != set(before):
        raise ValueError(
            f"held_out_loss: expected the same tasks, received {sorted(before)} and {sorted(after)}"
        )
    accepted = all(after[task] <= before[task] for task in before)
    return GuardedUpdate(candidate if accepted else baim, accepted, before, after)


@dataclass(frozen=True)
class RelayedAdapter:
    """One validated relayed adapter, ready for a relay round."""

    learner: str  # the BAIM learner its edge uploaded (actors.edge.learner_name of the edge id)
    task: str
    deltas: dict[str, torch.Tensor]  # the adapter's merged weight changes, keyed like the BAIM's parameters
    teacher: nn.Module  # the personalised task model (base + merged adapter): forward(x, seed=...) -> .recon


@dataclass(frozen=True)
class RelaySettings:
    """How a relay round takes the adapters in (scenario: personalisation.relay_*)."""

    method: str = "fold_own"  # one of RELAY_METHODS
    gate_epochs: int = 2  # fold_own, average: epochs of gate training on the cloud's data after the fold
    epochs: int = 2  # distil: epochs over the cloud's data
    lr: float = 0.005  # Adam, for gate training and distillation
    distil_weight: float = 1.0  # distil: weight of the distillation term
    student: str = "relaying_learners"  # distil: "relaying_learners" (their learners + gates) or "baim"
    generated: int = 0  # distil: images each teacher draws from its prior per epoch, added as training data
    batch_size: int = 64  # distil: batch size of the generated images
    seed: int = 0  # noise of training and of the teachers' reconstructions

    def __post_init__(self) -> None:
        if self.method not in RELAY_METHODS:
            raise ValueError(f"method: expected one of {list(RELAY_METHODS)}, received {self.method!r}")
        if self.student not in ("relaying_learners", "baim"):
            raise ValueError(f"student: expected 'relaying_learners' or 'baim', received {self.student!r}")


@dataclass
class RelayStats:
    """What a relay round measured on its own training data (distil only)."""

    distillation_before: float | None = None
    distillation_after: float | None = None


def relay_round(
    baim: BAIM,
    adapters: Sequence[RelayedAdapter],
    settings: RelaySettings,
    cloud_batches: Callable[[int], list[Batch]],
) -> RelayStats:
    """Take `adapters` into `baim` in place with `settings.method`; `cloud_batches(epochs)` gives that many
    shuffled passes over the cloud's data as (images, task indices into baim.config.tasks) batches.

    Training runs in train mode (the cloud's own training mode); the BAIM is left in eval mode.
    """
    stats = RelayStats()
    if not adapters:
        return stats
    if settings.method == "distil":
        tasks = list(baim.config.tasks)
        teachers: dict[int, list[nn.Module]] = {}
        for adapter in adapters:
            teachers.setdefault(tasks.index(adapter.task), []).append(adapter.teacher)
        batches = cloud_batches(settings.epochs)
        targets = teacher_targets(teachers, batches, settings.seed)
        train_batches, train_targets = with_generated(batches, targets, teachers, settings)
        if settings.student == "baim":
            params = list(baim.parameters())
        else:
            # An edge whose learner is not in the BAIM (kept in the registry only, or pruned) teaches the
            # gates and its squad through the distillation term; no learner of its own trains.
            learners = sorted({a.learner for a in adapters if a.learner in baim.learners})
            params = [p for name in learners for p in baim.learner(name).parameters()]
            params += baim.gate_parameters()
        stats.distillation_before = mean_distillation_loss(baim, batches, targets, settings.seed)
        baim.train()
        steps = len(train_batches)
        distil(
            baim,
            params,
            train_batches,
            train_targets,
            steps,
            settings.lr,
            settings.distil_weight,
            settings.seed,
        )
        stats.distillation_after = mean_distillation_loss(baim, batches, targets, settings.seed)
    else:
        deltas = fold_deltas(settings.method, [(adapter.learner, adapter.deltas) for adapter in adapters])
        add_weight_deltas(baim, deltas)
        if settings.gate_epochs:
            batches = cloud_batches(settings.gate_epochs)
            baim.train()
            train_only(baim, baim.gate_parameters(), batches, len(batches), settings.lr, settings.seed)
    baim.eval()
    return stats
