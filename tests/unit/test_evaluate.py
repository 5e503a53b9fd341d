"""The end-of-run measurements without Ray: personalisation of a published task model."""

from __future__ import annotations

from pathlib import Path

import torch

from baim.decompose import decompose
from orchestrator.core.artifacts import pack_module
from orchestrator.core.names import task_owner
from orchestrator.core.registry import Registry
from orchestrator.core.reports import RunReport
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
