"""Specs and safetensors: learners, BAIMs and task models rebuild bit-identically; bad input is rejected."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings

from baim.config import LearnerSpec
from baim.decompose import TaskModel, decompose
from baim.learners import VAELearner
from baim.model import BAIM
from baim.serialization import build_from_spec, from_bytes, from_files, module_spec, state_and_spec, to_bytes
from tests.support.baim_random import BAIMRecipe, baim_recipes, images

PROPERTY = settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def assert_identical(a: torch.nn.Module, b: torch.nn.Module) -> None:
    state_a, state_b = a.state_dict(), b.state_dict()
    assert list(state_a) == list(state_b)
    for key, value in state_a.items():
        assert value.dtype == state_b[key].dtype
        assert torch.equal(value, state_b[key]), key


@PROPERTY
@given(recipe=baim_recipes())
def test_baim_and_task_models_round_trip_bit_identically(recipe: BAIMRecipe):
    baim = recipe.build()
    baim.add_learner("late", baim.config.tasks[0], VAELearner(LearnerSpec((2,), 2, 16)))  # a pending offset
    x = images(3, recipe.seed)
    models: list[torch.nn.Module] = [baim, *(decompose(baim, task) for task in baim.config.tasks)]
    for model in models:
        # Execute
        weights, spec_json = to_bytes(model)
        rebuilt = from_bytes(weights, spec_json)

        # Assert
        assert type(rebuilt) is type(model)
        assert_identical(rebuilt, model)
        assert json.loads(spec_json) == module_spec(model)
        assert to_bytes(rebuilt) == (weights, spec_json)
        if isinstance(model, BAIM):
            assert torch.equal(rebuilt(x, 0, seed=1).recon, model(x, 0, seed=1).recon)
            assert rebuilt.pending_learners() == ["late"]
        else:
            assert isinstance(rebuilt, TaskModel)
            assert torch.equal(rebuilt(x, seed=1).recon, model(x, seed=1).recon)
            assert torch.equal(rebuilt.generate(2, seed=4), model.generate(2, seed=4))


def test_learner_round_trips_and_its_spec_is_flat():
    torch.manual_seed(0)
    learner = VAELearner(LearnerSpec((4, 6), 3, 16))

    state, spec = state_and_spec(learner)
    rebuilt = build_from_spec(json.loads(json.dumps(spec)))
    rebuilt.load_state_dict(state)

    assert spec == {"kind": "learner", "widths": [4, 6], "latent_dim": 3, "resolution": 16, "in_channels": 3}
    assert_identical(rebuilt, learner)
    assert from_bytes(*to_bytes(learner)).state_dict().keys() == learner.state_dict().keys()


def test_bad_specs_and_weights_are_rejected_with_the_reason():
    recipe = BAIMRecipe((LearnerSpec((3,), 2, 16),) * 2, (0, 1), 2, 1, 1, "all", 0.0, 1)
    baim = recipe.build()
    weights, spec_json = to_bytes(baim)
    spec = json.loads(spec_json)

    with pytest.raises(ValueError, match="spec kind: expected one of"):
        build_from_spec({**spec, "kind": "pickle"})
    with pytest.raises(ValueError, match="unknown keys"):
        build_from_spec({**spec, "extra": 1})
    with pytest.raises(ValueError, match="spec_json: expected a JSON object"):
        from_bytes(weights, "{not json")
    with pytest.raises(ValueError, match="weights: expected safetensors bytes"):
        from_bytes(b"garbage", spec_json)
    state = safetensors.torch.load(weights)
    state.pop(next(iter(state)))
    with pytest.raises(ValueError, match="missing keys"):
        from_bytes(safetensors.torch.save(state), spec_json)
    state = safetensors.torch.load(weights)
    key = next(k for k in state if k.endswith("conv.weight"))
    state[key] = torch.zeros(1, 1, 1, 1)
    with pytest.raises(ValueError, match=r"expected torch\.float32 of shape"):
        from_bytes(safetensors.torch.save(state), spec_json)
    spec["connections"][0] = {"src": "e1", "src_stage": 1, "dst": "e0", "dst_stage": 0}  # backwards: a cycle
    with pytest.raises(ValueError, match="connection_height"):
        build_from_spec(spec)


def test_an_edge_uploads_spec_builds_the_learner_it_declares():
    spec = LearnerSpec((4, 6), 3, 16)
    upload = {"kind": "learner", "edge_id": "edge-0", "task": "male", "learner": spec.to_dict()}

    built = build_from_spec(upload)

    assert isinstance(built, VAELearner) and built.spec == spec
    with pytest.raises(ValueError, match=r"learner spec: unknown keys \['owner'\]"):
        build_from_spec({**upload, "owner": "x"})
    with pytest.raises(ValueError, match=r"LearnerSpec: missing keys \['resolution'\]"):
        build_from_spec({**upload, "learner": {"widths": [4], "latent_dim": 3}})


def test_from_files_rebuilds_what_to_bytes_wrote(tmp_path):
    torch.manual_seed(0)
    learner = VAELearner(LearnerSpec((4,), 3, 16))
    weights, spec_json = to_bytes(learner)
    (tmp_path / "w.safetensors").write_bytes(weights)
    (tmp_path / "spec.json").write_text(spec_json)

    rebuilt = from_files(tmp_path / "w.safetensors", tmp_path / "spec.json")

    assert_identical(rebuilt, learner)
