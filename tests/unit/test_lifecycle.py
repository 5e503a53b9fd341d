"""Self-maintenance in the coordinator (no Ray): continual rounds, few-shot tasks, model-level pruning."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import ValidationError

from actors.coordinator import CloudCoordinator
from actors.receipt_log import ReceiptLog
from baim.model import BAIM
from orchestrator.core.receipts import CoordinatorSummary
from orchestrator.core.registry import Registry
from orchestrator.core.scenario import Scenario, format_validation_error
from tests.support.coordinator import make_coordinator, upload_kwargs
from tests.support.loop import LoopThread
from tests.support.scenarios import NEVER_TRAIN, tiny_scenario
from tests.support.uploads import valid_payload

LATE = {"id": "edge-4", "task": "male", "shard_size": 32, "model": {"widths": [8, 16], "latent_dim": 8},
        "batch_size": 16, "start": False}  # fmt: skip
NEW_TASK = {"kind": "new_task", "at_seconds": 1.0, "task": {"name": "glasses", "expression": "Eyeglasses"},
            "shots": 8}  # fmt: skip


def lifecycle_scenario(tmp_path: Path, **cloud: Any) -> Scenario:
    """tiny.yaml with a late male edge (edge-4), a new task with 8 shots, rounds only from finish()."""
    document = tiny_scenario(tmp_path).model_dump(mode="json")
    document["edges"].append(LATE)
    document["timeline"] = [{"kind": "join", "at_seconds": 1.0, "edge": "edge-4"}, NEW_TASK]
    document["cloud"].update({"fusion": NEVER_TRAIN, "few_shot_steps": 20, **cloud})
    return Scenario.model_validate(document)


def learner_hashes(baim: BAIM, names: list[str]) -> dict[str, str]:
    """sha256 over each learner's state_dict (names, shapes and bytes)."""
    hashes = {}
    for name in names:
        digest = hashlib.sha256()
        for key, tensor in baim.learner(name).state_dict().items():
            digest.update(key.encode() + str(tuple(tensor.shape)).encode())
            digest.update(tensor.detach().contiguous().numpy().tobytes())
        hashes[name] = digest.hexdigest()
    return hashes


def two_rounds(coordinator: CloudCoordinator, scenario: Scenario, loop: LoopThread) -> CoordinatorSummary:
    """Round 1 over edge-0..3 (finish), then edge-4 uploads and a second finish() trains round 2."""
    for edge_id in ("edge-0", "edge-1", "edge-2", "edge-3"):
        loop.run(coordinator.upload(**upload_kwargs(edge_id, valid_payload(scenario, edge_id, seed=1))))
    loop.run(coordinator.finish())
    loop.run(coordinator.upload(**upload_kwargs("edge-4", valid_payload(scenario, "edge-4", seed=1))))
    return CoordinatorSummary.model_validate(loop.run(coordinator.finish()))


def load_baim(registry_dir: Path, version: str) -> BAIM:
    return Registry(str(registry_dir)).load_module("baim", version, BAIM)


def test_a_gate_only_round_keeps_the_trained_learners_and_measures_forgetting(
    tmp_path: Path, loop: LoopThread
) -> None:
    scenario = lifecycle_scenario(tmp_path, continual="gate_only")
    coordinator = make_coordinator(scenario, tmp_path / "registry")

    summary = two_rounds(coordinator, scenario, loop)

    first, second = summary.rounds
    assert first.continual is None and second.continual is not None
    old = ["edge-0", "edge-1", "edge-2", "edge-3"]
    assert second.continual.mode == "gate_only"
    assert second.continual.frozen_learners == old and second.continual.new_learners == ["edge-4"]
    assert list(second.strategies) == ["finetune"]  # the strategy it continues from, alone
    before, after = (
        load_baim(tmp_path / "registry", first.baim_version),
        load_baim(tmp_path / "registry", second.baim_version),
    )
    assert learner_hashes(after, old) == learner_hashes(before, old)
    assert learner_hashes(after, ["edge-4"]) != learner_hashes(coordinator_learner(scenario), ["edge-4"])
    frozen_connections = [c for c in after.connections.specs if c.src in old and c.dst in old]
    for spec in frozen_connections:
        for mine, theirs in zip(
            after.connections.projection(spec).parameters(),
            before.connections.projection(spec).parameters(),
            strict=True,
        ):
            assert torch.equal(mine, theirs), spec.key
    record = second.continual
    assert set(record.forgetting) == {"male", "female"}
    for task, value in record.forgetting.items():
        assert value == pytest.approx(record.test_loss_after[task] - record.test_loss_before[task])
    # The loss before is the first round's trained BAIM's (fusion is function-preserving).
    assert record.test_loss_before["female"] == pytest.approx(
        first_round_test_loss(scenario, before, "female"), abs=1e-6
    )


