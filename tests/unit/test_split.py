"""Split generation: head + tail equals generation for every cut; what crosses is minimal and checked."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings

from baim.config import LearnerSpec
from baim.decompose import decompose
from baim.learners import noise_for
from baim.model import BAIM
from baim.model_config import BAIMConfig, ConnectionSpec, LearnerEntry, SquadSpec
from baim.split import (
    check_split_state,
    crossing_rows,
    expected_shapes,
    generate_head,
    generate_tail,
    split_points,
    split_state_from_bytes,
    split_state_to_bytes,
)
from tests.support.baim_random import RESOLUTION, BAIMRecipe, baim_recipes, randomise_connections
from tests.support.models import two_learner_model

PROPERTY = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SPLIT_TOLERANCE = 1e-6


@PROPERTY
@given(recipe=baim_recipes())
def test_split_generation_equals_generation_for_every_cut(recipe: BAIMRecipe):
    baim = recipe.build()
    for task in baim.config.tasks:
        model = decompose(baim, task)
        unsplit = model.generate(5, seed=recipe.seed)
        assert split_points(model)
        for cut in split_points(model):
            # Execute: through bytes, as it travels
            wire = split_state_to_bytes(generate_head(model, 5, cut, seed=recipe.seed))
            images = generate_tail(model, split_state_from_bytes(model, wire, cut), cut)

            # Assert
            assert (images - unsplit).abs().max() <= SPLIT_TOLERANCE


def test_cut_points_are_the_decoder_stages():
    assert split_points(two_learner_model(top_k=2)) == [1, 2, 3]


def test_what_crosses_each_cut_by_hand():
    # Prepare: K = 1, so each row runs a (with c feeding it) or c alone
    model = two_learner_model(top_k=1)
    n, seed = 6, 3
    selected = model.baim.generation_gate(0, n, seed=seed).selected
    a_rows = torch.nonzero(selected[:, 0]).flatten()
    c_rows = torch.nonzero(selected[:, 1]).flatten()
    assert a_rows.numel() and c_rows.numel()  # this seed exercises both routes
    every_row = torch.arange(n)

    # Execute
    rows = {cut: crossing_rows(model, selected, cut) for cut in (1, 2, 3)}
    shapes = {cut: expected_shapes(model, selected, cut) for cut in (1, 2, 3)}

    # Assert: after stage 1, c's image goes to the mixture (its rows) and to a's stage 3 (a's rows)
    assert list(rows[1]) == [("c", 1)] and torch.equal(rows[1][("c", 1)], every_row)
    # after stage 2, a's stage-2 output crosses too, on a's rows
    assert list(rows[2]) == [("c", 1), ("a", 2)]
    assert torch.equal(rows[2][("a", 2)], a_rows) and torch.equal(rows[2][("c", 1)], every_row)
    # after stage 3, the connection is inside the head: c's image crosses only for the mixture
    assert list(rows[3]) == [("c", 1), ("a", 3)]
    assert torch.equal(rows[3][("c", 1)], c_rows) and torch.equal(rows[3][("a", 3)], a_rows)
    assert shapes[2] == {
        "gate/weights": (n, 2),
        "gate/selected": (n, 2),
        "gate/code": (n, 8),
        "stage/c/1": (n, 3, RESOLUTION, RESOLUTION),
        "stage/a/2": (a_rows.numel(), 4, 8, 8),
    }
    state = generate_head(model, n, 2, seed=seed)
    assert {k: tuple(v.shape) for k, v in state.items()} == {**shapes[2], "seed": ()}
    assert (generate_tail(model, state, 2) - model.generate(n, seed=seed)).abs().max() <= SPLIT_TOLERANCE


def test_split_with_explicit_noise_equals_generation_with_that_noise():
    model = two_learner_model(top_k=2)
    n = 3
    eps = {name: noise_for(name, 11, n, model.baim.learner(name).spec.latent_dim) for name in ("a", "c")}
    eps["@gate"] = noise_for("@gate", 11, n, model.config.gate_code_dim)

    for cut in split_points(model):
        state = generate_head(model, n, cut, eps=eps)
        assert "seed" not in state
        assert (generate_tail(model, state, cut, eps=eps) - model.generate(n, eps=eps)).abs().max() <= 1e-6


def test_feeders_of_another_task_split_too():
    # Prepare: t1's learner b feeds a (t0) from decoder stage 2 into stage 3; decomposition keeps b cut there
    config = BAIMConfig(
        learners=(
            LearnerEntry("a", "t0", LearnerSpec((4, 4), 2, RESOLUTION)),
            LearnerEntry("b", "t1", LearnerSpec((3, 3), 2, RESOLUTION)),
        ),
        squads=(SquadSpec("t0", ("a",)), SquadSpec("t1", ("b",))),
        connection_height=1,
        connections=(ConnectionSpec("b", 2, "a", 3),),
    )
    torch.manual_seed(0)
    baim = BAIM(config)
    randomise_connections(baim, seed=2)
    model = decompose(baim, "t0")

    state = generate_head(model, 2, 2, seed=1)

    assert sorted(k for k in state if k.startswith("stage/")) == ["stage/a/2", "stage/b/2"]
    assert (generate_tail(model, state, 2) - baim.generate("t0", 2, seed=1)).abs().max() <= SPLIT_TOLERANCE


# ---- the receiver's checks -----------------------------------------------------------------------------


def corrupt(state: dict[str, torch.Tensor], how: str) -> dict[str, torch.Tensor]:
    state = dict(state)
    if how == "shape":
        state["stage/a/2"] = state["stage/a/2"][:, :, :4]
    elif how == "dtype":
        state["stage/a/2"] = state["stage/a/2"].double()
    elif how == "nan":
        state["stage/a/2"] = state["stage/a/2"].clone().fill_(float("nan"))
    elif how == "unknown":
        state["stage/z/9"] = torch.zeros(1)
    elif how == "missing":
        del state["gate/code"]
    elif how == "selection":
        state["gate/selected"] = torch.zeros_like(state["gate/selected"])
    elif how == "selection-dtype":
        state["gate/selected"] = state["gate/selected"].float()
    elif how == "weights":
        state["gate/weights"] = state["gate/weights"] * 3
    elif how == "seed":
        state["seed"] = torch.tensor([1, 2])
    return state


@pytest.mark.parametrize(
    ("how", "message"),
    [
        (
            "shape",
            r"'stage/a/2': expected torch.float32 of shape \((\d+), 4, 8, 8\), received .* \(\1, 4, 4, 8\)",
        ),
        ("dtype", "received torch.float64"),
        ("nan", "'stage/a/2': non-finite values"),
        ("unknown", r"unknown keys \['stage/z/9'\]"),
        ("missing", r"missing keys \['gate/code'\]"),
        ("selection", "select squad members only, at least one"),
        ("selection-dtype", "'gate/selected': expected torch.bool"),
        ("weights", r"expected values in \[0, 1\]"),
        ("seed", "'seed': expected a non-negative int64 scalar"),
    ],
)
def test_a_bad_state_is_rejected_with_the_reason(how: str, message: str):
    model = two_learner_model(top_k=2)
    state = generate_head(model, 4, 2, seed=0)

    with pytest.raises(ValueError, match=message):
        generate_tail(model, corrupt(state, how), 2)


def test_unknown_cuts_and_bad_bytes_are_rejected():
    model = two_learner_model(top_k=2)
    state = generate_head(model, 2, 1, seed=0)

    with pytest.raises(ValueError, match=r"cut: expected one of the stages \[1, 2, 3\], received 0"):
        generate_head(model, 2, 0, seed=0)
    with pytest.raises(ValueError, match=r"cut: expected one of the stages \[1, 2, 3\], received 7"):
        check_split_state(model, state, 7)
    with pytest.raises(ValueError, match="missing keys"):  # a state for cut 1 is not one for cut 2
        check_split_state(model, state, 2)
    with pytest.raises(ValueError, match="expected safetensors bytes"):
        split_state_from_bytes(model, b"\x00" * 16, 1)
    with pytest.raises(ValueError, match="seed: expected an int in"):
        generate_head(model, 2, 1, seed=-1)
    with pytest.raises(ValueError, match="expected at most 1 images, received 2"):
        split_state_from_bytes(model, split_state_to_bytes(state), 1, max_batch=1)
