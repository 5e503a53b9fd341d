"""Connection pruning and model-level (learner) pruning, both in place.

Connection pruning (the paper's iterative filter, every `prune_interval` epochs): `prune_connections(baim,
ratio, scores)` removes floor(ratio * surviving) connections, the least important by `scores` (data-driven
contributions from `baim.compaction.connection_contributions`; when None, the legacy data-free
`ConnectionGraph.importance`, the Frobenius norm of the projection weight; ties go to the earliest connection
in graph order), and deletes their parameters. Floor, so a ratio never removes more than asked and a tiny
graph is left alone rather than rounded up to a removal. Parameters change: rebuild the optimiser afterwards.
`baim.compaction` adds the data-driven scores, per-task parameter budgets and the schedule.

Model-level pruning (the paper's "trimming sub-models"): `selection_frequency` measures, on given data, how
often each squad member is in the LSGate's top K among the samples routed to a squad containing it (the gate
alone runs, no learner). `prune_learners(baim, frequency, threshold)` takes members whose frequency is below
the threshold out of their squads (a squad keeps at least its most selected member), then compacts the BAIM:
a removed learner that no surviving connection reads is deleted; one that still feeds other learners is kept
as a feeder, cut after the deepest stage it feeds (the paper merges such modules into their consumers; keeping
the cut feeder is the exact form of that: the consumers see the same features). Removing a learner that was
never selected and feeds nothing leaves every output unchanged.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import NamedTuple

import torch

from baim.model import BAIM, compact_config
from baim.model_config import ConnectionSpec, SquadSpec

logger = logging.getLogger(__name__)


def prune_connections(
    baim: BAIM, ratio: float, scores: dict[ConnectionSpec, float] | None = None
) -> list[ConnectionSpec]:
    """Remove floor(ratio * surviving) least important connections (by `scores`, default the weight norm);
    returns them, least important first."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio: expected a float in [0, 1], received {ratio!r}")
    surviving = baim.connections.specs
    count = math.floor(ratio * len(surviving))
    doomed = baim.connections.least_important(count, scores)
    remove_connections(baim, doomed)
    logger.info("pruned %d of %d connections (ratio %.3f)", count, len(surviving), ratio)
    return doomed


def remove_connections(baim: BAIM, doomed: Iterable[ConnectionSpec]) -> None:
    """Delete the connections `doomed` (and their parameters) from `baim`, in place."""
    doomed_set = set(doomed)
    kept = tuple(c for c in baim.config.connections or () if c not in doomed_set)
    baim.restructure(baim.config.with_changes(connections=kept))


def compact(baim: BAIM) -> None:
    """Drop what no squad can reach any more (feeder stages and connections left dead by pruning)."""
    baim.restructure(compact_config(baim.config, baim.config.squads))


@torch.no_grad()
def selection_frequency(
    baim: BAIM, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], seed: int | None = 0
) -> dict[str, float]:
    """Per squad member: (#samples selecting it) / (#samples routed to a squad that contains it).

    `batches` yields (images, task_ids). Learners no sample was routed to are left out (nothing to judge).
    The gate code is drawn with `seed` (noise_for), or fresh noise when None.
    """
    names = baim.config.learner_names
    selected_count = torch.zeros(len(names), dtype=torch.long)
    routed_count = torch.zeros(len(names), dtype=torch.long)
    columns = [baim.squad_columns(task) for task in baim.config.tasks]
    for x, task_ids in batches:
        gate = baim.route(x, task_ids, seed=seed, min_k=1)  # the inference selection (top K)
        selected_count += gate.selected.sum(dim=0).cpu()
        tasks = task_ids.cpu()
        for task_id, cols in enumerate(columns):
            routed_count[cols] += int((tasks == task_id).sum())
    return {
        name: float(selected_count[n]) / float(routed_count[n])
        for n, name in enumerate(names)
        if routed_count[n] > 0
    }


class PrunedLearners(NamedTuple):
    removed: list[str]  # taken out of every squad
    deleted: list[str]  # gone from the BAIM (fed nothing)
    feeders: list[str]  # kept, cut after the deepest stage they feed


def prune_learners(baim: BAIM, frequency: dict[str, float], threshold: float) -> PrunedLearners:
    """Take members selected less often than `threshold` out of their squads, then compact (in place).

    `frequency` maps learner names to selection frequencies (`selection_frequency`); members missing from it
    are kept. Every squad keeps at least its most selected member (ties: the earliest in the squad).
    """
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold: expected a float in [0, 1], received {threshold!r}")
    unknown = sorted(set(frequency) - set(baim.config.learner_names))
    if unknown:
        raise ValueError(
            f"frequency: unknown learners {unknown}; learners are {list(baim.config.learner_names)}"
        )
    squads = []
    removed: set[str] = set()
    for squad in baim.config.squads:
        keep = [m for m in squad.members if frequency.get(m, math.inf) >= threshold]
        if not keep:
            best = max(squad.members, key=lambda m: (frequency[m], -squad.members.index(m)))
            keep = [best]
        removed.update(m for m in squad.members if m not in keep)
        squads.append(SquadSpec(squad.task, tuple(keep)))
    still_member = {m for squad in squads for m in squad.members}
    removed -= still_member
    before = set(baim.config.learner_names)
    config = compact_config(baim.config.with_changes(squads=tuple(squads)), squads)
    baim.restructure(config)
    after = set(config.learner_names)
    order = list(baim.config.learner_names)
    result = PrunedLearners(
        removed=sorted(removed),
        deleted=sorted(before - after),
        feeders=[m for m in order if m in removed],
    )
    logger.info("model-level pruning: removed %s; deleted %s; kept as feeders %s", *result)
    return result