def coordinator_learner(scenario: Scenario) -> BAIM:
    """edge-4's uploaded weights as a one-learner BAIM (to compare its learner's hash with)."""
    from baim.learners import VAELearner
    from orchestrator.core.artifacts import load_module

    learner = load_module(valid_payload(scenario, "edge-4", seed=1), VAELearner, artifact_id="edge-4")
    return BAIM.from_learners(["male"], [("edge-4", "male", learner)], top_k=1)


def first_round_test_loss(scenario: Scenario, baim: BAIM, task: str) -> float:
    from actors.lifecycle import task_test_losses
    from orchestrator.data.partitions import make_partitions
    from orchestrator.data.sources import resolve_source

    source = resolve_source(scenario.data)
    losses = task_test_losses(
        baim, [task], source=source, test_indices=make_partitions(source, scenario).test,
        resolution=scenario.data.resolution, batch_size=scenario.cloud.batch_size, seed=scenario.seed,
    )  # fmt: skip
    return losses[task]


def test_a_finetune_all_round_moves_the_trained_learners(tmp_path: Path, loop: LoopThread) -> None:
    scenario = lifecycle_scenario(tmp_path, continual="finetune_all")
    coordinator = make_coordinator(scenario, tmp_path / "registry")

    summary = two_rounds(coordinator, scenario, loop)

    first, second = summary.rounds
    assert second.continual is not None and second.continual.frozen_learners == []
    assert list(second.strategies) == ["finetune", "freeze"]
    old = ["edge-0", "edge-1", "edge-2", "edge-3"]
    before = learner_hashes(load_baim(tmp_path / "registry", first.baim_version), old)
    after = learner_hashes(load_baim(tmp_path / "registry", second.baim_version), old)
    assert all(before[name] != after[name] for name in old)


def test_a_new_task_gets_a_few_shot_gate_over_the_existing_learners(tmp_path: Path, loop: LoopThread) -> None:
    scenario = lifecycle_scenario(tmp_path)
    coordinator = make_coordinator(scenario, tmp_path / "registry")
    for edge_id in ("edge-0", "edge-1", "edge-2", "edge-3"):
        loop.run(coordinator.upload(**upload_kwargs(edge_id, valid_payload(scenario, edge_id, seed=1))))

    queued = loop.run(coordinator.new_task(NEW_TASK))  # no trained BAIM yet: it waits for one
    summary = CoordinatorSummary.model_validate(loop.run(coordinator.finish()))

    assert queued == {"task": "glasses", "state": "queued"}
    (record,) = summary.new_tasks
    assert (record.task, record.shots, record.steps) == ("glasses", 8, 20)
    assert record.members == ["edge-0", "edge-1", "edge-2", "edge-3"]
    assert record.other_tasks_unchanged is True
    trained = load_baim(tmp_path / "registry", record.baim_version)
    assert record.gate_parameters == sum(p.numel() for p in trained.gate.squad_gate("glasses").parameters())
    assert record.test_images == 32 and record.test_loss is not None
    # The largest edge model by parameters: edge-0's [8, 16] / 8 (9,851) beats edge-3's [4, 8, 16] / 8.
    assert (record.cloud_only_vae.widths, record.cloud_only_vae.latent_dim) == ([8, 16], 8)
    assert record.cloud_only_vae.params == 9851 and record.cloud_only_vae.steps == 20
    assert record.artifact == f"task/glasses@{record.baim_version}"
    assert set(summary.tasks) == {"male", "female", "glasses"}
    assert all(t.decomposition_max_abs_diff <= 1e-5 for t in summary.tasks.values())
    assert loop.run(coordinator.new_task(NEW_TASK)) == {"task": "glasses", "state": "done"}
    with pytest.raises(ValueError, match="no new_task event of the scenario declares it"):
        loop.run(coordinator.new_task(NEW_TASK | {"task": {"name": "hats", "expression": "Wearing_Hat"}}))


