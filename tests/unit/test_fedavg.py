"""FedAvgBaseline (the strategy, no Ray) and EdgeNode.fedavg_round as a plain class."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as safetensors_save

from actors.edge import EdgeNode
from baim.config import LearnerSpec
from baim.costs import count_params
from baim.learners import VAELearner
from orchestrator.baselines.fedavg import (
    FedAvgBaseline,
    FitFailure,
    FitResult,
    global_spec,
    homogeneous_spec,
    loss_text,
    stop_reason,
)
from orchestrator.core.artifacts import ArtifactPayload, canonical_json, pack_state
from orchestrator.core.scenario import FedAvgConfig, Scenario
from orchestrator.data.partitions import make_partitions
from orchestrator.data.sources import resolve_source
from tests.support.scenarios import tiny_scenario

SPEC = LearnerSpec(widths=(4,), latent_dim=2, resolution=8)


def constant_state(value: float) -> dict[str, torch.Tensor]:
    """Every tensor of SPEC's learner filled with `value`."""
    return {name: torch.full_like(t, value) for name, t in VAELearner(SPEC).state_dict().items()}


def update(client_id: str, state: dict[str, torch.Tensor], num_examples: int) -> FitResult:
    payload = pack_state(state, {**global_spec(SPEC, 1), "edge_id": client_id})
    return FitResult(client_id, payload, num_examples)


def test_fedavg_of_identical_client_models_is_the_identity() -> None:
    # Prepare
    strategy = FedAvgBaseline(spec=SPEC, seed=3)
    global_state = strategy.initialize_parameters()
    client_state = {name: t + 0.25 for name, t in global_state.items()}
    results = [update("a", client_state, 10), update("b", client_state, 30), update("c", client_state, 7)]

    # Execute
    aggregate = strategy.aggregate_fit(1, results, [], global_state)

    # Assert
    assert aggregate.updated and aggregate.aggregated == ["a", "b", "c"]
    for name, tensor in client_state.items():
        assert torch.equal(aggregate.state[name], tensor), name


def test_weighted_average_by_shard_size_matches_a_hand_computation() -> None:
    # Prepare: shard sizes 1 and 3, every weight 1.0 and 5.0: (1 * 1 + 3 * 5) / 4 = 4.0
    strategy = FedAvgBaseline(spec=SPEC)
    results = [update("small", constant_state(1.0), 1), update("large", constant_state(5.0), 3)]

    # Execute
    aggregate = strategy.aggregate_fit(1, results, [], constant_state(0.0))

    # Assert
    for name, tensor in aggregate.state.items():
        assert torch.equal(tensor, torch.full_like(tensor, 4.0)), name


def test_a_nan_update_is_rejected_and_the_round_proceeds_with_the_rest() -> None:
    # Prepare
    strategy = FedAvgBaseline(spec=SPEC)
    crashed = FitFailure("gone", "crashed", "actor died")
    results = [update("good", constant_state(2.0), 5), update("bad", constant_state(float("nan")), 5)]

    # Execute
    aggregate = strategy.aggregate_fit(2, results, [crashed], constant_state(0.0))

    # Assert
    assert aggregate.updated and aggregate.aggregated == ["good"]
    assert [(f.client_id, f.reason) for f in aggregate.failures] == [("gone", "crashed"), ("bad", "rejected")]
    assert "NaN" in aggregate.failures[1].detail
    assert all(torch.equal(t, torch.full_like(t, 2.0)) for t in aggregate.state.values())


def test_an_update_for_another_architecture_is_rejected() -> None:
    # Prepare
    strategy = FedAvgBaseline(spec=SPEC)
    other = LearnerSpec(widths=(8,), latent_dim=2, resolution=8)
    wrong = pack_state(VAELearner(other).state_dict(), {"kind": "learner", "learner": other.to_dict()})
    tampered_shape = constant_state(1.0)
    tampered_shape["fc_mu.bias"] = torch.zeros(3)

    # Execute
    aggregate = strategy.aggregate_fit(
        1,
        [FitResult("other", wrong, 4), update("shape", tampered_shape, 4)],
        [],
        constant_state(0.5),
    )

    # Assert: nothing usable, the global model is kept
    assert not aggregate.updated and aggregate.aggregated == []
    assert [f.reason for f in aggregate.failures] == ["rejected", "rejected"]
    assert "spec" in aggregate.failures[0].detail
    assert "fc_mu.bias" in aggregate.failures[1].detail
    assert all(torch.equal(t, torch.full_like(t, 0.5)) for t in aggregate.state.values())


