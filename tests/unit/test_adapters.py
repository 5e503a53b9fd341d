"""LoRA adapters: exact math per layer type, base weights untouched, merge exact, uploads validated."""

from __future__ import annotations

import copy
import hashlib
import json

import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from baim.adapters import (
    LoRAConfig,
    adapted_layers,
    adapter_bytes,
    adapter_from_bytes,
    adapter_spec,
    adapter_state,
    adapter_to_bytes,
    add_weight_deltas,
    apply_lora,
    config_from_spec,
    load_adapter_state,
    lora_parameters,
    lora_weight_deltas,
    merge_lora,
    strip_lora,
    target_layers,
    unmerge_lora,
    validate_adapter_state,
)
from baim.config import LearnerSpec
from baim.costs import count_params, count_trainable_params
from baim.decompose import TaskModel, decompose
from baim.learners import VAELearner
from baim.model import BAIM
from baim.training import evaluate, make_optimizer, train_epoch
from tests.support.baim_random import RESOLUTION, BAIMRecipe, baim_recipes, images, randomise_connections

MERGE_TOLERANCE = 1e-5


def task_model(seed: int = 0) -> TaskModel:
    """A two-learner task model (plus a feeder from the other task) on 16x16 images."""
    torch.manual_seed(seed)
    learners = [
        ("a", "t0", VAELearner(LearnerSpec((4, 6), 3, RESOLUTION))),
        ("b", "t1", VAELearner(LearnerSpec((3,), 2, RESOLUTION))),
        ("c", "t0", VAELearner(LearnerSpec((5, 4), 4, RESOLUTION))),
    ]
    baim = BAIM.from_learners(["t0", "t1"], learners, top_k=2, connection_height=1, seed=seed)
    randomise_connections(baim, seed)
    return decompose(baim, "t0")


def base_hash(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        if ".lora." not in key:
            digest.update(key.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def randomise_adapters(model: nn.Module, seed: int, scale: float = 0.2) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=generator) * scale)


