"""The end-of-run measurements without Ray: personalisation of a published task model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch

from baim.decompose import decompose
from baim.relay import mean_deltas
from orchestrator.core.artifacts import pack_module
from orchestrator.core.names import BAIM_OWNER, task_owner
from orchestrator.core.registry import Registry
from orchestrator.core.reports import RunReport
from orchestrator.core.scenario import PersonalisationConfig, UsersConfig
from orchestrator.data.partitions import make_partitions
from orchestrator.data.sources import resolve_source
from orchestrator.evaluation.evaluate import EvaluationOptions, RunEvaluation
from tests.support.models import tiny_baim
from tests.support.reports import bare_report, edge_row
from tests.support.scenarios import tiny_scenario


def personalised(tmp_path: Path, name: str, global_seed: int) -> tuple[float, float, int]:
    """(test loss before, after, FLOPs) of edge-0 personalising the published `male` task model, with the
    driver's global RNG seeded `global_seed` first (as if earlier work had drawn from it)."""
    scenario = tiny_scenario(tmp_path)
    registry = Registry(str(tmp_path / "registry"))
    if not registry.versions(task_owner("male")):
        model = decompose(tiny_baim(), "male")
        registry.put(task_owner("male"), "v000001", pack_module(model, model.spec()))
    document = bare_report()
    document["registry"] = str(tmp_path / "registry")
    document["edges"] = {"edge-0": {**edge_row(1_000, 100), "task": "male"}}
    document["tasks"] = {"male": {"params": 1, "baim_params": 1, "learners": ["e2"], "test_loss": 0.1,
                                  "test_images": 1, "decomposition_max_abs_diff": 0.0,
                                  "artifact": "task/male@v000001", "sha256": "ab" * 32}}  # fmt: skip
    source = resolve_source(scenario.data)
    options = EvaluationOptions(personalise_epochs=1, run_fedavg=False, image_quality=False)
    evaluation = RunEvaluation(
        RunReport.model_validate(document), scenario, source, make_partitions(source, scenario),
        tmp_path / name, options,
    )  # fmt: skip
    torch.manual_seed(global_seed)
    section = evaluation._personalise()
    assert section.enabled
    row = section.edges["edge-0"]
    return row.test_loss_before, row.test_loss_after, row.flops


def test_personalisation_gives_the_same_numbers_whatever_the_global_rng_holds(tmp_path: Path) -> None:
    # Execute: the same personalisation after two different histories of the driver's global RNG
    first = personalised(tmp_path, "first", global_seed=1)
    second = personalised(tmp_path, "second", global_seed=2)

    # Assert: bit for bit (the loss changed, so training happened)
    assert first == second
    assert first[1] != first[0] and first[2] > 0


def lora_evaluation(tmp_path: Path, *, relay: bool) -> RunEvaluation:
    """edge-0 personalises `male` with rank-2 adapters; the BAIM it came from is the run's kept BAIM."""
    scenario = tiny_scenario(tmp_path)
    scenario = scenario.model_copy(
        update={"personalisation": PersonalisationConfig(method="lora", rank=2, relay=relay, lr=0.01)}
    )
    registry = Registry(str(tmp_path / "registry"))
    baim = tiny_baim()
    registry.put(BAIM_OWNER, "v000001", pack_module(baim, baim.spec()))
    model = decompose(baim, "male")
    registry.put(task_owner("male"), "v000001", pack_module(model, model.spec()))
    document = bare_report()
    document["registry"] = str(tmp_path / "registry")
    document["cloud"]["baim_version"] = "v000001"
    document["edges"] = {"edge-0": {**edge_row(1_000, 100), "task": "male"}}
    document["tasks"] = {"male": {"params": 1, "baim_params": 1, "learners": ["e2"], "test_loss": 0.1,
                                  "test_images": 1, "decomposition_max_abs_diff": 0.0,
                                  "artifact": "task/male@v000001", "sha256": "ab" * 32}}  # fmt: skip
    source = resolve_source(scenario.data)
    options = EvaluationOptions(personalise_epochs=2, run_fedavg=False, image_quality=False)
    return RunEvaluation(
        RunReport.model_validate(document), scenario, source, make_partitions(source, scenario),
        tmp_path / "out", options,
    )  # fmt: skip


def test_lora_personalisation_trains_and_reports_only_the_adapters(tmp_path: Path) -> None:
    # Execute
    evaluation = lora_evaluation(tmp_path, relay=False)
    section = evaluation._personalise()

    # Assert: the row counts the adapters, and what would be relayed is exactly their safetensors bytes
    assert section.enabled
    row = section.edges["edge-0"]
    ((edge_id, version, weights, spec),) = evaluation.relay_uploads["male"]
    assert (row.method, edge_id, version) == ("lora", "edge-0", "v000001")
    assert row.upload_bytes == len(weights) and json.loads(spec)["rank"] == 2
    assert 0 < row.trainable_params < row.params  # rank 2 on tiny layers: about a third
    assert row.upload_bytes < row.bytes_received / 2
    assert row.test_loss_after < row.test_loss_before


