"""The CloudCoordinator as a plain class in tests: its coroutines on a background event loop."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from actors.coordinator import CloudCoordinator
from actors.edge import poison_state, upload_spec
from baim.config import LearnerSpec
from baim.learners import VAELearner
from orchestrator.cloud.local import local_training_round
from orchestrator.core.artifacts import ArtifactPayload, pack_state
from orchestrator.core.scenario import Scenario
from orchestrator.data.partitions import make_partitions
from orchestrator.data.sources import resolve_source
from tests.support.loop import LoopThread


class SyncCoordinator:
    """The coordinator behind synchronous `receive(...)` and `outcome(key)`, the way an edge calls them
    through Ray."""

    def __init__(self, coordinator: CloudCoordinator, loop: LoopThread) -> None:
        self.coordinator = coordinator
        self.loop = loop

    def receive(self, **kwargs: Any) -> dict[str, Any]:
        return self.loop.run(self.coordinator.receive(**kwargs))

    def outcome(self, key: str) -> dict[str, Any] | None:
        return self.loop.run(self.coordinator.outcome(key))


def make_coordinator(scenario: Scenario, registry_dir: Path, **options: Any) -> CloudCoordinator:
    """A coordinator over `registry_dir` with the scenario's data and partitions."""
    source = resolve_source(scenario.data)
    options.setdefault("round_runner", local_training_round)  # the production in-process runner
    return CloudCoordinator(scenario, str(registry_dir), source, make_partitions(source, scenario), **options)


def upload_kwargs(edge_id: str, payload: ArtifactPayload, version: int = 1) -> dict[str, Any]:
    """The arguments of `CloudCoordinator.upload` for `payload`."""
    return {
        "edge_id": edge_id,
        "version": version,
        "weights": payload.weights,
        "spec_json": payload.spec_json,
        "sha256": payload.sha256,
    }


def learner_payload(scenario: Scenario, edge_id: str, seed: int = 0, **poison: Any) -> ArtifactPayload:
    """The upload of a freshly initialised learner of the edge's declared architecture (optionally poisoned:
    `mode=..., scale=...`)."""
    edge = scenario.edge(edge_id)
    spec = LearnerSpec(tuple(edge.model.widths), edge.model.latent_dim, scenario.data.resolution)
    torch.manual_seed(seed)
    state = VAELearner(spec).state_dict()
    if poison:
        state = poison_state(state, poison["mode"], poison.get("scale", 10.0), seed)
    return pack_state(state, upload_spec(edge, spec))


class HeldValidation:
    """Wraps the real `UploadValidator.validate`: each call waits until `release` is set, and `started`
    counts the calls that began (so a test knows validation is under way, not finished)."""

    def __init__(self, validate: Any) -> None:
        self.validate = validate
        self.release = threading.Event()
        self.started = threading.Semaphore(0)

    def __call__(self, *args: Any) -> Any:
        self.started.release()
        assert self.release.wait(timeout=60), "validation was never released"
        return self.validate(*args)


def hold_validation(coordinator: CloudCoordinator, monkeypatch: pytest.MonkeyPatch) -> HeldValidation:
    held = HeldValidation(coordinator.validator.validate)
    monkeypatch.setattr(coordinator.validator, "validate", held)
    return held
