"""Compact task models: data-driven connection scores, parameter charges and per-task budgets.

A task model keeps its squad plus everything that feeds it through surviving connections
(`baim.model.compact_config`); a connection from another task's learner pins that learner's stages up to the
one it reads, and a decoder-stage source pins the whole encoder and bottleneck too (reconstruction runs the
feeder's encoder on the input). So compactness is decided by which cross-task connections survive. Here:

- Score (`connection_contributions`): what a connection contributes on data, the RMS of its projected signal
  relative to the RMS of its destination's input, measured in eval mode (inference routing, top K) on given
  batches with seeded noise (`baim.connections.ConnectionEnergy`). A connection into a stage that never ran
  scores 0.
- Charge: removing connections G saves, in task t's model, params(t) - params(t without G): their own
  projection weights plus every feeder stage (and bottleneck, and transitive feeder) only they pin. Counted
  exactly from the config (`task_model_params`), no module is built.
- Budget (`PruningSchedule.budget`): the largest task model allowed, as a multiple of the parameters of the
  task's own squad (its members' learners). `prune_to_targets` removes, greedily, the candidate with the
  lowest score per parameter saved in the tasks still over target (savings capped at each task's excess,
  the usual greedy for covering problems) until every task is within target. Candidates are single
  connections and, per feeder of an over-target task, each cut level (every connection from that feeder at
  or past a source stage): removing one of two connections that pin the same feeder saves nothing, removing
  both saves the feeder, and only the group shows that. Candidates whose score is exactly 0 go all at once.
- Schedule (`prune_on_schedule`, one call per epoch): prune after every `interval`-th epoch up to
  `total_epochs - recovery_epochs`, then train without pruning (recovery). Without a budget each pruning
  removes floor(ratio * surviving) connections, the lowest scores (the paper's schedule). With a budget the
  targets shrink on `PruningSchedule.shape`: "geometric", each task's size / limit by the same factor per
  remaining pruning, or "cubic" (Zhu & Gupta 2017), the excess over the limit falling as (1 - progress)^3,
  most of it in the first prunings; either way the last pruning reaches the limit.

Everything is pure torch and deterministic: the same BAIM, batches and seed give the same removals, so every
DDP rank that calls it with the same score batches removes the same connections. Decomposition stays exact:
only connections are removed, and `decompose` keeps whatever survives. Rationale: docs/model.md.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import torch

from baim.config import LearnerSpec
from baim.connections import ConnectionEnergy
from baim.gates import GATE_POOL
from baim.learners import VAELearner
from baim.model import BAIM, compact_config
from baim.model_config import BAIMConfig, ConnectionSpec
from baim.pruning import prune_connections, remove_connections

logger = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor]  # (images (B, C, R, R), task ids (B,))


# ---- scores ---------------------------------------------------------------------------------------------


@torch.no_grad()
def connection_contributions(
    baim: BAIM, batches: Iterable[Batch], seed: int = 0
) -> dict[ConnectionSpec, float]:
    """Each surviving connection's RMS(projected) / RMS(destination input) on `batches` (module docstring).

    Runs in eval mode (restored afterwards) with noise_for noise seeded by seed + batch index.
    """
    energy = ConnectionEnergy()
    device = next(baim.parameters()).device
    was_training = baim.training
    baim.eval()
    try:
        for index, (images, task_ids) in enumerate(batches):
            baim(images.to(device), task_ids.to(device), seed=seed + index, probe=energy)
    finally:
        baim.train(was_training)
    return energy.contributions(baim.connections.specs)


# ---- parameter counts from a config ---------------------------------------------------------------------


@dataclass(frozen=True)
class LearnerParams:
    """Parameter counts of one learner architecture's parts."""

    encoder_stages: tuple[int, ...]
    posterior: int  # fc_mu + fc_logvar
    decoder_input: int
    decoder_stages: tuple[int, ...]

    @property
    def total(self) -> int:
        return sum(self.encoder_stages) + self.posterior + self.decoder_input + sum(self.decoder_stages)

    def kept(self, last_stage: int, generation_only: bool) -> int:
        """Parameters of the learner cut after `last_stage` (as `baim.model.truncate_learner` cuts it)."""
        S = len(self.encoder_stages)
        if last_stage < S:
            return 0 if generation_only else sum(self.encoder_stages[: last_stage + 1])
        encoder = 0 if generation_only else sum(self.encoder_stages) + self.posterior
        return encoder + self.decoder_input + sum(self.decoder_stages[: last_stage - S + 1])


