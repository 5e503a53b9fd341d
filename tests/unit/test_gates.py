"""HierGate: LSGate top-K and softmax weights, the N-vector sections, TSGate routing, pending learners."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings

from baim.config import LearnerSpec
from baim.gates import GATE_NOISE_KEY, PENDING_OFFSET, LSGate, TSGate
from baim.learners import noise_for
from tests.support.baim_random import RESOLUTION, BAIMRecipe, baim_recipes, images

PROPERTY = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def make_gate(num_members: int, top_k: int, seed: int = 0) -> LSGate:
    return LSGate(
        code_dim=3, num_members=num_members, top_k=top_k, generator=torch.Generator().manual_seed(seed)
    )


def test_lsgate_weights_are_the_softmax_of_the_top_k_logits():
    # Prepare
    gate = make_gate(num_members=4, top_k=2)
    with torch.no_grad():
        gate.proj.weight.zero_()
        gate.proj.bias.copy_(torch.tensor([0.5, 2.0, -1.0, 1.0]))
    code = torch.zeros(1, 3)

    # Execute
    weights, selected = gate(code)

    # Assert: members 1 and 3 win; weights are softmax([2.0, 1.0]) on them
    expected = F.softmax(torch.tensor([2.0, 1.0]), dim=0)
    assert selected.tolist() == [[False, True, False, True]]
    torch.testing.assert_close(weights[0, [1, 3]], expected)
    assert weights[0, 0] == 0 and weights[0, 2] == 0


@pytest.mark.parametrize(("num_members", "top_k"), [(1, 2), (3, 1), (3, 3), (5, 2), (2, 4)])
def test_lsgate_selects_min_k_and_size_members_with_weights_summing_to_one(num_members, top_k):
    gate = make_gate(num_members, top_k)
    code = torch.randn(16, 3, generator=torch.Generator().manual_seed(1))

    weights, selected = gate(code)

    assert (selected.sum(dim=1) == min(top_k, num_members)).all()
    assert ((weights > 0) == selected).all()
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(16))


def test_pending_member_never_wins_and_gets_zero_weight_in_a_small_squad():
    # Prepare: a squad of 2 with K = 2 (all run), then a pending third member with a huge logit weight
    gate = make_gate(num_members=2, top_k=2)
    code = torch.randn(32, 3, generator=torch.Generator().manual_seed(2))
    before, _ = gate(code)
    gate.add_member(pending=True)
    with torch.no_grad():
        gate.proj.bias[2] = 50.0  # even a strongly trained row cannot beat the offset

    # Execute
    after, selected = gate(code)

    # Assert: the pending member is never among the top 2, the weights are bit-identical
    assert gate.admission_offset.tolist() == [0.0, 0.0, PENDING_OFFSET]
    assert not selected[:, 2].any()
    assert torch.equal(after[:, :2], before)


def test_pending_member_of_a_squad_smaller_than_k_runs_with_weight_exactly_zero():
    gate = make_gate(num_members=1, top_k=3)
    code = torch.randn(8, 3, generator=torch.Generator().manual_seed(3))
    gate.add_member(pending=True)

    weights, selected = gate(code)

    assert selected.all()
    assert (weights[:, 1] == 0.0).all()
    assert (weights[:, 0] == 1.0).all()


def test_keep_members_keeps_rows_in_the_given_order():
    gate = make_gate(num_members=3, top_k=3)
    code = torch.randn(5, 3, generator=torch.Generator().manual_seed(4))
    logits = gate.logits(code)

    gate.keep_members([2, 0])

    torch.testing.assert_close(gate.logits(code), logits[:, [2, 0]])


def test_tsgate_routes_rows_by_task_and_rejects_bad_ids():
    tsgate = TSGate(num_tasks=3)

    routes = tsgate(torch.tensor([2, 0, 2, 2]))

    assert [(task, rows.tolist()) for task, rows in routes] == [(0, [1]), (2, [0, 2, 3])]
    with pytest.raises(ValueError, match=r"task_ids: expected ids in \[0, 2\]"):
        tsgate(torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="1-D integer tensor"):
        tsgate(torch.tensor([0.0, 1.0]))


@PROPERTY
@given(recipe=baim_recipes())
def test_gate_output_has_exactly_k_non_zeros_in_the_task_section(recipe: BAIMRecipe):
    # Prepare
    baim = recipe.build()
    batch = 12
    task_ids = torch.arange(batch) % len(baim.config.tasks)

    # Execute
    gate = baim.route(images(batch, recipe.seed), task_ids, seed=recipe.seed)

    # Assert
    assert gate.weights.shape == (batch, baim.num_learners)
    for row in range(batch):
        task = baim.config.tasks[int(task_ids[row])]
        section = baim.squad_columns(task)
        k = min(baim.config.top_k, len(section))
        nonzero = torch.nonzero(gate.weights[row]).flatten().tolist()
        assert len(nonzero) == k
        assert set(nonzero) <= set(section)
        assert torch.nonzero(gate.selected[row]).flatten().tolist() == nonzero
        torch.testing.assert_close(gate.weights[row].sum(), torch.tensor(1.0))


def test_generation_routes_from_the_prior_gate_code_reproducibly():
    recipe = BAIMRecipe(
        specs=(LearnerSpec((2,), 2, RESOLUTION),) * 4,
        tasks_of=(0, 0, 0, 1),
        num_tasks=2,
        top_k=1,
        height=1,
        scope="all",
        prune_ratio=1.0,  # no connections: a learner runs only where it is selected
        seed=5,
    )
    baim = recipe.build()
    code = noise_for(GATE_NOISE_KEY, 7, 64, baim.config.gate_code_dim)
    expected, _ = baim.gate.squad_gate("t0")(code)

    baim.stage_counter.reset()
    first = baim.generate("t0", 64, seed=7)
    rows = {name: baim.stage_counter.rows[(name, 1)] for name in ("e0", "e1", "e2")}

    # The decoder stage of each learner ran on exactly the samples the prior code routed to it (K = 1)
    assert rows == {f"e{n}": int(expected[:, n].sum()) for n in range(3)}
    assert sum(rows.values()) == 64
    assert torch.equal(first, baim.generate("t0", 64, seed=7))
    assert not torch.equal(first, baim.generate("t0", 64, seed=8))
