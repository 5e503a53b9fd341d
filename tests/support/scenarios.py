"""Small scenarios for tests: scenarios/tiny.yaml on procedural faces (fast, no files)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from orchestrator.core.scenario import Scenario, load_scenario

REPO = Path(__file__).resolve().parents[2]
NEVER_TRAIN = {"min_new_models": 100, "max_wait_seconds": 100_000}  # fusion settings: no training round


def tiny_scenario(tmp_path: Path, **cloud_changes: Any) -> Scenario:
    """scenarios/tiny.yaml on procedural faces (no CelebA under tmp_path), with cloud settings overridden."""
    document = load_scenario(REPO / "scenarios" / "tiny.yaml").model_dump(mode="json")
    document["data"]["root"] = str(tmp_path / "no-celeba-here")
    document["data"]["procedural"] = {"num_images": 1500, "native_size": 32}
    document["cloud"].update(cloud_changes)
    return Scenario.model_validate(document)


def never_training_scenario(tmp_path: Path, **cloud_changes: Any) -> Scenario:
    """`tiny_scenario` whose coordinator never starts a training round (unless `fusion` is overridden)."""
    return tiny_scenario(tmp_path, **{"fusion": NEVER_TRAIN, **cloud_changes})