def loss_fn(module: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    return module(batch, seed=0).loss


# ---- math ----------------------------------------------------------------------------------------------


def test_linear_delta_is_scaled_b_times_a_by_hand():
    # Prepare
    layer = nn.Linear(2, 2, bias=False)
    apply_lora(layer, LoRAConfig(rank=1, alpha=2.0, target_modules=("Linear",)))
    with torch.no_grad():
        layer.lora.A.copy_(torch.tensor([[1.0, 2.0]]))
        layer.lora.B.copy_(torch.tensor([[3.0], [-1.0]]))
        layer.weight.zero_()

    # Execute
    out = layer(torch.tensor([[1.0, 1.0]]))

    # Assert: s = 2 / 1; A x = 3; B (A x) = (9, -3); times s = (18, -6)
    assert torch.equal(out, torch.tensor([[18.0, -6.0]]))
    assert torch.equal(layer.lora.delta_weight(), torch.tensor([[6.0, 12.0], [-2.0, -4.0]]))


@pytest.mark.parametrize(
    "layer",
    [
        nn.Linear(10, 6),
        nn.Conv2d(3, 4, kernel_size=3, stride=2, padding=1),
        nn.Conv2d(3, 5, kernel_size=(3, 1), padding=(2, 0), dilation=2),
        nn.ConvTranspose2d(4, 3, kernel_size=3, stride=2, padding=1, output_padding=1),
        nn.ConvTranspose2d(2, 3, kernel_size=4, stride=3, padding=2, output_padding=1, dilation=1),
        nn.Conv2d(6, 2, kernel_size=1, bias=False),
    ],
    ids=["linear", "conv", "conv-dilated", "conv-transpose", "conv-transpose-stride3", "conv1x1"],
)
def test_merged_layer_equals_adapted_layer(layer: nn.Module):
    # Prepare
    torch.manual_seed(0)
    x = torch.randn(3, 10) if isinstance(layer, nn.Linear) else torch.randn(2, layer.in_channels, 7, 7)
    base = layer(x)
    apply_lora(layer, LoRAConfig(rank=3, alpha=5.0))
    randomise_adapters(layer, seed=1)
    adapted = layer(x)

    # Execute
    merge_lora(layer)
    merged = layer(x)

    # Assert
    assert (adapted - base).abs().max() > 1e-2  # the adapter does change the layer
    assert (merged - adapted).abs().max() <= MERGE_TOLERANCE
    unmerge_lora(layer)
    assert (layer(x) - adapted).abs().max() <= MERGE_TOLERANCE


def test_parameter_counts_by_hand():
    # Linear(10, 6) rank 2: A 2*10 + B 6*2 = 32; Conv2d(3, 4, 3x3): A 2*3*9 + B 4*2 = 62;
    # ConvTranspose2d(4, 3, 3x3): A 4*2*9 + B 3*2 = 78.
    model = nn.Sequential(nn.Linear(10, 6), nn.Conv2d(3, 4, 3), nn.ConvTranspose2d(4, 3, 3))
    base = count_params(model)

    apply_lora(model, LoRAConfig(rank=2))

    assert count_trainable_params(model) == 32 + 62 + 78
    assert count_params(model) == base + 32 + 62 + 78
    assert adapter_bytes(model) == len(safetensors.torch.save(adapter_state(model)))


# ---- on a task model -----------------------------------------------------------------------------------


def test_fresh_adapters_change_no_output_and_keep_the_base_keys():
    model = task_model()
    x = images(4, 1)
    before_recon, before_images = model(x, seed=3).recon, model.generate(3, seed=5)
    base_keys = set(model.state_dict())

    names = apply_lora(model, LoRAConfig(rank=2))

    assert torch.equal(model(x, seed=3).recon, before_recon)
    assert torch.equal(model.generate(3, seed=5), before_images)
    assert isinstance(model, TaskModel)
    assert base_keys <= set(model.state_dict())
    assert set(model.state_dict()) - base_keys == {f"{n}.lora.{t}" for n in names for t in ("A", "B")}
    assert set(adapter_state(model)) == set(model.state_dict()) - base_keys


def test_training_changes_only_adapters_and_lowers_the_loss_on_own_data():
    # Prepare
    model = task_model()
    apply_lora(model, LoRAConfig(rank=4, alpha=8.0, seed=2))
    hash_before = base_hash(model)
    adapters_before = {k: v.clone() for k, v in adapter_state(model).items()}
    data = [images(8, 10 + i) * 0.5 + 0.25 for i in range(2)]
    loss_before = evaluate(model, data, loss_fn)
    optimizer = make_optimizer(model, lr=0.01)

    # Execute
    torch.manual_seed(0)
    for _ in range(15):
        train_epoch(model, data, optimizer, loss_fn)

    # Assert
    assert optimizer.param_groups[0]["params"] == lora_parameters(model)
    assert all(not p.requires_grad for n, p in model.named_parameters() if ".lora." not in n)
    assert base_hash(model) == hash_before
    assert any(not torch.equal(v, adapters_before[k]) for k, v in adapter_state(model).items())
    assert evaluate(model, data, loss_fn) < loss_before


def test_merge_then_strip_gives_a_plain_task_model_with_the_adapted_outputs():
    # Prepare
    model = task_model()
    base_keys = set(model.state_dict())
    apply_lora(model, LoRAConfig(rank=3, alpha=3.0))
    randomise_adapters(model, seed=4, scale=0.1)
    x = images(4, 2)
    adapted_recon, adapted_images = model(x, seed=1).recon, model.generate(4, seed=6)

    # Execute
    merge_lora(model)
    merged_recon = model(x, seed=1).recon
    strip_lora(model)

    # Assert
    assert (merged_recon - adapted_recon).abs().max() <= MERGE_TOLERANCE
    assert set(model.state_dict()) == base_keys and adapted_layers(model) == []
    assert (model(x, seed=1).recon - adapted_recon).abs().max() <= MERGE_TOLERANCE
    assert (model.generate(4, seed=6) - adapted_images).abs().max() <= MERGE_TOLERANCE
    plain = TaskModel.from_spec(model.spec())
    plain.load_state_dict(model.state_dict(), strict=True)  # loads as an ordinary task model artifact


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(recipe=baim_recipes(), rank=st.integers(1, 3))
def test_merging_is_exact_on_random_pruned_task_models(recipe: BAIMRecipe, rank: int):
    model = decompose(recipe.build(), "t0")
    apply_lora(model, LoRAConfig(rank=rank, alpha=2.0, seed=recipe.seed))
    randomise_adapters(model, seed=recipe.seed, scale=0.1)
    x = images(3, recipe.seed)
    adapted_recon, adapted_images = model(x, seed=1).recon, model.generate(3, seed=2)

    merge_lora(model)

    assert (model(x, seed=1).recon - adapted_recon).abs().max() <= MERGE_TOLERANCE
    assert (model.generate(3, seed=2) - adapted_images).abs().max() <= MERGE_TOLERANCE


def test_strip_without_merge_restores_the_base_bit_for_bit():
    model = task_model()
    x = images(3, 2)
    before = model(x, seed=1).recon
    apply_lora(model, LoRAConfig(rank=2))
    randomise_adapters(model, seed=4)
    assert not torch.equal(model(x, seed=1).recon, before)

    strip_lora(model)

    assert torch.equal(model(x, seed=1).recon, before)


def test_weight_deltas_fold_into_another_copy_like_merging():
    model = task_model()
    other = copy.deepcopy(model)
    apply_lora(model, LoRAConfig(rank=2, target_modules=("*.decoder_stages.*",)))
    randomise_adapters(model, seed=7)
    x = images(3, 5)
    adapted = model(x, seed=2).recon

    add_weight_deltas(other, lora_weight_deltas(model))

    assert (other(x, seed=2).recon - adapted).abs().max() <= MERGE_TOLERANCE
    with pytest.raises(ValueError, match="not a parameter"):
        add_weight_deltas(other, {"baim.nope.weight": torch.zeros(1)})


def test_a_deep_copy_keeps_working_adapters_that_strip_cleanly():
    model = task_model()
    apply_lora(model, LoRAConfig(rank=2))
    randomise_adapters(model, seed=3)
    x = images(2, 1)

    twin = copy.deepcopy(model)

    assert torch.equal(twin(x, seed=0).recon, model(x, seed=0).recon)
    strip_lora(twin)
    assert adapted_layers(twin) == [] and len(adapted_layers(model)) > 0
    assert torch.equal(twin(x, seed=0).recon, task_model()(x, seed=0).recon)


# ---- targets and config --------------------------------------------------------------------------------


def test_targets_by_type_and_by_name_pattern():
    model = task_model()
    transposed = target_layers(model, ["ConvTranspose2d"])
    decoder_of_a = target_layers(model, ["baim.learners.a.decoder_stages.*"])

    assert transposed and all(isinstance(model.get_submodule(n), nn.ConvTranspose2d) for n in transposed)
    assert decoder_of_a and all(n.startswith("baim.learners.a.decoder_stages.") for n in decoder_of_a)
    # the projections' 1x1 convs and the gate's linear layer are reachable too
    assert any(n.startswith("baim.connections.") for n in target_layers(model, ["Conv2d"]))
    assert "baim.gate.encoder.fc" in target_layers(model, ["Linear"])


def test_unknown_targets_and_unsupported_layers_are_rejected_by_name():
    model = task_model()
    with pytest.raises(ValueError, match=r"\['Conv3d', 'nothing\.\*'\] select no layer"):
        apply_lora(model, LoRAConfig(target_modules=("Conv2d", "Conv3d", "nothing.*")))
    assert adapted_layers(model) == []
    with pytest.raises(ValueError, match="groups=1"):
        apply_lora(nn.Sequential(nn.Conv2d(4, 4, 3, groups=2)), LoRAConfig())
    apply_lora(model, LoRAConfig())
    with pytest.raises(ValueError, match="already has adapters"):
        apply_lora(model, LoRAConfig())


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"rank": 0}, "rank: expected an int in"),
        ({"rank": 2.0}, "rank: expected an int in"),
        ({"alpha": float("nan")}, "alpha: expected a finite number > 0"),
        ({"alpha": -1.0}, "alpha: expected a finite number > 0"),
        ({"target_modules": ()}, "target_modules: expected a non-empty list"),
        ({"target_modules": ("",)}, r"target_modules\[0\]"),
    ],
)
def test_bad_config_names_the_field(options: dict, message: str):
    with pytest.raises(ValueError, match=message):
        LoRAConfig(**options)


