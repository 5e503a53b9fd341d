"""The lifecycle on a local Ray instance: a late join trained by a gate_only continual round, a new task
from 8 shots published and served over HTTP beside the running tasks, learners pruned before decomposition."""

from __future__ import annotations

import hashlib
import json
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import ray
from ray import serve

from baim.model import BAIM
from orchestrator.core.receipts import CoordinatorSummary
from orchestrator.core.registry import Registry
from orchestrator.core.scenario import Scenario, ServingConfig
from orchestrator.runtime.engine import EngineOptions, run_scenario
from serve.app import RegistryWatcher, start_http
from tests.support.coordinator import make_coordinator, upload_kwargs
from tests.support.loop import LoopThread
from tests.support.network import free_port
from tests.support.scenarios import tiny_scenario
from tests.support.uploads import valid_payload

ORIGINAL = ["edge-0", "edge-1", "edge-2", "edge-3"]
NEW_TASK = {"kind": "new_task", "at_seconds": 1.0, "task": {"name": "glasses", "expression": "Eyeglasses"},
            "shots": 8}  # fmt: skip


def lifecycle_scenario(tmp_path: Path) -> Scenario:
    """tiny.yaml (procedural faces) plus a male edge joining at 20 s (after round 1 started: the four
    initial uploads start it), a new task at 1 s, gate_only continual rounds and a selection-rate threshold
    of 0.99: with top_k 1 the rates of a squad's members add up to at most 1, so every squad of two or more
    members loses one."""
    document = tiny_scenario(tmp_path).model_dump(mode="json")
    late = {"id": "edge-4", "task": "male", "shard_size": 32, "model": {"widths": [8, 16], "latent_dim": 8},
            "batch_size": 16, "num_cpus": 0.25, "start": False}  # fmt: skip
    document["edges"].append(late)
    document["timeline"] = [NEW_TASK, {"kind": "join", "at_seconds": 20.0, "edge": "edge-4"}]
    document["cloud"].update(
        strategies=["finetune"],
        continual="gate_only",
        min_selection_rate=0.99,
        few_shot_steps=20,
        fusion={"min_new_models": 4, "max_wait_seconds": 1000},
    )
    document["baselines"]["fedavg"]["enabled"] = False
    return Scenario.model_validate(document)


def learner_hashes(baim: BAIM, names: list[str]) -> dict[str, str]:
    hashes = {}
    for name in names:
        digest = hashlib.sha256()
        for key, tensor in baim.learner(name).state_dict().items():
            digest.update(key.encode() + tensor.detach().contiguous().numpy().tobytes())
        hashes[name] = digest.hexdigest()
    return hashes


@pytest.mark.slow  # edges, two rounds, a few-shot round: about 60-90 s on two shared cores
@pytest.mark.usefixtures("ray_session")
def test_a_run_with_a_late_join_and_a_new_task_reports_forgetting_and_removed_learners(
    tmp_path: Path,
) -> None:
    scenario = lifecycle_scenario(tmp_path)

    report = run_scenario(scenario, tmp_path / "out", EngineOptions(cloud_trainer="local"))

    assert {row.status for row in report.edges.values()} == {"accepted"}
    first, second = report.cloud.rounds
    assert first.learners == ORIGINAL and first.continual is None
    assert second.continual is not None and second.continual.mode == "gate_only"
    assert (second.continual.frozen_learners, second.continual.new_learners) == (ORIGINAL, ["edge-4"])
    registry = Registry(report.registry)
    before = registry.load_module("baim", first.baim_version, BAIM)
    after = registry.load_module("baim", second.baim_version, BAIM)
    assert learner_hashes(after, ORIGINAL) == learner_hashes(before, ORIGINAL)
    assert {"male", "female"} <= set(second.continual.forgetting)
    (new_task,) = report.cloud.new_tasks
    assert (new_task.task, new_task.shots, new_task.members) == ("glasses", 8, ORIGINAL)
    assert new_task.other_tasks_unchanged and new_task.cloud_only_vae.test_loss > 0
    assert set(report.tasks) == {"male", "female", "glasses"}
    pruning = report.cloud.learner_pruning
    assert pruning is not None and pruning.removed
    assert all(r.selection_rate < 0.99 for r in pruning.removed)
    written = json.loads((tmp_path / "out" / "report.json").read_text())
    assert written["cloud"]["rounds"][1]["continual"]["forgetting"] == second.continual.forgetting
    assert [r["learner"] for r in written["cloud"]["learner_pruning"]["removed"]] == [
        r.learner for r in pruning.removed
    ]
    assert (
        "Lifecycle: continual rounds, new tasks, pruned learners"
        in (tmp_path / "out" / "report.md").read_text()
    )


def replica_ids(app_name: str) -> set[str]:
    return {
        actor["name"]
        for actor in ray.util.list_named_actors(all_namespaces=True)
        if actor["name"].startswith(f"SERVE_REPLICA::{app_name}#")
    }


def post(url: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), method="POST", headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return response.status, json.loads(response.read())


@pytest.mark.slow  # Serve start-up, then a new application and a new index replica: 30-60 s
@pytest.mark.usefixtures("ray_session")
def test_a_new_task_is_served_over_http_without_restarting_the_others(tmp_path: Path) -> None:
    # Prepare: a trained run serving male and female
    document = lifecycle_scenario(tmp_path).model_dump(mode="json")
    document["edges"] = document["edges"][:4]
    document["timeline"] = [NEW_TASK]
    document["cloud"].update(min_selection_rate=None)
    scenario = Scenario.model_validate(document)
    loop = LoopThread()
    coordinator = make_coordinator(scenario, tmp_path / "registry")
    for edge_id in ORIGINAL:
        loop.run(coordinator.upload(**upload_kwargs(edge_id, valid_payload(scenario, edge_id, seed=1))))
    loop.run(coordinator.finish())
    serving = ServingConfig(port=free_port(), min_replicas=1, max_replicas=1, num_cpus=0.25)
    serve.shutdown()
    start_http(serving)
    watcher = RegistryWatcher(str(tmp_path / "registry"), serving, app_name="lifecycle", poll_seconds=1.0)
    base = f"http://127.0.0.1:{serving.port}"
    try:
        watcher.poll()
        male_replicas = replica_ids("lifecycle-task-male")
        male_before = post(f"{base}/tasks/male/generate", {"n": 2, "seed": 3})[1]

        # Execute: the task appears; the coordinator adapts and publishes it; the watcher deploys it
        assert loop.run(coordinator.new_task(NEW_TASK)) == {"task": "glasses", "state": "queued"}
        deadline = time.monotonic() + 120
        while loop.run(coordinator.new_task(NEW_TASK))["state"] != "done":
            assert time.monotonic() < deadline, "the few-shot task was not adapted in 120 s"
            time.sleep(0.5)
        assert watcher.poll() is True

        # Assert: served over HTTP; the running tasks' replicas and models untouched
        status, reply = post(f"{base}/tasks/glasses/generate", {"n": 2, "seed": 3})
        summary = CoordinatorSummary.model_validate(loop.run(coordinator.summary()))
        assert status == 200 and len(reply["images"]) == 2
        assert reply["model_version"] == summary.new_tasks[0].baim_version
        assert watcher.deployed_tasks == ["female", "glasses", "male"]
        assert male_replicas and replica_ids("lifecycle-task-male") == male_replicas
        assert post(f"{base}/tasks/male/generate", {"n": 2, "seed": 3})[1] == male_before
    finally:
        serve.shutdown()
        loop.stop()