@functools.lru_cache(maxsize=256)
def learner_params(spec: LearnerSpec) -> LearnerParams:
    """Per-part parameter counts of a VAELearner of `spec` (built on the meta device: no memory, no RNG)."""
    with torch.device("meta"):
        learner = VAELearner(spec)

    def count(module: torch.nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    return LearnerParams(
        encoder_stages=tuple(count(stage) for stage in learner.encoder_stages),
        posterior=count(learner.fc_mu) + count(learner.fc_logvar),
        decoder_input=count(learner.decoder_input),
        decoder_stages=tuple(count(stage) for stage in learner.decoder_stages),
    )


def connection_params(config: BAIMConfig, conn: ConnectionSpec) -> int:
    """Weights of a connection's 1x1 projection: source output channels x destination input channels."""
    return _connection_params(
        config.learner(conn.src).spec, conn.src_stage, config.learner(conn.dst).spec, conn.dst_stage
    )


@functools.lru_cache(maxsize=65536)
def _connection_params(src: LearnerSpec, src_stage: int, dst: LearnerSpec, dst_stage: int) -> int:
    return _stage_channels(src, src_stage, output=True) * _stage_channels(dst, dst_stage, output=False)


def _stage_channels(spec: LearnerSpec, stage: int, output: bool) -> int:
    """Channels of stage `stage`'s output (or input), from the geometry in `baim.learners`."""
    S = len(spec.widths)
    if not output:
        if stage < S:
            return spec.in_channels if stage == 0 else spec.widths[stage - 1]
        return spec.widths[S - 1 - (stage - S)]
    if stage < S:
        return spec.widths[stage]
    t = stage - S
    return spec.in_channels if t == S - 1 else spec.widths[S - 2 - t]


def gate_params(config: BAIMConfig) -> int:
    """The HierGate's parameters: the gate encoder (absent in a generation-only model) and every LSGate."""
    first = config.learners[0].spec
    pool = min(GATE_POOL, first.resolution)
    code = config.gate_code_dim
    encoder = 0 if config.generation_only else (first.in_channels * pool * pool + 1) * 2 * code
    return encoder + sum((code + 1) * len(squad.members) for squad in config.squads)


def config_params(config: BAIMConfig) -> int:
    """Parameters of `BAIM(config)` (== baim.costs.count_params of it), from the config alone."""
    learners = sum(
        learner_params(entry.spec).kept(entry.last_stage, config.generation_only) for entry in config.learners
    )
    connections = sum(connection_params(config, conn) for conn in config.connections or ())
    return learners + connections + gate_params(config)


def squad_params(config: BAIMConfig, task: str) -> int:
    """Parameters of `task`'s own squad: its members' (full) learners."""
    return sum(learner_params(config.learner(member).spec).total for member in config.squad(task).members)


def task_model_params(config: BAIMConfig, task: str) -> int:
    """Parameters of `decompose(BAIM(config), task)`."""
    return config_params(compact_config(config, [config.squad(task)]))


def budget_limits(config: BAIMConfig, budget: float) -> dict[str, int]:
    """Per task: the largest task model `budget` allows, floor(budget * squad parameters)."""
    _check_budget(budget)
    return {task: math.floor(budget * squad_params(config, task)) for task in config.tasks}


def _check_budget(budget: object) -> None:
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget > 1.0:
        raise ValueError(
            f"budget: expected a float > 1 (a task model holds its squad plus the gate), received {budget!r}"
        )


# ---- pruning to targets ---------------------------------------------------------------------------------


class _TaskSizer:
    """Task model parameter counts of `config` with a subset of its connections, without building configs."""

    def __init__(self, config: BAIMConfig) -> None:
        self.config = config
        self.index = {entry.name: n for n, entry in enumerate(config.learners)}
        self.entries = {entry.name: entry for entry in config.learners}
        self.conv = {conn: connection_params(config, conn) for conn in config.connections or ()}
        first = config.learners[0].spec
        pool = min(GATE_POOL, first.resolution)
        self.gate_encoder = (first.in_channels * pool * pool + 1) * 2 * config.gate_code_dim

    def order(self, connections: Iterable[ConnectionSpec]) -> list[ConnectionSpec]:
        """Connections in the descending (dst_stage, dst arrival index) order `required_depths` walks."""
        return sorted(connections, key=lambda c: (c.dst_stage, self.index[c.dst]), reverse=True)

    def depths(
        self, task: str, ordered: Sequence[ConnectionSpec], without: frozenset[ConnectionSpec]
    ) -> dict[str, int]:
        depth = {name: -1 for name in self.index}
        for member in self.config.squad(task).members:
            depth[member] = self.entries[member].last_stage
        for conn in ordered:
            if conn not in without and depth[conn.dst] >= conn.dst_stage:
                depth[conn.src] = max(depth[conn.src], conn.src_stage)
        return depth

    def size(
        self,
        task: str,
        depth: dict[str, int],
        ordered: Sequence[ConnectionSpec],
        without: frozenset[ConnectionSpec],
    ) -> int:
        learners = sum(
            learner_params(self.entries[name].spec).kept(d, False) for name, d in depth.items() if d >= 0
        )
        connections = sum(self.conv[c] for c in ordered if c not in without and depth[c.dst] >= c.dst_stage)
        lsgate = (self.config.gate_code_dim + 1) * len(self.config.squad(task).members)
        return learners + connections + self.gate_encoder + lsgate


def prune_to_targets(
    baim: BAIM, scores: dict[ConnectionSpec, float], targets: dict[str, int]
) -> list[ConnectionSpec]:
    """Remove connections until every task model of `targets` has at most its target parameters (in place).

    Greedy by score per capped parameter saved (module docstring). Returns the removed connections in
    removal order. A target below what a task model needs without any connection is not reachable: then
    every removable connection of that task goes and a warning is logged.
    """
    unknown = sorted(set(targets) - set(baim.config.tasks))
    if unknown:
        raise ValueError(f"targets: unknown tasks {unknown}; tasks are {list(baim.config.tasks)}")
    missing = [c.key for c in baim.connections.specs if c not in scores]
    if missing:
        raise ValueError(f"scores: expected a score for every connection, missing {missing[:5]}")
    config = baim.config
    sizer = _TaskSizer(config)
    position = {conn: n for n, conn in enumerate(config.connections or ())}
    ordered = sizer.order(config.connections or ())
    removed: list[ConnectionSpec] = []
    gone: frozenset[ConnectionSpec] = frozenset()
    while True:
        depth = {task: sizer.depths(task, ordered, gone) for task in targets}
        size = {task: sizer.size(task, depth[task], ordered, gone) for task in targets}
        excess = {task: size[task] - targets[task] for task in targets if size[task] > targets[task]}
        if not excess:
            break
        holders = {task: _holders(config, task, depth[task], ordered, gone) for task in excess}
        best: tuple[float, int, int, tuple[ConnectionSpec, ...]] | None = None
        zero_value: set[ConnectionSpec] = set()
        for group in _candidates(config, ordered, gone, depth, excess):
            saved = 0
            for task, over in excess.items():
                single = group[0]
                if len(group) == 1 and holders[task].get(single) != 1:
                    # moves no depth: only its own projection leaves this task model (if it was in it)
                    reduction = sizer.conv[single] if depth[task][single.dst] >= single.dst_stage else 0
                else:
                    without = gone | frozenset(group)
                    after = sizer.size(task, sizer.depths(task, ordered, without), ordered, without)
                    reduction = size[task] - after
                saved += min(reduction, over)
            if saved <= 0:
                continue
            value = sum(scores[c] for c in group)
            if value == 0.0:
                zero_value.update(group)
            key = (value / saved, -saved, min(position[c] for c in group), group)
            if best is None or key[:3] < best[:3]:
                best = key
        if best is None:
            logger.warning(
                "pruning to targets: tasks %s stay above their targets (excess %s), nothing left to remove",
                sorted(excess),
                excess,
            )
            break
        doomed = sorted(zero_value, key=position.__getitem__) if zero_value else list(best[3])
        removed += doomed
        gone = gone | frozenset(doomed)
    remove_connections(baim, removed)
    logger.info("pruned %d connections to reach task model targets %s", len(removed), targets)
    return removed


def _holders(
    config: BAIMConfig,
    task: str,
    depth: dict[str, int],
    ordered: Sequence[ConnectionSpec],
    gone: frozenset[ConnectionSpec],
) -> dict[ConnectionSpec, int]:
    """For each connection in the task model that reads a feeder (a non-member) at its current depth: how
    many such connections hold that feeder there. Removing a connection counted 1 cuts the feeder."""
    members = set(config.squad(task).members)
    holding = [
        c
        for c in ordered
        if c not in gone
        and c.src not in members
        and depth[c.dst] >= c.dst_stage
        and depth[c.src] == c.src_stage
    ]
    counts: dict[str, int] = {}
    for c in holding:
        counts[c.src] = counts.get(c.src, 0) + 1
    return {c: counts[c.src] for c in holding}


def _candidates(
    config: BAIMConfig,
    ordered: Sequence[ConnectionSpec],
    gone: frozenset[ConnectionSpec],
    depth: dict[str, dict[str, int]],
    excess: dict[str, int],
) -> list[tuple[ConnectionSpec, ...]]:
    """Single connections and feeder cut levels of the over-target tasks' models, deduplicated, in order."""
    seen: dict[tuple[ConnectionSpec, ...], None] = {}
    for task in excess:
        members = set(config.squad(task).members)
        in_model = [c for c in reversed(ordered) if c not in gone and depth[task][c.dst] >= c.dst_stage]
        for conn in in_model:
            seen.setdefault((conn,), None)
        feeders = sorted({c.src for c in in_model if c.src not in members}, key=config.learner_names.index)
        for feeder in feeders:
            out = [c for c in in_model if c.src == feeder]
            for level in sorted({c.src_stage for c in out}):
                seen.setdefault(tuple(c for c in out if c.src_stage >= level), None)
    return list(seen)


# ---- the schedule ---------------------------------------------------------------------------------------

# How a budget's targets shrink from one pruning to the next (`step_targets`).
PruningShape = Literal["geometric", "cubic"]
PRUNING_SHAPES: tuple[str, ...] = get_args(PruningShape)


@dataclass(frozen=True)
class PruningSchedule:
    """When and how much to prune during cloud training (module docstring)."""

    interval: int  # prune after every `interval`-th epoch (cloud.prune_interval)
    ratio: (
        float  # without a budget: fraction of surviving connections removed per pruning (cloud.prune_ratio)
    )
    budget: float | None = None  # largest task model / its squad's parameters (cloud.task_model_budget)
    recovery_epochs: int = 0  # final epochs without pruning (cloud.recovery_epochs)
    shape: PruningShape = "geometric"  # how a budget's targets shrink per pruning (cloud.prune_shape)

    def __post_init__(self) -> None:
        if isinstance(self.interval, bool) or not isinstance(self.interval, int) or self.interval < 1:
            raise ValueError(f"interval: expected an int >= 1, received {self.interval!r}")
        if (
            isinstance(self.ratio, bool)
            or not isinstance(self.ratio, (int, float))
            or not 0 <= self.ratio < 1
        ):
            raise ValueError(f"ratio: expected a float in [0, 1), received {self.ratio!r}")
        if self.budget is not None:
            _check_budget(self.budget)
        if (
            isinstance(self.recovery_epochs, bool)
            or not isinstance(self.recovery_epochs, int)
            or self.recovery_epochs < 0
        ):
            raise ValueError(f"recovery_epochs: expected an int >= 0, received {self.recovery_epochs!r}")
        if self.shape not in PRUNING_SHAPES:
            raise ValueError(f"shape: expected one of {list(PRUNING_SHAPES)}, received {self.shape!r}")

    def pruning_epochs(self, total_epochs: int) -> list[int]:
        """The 1-based epochs after whose training pruning runs.

        Raises ValueError when a budget is set and no epoch prunes (it could never be reached).
        """
        epochs = list(range(self.interval, total_epochs - self.recovery_epochs + 1, self.interval))
        if self.budget is not None and not epochs:
            raise ValueError(
                f"budget: needs at least one pruning epoch, but prune_interval {self.interval} > epochs "
                f"{total_epochs} - recovery_epochs {self.recovery_epochs}"
            )
        return epochs


def step_targets(
    sizes: dict[str, int], limits: dict[str, int], prunings_left: int, shape: PruningShape = "geometric"
) -> dict[str, int]:
    """Per task, the size to reach at this pruning, one of `prunings_left` (this one included); the last one
    reaches the limit, and a target is never above `sizes`.

    "geometric": size / limit shrinks by the same factor at each pruning, target = limit * (size /
    limit)^((r - 1) / r). "cubic" (Zhu & Gupta 2017, "To prune, or not to prune"): the excess over the limit
    follows E0 * (1 - j / n)^3 over the n prunings, which from the current excess is target = limit +
    (size - limit) * ((r - 1) / r)^3: most is removed early, while the network is most redundant, leaving
    the later epochs to recover. Both depend only on the current sizes and r, so a run resumed from a
    checkpoint continues the same schedule.
    """
    if prunings_left < 1:
        raise ValueError(f"prunings_left: expected >= 1, received {prunings_left}")
    if shape not in PRUNING_SHAPES:
        raise ValueError(f"shape: expected one of {list(PRUNING_SHAPES)}, received {shape!r}")
    remaining = (prunings_left - 1) / prunings_left
    targets = {}
    for task, size in sizes.items():
        limit = limits[task]
        if size <= limit:
            targets[task] = size
        elif shape == "cubic":
            targets[task] = limit + math.floor((size - limit) * remaining**3)
        else:
            targets[task] = max(limit, math.floor(limit * (size / limit) ** remaining))
    return targets


def prune_on_schedule(
    baim: BAIM,
    epoch: int,
    total_epochs: int,
    schedule: PruningSchedule,
    score_batches: Sequence[Batch],
    seed: int = 0,
) -> list[ConnectionSpec]:
    """The one call a training loop makes after the training of each 1-based `epoch` (module docstring).

    Returns the removed connections (empty when this epoch does not prune). When it is not empty the model's
    parameters changed: rebuild the optimiser (`baim.training.make_optimizer(..., previous=...)`) and any DDP
    wrapper. `score_batches` must be the same on every rank (e.g. fixed batches of the cloud's data).
    """
    epochs = schedule.pruning_epochs(total_epochs)
    if epoch not in epochs or not baim.connections.specs:
        return []
    if schedule.budget is None and schedule.ratio == 0:
        return []
    if not score_batches:
        raise ValueError(
            "score_batches: expected at least one (images, task_ids) batch to score connections on"
        )
    if schedule.budget is None:
        return prune_connections(baim, schedule.ratio, connection_contributions(baim, score_batches, seed))
    limits = budget_limits(baim.config, schedule.budget)
    sizes = {task: task_model_params(baim.config, task) for task in baim.config.tasks}
    if all(sizes[task] <= limits[task] for task in sizes):
        return []  # within the budget already: nothing to score
    prunings_left = sum(1 for e in epochs if e >= epoch)
    scores = connection_contributions(baim, score_batches, seed)
    return prune_to_targets(baim, scores, step_targets(sizes, limits, prunings_left, schedule.shape))
