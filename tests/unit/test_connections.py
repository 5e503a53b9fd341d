"""Projection connections: the module, the connection rule, the DAG property, importance ranking."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings

from baim.config import LearnerSpec
from baim.connections import LinearProjection
from baim.model_config import (
    BAIMConfig,
    ConnectionSpec,
    LearnerEntry,
    SquadSpec,
    candidate_connections,
    is_encoder_stage,
)
from tests.support.baim_random import BAIMRecipe, baim_recipes

PROPERTY = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def test_projection_starts_at_zero_and_has_the_target_shape():
    for src, dst in [((4, 8, 8), (6, 2, 2)), ((4, 2, 2), (3, 16, 16)), ((5, 4, 4), (2, 4, 4))]:
        projection = LinearProjection(src, dst)
        out = projection(torch.randn(3, *src))
        assert out.shape == (3, *dst)
        assert torch.count_nonzero(out) == 0


def test_projection_pools_down_and_repeats_up_after_a_1x1_conv():
    # Prepare: one input channel to one output channel with weight 2
    down = LinearProjection((1, 4, 4), (1, 2, 2))
    up = LinearProjection((1, 2, 2), (1, 4, 4))
    with torch.no_grad():
        down.conv.weight.fill_(2.0)
        up.conv.weight.fill_(2.0)
    h = torch.arange(16.0).view(1, 1, 4, 4)

    # Execute / Assert: 2 * the 2x2 block means; 2 * each value repeated over a 2x2 block
    assert down(h).flatten().tolist() == [2 * 2.5, 2 * 4.5, 2 * 10.5, 2 * 12.5]
    small = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    assert up(small)[0, 0].tolist() == [[2, 2, 4, 4], [2, 2, 4, 4], [6, 6, 8, 8], [6, 6, 8, 8]]


def two_learner_config(connections):
    spec = LearnerSpec((4, 4), 2, 16)
    return BAIMConfig(
        learners=(LearnerEntry("a", "t", spec), LearnerEntry("b", "t", spec)),
        squads=(SquadSpec("t", ("a", "b")),),
        connection_height=1,
        connections=tuple(connections),
    )


@pytest.mark.parametrize(
    ("conn", "problem"),
    [
        (ConnectionSpec("b", 1, "a", 1), "lower to a higher arrival index"),
        (ConnectionSpec("a", 0, "b", 2), "connection_height"),
        (ConnectionSpec("a", 2, "b", 1), "connection_height"),
        (ConnectionSpec("a", 1, "b", 2), "bottleneck"),
        (ConnectionSpec("a", 1, "a", 2), "same learner"),
        (ConnectionSpec("a", 3, "c", 3), "unknown dst"),
    ],
)
def test_config_rejects_connections_that_break_the_rule(conn, problem):
    with pytest.raises(ValueError, match=problem):
        two_learner_config([conn])


def test_candidates_of_two_equal_learners_are_listed_exactly():
    config = two_learner_config([])

    candidates = {c.key for c in candidate_connections(config)}

    # stages 0,1 encode and 2,3 decode; h = 1; same stage only a -> b
    assert candidates == {
        "a:0->b:0", "a:0->b:1", "a:1->b:1", "a:2->b:2", "a:2->b:3", "a:3->b:3",
        "b:0->a:1", "b:2->a:3",
    }  # fmt: skip


def is_acyclic(nodes: set[tuple[str, int]], edges: list[tuple[tuple[str, int], tuple[str, int]]]) -> bool:
    """Kahn's algorithm."""
    indegree = {node: 0 for node in nodes}
    out: dict[tuple[str, int], list[tuple[str, int]]] = {node: [] for node in nodes}
    for src, dst in edges:
        indegree[dst] += 1
        out[src].append(dst)
    ready = [node for node, d in indegree.items() if d == 0]
    visited = 0
    while ready:
        node = ready.pop()
        visited += 1
        for nxt in out[node]:
            indegree[nxt] -= 1
            if indegree[nxt] == 0:
                ready.append(nxt)
    return visited == len(nodes)


@PROPERTY
@given(recipe=baim_recipes())
def test_connection_graph_is_a_dag_and_every_connection_respects_the_height(recipe: BAIMRecipe):
    baim = recipe.build()
    config = baim.config
    entries = {entry.name: entry for entry in config.learners}

    nodes = {(e.name, k) for e in config.learners for k in range(e.last_stage + 1)}
    edges = [((e.name, k), (e.name, k + 1)) for e in config.learners for k in range(e.last_stage)]
    for conn in baim.connections.specs:
        assert conn.src != conn.dst
        assert 0 <= conn.dst_stage - conn.src_stage <= config.connection_height
        src, dst = entries[conn.src], entries[conn.dst]
        assert is_encoder_stage(src.spec, conn.src_stage) == is_encoder_stage(dst.spec, conn.dst_stage)
        edges.append(((conn.src, conn.src_stage), (conn.dst, conn.dst_stage)))
    assert is_acyclic(nodes, edges)
    assert [c.key for c in baim.connections.specs] == [c.key for c in config.connections or ()]
    assert set(baim.connections.projections.keys()) == {c.key for c in baim.connections.specs}


def test_least_important_ranks_by_weight_norm_and_breaks_ties_by_order():
    from baim.model import BAIM

    config = two_learner_config([ConnectionSpec("a", 0, "b", 0), ConnectionSpec("a", 1, "b", 1)])
    config = config.with_changes(connections=tuple(candidate_connections(config)))
    baim = BAIM(config)
    specs = baim.connections.specs
    norms = [3.0, 0.0, 1.0, 0.0, 2.0, 5.0, 0.5, 4.0]
    with torch.no_grad():
        for spec, norm in zip(specs, norms, strict=True):
            weight = baim.connections.projection(spec).conv.weight
            weight.zero_()
            weight.view(-1)[0] = norm

    ranked = baim.connections.least_important(len(specs))

    expected_positions = [1, 3, 6, 2, 4, 0, 7, 5]  # norms ascending, the two zeros in graph order
    assert ranked == [specs[pos] for pos in expected_positions]


def test_connections_are_built_with_the_device_and_dtype_they_are_given():
    from baim.connections import ConnectionGraph

    shapes: dict[str, tuple[list[tuple[int, int, int]], list[tuple[int, int, int]]]] = {
        "a": ([(3, 8, 8)], [(4, 4, 4)]),
        "b": ([(3, 8, 8)], [(4, 4, 4)]),
    }
    # An empty graph has no parameters to take a dtype from: it uses what it is given ...
    graph = ConnectionGraph([], shapes)
    graph.add([ConnectionSpec("a", 0, "b", 0)], shapes, device=torch.device("cpu"), dtype=torch.float64)
    assert graph.projection(ConnectionSpec("a", 0, "b", 0)).conv.weight.dtype == torch.float64
    # ... and, when not given, that of the connections it already holds.
    graph.add([ConnectionSpec("b", 0, "a", 0)], shapes)
    assert {p.dtype for p in graph.parameters()} == {torch.float64}
