"""HierGate: LSGate top-K and softmax weights, the N-vector sections, TSGate routing, pending learners; a
gate that learns at K = 1 (the "sample" mixture's training-time widening); sampling a learner by weight."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings

from baim.config import LearnerSpec
from baim.continual import train_only
from baim.gates import GATE_NOISE_KEY, PENDING_OFFSET, LSGate, TSGate, pick_members, pick_uniforms
from baim.learners import VAELearner, noise_for
from baim.model import BAIM
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

    # K learners at inference; max(K, 2) in training (the "sample" mixture's expected loss needs two)
    for training, min_k in ((False, 1), (True, 2)):
        # Execute
        baim.train(training)
        gate = baim.route(images(batch, recipe.seed), task_ids, seed=recipe.seed)

        # Assert
        assert gate.weights.shape == (batch, baim.num_learners)
        for row in range(batch):
            task = baim.config.tasks[int(task_ids[row])]
            section = baim.squad_columns(task)
            k = min(max(baim.config.top_k, min_k), len(section))
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


# ---- a gate that learns at any K -----------------------------------------------------------------------


def two_member_squad(mixture: str, seed: int = 0) -> BAIM:
    torch.manual_seed(seed)
    spec = LearnerSpec((4,), 2, RESOLUTION)
    baim = BAIM.from_learners(["t"], [("a", "t", VAELearner(spec)), ("b", "t", VAELearner(spec))], top_k=1)
    baim.config = baim.config.with_changes(mixture=mixture)
    return baim


def test_at_k1_the_reconstruction_loss_alone_reaches_the_lsgate_and_the_gate_encoder():
    x = images(6, 1)
    for mixture in ("sample", "blend"):
        # Prepare
        baim = two_member_squad(mixture)

        # Execute: the reconstruction term only (the gate code's KL term would reach the encoder anyway)
        baim(x, 0, seed=2).recon_loss.backward()

        # Assert: the expected loss over two learners moves the gate; the renormalised top-1 weight (1.0) not
        lsgate = baim.gate.squad_gate("t").proj.weight.grad
        assert baim.gate.encoder is not None
        encoder = baim.gate.encoder.fc.weight.grad
        assert lsgate is not None and encoder is not None
        if mixture == "sample":
            assert torch.count_nonzero(lsgate) > 0 and torch.count_nonzero(encoder) > 0
        else:
            assert torch.count_nonzero(lsgate) == 0 and torch.count_nonzero(encoder) == 0


MODE_COLOURS = torch.tensor([[0.9, 0.2, 0.1], [0.1, 0.3, 0.9]])  # mode 0 reddish, mode 1 bluish


def two_modes(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (n, 3, R, R), mode (n,)): a mode's colour plus pixel noise."""
    generator = torch.Generator().manual_seed(seed)
    mode = torch.randint(0, 2, (n,), generator=generator)
    noise = 0.1 * torch.randn(n, 3, RESOLUTION, RESOLUTION, generator=generator)
    return (MODE_COLOURS[mode].view(n, 3, 1, 1) + noise).clamp(0.0, 1.0), mode


def learner_of_mode(mode: int, seed: int) -> VAELearner:
    torch.manual_seed(seed)
    learner = VAELearner(LearnerSpec((4,), 2, RESOLUTION))
    optimizer = torch.optim.Adam(learner.parameters(), lr=0.02)
    for step in range(30):
        x, modes = two_modes(64, 100 + step)
        loss = learner.loss(x[modes == mode], kld_weight=0.00025).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return learner


@pytest.mark.parametrize("mixture", ["sample", "blend"])
def test_after_a_short_training_at_k1_the_gate_choice_predicts_the_mode(mixture: str):
    # Prepare: a squad of two learners, a fitting mode 0 and b mode 1, K = 1; chance is 0.5
    learners = [("a", "t", learner_of_mode(0, seed=1)), ("b", "t", learner_of_mode(1, seed=2))]
    torch.manual_seed(0)
    baim = BAIM.from_learners(["t"], learners, top_k=1, seed=3)
    baim.config = baim.config.with_changes(mixture=mixture)
    lsgate_before = baim.gate.squad_gate("t").proj.weight.detach().clone()
    batches = [
        (x, torch.zeros(len(x), dtype=torch.long)) for x, _ in (two_modes(32, 500 + i) for i in range(10))
    ]
    test_images, test_modes = two_modes(256, 999)

    # Execute: 30 Adam steps on everything (finetune)
    train_only(baim, list(baim.parameters()), batches, steps=30, lr=0.01, seed=4)
    baim.eval()
    with torch.no_grad():
        chosen = baim.route(test_images, 0, seed=0).selected[:, 1].long()  # 1: b (mode 1) selected
    accuracy = float((chosen == test_modes).float().mean())

    # Assert
    if mixture == "sample":
        assert accuracy >= 0.9
    else:  # the documented defect of the legacy blend: the LSGate never received a gradient
        assert torch.equal(baim.gate.squad_gate("t").proj.weight, lsgate_before)