# ---- the relay: what travels and how it is checked -------------------------------------------------------


def edge_adapted(seed: int = 5) -> TaskModel:
    model = task_model()
    apply_lora(model, LoRAConfig(rank=2, alpha=4.0, target_modules=("ConvTranspose2d", "Linear")))
    randomise_adapters(model, seed=seed, scale=0.05)
    return model


def test_an_uploaded_adapter_rebuilds_the_same_model_on_the_receiver():
    edge = edge_adapted()
    weights, spec_json = adapter_to_bytes(edge)
    receiver = task_model()

    names = adapter_from_bytes(receiver, weights, spec_json, max_relative_delta=10.0)

    x = images(3, 3)
    assert names == adapted_layers(edge) == json.loads(spec_json)["layers"]
    assert torch.equal(receiver(x, seed=1).recon, edge(x, seed=1).recon)
    assert len(weights) == adapter_bytes(edge)


def poisoned(state: dict[str, torch.Tensor], how: str) -> dict[str, torch.Tensor]:
    state = dict(state)
    key = sorted(state)[0]
    if how == "nan":
        state[key] = state[key].clone().fill_(float("nan"))
    elif how == "shape":
        state[key] = torch.zeros(*state[key].shape, 2)
    elif how == "dtype":
        state[key] = state[key].double()
    elif how == "unknown":
        state["baim.learners.a.fc_mu.lora.C"] = torch.zeros(1)
    elif how == "missing":
        del state[key]
    return state


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("nan", "non-finite values"),
        ("shape", "expected torch.float32 of shape"),
        ("dtype", "received torch.float64"),
        ("unknown", r"unknown names \['baim.learners.a.fc_mu.lora.C'\]"),
        ("missing", "missing names"),
    ],
)
def test_poisoned_adapter_states_are_rejected_with_the_reason(how: str, message: str):
    edge = edge_adapted()
    receiver = task_model()
    apply_lora(receiver, config_from_spec(adapter_spec(edge)))
    bad = poisoned(adapter_state(edge), how)
    before = adapter_state(receiver)

    with pytest.raises(ValueError, match=message):
        load_adapter_state(receiver, bad)

    assert all(torch.equal(v, before[k]) for k, v in adapter_state(receiver).items())


