"""A trained tiny run end to end without Ray (the coordinator with the in-process round runner): the budget
reached by cloud training, the kept strategy, the published generation-only artifacts and what report.json
says an edge downloads."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from baim.compaction import budget_limits, squad_params
from baim.decompose import GenerationModel, TaskModel
from baim.model import BAIM
from orchestrator.core.names import generation_owner, task_owner
from orchestrator.core.receipts import CoordinatorSummary
from orchestrator.core.registry import Registry
from orchestrator.core.reports import RunReport
from orchestrator.data.partitions import make_partitions
from orchestrator.data.sources import resolve_source
from orchestrator.evaluation.evaluate import EvaluationOptions, RunEvaluation
from tests.support.coordinator import learner_payload, make_coordinator, upload_kwargs
from tests.support.loop import LoopThread
from tests.support.reports import bare_report
from tests.support.scenarios import tiny_scenario

# tiny's learners: without any connection a task model is 1.18x (male) and 1.21x (female) its squad (the
# gate encoder is large next to 8-16 channel learners); fused with every candidate connection, 1.75x and
# 2.52x. 1.4 is reachable and needs pruning.
BUDGET = 1.4
EDGES = ("edge-0", "edge-1", "edge-2", "edge-3")


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, CoordinatorSummary]:
    tmp_path = tmp_path_factory.mktemp("compact")
    scenario = tiny_scenario(
        tmp_path,
        strategies=["finetune", "freeze"],
        epochs=3,
        prune_interval=1,
        task_model_budget=BUDGET,
        recovery_epochs=1,
        keep="best",
        fusion={"min_new_models": len(EDGES), "max_wait_seconds": 1000},
    )
    loop = LoopThread()
    try:
        coordinator = make_coordinator(scenario, tmp_path / "registry")
        for n, edge_id in enumerate(EDGES):
            loop.run(coordinator.upload(**upload_kwargs(edge_id, learner_payload(scenario, edge_id, seed=n))))
        summary = CoordinatorSummary.model_validate(loop.run(coordinator.finish(), timeout=600))
    finally:
        loop.stop()
    return tmp_path, summary


def test_cloud_training_reaches_the_budget_on_the_pruning_epochs_then_recovers(
    finished: tuple[Path, CoordinatorSummary],
) -> None:
    tmp_path, summary = finished
    registry = Registry(str(tmp_path / "registry"))
    baim = registry.load_module("baim", summary.baim_version or "", BAIM)
    limits = budget_limits(baim.config, BUDGET)

    assert set(summary.tasks) == {"male", "female"}
    for task, published in summary.tasks.items():
        assert published.params <= limits[task] == published.budget_params
        assert published.squad_params == squad_params(baim.config, task)
        assert published.params / published.squad_params <= BUDGET
        assert published.decomposition_max_abs_diff <= 1e-5
    (record,) = summary.rounds
    for run in record.strategies.values():  # prunings after epochs 1 and 2; epoch 3 recovers
        after_first, after_second, after_recovery = run.connections
        assert after_first >= after_second == after_recovery


def test_the_kept_strategy_is_the_one_with_the_lowest_holdout_loss(
    finished: tuple[Path, CoordinatorSummary],
) -> None:
    _, summary = finished
    (record,) = summary.rounds
    assert record.holdout_loss is not None and set(record.holdout_loss) == {"finetune", "freeze"}
    assert all(math.isfinite(loss) and loss > 0 for loss in record.holdout_loss.values())
    assert record.kept == min(record.holdout_loss, key=record.holdout_loss.__getitem__)


def test_the_generation_artifact_generates_what_the_full_task_model_generates(
    finished: tuple[Path, CoordinatorSummary],
) -> None:
    tmp_path, summary = finished
    registry = Registry(str(tmp_path / "registry"))
    for task, published in summary.tasks.items():
        version = published.artifact.split("@")[1]
        full = registry.load_module(task_owner(task), version, TaskModel).eval()
        generation = registry.load_module(generation_owner(task), version, GenerationModel).eval()
        assert published.generation is not None
        assert published.generation.artifact == f"{generation_owner(task)}@{version}"
        assert published.generation.max_abs_diff <= 1e-5
        for n, seed in ((1, 0), (5, 123)):
            assert torch.allclose(generation.generate(n, seed=seed), full.generate(n, seed=seed), atol=1e-5)
        assert published.generation.params == sum(p.numel() for p in generation.parameters())
        assert published.generation.params < published.params
        assert published.generation.nbytes < (published.nbytes or 0)


def test_report_json_says_which_kind_each_download_is_and_its_bytes(
    finished: tuple[Path, CoordinatorSummary],
) -> None:
    tmp_path, summary = finished
    registry = Registry(str(tmp_path / "registry"))
    scenario = tiny_scenario(tmp_path)
    document = bare_report()
    document["registry"] = str(tmp_path / "registry")
    document["tasks"] = {task: info.model_dump(mode="json") for task, info in summary.tasks.items()}
    document["cloud"].update(
        rounds=[r.model_dump(mode="json") for r in summary.rounds],
        baim_version=summary.baim_version,
        baim_params=summary.baim_params,
    )
    source = resolve_source(scenario.data)
    options = EvaluationOptions(personalise_epochs=0, run_fedavg=False, image_quality=False)
    evaluation = RunEvaluation(
        RunReport.model_validate(document), scenario, source, make_partitions(source, scenario),
        tmp_path / "evaluation", options,
    )  # fmt: skip

    downloads = evaluation._strategy_sets()

    for task, published in summary.tasks.items():
        full, generation = downloads.task_models[task], downloads.generation_models[task]
        version = published.artifact.split("@")[1]
        assert (full.kind, full.artifact, full.params) == ("full", published.artifact, published.params)
        assert full.nbytes == registry.ref(task_owner(task), version).nbytes
        assert generation.kind == "generation"
        assert generation.nbytes == registry.ref(generation_owner(task), version).nbytes < full.nbytes
    assert downloads.baim is not None and downloads.baim.kind == "baim"
    assert downloads.baim.params == summary.baim_params
