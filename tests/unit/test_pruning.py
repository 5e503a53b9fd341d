"""Connection pruning (count, least important, parameters freed) and model-level learner pruning."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from baim.config import LearnerSpec
from baim.model import BAIM
from baim.model_config import BAIMConfig, ConnectionSpec, LearnerEntry, SquadSpec
from baim.pruning import compact, prune_connections, prune_learners, selection_frequency
from tests.support.baim_random import RESOLUTION, BAIMRecipe, baim_recipes, images, randomise_connections

PROPERTY = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(recipe=baim_recipes(), ratio=st.floats(0.0, 1.0))
def test_pruning_removes_exactly_floor_ratio_of_the_least_important(recipe: BAIMRecipe, ratio: float):
    # Prepare
    baim = recipe.build()
    before = list(baim.connections.specs)
    scores = baim.connections.importance()
    params_before = sum(p.numel() for p in baim.parameters())
    sizes = {c: baim.connections.projection(c).conv.weight.numel() for c in before}

    # Execute
    removed = prune_connections(baim, ratio)

    # Assert: count, the least important ones, their parameters gone, the rest untouched and in order
    assert len(removed) == math.floor(ratio * len(before))
    survivors = [c for c in before if c not in set(removed)]
    assert baim.connections.specs == survivors
    assert list(baim.config.connections or ()) == survivors
    if removed and survivors:
        assert max(scores[c] for c in removed) <= min(scores[c] for c in survivors)
    assert set(baim.connections.projections.keys()) == {c.key for c in survivors}
    assert sum(p.numel() for p in baim.parameters()) == params_before - sum(sizes[c] for c in removed)


def test_pruning_ties_go_to_the_earliest_connection_and_bad_ratios_are_rejected():
    spec = LearnerSpec((4,), 2, RESOLUTION)
    config = BAIMConfig(
        learners=(LearnerEntry("a", "t", spec), LearnerEntry("b", "t", spec)),
        squads=(SquadSpec("t", ("a", "b")),),
        connection_height=0,
    )
    baim = BAIM(config)  # candidates a:0->b:0, a:1->b:1, all zero
    first, second = baim.connections.specs

    assert prune_connections(baim, 0.5) == [first]
    assert baim.connections.specs == [second]
    with pytest.raises(ValueError, match=r"ratio: expected a float in \[0, 1\]"):
        prune_connections(baim, 1.5)


def squad_with_idle_learner(feeds: bool) -> BAIM:
    """t0 = {a, d}, t1 = {b}, K = 1; d's gate row is pushed far down so it is never selected."""
    spec = LearnerSpec((4, 4), 2, RESOLUTION)
    connections = [ConnectionSpec("a", 2, "b", 3)]
    if feeds:
        connections.append(ConnectionSpec("d", 2, "b", 3))
    config = BAIMConfig(
        learners=(
            LearnerEntry("a", "t0", spec),
            LearnerEntry("b", "t1", spec),
            LearnerEntry("d", "t0", spec),
        ),
        squads=(SquadSpec("t0", ("a", "d")), SquadSpec("t1", ("b",))),
        top_k=1,
        connection_height=1,
        connections=tuple(connections),
    )
    torch.manual_seed(0)
    baim = BAIM(config)
    randomise_connections(baim, seed=4)
    with torch.no_grad():
        baim.gate.squad_gate("t0").proj.bias[1] = -100.0
    return baim


@pytest.mark.parametrize("feeds", [False, True])
def test_pruning_a_never_selected_learner_leaves_outputs_unchanged(feeds: bool):
    # Prepare: inference (eval mode, top K); in training the "sample" mixture also evaluates d
    baim = squad_with_idle_learner(feeds).eval()
    x = images(6, 1)
    task_ids = torch.tensor([0, 1, 0, 1, 0, 1])
    before = baim(x, task_ids, seed=2)
    generated = [baim.generate(task, 3, seed=5) for task in ("t0", "t1")]
    frequency = selection_frequency(baim, [(x, task_ids)], seed=2)
    params_before = sum(p.numel() for p in baim.parameters())

    # Execute
    result = prune_learners(baim, frequency, threshold=0.1)

    # Assert
    assert frequency == {"a": 1.0, "b": 1.0, "d": 0.0}
    assert result.removed == ["d"]
    after = baim(x, task_ids, seed=2)
    assert torch.equal(after.recon, before.recon)
    assert torch.equal(after.loss, before.loss)
    for task, images_before in zip(("t0", "t1"), generated, strict=True):
        assert torch.equal(baim.generate(task, 3, seed=5), images_before)
    assert baim.config.squad("t0").members == ("a",)
    assert sum(p.numel() for p in baim.parameters()) < params_before
    if feeds:  # kept as a feeder, cut after stage 2, still feeding b
        assert result.feeders == ["d"] and result.deleted == []
        assert baim.config.learner("d").depth == 2
        assert "d:2->b:3" in {c.key for c in baim.connections.specs}
    else:
        assert result.deleted == ["d"] and result.feeders == []
        assert "d" not in baim.learners


def test_prune_learners_keeps_the_most_selected_member_and_rejects_unknown_names():
    baim = squad_with_idle_learner(feeds=False)

    result = prune_learners(baim, {"a": 0.2, "d": 0.1, "b": 0.0}, threshold=0.9)

    assert result.removed == ["d"]
    assert baim.config.squad("t0").members == ("a",)
    assert baim.config.squad("t1").members == ("b",)
    with pytest.raises(ValueError, match="frequency: unknown learners"):
        prune_learners(baim, {"zz": 0.0}, threshold=0.5)


def test_compact_drops_feeder_stages_left_dead_by_connection_pruning():
    baim = squad_with_idle_learner(feeds=True)
    prune_learners(baim, {"a": 1.0, "d": 0.0, "b": 1.0}, threshold=0.5)
    baim.restructure(baim.config.with_changes(connections=(ConnectionSpec("a", 2, "b", 3),)))

    compact(baim)

    assert "d" not in baim.learners
    assert baim.config.learner_names == ("a", "b")