def test_without_accept_failures_a_failed_client_keeps_the_global_model() -> None:
    # Prepare
    strategy = FedAvgBaseline(spec=SPEC, accept_failures=False)
    results = [update("good", constant_state(2.0), 5)]

    # Execute
    aggregate = strategy.aggregate_fit(1, results, [FitFailure("x", "crashed")], constant_state(0.0))

    # Assert
    assert not aggregate.updated
    assert all(torch.equal(t, torch.zeros_like(t)) for t in aggregate.state.values())


def test_client_sampling_is_seeded_and_honours_the_fraction() -> None:
    # Prepare
    clients = [f"edge-{i}" for i in range(10)]
    strategy = FedAvgBaseline(spec=SPEC, seed=11, fraction_fit=0.3)

    # Execute
    first = strategy.configure_fit(1, clients)
    again = FedAvgBaseline(spec=SPEC, seed=11, fraction_fit=0.3).configure_fit(1, list(reversed(clients)))
    per_round = {tuple(strategy.configure_fit(r, clients)) for r in range(1, 9)}

    # Assert
    assert len(first) == 3 and set(first) <= set(clients)
    assert first == again  # same seed and round, same clients, whatever the order they are listed in
    assert len(per_round) > 1  # rounds draw different samples
    assert strategy.configure_fit(1, ["only"]) == ["only"]  # at least min_fit_clients = 1
    assert strategy.configure_fit(1, []) == []


def test_bad_strategy_options_are_named() -> None:
    with pytest.raises(ValueError, match="fraction_fit"):
        FedAvgBaseline(spec=SPEC, fraction_fit=0.0)
    with pytest.raises(ValueError, match="min_fit_clients"):
        FedAvgBaseline(spec=SPEC, min_fit_clients=0)


def test_the_homogeneous_model_is_the_largest_edge_model_unless_configured(tmp_path: Path) -> None:
    # Prepare
    scenario = tiny_scenario(tmp_path)
    specs = [
        LearnerSpec(tuple(e.model.widths), e.model.latent_dim, scenario.data.resolution)
        for e in scenario.all_edges()
    ]
    largest = max(specs, key=lambda s: count_params(VAELearner(s)))
    document = scenario.model_dump(mode="json")
    document["baselines"]["fedavg"]["model"] = {"widths": [4, 4], "latent_dim": 3}

    # Execute
    default = homogeneous_spec(scenario)
    configured = homogeneous_spec(Scenario.model_validate(document))

    # Assert
    assert default == largest
    assert configured == LearnerSpec((4, 4), 3, scenario.data.resolution)


