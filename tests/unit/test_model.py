"""BAIM forward/generate: sparse per-sample dispatch, feeders, mixture and loss, gradients, validation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings

from baim.config import LearnerSpec
from baim.gates import GATE_NOISE_KEY
from baim.learners import VAELearner, noise_for, vae_loss
from baim.model import BAIM
from baim.model_config import ConnectionSpec
from baim.training import apply_strategy
from tests.support.baim_random import (
    RESOLUTION,
    BAIMRecipe,
    baim_recipes,
    images,
    three_learners,
)

PROPERTY = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SPEC = LearnerSpec((4, 4), 2, RESOLUTION)  # stages 0, 1 encode; 2, 3 decode


def full_eps(baim: BAIM, batch: int, seed: int) -> dict[str, torch.Tensor]:
    eps = {e.name: noise_for(e.name, seed, batch, e.spec.latent_dim) for e in baim.config.learners}
    eps[GATE_NOISE_KEY] = noise_for(GATE_NOISE_KEY, seed, batch, baim.config.gate_code_dim)
    return eps


@PROPERTY
@given(recipe=baim_recipes())
def test_mixed_batch_gives_each_sample_what_it_gets_alone(recipe: BAIMRecipe):
    # Prepare
    baim = recipe.build()
    batch = 6
    x = images(batch, recipe.seed)
    task_ids = torch.tensor([n % len(baim.config.tasks) for n in range(batch)])
    eps = full_eps(baim, batch, recipe.seed)

    # Execute
    together = baim(x, task_ids, eps=eps)

    # Assert
    for row in range(batch):
        alone = baim(
            x[row : row + 1], task_ids[row : row + 1], eps={k: v[row : row + 1] for k, v in eps.items()}
        )
        torch.testing.assert_close(alone.recon[0], together.recon[row], atol=1e-5, rtol=0)
        assert torch.equal(alone.selected[0], together.selected[row])


@PROPERTY
@given(recipe=baim_recipes())
def test_without_connections_each_learner_runs_only_on_the_samples_that_select_it(recipe: BAIMRecipe):
    # Prepare: prune every connection
    recipe = BAIMRecipe(**{**recipe.__dict__, "prune_ratio": 1.0})
    baim = recipe.build()
    batch = 10
    task_ids = torch.arange(batch) % len(baim.config.tasks)
    baim.stage_counter.reset()

    # Execute
    out = baim(images(batch, recipe.seed), task_ids, seed=recipe.seed)

    # Assert: each stage of learner n ran on exactly the rows selecting n; work = sum of min(k, |squad|), with
    # k = max(K, 2) in training (the "sample" mixture evaluates two learners so that the gate learns at K = 1)
    for n, entry in enumerate(baim.config.learners):
        chosen = int(out.selected[:, n].sum())
        for k in range(entry.spec.num_stages):
            assert baim.stage_counter.rows[(entry.name, k)] == chosen
    squad_sizes = [len(squad.members) for squad in baim.config.squads]
    k = max(baim.config.top_k, baim.selection_min_k())
    assert baim.training and k == max(baim.config.top_k, 2)
    expected = sum(min(k, squad_sizes[int(t)]) for t in task_ids)
    assert int(out.selected.sum()) == expected


@PROPERTY
@given(recipe=baim_recipes())
def test_a_learner_that_runs_is_selected_or_feeds_a_learner_that_runs(recipe: BAIMRecipe):
    baim = recipe.build()
    batch = 5
    task_ids = torch.zeros(batch, dtype=torch.long)  # only task t0 is routed
    baim.stage_counter.reset()

    out = baim(images(batch, recipe.seed), task_ids, seed=recipe.seed)

    ran = {e.name for e in baim.config.learners if baim.stage_counter.learner_rows(e.name) > 0}
    selected = {e.name for n, e in enumerate(baim.config.learners) if out.selected[:, n].any()}
    assert selected <= ran
    for name in ran - selected:
        consumers = {c.dst for c in baim.connections.specs if c.src == name}
        assert consumers & ran, f"{name} ran but is neither selected nor feeding a learner that ran"
        # a feeder runs only up to the deepest stage a connection reads
        deepest = max(c.src_stage for c in baim.connections.specs if c.src == name and c.dst in ran)
        entry = baim.config.learner(name)
        assert all(baim.stage_counter.rows[(name, k)] == 0 for k in range(deepest + 1, entry.spec.num_stages))


def test_feeder_runs_only_the_stages_its_connection_reads_and_only_for_routed_samples():
    # Prepare: a (task t0) feeds b (task t1) from its stage 0 into b's stage 1; inference routing (top K = 1)
    baim = three_learners([ConnectionSpec("a", 0, "b", 1)]).eval()
    x = images(4, 3)
    task_ids = torch.tensor([1, 1, 1, 0])  # three samples for t1, one for t0
    baim.stage_counter.reset()

    # Execute
    out = baim(x, task_ids, seed=0)

    # Assert
    rows = baim.stage_counter.rows
    a_selected = int(out.selected[:, 0].sum())
    c_selected = int(out.selected[:, 2].sum())
    assert a_selected + c_selected == 1
    assert [rows[("b", k)] for k in range(4)] == [3, 3, 3, 3]
    assert rows[("a", 0)] == 3 + a_selected  # b's three samples need a's stage 0
    assert [rows[("a", k)] for k in (1, 2, 3)] == [a_selected] * 3
    assert [rows[("c", k)] for k in range(4)] == [c_selected] * 4


def test_generation_skips_encoder_connections_and_runs_decoder_feeders_from_the_prior():
    baim = three_learners([ConnectionSpec("a", 0, "b", 1), ConnectionSpec("c", 2, "b", 3)])
    baim.stage_counter.reset()

    baim.generate("t1", 5, seed=1)

    rows = baim.stage_counter.rows
    assert baim.stage_counter.learner_rows("a") == 0  # its only consumer edge is in the encoder
    assert [rows[("c", k)] for k in range(4)] == [0, 0, 5, 0]  # decoder stage 2 only, from z ~ N(0, I)
    assert [rows[("b", k)] for k in range(4)] == [0, 0, 5, 5]


def kld_of(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    return -0.5 * torch.sum(1 + logvar - mu**2 - logvar.exp(), dim=1)


@pytest.mark.parametrize("mixture", ["sample", "blend"])
def test_mixture_and_loss_follow_the_documented_formula(mixture: str):
    # Prepare: squad t0 = {a, c} with K = 2 and no connections: both run, weights softmax over two logits
    baim = three_learners([])
    baim.config = baim.config.with_changes(mixture=mixture)
    baim.gate.squad_gate("t0").top_k = 2
    x = images(3, 4)
    eps = full_eps(baim, 3, seed=9)

    # Execute
    out = baim(x, "t0", eps=eps)

    # Assert
    a = baim.learner("a")(x, eps["a"])
    c = baim.learner("c")(x, eps["c"])
    w_a, w_c = out.gate_weights[:, 0], out.gate_weights[:, 2]
    torch.testing.assert_close(w_a + w_c, torch.ones(3))
    expected_recon = w_a.view(-1, 1, 1, 1) * a.recon + w_c.view(-1, 1, 1, 1) * c.recon
    torch.testing.assert_close(out.recon, expected_recon)

    def mse(recon: torch.Tensor) -> torch.Tensor:
        return ((recon - x) ** 2).flatten(start_dim=1).mean(dim=1)

    expected_kld = (w_a * kld_of(a.mu, a.logvar) + w_c * kld_of(c.mu, c.logvar)).mean()
    if mixture == "sample":  # the expected loss over the mixture
        torch.testing.assert_close(out.recon_loss, (w_a * mse(a.recon) + w_c * mse(c.recon)).mean())
    else:  # the loss of the blended image
        torch.testing.assert_close(out.recon_loss, F.mse_loss(expected_recon, x))
    torch.testing.assert_close(out.kld, expected_kld)
    torch.testing.assert_close(
        out.loss, out.recon_loss + baim.config.kld_weight * (expected_kld + out.gate_kld)
    )
    assert out.gate_kld > 0


def test_a_single_learner_squad_is_exactly_that_learner_plus_the_gate_code_kld():
    baim = three_learners([])
    x = images(4, 5)
    eps = full_eps(baim, 4, seed=2)

    out = baim(x, "t1", eps=eps)

    b = baim.learner("b")(x, eps["b"])
    assert torch.equal(out.recon, b.recon)
    reference = vae_loss(b.recon, x, b.mu, b.logvar, baim.config.kld_weight)
    torch.testing.assert_close(out.loss, reference.loss + baim.config.kld_weight * out.gate_kld)


def test_gradients_reach_learners_gates_and_connections_and_freeze_keeps_learners_out():
    baim = three_learners([ConnectionSpec("a", 0, "b", 1), ConnectionSpec("a", 1, "c", 1)])
    baim.gate.squad_gate("t0").top_k = 2
    x = images(4, 6)
    task_ids = torch.tensor([0, 1, 0, 1])

    baim(x, task_ids, seed=3).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in baim.connection_parameters())
    assert baim.gate.squad_gate("t0").proj.weight.grad.abs().sum() > 0
    assert baim.gate.encoder.fc.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in baim.learner("b").parameters())

    baim.zero_grad(set_to_none=True)
    apply_strategy(baim, "freeze", baim.learner_modules(), seed=0)
    baim(x, task_ids, seed=3).loss.backward()
    assert all(p.grad is None for m in baim.learner_modules() for p in m.parameters())
    assert all(p.grad is not None for p in baim.connection_parameters())


def test_from_learners_copies_weights_and_builds_one_squad_per_task():
    torch.manual_seed(0)
    uploads = [("e0", "t1", VAELearner(SPEC)), ("e1", "t0", VAELearner(SPEC)), ("e2", "t1", VAELearner(SPEC))]

    baim = BAIM.from_learners(["t0", "t1"], uploads, top_k=2, connection_height=2)

    assert [s.to_dict() for s in baim.config.squads] == [
        {"task": "t0", "members": ["e1"]},
        {"task": "t1", "members": ["e0", "e2"]},
    ]
    for name, _, learner in uploads:
        copy = baim.learner(name)
        assert copy is not learner
        assert all(torch.equal(copy.state_dict()[k], v) for k, v in learner.state_dict().items())
    assert baim.squad_columns("t1") == [0, 2]


def test_bad_inputs_raise_clear_errors():
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="task 't2' has no learner"):
        BAIM.from_learners(["t0", "t2"], [("e0", "t0", VAELearner(SPEC))])
    with pytest.raises(ValueError, match=r"not in tasks"):
        BAIM.from_learners(["t0"], [("e0", "t9", VAELearner(SPEC))])
    with pytest.raises(ValueError, match="name matching"):
        BAIM.from_learners(["t0"], [("e.0", "t0", VAELearner(SPEC))])
    with pytest.raises(ValueError, match="resolution"):
        BAIM.from_learners(
            ["t0"], [("a", "t0", VAELearner(SPEC)), ("b", "t0", VAELearner(LearnerSpec((4,), 2, 8)))]
        )
    baim = three_learners([])
    with pytest.raises(ValueError, match=r"images: expected shape \(B, \(3, 16, 16\)\)"):
        baim(torch.rand(2, 3, 8, 8), 0)
    with pytest.raises(ValueError, match="task: expected one of"):
        baim(images(2, 0), "nope")
    with pytest.raises(ValueError, match=r"task_ids: expected ids in \[0, 1\]"):
        baim(images(2, 0), torch.tensor([0, 2]))
    with pytest.raises(ValueError, match=r"eps: expected a tensor for"):
        baim(images(2, 0), 0, eps={})
    with pytest.raises(ValueError, match="n: expected a positive int"):
        baim.generate("t0", 0)


def test_generate_returns_images_in_unit_range_and_depends_on_the_seed():
    baim = three_learners([ConnectionSpec("c", 2, "b", 3)], height=1)
    first = baim.generate("t1", 4, seed=11)
    assert first.shape == (4, 3, RESOLUTION, RESOLUTION)
    assert first.min() >= 0 and first.max() <= 1
    assert torch.equal(first, baim.generate(1, 4, seed=11))
    assert not torch.equal(first, baim.generate("t1", 4, seed=12))
