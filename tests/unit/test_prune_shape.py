"""cloud.prune_shape reaches the pruning schedule of both round runners."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.cloud.ray_train import round_config_from_scenario
from orchestrator.core.scenario import Scenario, load_scenario

QUICKSTART = Path(__file__).resolve().parents[2] / "scenarios" / "quickstart.yaml"


def scenario_with(**cloud: object) -> Scenario:
    document = load_scenario(QUICKSTART).model_dump(mode="json")
    document["cloud"].update(cloud)
    return Scenario.model_validate(document)


@pytest.mark.parametrize("shape", ["geometric", "cubic"])
def test_the_scenarios_prune_shape_is_the_ray_train_rounds_schedule_shape(shape: str):
    scenario = scenario_with(prune_shape=shape)
    tasks = scenario.task_names()

    config = round_config_from_scenario(
        scenario,
        {task: [0] for task in tasks},
        {task: [1] for task in tasks},
        round_id=1,
        registry_uri="/tmp/unused-registry",
        baim_version="v1",
        strategy="finetune",
    )

    assert config.pruning().shape == shape
    assert config.pruning().budget == scenario.cloud.task_model_budget


def test_the_default_prune_shape_is_cubic():
    assert load_scenario(QUICKSTART).cloud.prune_shape == "cubic"
