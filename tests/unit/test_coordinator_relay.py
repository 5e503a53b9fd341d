"""The coordinator's relay: adapters validated like uploads, a relay round published as new versions."""

from __future__ import annotations

from pathlib import Path

import safetensors.torch
import torch
from torch.utils.data import DataLoader

from actors.coordinator import CloudCoordinator
from baim.adapters import LoRAConfig, adapter_to_bytes, apply_lora, lora_parameters
from baim.decompose import TaskModel
from orchestrator.core.names import task_owner
from orchestrator.core.registry import Registry
from orchestrator.core.scenario import PersonalisationConfig, Scenario
from orchestrator.data.datasets import FaceDataset
from orchestrator.data.partitions import make_partitions
from orchestrator.data.sources import resolve_source
from serve.client import personalise
from tests.support.coordinator import learner_payload, make_coordinator, upload_kwargs
from tests.support.loop import LoopThread
from tests.support.scenarios import tiny_scenario


def relaying_scenario(tmp_path: Path) -> Scenario:
    scenario = tiny_scenario(
        tmp_path, strategies=["finetune"], epochs=1, fusion={"min_new_models": 2, "max_wait_seconds": 1000}
    )
    relay = PersonalisationConfig(method="lora", rank=2, relay=True, relay_method="fold_own", lr=0.01)
    return scenario.model_copy(update={"personalisation": relay})


def personalised_adapter(scenario: Scenario, registry: Registry, edge_id: str) -> tuple[bytes, str]:
    """What `edge_id` relays: rank-2 adapters on its downloaded task model, trained 1 epoch on its shard."""
    task = scenario.edge(edge_id).task
    model = registry.load_module(task_owner(task), "v000001", TaskModel)
    source = resolve_source(scenario.data)
    shard = FaceDataset(source, make_partitions(source, scenario).edges[edge_id], scenario.data.resolution)
    apply_lora(model, LoRAConfig(rank=2, alpha=2.0, seed=0))
    torch.manual_seed(0)
    personalise(model, DataLoader(shard, batch_size=16), 1, 0.01, trainable=lora_parameters(model))
    return adapter_to_bytes(model)


def finished_run(tmp_path: Path, loop: LoopThread) -> tuple[Scenario, CloudCoordinator, Registry]:
    """A relaying scenario's finished run: edge-0 and edge-2 uploaded, BAIM and task models v000001."""
    scenario = relaying_scenario(tmp_path)
    coordinator = make_coordinator(scenario, tmp_path / "registry")
    for edge_id in ("edge-0", "edge-2"):
        loop.run(coordinator.upload(**upload_kwargs(edge_id, learner_payload(scenario, edge_id))))
    loop.run(coordinator.finish(), timeout=300)
    return scenario, coordinator, Registry(str(tmp_path / "registry"))


def test_relayed_adapters_are_validated_and_a_relay_round_publishes_only_when_accepted(
    tmp_path: Path, loop: LoopThread
) -> None:
    # Prepare: a finished run (BAIM and task models v000001), then edge-0's personalised adapter
    scenario, coordinator, registry = finished_run(tmp_path, loop)
    weights, spec = personalised_adapter(scenario, registry, "edge-0")
    state = safetensors.torch.load(weights)
    first = sorted(state)[0]
    nan = safetensors.torch.save({key: torch.full_like(t, float("nan")) for key, t in state.items()})
    reshaped = safetensors.torch.save({**state, first: torch.zeros(state[first].shape[0] + 1)})

    def relay(edge: str, task: str, version: str, body: bytes) -> dict[str, object]:
        return loop.run(coordinator.relay(edge, task, version, body, spec))

    # Execute: poisoned, stale and misaddressed relays, then the real one
    answers = {
        "nan": relay("edge-0", "male", "v000001", nan),
        "shape": relay("edge-0", "male", "v000001", reshaped),
        "stale": relay("edge-0", "male", "v000000", weights),
        "task": relay("edge-0", "female", "v000001", weights),
        "edge": relay("edge-99", "male", "v000001", weights),
        "good": relay("edge-0", "male", "v000001", weights),
    }
    record = loop.run(coordinator.relay_round(), timeout=300)
    again = loop.run(coordinator.relay_round(), timeout=300)
    late = relay("edge-0", "male", "v000001", weights)  # trained on the model the round replaced

    # Assert: each bad relay rejected with its reason, the coordinator still answering
    assert answers["nan"]["reason"] == "invalid" and "non-finite" in str(answers["nan"]["detail"])
    assert answers["shape"]["reason"] == "invalid" and "of shape" in str(answers["shape"]["detail"])
    reasons = [answers[k]["reason"] for k in ("stale", "task", "edge")]
    assert reasons == ["stale", "wrong_task", "unknown_edge"]
    assert answers["good"]["accepted"] and answers["good"]["nbytes"] == len(weights) + len(spec)
    # The round took the one good adapter in; its own learner's fold lowered both held-out losses (seeded),
    # so the guard accepted it and it was published: the BAIM and every task model as v000002, and the
    # coordinator continues from it
    assert record is not None and record["tasks"]["male"]["edges"] == ["edge-0"]
    before, after = record["holdout_loss_before"], record["holdout_loss_after"]
    assert all(after[task] <= before[task] for task in before) and record["accepted"]
    assert registry.versions("baim") == ["v000001", "v000002"]
    assert registry.versions("task/male") == ["v000001", "v000002"]
    assert record["task_versions"] == {"male": "task/male@v000002", "female": "task/female@v000002"}
    assert loop.run(coordinator.status())["baim_version"] == "v000002"
    assert again is None  # nothing pending any more
    assert late["reason"] == "stale" and "v000002" in str(late["detail"])


def test_a_relayed_adapter_survives_a_coordinator_restart_and_one_stale_by_then_is_dropped(
    tmp_path: Path, loop: LoopThread
) -> None:
    # Prepare: a finished run, edge-0's adapter accepted; then the coordinator is gone before its relay round
    scenario, coordinator, registry = finished_run(tmp_path, loop)
    weights, spec = personalised_adapter(scenario, registry, "edge-0")
    assert loop.run(coordinator.relay("edge-0", "male", "v000001", weights, spec))["accepted"]
    del coordinator

    # Execute: a new coordinator on the same registry resumes, runs the round, and a third resumes after it
    resumed = make_coordinator(scenario, tmp_path / "registry")
    pending = list(resumed.relay_desk.pending)
    record = loop.run(resumed.relay_round(), timeout=300)
    after_round = make_coordinator(scenario, tmp_path / "registry")

    # Assert: the resumed desk validated the adapter again and took it in; nothing is pending after the round
    assert pending == ["edge-0"]
    assert record is not None and record["tasks"]["male"]["edges"] == ["edge-0"]
    assert after_round.relay_desk.pending == {}
    assert registry.blobs("relay") == []


def test_a_pending_adapter_whose_model_was_replaced_before_the_restart_is_dropped_on_resume(
    tmp_path: Path, loop: LoopThread
) -> None:
    scenario, coordinator, registry = finished_run(tmp_path, loop)
    weights, spec = personalised_adapter(scenario, registry, "edge-0")
    assert loop.run(coordinator.relay("edge-0", "male", "v000001", weights, spec))["accepted"]
    model = registry.get(task_owner("male"), "v000001")
    registry.put(task_owner("male"), "v000002", model)  # a newer male model is published meanwhile

    resumed = make_coordinator(scenario, tmp_path / "registry")

    assert resumed.relay_desk.pending == {}
    assert registry.blobs("relay") == []
    assert registry.get_json("relay/pending") == {}