def test_edge_fedavg_round_trains_the_global_model_and_returns_its_serialized_update(tmp_path: Path) -> None:
    # Prepare
    scenario = tiny_scenario(tmp_path)
    source = resolve_source(scenario.data)
    partitions = make_partitions(source, scenario)
    edge = EdgeNode(
        scenario.edge("edge-0"),
        source,
        partitions.edges["edge-0"],
        resolution=scenario.data.resolution,
        scenario_seed=scenario.seed,
        kld_weight=scenario.cloud.kld_weight,
        time_scale=0.0,
    )
    spec = homogeneous_spec(scenario)
    strategy = FedAvgBaseline(spec=spec, seed=scenario.seed)
    global_state = strategy.initialize_parameters()
    sent = pack_state(global_state, global_spec(spec, 1))

    # Execute
    weights, spec_json, sha256, report_json = edge.fedavg_round(
        sent.weights, sent.spec_json, sent.sha256, 1, 1
    )
    again = edge.fedavg_round(sent.weights, sent.spec_json, sent.sha256, 1, 1)

    # Assert
    report = json.loads(report_json)
    assert report["status"] == "trained" and report["round"] == 1
    assert report["flops"] > 0 and report["train_loss"] > 0
    received = ArtifactPayload(weights, spec_json, sha256)
    aggregate = strategy.aggregate_fit(1, [FitResult("edge-0", received, 48)], [], global_state)
    assert aggregate.updated  # verified: same spec and shapes, finite
    assert not all(torch.equal(aggregate.state[k], global_state[k]) for k in global_state)  # it trained
    # The bytes sent are the safetensors bytes of the state plus the canonical JSON spec, nothing else.
    expected_spec = canonical_json({**global_spec(spec, 1), "edge_id": "edge-0"}).decode()
    assert spec_json == expected_spec
    assert len(weights) == len(safetensors_save(aggregate.state))
    assert received.nbytes == len(safetensors_save(aggregate.state)) + len(expected_spec.encode())
    assert again[0] == weights  # same seed and round, same update


def test_progress_loss_text_survives_a_loss_measured_on_nothing() -> None:
    # mean_test_loss is None when no task has test images; the progress line used to raise TypeError.
    assert loss_text(None) == "n/a"
    assert loss_text(0.123456789) == "0.12346"


@pytest.mark.parametrize(
    ("aggregation", "options", "expected", "used"),
    [
        ("median", {}, 2.0, ["a", "b", "c"]),  # median of 1, 2, 100
        ("trimmed_mean", {"trim_proportion": 0.34}, 2.0, ["a", "b", "c"]),  # int(0.34 * 3) = 1 cut each end
        # Krum with f = 0: n - f - 2 = 1 neighbour; scores |1-2|^2, |2-1|^2, |100-2|^2 per coordinate: a, b
        # tie, the earlier wins
        ("krum", {"krum_num_malicious": 0}, 1.0, ["a"]),
        # Multi-Krum keeping 2: a and b averaged by shard size (10 * 1 + 30 * 2) / 40 = 1.75
        ("krum", {"krum_num_malicious": 0, "krum_to_keep": 2}, 1.75, ["a", "b"]),
    ],
)
def test_robust_aggregations_ignore_an_outlier_update(
    aggregation: str, options: dict[str, float], expected: float, used: list[str]
) -> None:
    # Prepare: client c sends every weight x100 the others'
    strategy = FedAvgBaseline(spec=SPEC, aggregation=aggregation, **options)  # type: ignore[arg-type]
    results = [
        update("a", constant_state(1.0), 10),
        update("b", constant_state(2.0), 30),
        update("c", constant_state(100.0), 20),
    ]

    # Execute
    aggregate = strategy.aggregate_fit(1, results, [], constant_state(0.0))

    # Assert
    assert aggregate.aggregated == used
    for name, tensor in aggregate.state.items():
        assert torch.allclose(tensor, torch.full_like(tensor, expected)), name


def test_an_unknown_aggregation_is_named() -> None:
    with pytest.raises(ValueError, match="aggregation: expected one of mean, median, trimmed_mean, krum"):
        FedAvgBaseline(spec=SPEC, aggregation="mode")


def test_fedavg_stops_at_the_target_or_on_a_plateau_else_goes_on() -> None:
    target = FedAvgConfig(target_loss=0.5)
    assert stop_reason([0.9, 0.6], target) is None
    assert stop_reason([0.9, 0.5], target) == "target"
    plateau = FedAvgConfig(plateau_patience=2, plateau_min_delta=0.01)
    assert stop_reason([0.9, 0.6, 0.595], plateau) is None  # one round without a 0.01 improvement
    assert stop_reason([0.9, 0.6, 0.595, 0.61], plateau) == "plateau"
    assert stop_reason([0.9, 0.6, 0.595, 0.5], plateau) is None
    assert stop_reason([], plateau) is None
    assert stop_reason([0.1, 0.1, 0.1], FedAvgConfig()) is None  # neither configured: only the cap