def test_implausibly_large_adapters_are_rejected_when_bounded():
    edge = edge_adapted()
    receiver = task_model()
    apply_lora(receiver, config_from_spec(adapter_spec(edge)))
    huge = {k: v * 1000 for k, v in adapter_state(edge).items()}

    validate_adapter_state(receiver, huge)  # no bound: shapes and values are fine
    with pytest.raises(ValueError, match=r"\|\|delta\|\| / \|\|W\|\| = .* exceeds 0.5"):
        validate_adapter_state(receiver, huge, max_relative_delta=0.5)


def test_a_rejected_upload_leaves_the_receiver_as_it_was():
    edge = edge_adapted()
    weights, spec_json = adapter_to_bytes(edge)
    receiver = task_model()
    flags = [p.requires_grad for p in receiver.parameters()]
    bad_weights = safetensors.torch.save(poisoned(adapter_state(edge), "nan"))

    with pytest.raises(ValueError, match="non-finite"):
        adapter_from_bytes(receiver, bad_weights, spec_json)
    with pytest.raises(ValueError, match="expected safetensors bytes"):
        adapter_from_bytes(receiver, b"not safetensors", spec_json)
    with pytest.raises(ValueError, match="select no layer"):
        spec = json.loads(spec_json)
        spec["layers"] = ["baim.learners.zz.fc_mu"]
        adapter_from_bytes(receiver, weights, json.dumps(spec))
    with pytest.raises(ValueError, match="adapter spec kind"):
        adapter_from_bytes(receiver, weights, json.dumps({**json.loads(spec_json), "kind": "learner"}))

    assert adapted_layers(receiver) == []
    assert [p.requires_grad for p in receiver.parameters()] == flags