# ---- sampling a learner ---------------------------------------------------------------------------------


def test_pick_members_draws_each_selected_member_with_its_weight():
    # Prepare: 3 of 4 members selected with weights 0.5, 0.3, 0.2
    weights = torch.tensor([[0.5, 0.0, 0.3, 0.2]]).expand(40_000, 4)
    selected = weights > 0
    uniform = torch.rand(40_000, generator=torch.Generator().manual_seed(0))

    # Execute
    picked = pick_members(weights, selected, uniform)

    # Assert: frequencies within 0.01 of the weights (4 sigma is about 0.01 at 40,000 draws); never member 1
    frequency = torch.bincount(picked, minlength=4).float() / 40_000
    torch.testing.assert_close(frequency, weights[0], atol=0.01, rtol=0)
    assert int(frequency[1] * 40_000) == 0
    # the extremes map to the first and the last selected member
    extremes = pick_members(weights[:3], selected[:3], torch.tensor([0.0, 1.0, 1.0 - 1e-12]))
    assert extremes.tolist() == [0, 3, 3]


def test_the_hashed_draw_is_uniform_and_independent_of_the_weights_it_picks_by():
    # Prepare: prior gate codes and a squad of three with K = 2, the weights depending on the code
    code = noise_for(GATE_NOISE_KEY, 3, 40_000, 3)
    weights, selected = make_gate(num_members=3, top_k=2)(code)

    # Execute
    uniform = pick_uniforms(code)
    picked = pick_members(weights, selected, uniform)

    # Assert: u is uniform (deciles within 0.01 of 0.1), the picks follow the weights overall and also
    # among the codes whose first member's weight is high or low (independence from w(c))
    deciles = torch.histc(uniform.float(), bins=10, min=0.0, max=1.0) / 40_000
    torch.testing.assert_close(deciles, torch.full((10,), 0.1), atol=0.01, rtol=0)
    assert float(uniform.min()) > 0.0 and float(uniform.max()) < 1.0
    for rows in (torch.ones(40_000, dtype=torch.bool), weights[:, 0] > 0.6, weights[:, 0] < 0.3):
        frequency = torch.bincount(picked[rows], minlength=3).float() / int(rows.sum())
        torch.testing.assert_close(frequency, weights[rows].mean(dim=0), atol=0.015, rtol=0)
    # the same row's code gives the same draw, in any batch
    assert torch.equal(pick_uniforms(code[5:9]), uniform[5:9])


def test_sample_generation_decodes_the_drawn_learners_own_latent():
    # Prepare: one squad of three learners, K = 2, no connections
    torch.manual_seed(0)
    spec = LearnerSpec((4,), 3, RESOLUTION)
    learners = [(name, "t", VAELearner(spec)) for name in ("a", "b", "c")]
    baim = BAIM.from_learners(["t"], learners, top_k=2, connection_height=0, connections=())
    n, seed = 64, 5

    # Execute
    baim.stage_counter.reset()
    generated = baim.generate("t", n, seed=seed)

    # Assert: row i is exactly learner pick[i]'s decode of its own latent; one learner ran per sample
    code = noise_for(GATE_NOISE_KEY, seed, n, baim.config.gate_code_dim)
    weights, selected = baim.gate.squad_gate("t")(code)
    picked = pick_members(weights, selected, pick_uniforms(code))
    assert bool(selected[torch.arange(n), picked].all())
    for index, (name, _, _) in enumerate(learners):
        rows = torch.nonzero(picked == index).flatten()
        own = baim.learner(name).decode(noise_for(name, seed, n, spec.latent_dim)[rows]).clamp(0, 1)
        assert torch.equal(generated[rows], own)
    assert sum(baim.stage_counter.rows[(name, 1)] for name, _, _ in learners) == n
    assert len(set(picked.tolist())) == 3  # every learner is drawn sometimes (K = 2 of 3 per sample)
    assert torch.equal(generated, baim.generate("t", n, seed=seed))