def test_relay_folds_valid_adapters_rejects_poisoned_ones_and_measures_the_change(tmp_path: Path) -> None:
    # Prepare: edge-0's real adapters, and three more edges relaying a NaN copy, a scaled copy and a copy
    # with one tensor of the wrong shape
    evaluation = lora_evaluation(tmp_path, relay=True)
    evaluation._personalise()
    ((_, version, weights, spec),) = evaluation.relay_uploads["male"]
    state = safetensors.torch.load(weights)
    poisoned = {key: torch.full_like(t, float("nan")) for key, t in state.items()}
    scaled = {key: t * 1000 for key, t in state.items()}
    first = sorted(state)[0]
    reshaped = {**state, first: torch.zeros(state[first].shape[0] + 1, *state[first].shape[1:])}
    for edge, tensors in (("edge-9", poisoned), ("edge-8", scaled), ("edge-7", reshaped)):
        evaluation.relay_uploads["male"].append((edge, version, safetensors.torch.save(tensors), spec))
    scenario = evaluation.scenario
    edges = [*scenario.edges] + [
        scenario.edges[0].model_copy(update={"id": edge}) for edge in ("edge-7", "edge-8", "edge-9")
    ]
    evaluation.scenario = scenario.model_copy(update={"edges": edges})

    # Execute
    section = evaluation._relay()

    # Assert
    assert section.enabled
    task = section.tasks["male"]
    assert task.folded == ["edge-0"]
    assert set(task.rejected) == {"edge-7", "edge-8", "edge-9"}
    assert "non-finite" in task.rejected["edge-9"] and task.rejected["edge-9"].startswith("invalid")
    assert "exceeds 5" in task.rejected["edge-8"]
    assert "expected torch.float32 of shape" in task.rejected["edge-7"]
    assert task.upload_bytes == sum(len(w) + len(s) for _, _, w, s in evaluation.relay_uploads["male"])
    assert task.candidate_test_loss != task.test_loss_before
    # the guard: kept means the candidate's losses, rejected means the old model's, and the verdict agrees
    # with the held-out losses it compared
    no_task_worse = all(
        section.holdout_loss_after[t] <= section.holdout_loss_before[t] for t in section.holdout_loss_before
    )
    assert section.guarded and section.accepted == no_task_worse
    kept = task.candidate_test_loss if section.accepted else task.test_loss_before
    assert task.test_loss_after == pytest.approx(kept, rel=1e-6)
    assert (section.baim_version is not None) == section.accepted


def test_relay_is_off_unless_asked(tmp_path: Path) -> None:
    evaluation = lora_evaluation(tmp_path, relay=False)
    evaluation._personalise()
    assert evaluation._relay().enabled is False


def edge_speed(evaluation: RunEvaluation) -> float:
    return evaluation.scenario.edge("edge-0").gflops


def test_placements_are_measured_for_edges_with_users(tmp_path: Path) -> None:
    # Prepare: edge-0 (task male) gets 20 users on a slow uplink
    evaluation = lora_evaluation(tmp_path, relay=False)
    users = UsersConfig(count=20, requests_per_second=0.5, images_per_request=4)
    edges = [
        edge.model_copy(update={"users": users}) if edge.id == "edge-0" else edge
        for edge in evaluation.scenario.edges
    ]
    evaluation.scenario = evaluation.scenario.model_copy(update={"edges": edges})

    # Execute
    section = evaluation._placements()

    # Assert: all_cloud, one split per decoder stage, all_edge; the choice is the least latency
    assert section.enabled and set(section.edges) == {"edge-0"}
    edge = section.edges["edge-0"]
    names = [p.name for p in edge.placements]
    assert names[0] == "all_cloud" and names[-1] == "all_edge" and len(names) > 2
    assert edge.chosen == min(edge.placements, key=lambda p: p.latency_s).name
    assert edge.requests_per_second == 10.0
    by_name = {p.name: p for p in edge.placements}
    assert by_name["all_edge"].uplink_bytes == 0 and by_name["all_cloud"].edge_flops == 0
    flops = by_name["all_edge"].edge_flops
    assert by_name["all_edge"].edge_utilisation == pytest.approx(
        10.0 * flops / (edge_speed(evaluation) * 1e9)
    )


def test_relayed_deltas_average_per_parameter_and_leave_the_gate_out() -> None:
    one, two = torch.ones(2), torch.full((2,), 3.0)
    deltas = [
        {"learners.a.w": one, "learners.s.w": one, "gate.encoder.fc.weight": one},
        {"learners.b.w": two, "learners.s.w": two},
    ]
    averaged = mean_deltas(deltas)
    assert set(averaged) == {"learners.a.w", "learners.b.w", "learners.s.w"}
    assert torch.equal(averaged["learners.a.w"], one) and torch.equal(averaged["learners.b.w"], two)
    assert torch.equal(averaged["learners.s.w"], torch.full((2,), 2.0))  # shared: the mean, not the sum
