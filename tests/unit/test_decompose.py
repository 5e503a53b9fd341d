"""Task-oriented decomposition: the task model computes the BAIM's output for its task, with fewer params."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from baim.config import LearnerSpec
from baim.decompose import GenerationModel, TaskModel, decompose, generation_model
from baim.gates import GATE_NOISE_KEY
from baim.learners import noise_for
from baim.model import BAIM
from baim.model_config import BAIMConfig, ConnectionSpec, LearnerEntry, SquadSpec
from baim.pruning import prune_learners
from baim.serialization import build_from_spec, from_bytes, to_bytes
from tests.support.baim_random import (
    RESOLUTION,
    BAIMRecipe,
    baim_recipes,
    budget_pruned,
    images,
    randomise_connections,
)

PROPERTY = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FEW = settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TOLERANCE = 1e-5


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@PROPERTY
@given(recipe=baim_recipes())
def test_decomposed_model_equals_the_baim_for_reconstruction_and_generation(recipe: BAIMRecipe):
    baim = recipe.build()
    x = images(5, recipe.seed)
    for task_id, task in enumerate(baim.config.tasks):
        # Execute
        model = decompose(baim, task)
        ours, theirs = model(x, seed=recipe.seed), baim(x, task_id, seed=recipe.seed)
        generated = model.generate(4, seed=recipe.seed + 1)

        # Assert
        assert (ours.recon - theirs.recon).abs().max() <= TOLERANCE
        assert abs(float((ours.loss - theirs.loss).detach())) <= TOLERANCE
        assert (generated - baim.generate(task, 4, seed=recipe.seed + 1)).abs().max() <= TOLERANCE
        assert count(model) < count(baim)  # at least the other squads' LSGates are gone
        columns = [baim.config.learner_names.index(n) for n in model.config.learner_names]
        assert torch.equal(ours.gate_weights, theirs.gate_weights[:, columns])


@PROPERTY
@given(
    recipe=baim_recipes(),
    budget=st.sampled_from([1.2, 2.0, 4.0]),
    mixture=st.sampled_from(["sample", "blend"]),
)
def test_task_and_generation_models_of_budget_pruned_baims_match_the_baim(
    recipe: BAIMRecipe, budget: float, mixture: str
):
    # Prepare
    baim = budget_pruned(recipe, budget)
    baim.config = baim.config.with_changes(mixture=mixture)
    x = images(5, recipe.seed)
    for training in (True, False):
        baim.train(training)
        for task_id, task in enumerate(baim.config.tasks):
            # Execute
            model = decompose(baim, task).train(training)
            generator = decompose(baim, task, kind="generation")
            ours, theirs = model(x, seed=recipe.seed), baim(x, task_id, seed=recipe.seed)
            expected = baim.generate(task, 4, seed=recipe.seed + 1)

            # Assert
            assert (ours.recon - theirs.recon).abs().max() <= TOLERANCE
            assert abs(float((ours.loss - theirs.loss).detach())) <= TOLERANCE
            assert (generator.generate(4, seed=recipe.seed + 1) - expected).abs().max() <= TOLERANCE
            assert torch.equal(
                generator.generate(4, seed=recipe.seed + 1), model.generate(4, seed=recipe.seed + 1)
            )
            assert count(generator) <= count(model) < count(baim)


@FEW
@given(recipe=baim_recipes())
def test_the_generation_model_holds_no_encoder_and_round_trips_through_safetensors(recipe: BAIMRecipe):
    baim = recipe.build()
    for task in baim.config.tasks:
        # Execute
        model = generation_model(decompose(baim, task))
        weights, spec_json = to_bytes(model)
        rebuilt = from_bytes(weights, spec_json)

        # Assert: only decoder parts and the LSGate; the same images, bit for bit
        assert isinstance(rebuilt, GenerationModel) and rebuilt.spec()["kind"] == "generation_model"
        assert rebuilt.config.generation_only and rebuilt.baim.gate.encoder is None
        keys = list(rebuilt.state_dict())
        assert not [k for k in keys if any(part in k for part in ("encoder", "fc_mu", "fc_logvar"))]
        assert not [
            c
            for c in rebuilt.config.connections or ()
            if c.dst_stage < len(rebuilt.config.learner(c.dst).spec.widths)
        ]
        assert torch.equal(rebuilt.generate(3, seed=6), decompose(baim, task).generate(3, seed=6))
        assert isinstance(build_from_spec(model.spec()), GenerationModel)
        assert to_bytes(rebuilt) == (weights, spec_json)
        with pytest.raises(ValueError, match="generation-only model"):
            rebuilt.baim(images(2, 0), 0)


def test_a_decoder_feeder_is_kept_without_its_encoder_and_an_encoder_feeder_is_dropped():
    baim = chain_baim()  # a:2 -> b:3 (decoder), b:0 -> c:1 (encoder)

    t1, t2 = (decompose(baim, task, kind="generation") for task in ("t1", "t2"))

    assert [(e.name, e.depth) for e in t1.config.learners] == [("a", 2), ("b", None)]
    assert [(e.name, e.depth) for e in t2.config.learners] == [("c", None)]
    feeder = t1.baim.learner("a")
    assert len(feeder.encoder_stages) == 0 and feeder.fc_mu is None and feeder.fc_logvar is None
    assert len(feeder.decoder_stages) == 1 and feeder.decoder_input is not None
    assert torch.equal(t1.generate(4, seed=3), decompose(baim, "t1").generate(4, seed=3))


def test_a_spec_written_before_mixture_existed_loads_as_the_legacy_blend():
    baim = chain_baim()
    spec = decompose(baim, "t1").spec()
    del spec["mixture"], spec["generation_only"]

    model = build_from_spec(spec)

    assert isinstance(model, TaskModel) and model.config.mixture == "blend"
    with pytest.raises(ValueError, match="mixture: expected one of"):
        build_from_spec({**spec, "mixture": "average"})
    with pytest.raises(ValueError, match="kind 'generation_model'"):
        GenerationModel.from_spec(spec)
    with pytest.raises(ValueError, match="cannot be generation_only"):
        TaskModel.from_spec({**spec, **decompose(baim, "t1", kind="generation").spec(), "kind": "task_model"})


@PROPERTY
@given(recipe=baim_recipes())
def test_task_rows_of_a_mixed_batch_match_the_task_model(recipe: BAIMRecipe):
    baim = recipe.build()
    batch = 6
    x = images(batch, recipe.seed)
    task_ids = torch.arange(batch) % len(baim.config.tasks)
    eps = {e.name: noise_for(e.name, 3, batch, e.spec.latent_dim) for e in baim.config.learners}
    eps[GATE_NOISE_KEY] = noise_for(GATE_NOISE_KEY, 3, batch, baim.config.gate_code_dim)
    together = baim(x, task_ids, eps=eps)

    for task_id, task in enumerate(baim.config.tasks):
        rows = torch.nonzero(task_ids == task_id).flatten()
        model = decompose(baim, task)
        sub_eps = {
            k: v[rows] for k, v in eps.items() if k in model.config.learner_names or k == GATE_NOISE_KEY
        }
        ours = model(x[rows], eps=sub_eps)
        assert (ours.recon - together.recon[rows]).abs().max() <= TOLERANCE


def chain_baim() -> BAIM:
    """t0 = {a}, t1 = {b}, t2 = {c}; a feeds b (decoder stage 2 -> 3), b feeds c (encoder 0 -> 1)."""
    spec = LearnerSpec((4, 4), 2, RESOLUTION)
    config = BAIMConfig(
        learners=(
            LearnerEntry("a", "t0", spec),
            LearnerEntry("b", "t1", spec),
            LearnerEntry("c", "t2", spec),
        ),
        squads=(SquadSpec("t0", ("a",)), SquadSpec("t1", ("b",)), SquadSpec("t2", ("c",))),
        connection_height=1,
        connections=(ConnectionSpec("a", 2, "b", 3), ConnectionSpec("b", 0, "c", 1)),
    )
    torch.manual_seed(0)
    baim = BAIM(config)
    randomise_connections(baim, seed=2)
    return baim


def test_decomposition_keeps_transitive_feeders_cut_after_the_stage_they_feed():
    baim = chain_baim()

    t0, t1, t2 = (decompose(baim, task) for task in ("t0", "t1", "t2"))

    assert [(e.name, e.depth) for e in t0.config.learners] == [("a", None)]
    assert [(e.name, e.depth) for e in t1.config.learners] == [("a", 2), ("b", None)]
    assert [(e.name, e.depth) for e in t2.config.learners] == [("b", 0), ("c", None)]
    assert [c.key for c in t1.config.connections or ()] == ["a:2->b:3"]
    assert [c.key for c in t2.config.connections or ()] == ["b:0->c:1"]
    # the cut feeder holds no parameters past its stage
    assert len(t2.baim.learner("b").encoder_stages) == 1 and t2.baim.learner("b").fc_mu is None
    assert len(t1.baim.learner("a").decoder_stages) == 1
    x = images(3, 1)
    for task_id, model in enumerate((t0, t1, t2)):
        assert (model(x, seed=4).recon - baim(x, task_id, seed=4).recon).abs().max() <= TOLERANCE


def test_decomposition_after_model_level_pruning_matches_and_keeps_the_feeder():
    # Prepare: t0 = {a, d}; d never selected (frequency 0) but feeds b
    spec = LearnerSpec((4, 4), 2, RESOLUTION)
    config = BAIMConfig(
        learners=(
            LearnerEntry("a", "t0", spec),
            LearnerEntry("b", "t1", spec),
            LearnerEntry("d", "t0", spec),
        ),
        squads=(SquadSpec("t0", ("a", "d")), SquadSpec("t1", ("b",))),
        top_k=1,
        connection_height=1,
        connections=(ConnectionSpec("d", 0, "b", 1),),
    )
    torch.manual_seed(0)
    baim = BAIM(config)
    randomise_connections(baim, seed=3)
    prune_learners(baim, {"a": 1.0, "d": 0.0, "b": 1.0}, threshold=0.5)

    model = decompose(baim, "t1")

    assert [(e.name, e.depth) for e in model.config.learners] == [("b", None), ("d", 0)]
    x = images(3, 2)
    assert (model(x, seed=1).recon - baim(x, "t1", seed=1).recon).abs().max() <= TOLERANCE


def test_task_model_rejects_bad_specs_and_unknown_tasks():
    baim = chain_baim()
    with pytest.raises(ValueError, match="task: expected one of"):
        decompose(baim, "t9")
    with pytest.raises(ValueError, match="exactly one squad"):
        TaskModel(baim.config)
    with pytest.raises(ValueError, match="kind 'task_model'"):
        TaskModel.from_spec(baim.spec())
