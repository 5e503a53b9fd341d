"""`cloud.trainer: auto`: the FLOPs estimate, the choice and the record of which runner trained a round."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from actors.rounds import RoundRequest
from baim.config import LearnerSpec
from baim.learners import VAELearner
from baim.model import BAIM
from orchestrator.cloud.auto import auto_training_round, choose_trainer, estimated_strategy_flops
from orchestrator.cloud.local import local_training_round
from orchestrator.core.artifacts import pack_module
from orchestrator.core.scenario import Scenario
from orchestrator.data.partitions import make_partitions
from orchestrator.data.sources import resolve_source
from tests.support.scenarios import tiny_scenario


def round_request(scenario: Scenario, tmp_path: Path) -> RoundRequest:
    """A first round over fresh learners of tiny's four edges (architectures as declared)."""
    torch.manual_seed(0)
    learners = [
        (
            edge.id,
            edge.task,
            VAELearner(
                LearnerSpec(tuple(edge.model.widths), edge.model.latent_dim, scenario.data.resolution)
            ),
        )
        for edge in scenario.edges
    ]
    cloud = scenario.cloud
    baim = BAIM.from_learners(
        [task.name for task in scenario.tasks],
        learners,
        top_k=cloud.top_k,
        connection_height=cloud.connection_height,
        kld_weight=cloud.kld_weight,
    )
    source = resolve_source(scenario.data)
    return RoundRequest(
        round_index=1,
        baim=pack_module(baim, baim.spec()),
        strategies=list(cloud.strategies),
        scenario=scenario,
        source=source,
        partitions=make_partitions(source, scenario),
        registry_uri=str(tmp_path / "registry"),
    )


def test_auto_runs_a_small_round_in_process_and_says_why(tmp_path: Path) -> None:
    # Prepare: tiny, finetune only, under a threshold it fits.
    scenario = tiny_scenario(
        tmp_path, trainer="auto", strategies=["finetune"], epochs=2, auto_local_max_flops=1e15
    )
    request = round_request(scenario, tmp_path)
    # Execute
    result = auto_training_round(request)
    # Assert: the in-process runner trained it, and its record gives the rule with the estimate.
    run = result.strategies["finetune"]
    estimate = estimated_strategy_flops(request)
    assert run.runner == "local"
    assert run.chosen_by == f"cloud.trainer: auto ({estimate:.3g} estimated FLOPs per strategy <= 1e+15)"
    # The estimate is of the same work the runner counted step by step (same shard, epochs and batch size);
    # it differs only where random images route to other learners than the real ones.
    assert run.flops == pytest.approx(estimate, rel=0.25)


def test_auto_picks_ray_train_above_the_threshold_or_with_gpus(tmp_path: Path) -> None:
    scenario = tiny_scenario(tmp_path, trainer="auto", auto_local_max_flops=0)
    request = round_request(scenario, tmp_path)
    estimate = estimated_strategy_flops(request)
    assert estimate > 0
    runner, why = choose_trainer(request)
    assert (runner, why) == (
        "ray_train",
        f"cloud.trainer: auto ({estimate:.3g} estimated FLOPs per strategy > 0)",
    )
    # At exactly the estimate the in-process runner still wins (the threshold is inclusive).
    at_estimate = tiny_scenario(tmp_path, trainer="auto", auto_local_max_flops=estimate)
    assert choose_trainer(round_request(at_estimate, tmp_path))[0] == "local"
    # GPU workers: Ray Train whatever the size (the in-process runner trains on the coordinator's CPU).
    gpu = tiny_scenario(tmp_path, trainer="auto", use_gpu=True, auto_local_max_flops=1e18)
    assert choose_trainer(round_request(gpu, tmp_path)) == (
        "ray_train",
        "cloud.trainer: auto (use_gpu: true)",
    )


def test_estimate_scales_with_epochs_and_shard(tmp_path: Path) -> None:
    one = estimated_strategy_flops(round_request(tiny_scenario(tmp_path, epochs=1), tmp_path))
    three = estimated_strategy_flops(round_request(tiny_scenario(tmp_path, epochs=3), tmp_path))
    assert three == pytest.approx(3 * one, rel=1e-9, abs=3)  # integer division per call


def test_named_trainer_and_evaluation_cadence_in_the_local_record(tmp_path: Path) -> None:
    scenario = tiny_scenario(tmp_path, trainer="local", strategies=["finetune"], epochs=3, evaluate_every=2)
    run = local_training_round(round_request(scenario, tmp_path)).strategies["finetune"]
    assert run.chosen_by == "cloud.trainer: local"
    # Evaluated after epoch 2 (every 2nd) and 3 (the last), not after 1.
    assert [loss is not None for loss in run.test_loss] == [False, True, True]