def test_learners_below_the_selection_rate_are_removed_before_decomposition(
    tmp_path: Path, loop: LoopThread
) -> None:
    # top_k 1 over two members: the two rates of a squad sum to 1, so 0.99 removes one member of each.
    scenario = lifecycle_scenario(tmp_path, min_selection_rate=0.99)
    document = scenario.model_dump(mode="json")
    document["timeline"] = []
    document["edges"] = document["edges"][:4]
    scenario = Scenario.model_validate(document)
    coordinator = make_coordinator(scenario, tmp_path / "registry")
    for edge_id in ("edge-0", "edge-1", "edge-2", "edge-3"):
        loop.run(coordinator.upload(**upload_kwargs(edge_id, valid_payload(scenario, edge_id, seed=1))))

    summary = CoordinatorSummary.model_validate(loop.run(coordinator.finish()))
    again = CoordinatorSummary.model_validate(loop.run(coordinator.finish()))

    pruning = summary.learner_pruning
    assert pruning is not None and pruning.threshold == 0.99
    assert len(pruning.removed) == 2 and {r.task for r in pruning.removed} == {"male", "female"}
    for removed in pruning.removed:
        assert removed.selection_rate == pruning.selection_rates[removed.learner] < 0.99
    for task in ("male", "female"):
        squad = [n for n in ("edge-0", "edge-1", "edge-2", "edge-3") if scenario.edge(n).task == task]
        assert sum(pruning.selection_rates[n] for n in squad) == pytest.approx(1.0)
    assert pruning.images == 2 * 64
    assert pruning.baim_version != pruning.from_version and pruning.params_after < pruning.params_before
    pruned = load_baim(tmp_path / "registry", pruning.baim_version)
    members = {m for squad in pruned.config.squads for m in squad.members}
    assert members.isdisjoint(r.learner for r in pruning.removed)
    assert all(t.artifact.endswith(f"@{pruning.baim_version}") for t in summary.tasks.values())
    assert all(t.decomposition_max_abs_diff <= 1e-5 for t in summary.tasks.values())  # exact, pruned too
    assert again.learner_pruning == pruning and again.tasks == summary.tasks  # finish() is idempotent
    # The receipts say which admitted uploads pruning removed, once (one pruned record in the log), and a
    # restarted coordinator replays the same.
    removed = {r.learner for r in pruning.removed}
    assert {(r.learner, r.admission) for r in again.accepted} == {
        (r.learner, "pruned" if r.learner in removed else "admitted") for r in summary.accepted
    }
    assert all("selection rate" in r.admission_detail for r in again.accepted if r.admission == "pruned")
    records = ReceiptLog(Registry(str(tmp_path / "registry"))).replay()
    assert [r.kind for r in records].count("pruned") == 1
    resumed = make_coordinator(scenario, tmp_path / "registry")
    assert [r.model_dump() for r in resumed.accepted] == [r.model_dump() for r in again.accepted]


@pytest.mark.parametrize(
    ("change", "line"),
    [
        ({"shots": 0}, "timeline.1.new_task.shots: Input should be greater than or equal to 1"),
        (
            {"task": {"name": "specs", "expression": "Eyeglass"}},
            "timeline.1.new_task.task.expression: unknown attribute 'Eyeglass'",
        ),
        (
            {"task": {"name": "female", "expression": "Eyeglasses"}},
            "timeline.1.task.name: task 'female' exists already (in tasks)",
        ),
    ],
    ids=["no_shots", "unknown_attribute", "existing_name"],
)
def test_a_bad_new_task_event_is_rejected_naming_the_field(
    tmp_path: Path, change: dict[str, Any], line: str
) -> None:
    document = lifecycle_scenario(tmp_path).model_dump(mode="json")
    document["timeline"][1].update(change)

    with pytest.raises(ValidationError) as caught:
        Scenario.model_validate(document)

    assert any(problem.startswith(line) for problem in format_validation_error(caught.value)), caught.value


def test_a_new_task_named_twice_is_rejected(tmp_path: Path) -> None:
    twice = lifecycle_scenario(tmp_path).model_dump(mode="json")
    twice["timeline"].append(NEW_TASK | {"at_seconds": 2.0})

    with pytest.raises(ValidationError) as caught:
        Scenario.model_validate(twice)

    assert format_validation_error(caught.value) == [
        "timeline.2.task.name: task 'glasses' exists already (in timeline.1); a new_task event names a task "
        "that is not there yet"
    ]


def test_a_gate_only_round_continues_with_the_kept_strategy_never_scratch(tmp_path: Path) -> None:
    from actors.lifecycle import continual_strategy

    strategies = ["scratch", "finetune", "freeze"]
    assert continual_strategy("freeze", strategies, last_kept="freeze") == "freeze"
    assert continual_strategy("best", strategies, last_kept="freeze") == "freeze"
    assert continual_strategy("best", strategies, last_kept="scratch") == "finetune"
    assert continual_strategy("scratch", strategies, last_kept="scratch") == "finetune"
    assert continual_strategy("best", ["freeze", "finetune"], last_kept=None) == "freeze"
    # scratch first no longer blocks gate_only: the round continues from what cloud.keep kept
    after_scratch = lifecycle_scenario(tmp_path).model_dump(mode="json")
    after_scratch["cloud"].update({"continual": "gate_only", "strategies": ["scratch", "finetune"]})
    assert Scenario.model_validate(after_scratch).cloud.continual == "gate_only"


def test_new_tasks_draw_their_shots_last_and_change_no_other_shard(tmp_path: Path) -> None:
    from orchestrator.data.partitions import make_partitions
    from orchestrator.data.sources import resolve_source

    with_task = lifecycle_scenario(tmp_path)
    document = with_task.model_dump(mode="json")
    document["timeline"] = document["timeline"][:1]
    without = Scenario.model_validate(document)
    source = resolve_source(with_task.data)

    mine, theirs = make_partitions(source, with_task), make_partitions(source, without)

    assert len(mine.cloud["glasses"]) == 8 and len(mine.test["glasses"]) == 32
    assert "glasses" not in mine.holdout
    assert source.attrs[mine.cloud["glasses"], source.attr_names.index("Eyeglasses")].all()
    for group, shards in theirs.groups().items():
        assert {k: v for k, v in mine.groups()[group].items() if k != "glasses"} == shards
    mine.check_disjoint()
