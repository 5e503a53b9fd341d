"""The bad-upload suite once through a real Ray actor: the CloudCoordinator as the engine runs it (an async
actor), hostile payloads sent as actor-call arguments the way an edge sends them.

Ray carries `weights: bytes` as raw bytes; the coordinator parses them with safetensors only. The pickle
cases create a marker file if anything in the actor's process unpickled them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import ray

from actors.coordinator import CloudCoordinator
from orchestrator.cloud.local import local_training_round
from tests.support.coordinator import upload_kwargs
from tests.support.scenarios import never_training_scenario
from tests.support.uploads import BAD_UPLOADS, PICKLE_CASES, valid_payload

pytestmark = pytest.mark.usefixtures("ray_session")

# The cases sent through the actor: the pickles plus one of each family (the plain-class suite has them all).
THROUGH_RAY = PICKLE_CASES | {
    "truncated_half",
    "int64",
    "one_nan",
    "weights_of_other_architecture",
    "spec_claims_other_learner",
    "gigantic_latent_dim",
    "gigantic_tensor_in_header",
    "sha256_of_other_weights",
    "spec_kind_unknown",
    "impersonates_another_edge",
    "deeply_nested_spec",  # raised RecursionError inside the actor before 6b9e85d
    "lone_surrogate_in_spec",  # a str Ray carries but UTF-8 cannot encode
}


def start_coordinator(tmp_path: Path) -> Any:
    scenario = never_training_scenario(tmp_path)
    actor_class = ray.remote(CloudCoordinator).options(num_cpus=0.25, max_concurrency=100)
    coordinator = actor_class.remote(scenario, str(tmp_path / "registry"), round_runner=local_training_round)
    return scenario, coordinator


def test_bad_uploads_through_a_ray_actor_are_rejected_and_nothing_is_unpickled(tmp_path: Path) -> None:
    # Prepare
    scenario, coordinator = start_coordinator(tmp_path)
    marker = tmp_path / "unpickled.marker"
    cases = [case for case in BAD_UPLOADS if case.name in THROUGH_RAY]
    assert len(cases) == len(THROUGH_RAY)

    try:
        # Execute: all bad uploads at once (concurrent calls on the async actor), then a valid one.
        refs = [
            coordinator.upload.remote(**upload_kwargs("edge-0", case.build(scenario, marker), case.version))
            for case in cases
        ]
        receipts = ray.get(refs, timeout=120)
        valid = ray.get(
            coordinator.upload.remote(**upload_kwargs("edge-1", valid_payload(scenario, "edge-1"))),
            timeout=120,
        )
        status = ray.get(coordinator.status.remote(), timeout=60)
    finally:
        ray.kill(coordinator)

    # Assert
    for case, receipt in zip(cases, receipts, strict=True):
        assert (receipt["accepted"], receipt["reason"]) == (False, case.reason), (case.name, receipt)
        assert case.detail_part in receipt["detail"], (case.name, receipt["detail"])
    assert not marker.exists(), "the coordinator actor unpickled an uploaded payload"
    assert valid["accepted"] is True, valid
    assert status["accepted"] == ["edge-1"] and status["learners"] == ["edge-1"]
    # Every rejection is counted: they share the key edge-0@1#sha, so distinct payloads give distinct keys.
    assert len({receipt["key"] for receipt in receipts}) == len(cases)
