"""Continual learning (function-preserving fusion, admission, training gates + new connections), few-shot."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings

from baim.config import LearnerSpec
from baim.continual import add_task, admit, continual_parameters, few_shot_adapt, train_only
from baim.learners import VAELearner
from baim.model import BAIM
from baim.model_config import BAIMConfig, candidate_connections
from baim.pruning import prune_connections
from tests.support.baim_random import BAIMRecipe, baim_recipes, images, learner_specs

PROPERTY = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TOLERANCE = 1e-6


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@PROPERTY
@given(recipe=baim_recipes(), new_spec=learner_specs())
def test_adding_a_learner_leaves_every_output_unchanged(recipe: BAIMRecipe, new_spec: LearnerSpec):
    # Prepare
    baim = recipe.build()
    tasks = list(baim.config.tasks)
    x = images(6, recipe.seed)
    task_ids = torch.arange(6) % len(tasks)
    before = baim(x, task_ids, seed=recipe.seed)
    generated = [baim.generate(task, 3, seed=recipe.seed) for task in tasks]
    torch.manual_seed(recipe.seed + 1)

    # Execute: one learner joins an existing squad, another founds a new task
    joined = baim.add_learner("late", tasks[recipe.seed % len(tasks)], VAELearner(new_spec))
    baim.add_learner("newcomer", "t_new", VAELearner(new_spec))

    # Assert
    after = baim(x, task_ids, seed=recipe.seed)
    assert (after.recon - before.recon).abs().max() <= TOLERANCE
    assert abs(float((after.loss - before.loss).detach())) <= TOLERANCE
    for task, images_before in zip(tasks, generated, strict=True):
        assert (baim.generate(task, 3, seed=recipe.seed) - images_before).abs().max() <= TOLERANCE
    assert baim.pending_learners() == ["late"]
    assert not after.gate_weights[:, -2:].any()  # the two new columns carry zero weight
    assert all(torch.count_nonzero(baim.connections.projection(c).conv.weight) == 0 for c in joined)
    assert set(joined) == set(candidate_connections(baim.config, among={"late"})) - {
        c for c in baim.connections.specs if "newcomer" in (c.src, c.dst)
    }
    assert baim.generate("t_new", 2, seed=0).shape == (2, 3, 16, 16)


@PROPERTY
@given(recipe=baim_recipes(), new_spec=learner_specs())
def test_incrementally_validated_config_equals_the_fully_validated_one(
    recipe: BAIMRecipe, new_spec: LearnerSpec
):
    """add_learner validates only what is new; the config it builds must be the one full validation builds."""
    # Prepare
    baim = recipe.build()
    tasks = list(baim.config.tasks)
    old_connections = tuple(baim.config.connections or ())
    old_parameters = {name: id(p) for name, p in baim.named_parameters()}

    # Execute
    joined = baim.add_learner("late", tasks[recipe.seed % len(tasks)], VAELearner(new_spec))
    founded = baim.add_learner("newcomer", "t_new", VAELearner(new_spec))

    # Assert: the same config as BAIMConfig's own full validation, connections in the documented order
    assert BAIMConfig.from_dict(baim.config.to_dict()) == baim.config
    assert baim.config.connections == (*old_connections, *joined, *founded)
    assert founded == candidate_connections(baim.config, among={"newcomer"})
    before_newcomer = baim.config.with_changes(
        learners=baim.config.learners[:-1],
        squads=tuple(s for s in baim.config.squads if s.task != "t_new"),
        connections=None,
    )
    assert joined == candidate_connections(before_newcomer, among={"late"})
    assert [c.key for c in baim.connections.specs] == [c.key for c in baim.config.connections]
    # Existing learners and connections were left as they were (nothing rebuilt or moved); the LSGate of
    # the joined squad grows by one row, so its projection is new.
    kept = [name for name in old_parameters if name.startswith(("learners.", "connections."))]
    assert kept
    current = dict(baim.named_parameters())
    assert all(id(current[name]) == old_parameters[name] for name in kept)


def test_after_admission_only_gates_and_new_connections_train():
    # Prepare
    recipe = BAIMRecipe(
        specs=(LearnerSpec((3, 3), 2, 16),) * 3,
        tasks_of=(0, 1, 0),
        num_tasks=2,
        top_k=2,
        height=1,
        scope="all",
        prune_ratio=0.0,
        seed=3,
    )
    baim = recipe.build()
    torch.manual_seed(5)
    new_connections = set(baim.add_learner("late", "t0", VAELearner(LearnerSpec((4,), 3, 16))))
    assert admit(baim) == ["late"]
    assert baim.pending_learners() == []
    before = snapshot(baim)
    params = continual_parameters(baim, ["late"])
    x = images(8, 1)
    task_ids = torch.arange(8) % 2

    # Execute
    losses = train_only(baim, params, [(x, task_ids)], steps=3, lr=0.05)

    # Assert: learners and old connections bit-identical; gates and the new connections moved
    after = snapshot(baim)
    assert len(losses) == 3
    new_keys = {f"connections.projections.{c.key}.conv.weight" for c in new_connections}
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert all(k.startswith("gate.") or k in new_keys for k in changed)
    assert any(k in new_keys for k in changed)
    assert any(k.startswith("gate.") for k in changed)
    assert all(p.requires_grad for p in baim.parameters())  # restored after training


@pytest.mark.parametrize("how_empty", ["single learner", "all pruned"])
def test_a_learner_fused_into_a_moved_baim_without_connections_takes_its_dtype(how_empty: str):
    # Prepare: a BAIM whose connection graph is empty (it cannot know the BAIM's dtype), moved to float64
    # (the stand-in for another device or dtype).
    spec = LearnerSpec((3,), 2, 16)
    torch.manual_seed(0)
    if how_empty == "single learner":
        baim = BAIM.from_learners(["t0"], [("a", "t0", VAELearner(spec))], top_k=1, connection_height=1)
    else:
        learners = [("a", "t0", VAELearner(spec)), ("b", "t0", VAELearner(spec))]
        baim = BAIM.from_learners(["t0"], learners, top_k=1, connection_height=1)
        assert baim.connections.specs
        prune_connections(baim, 1.0)
    assert baim.connections.specs == []
    baim.to(torch.float64)

    # Execute
    new_connections = baim.add_learner("late", "t0", VAELearner(spec))

    # Assert: every new module is float64 and the forward pass runs
    assert new_connections
    assert {p.dtype for p in baim.parameters()} == {torch.float64}
    output = baim(images(4, 1).double(), torch.zeros(4, dtype=torch.long))
    assert output.loss.dtype == torch.float64 and torch.isfinite(output.loss)


def test_admit_rejects_learners_that_are_not_pending():
    recipe = BAIMRecipe((LearnerSpec((3,), 2, 16),) * 2, (0, 1), 2, 1, 1, "all", 0.0, 1)
    baim = recipe.build()
    with pytest.raises(ValueError, match="are not pending"):
        admit(baim, ["e0"])


def test_few_shot_task_gets_its_own_gate_and_only_that_gate_learns():
    # Prepare: three learners of two tasks; the new task squads over all of them with K = 2
    recipe = BAIMRecipe(
        specs=(LearnerSpec((3, 3), 2, 16), LearnerSpec((4,), 2, 16), LearnerSpec((2, 4), 3, 16)),
        tasks_of=(0, 1, 0),
        num_tasks=2,
        top_k=2,
        height=1,
        scope="all",
        prune_ratio=0.0,
        seed=7,
    )
    baim = recipe.build()
    x_old = images(4, 2)
    old = [baim(x_old, task, seed=1).recon for task in (0, 1)]
    add_task(baim, "few", members=None)
    shots = images(4, 9)  # k = 4 samples of the new task
    before = snapshot(baim)
    initial = float(baim(shots, "few", seed=100).loss.detach())

    # Execute
    losses = few_shot_adapt(baim, "few", shots, steps=30, lr=0.05, seed=0)

    # Assert
    final = float(baim(shots, "few", seed=100).loss.detach())
    assert final < initial
    after = snapshot(baim)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("gate.squad_gates.few.") for k in changed)
    assert baim.config.squad("few").members == ("e0", "e1", "e2")
    for task, recon in zip((0, 1), old, strict=True):
        assert torch.equal(baim(x_old, task, seed=1).recon, recon)
    assert len(losses) == 30
    with pytest.raises(ValueError, match="already has a squad"):
        add_task(baim, "few")
