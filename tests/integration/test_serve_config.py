"""`baim serve --write-config` writes a Serve config that Serve's own `serve run` deploys on a running Ray
instance (the session's); every task then answers 200, with the scenario's autoscaling settings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import ray
import yaml
from ray import serve
from ray.serve.schema import ServeDeploySchema

from baim.decompose import decompose
from orchestrator.cli.main import main
from orchestrator.core.artifacts import pack_module
from orchestrator.core.registry import Registry
from tests.support.models import tiny_baim
from tests.support.network import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
SERVE_CLI = Path(sys.executable).with_name("serve")


def write_scenario(path: Path, port: int) -> Path:
    """scenarios/tiny.yaml with a `serving` section whose every value differs from the defaults."""
    scenario = yaml.safe_load((REPO_ROOT / "scenarios" / "tiny.yaml").read_text())
    scenario["serving"] = {
        "port": port,
        "min_replicas": 1,
        "max_replicas": 3,
        "target_ongoing_requests": 4.0,
        "num_cpus": 0.25,
        "max_batch_size": 4,
    }
    path.write_text(yaml.safe_dump(scenario))
    return path


def post_generate(base: str, task: str) -> tuple[int, dict]:
    request = urllib.request.Request(
        f"{base}/tasks/{task}/generate",
        data=json.dumps({"n": 2, "seed": 1}).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, {}
    except (urllib.error.URLError, ConnectionError, TimeoutError):  # still starting
        return 0, {}


def test_written_config_deploys_with_serve_run(
    ray_session: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare: a registry with two tasks (a task model and a lone learner)
    registry = Registry(str(tmp_path / "registry"))
    baim = tiny_baim(seed=0)
    smiling = decompose(baim, "smiling")
    registry.put("task/smiling", "v000001", pack_module(smiling, smiling.spec()))
    learner = baim.learner("e2")
    spec = {"kind": "learner", "edge_id": "edge-2", "task": "male", "learner": learner.spec.to_dict()}
    registry.put("task/male", "v000001", pack_module(learner, spec))
    port = free_port()
    scenario = write_scenario(tmp_path / "scenario.yaml", port)
    config_path = tmp_path / "serve.yaml"

    # Execute: write the config (no Ray needed), then apply it with Serve's own CLI on the session's Ray
    status = main(
        ["serve", "--registry", registry.uri, "--scenario", str(scenario), "--write-config", str(config_path)]
    )
    assert status == 0, capsys.readouterr().err
    config = yaml.safe_load(config_path.read_text())
    serve.shutdown()  # the config's http_options apply to a fresh Serve instance only
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    env.pop("BAIM_API_TOKEN", None)
    deployed = subprocess.run(
        [str(SERVE_CLI), "run", "--non-blocking", str(config_path)],
        cwd=tmp_path,  # the import paths must resolve from the installed package, not the checkout
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    try:
        base = f"http://127.0.0.1:{port}"
        replies: dict[str, tuple[int, dict]] = {}
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            replies = {task: post_generate(base, task) for task in ("male", "smiling")}
            if all(status == 200 for status, _ in replies.values()):
                break
            time.sleep(1)
        details = serve.context._get_global_client().get_serve_details()
    finally:
        serve.shutdown()

    # Assert: every task answers; what Serve deployed carries the scenario's serving settings
    ServeDeploySchema.model_validate(config)
    assert {task: status for task, (status, _) in replies.items()} == {"male": 200, "smiling": 200}
    assert all(len(body["images"]) == 2 for _, body in replies.values())
    applications = {app["name"]: app for app in config["applications"]}
    assert sorted(applications) == ["baim", "baim-metrics", "baim-task-male", "baim-task-smiling"]
    assert applications["baim-task-smiling"]["route_prefix"] == "/tasks/smiling"
    assert applications["baim-task-smiling"]["import_path"] == "serve.app:task_application"
    for task in ("male", "smiling"):
        written = applications[f"baim-task-{task}"]["deployments"][0]
        deployment = details["applications"][f"baim-task-{task}"]["deployments"][f"TaskModel_{task}"]
        applied = deployment["deployment_config"]
        assert written["autoscaling_config"]["max_replicas"] == 3
        assert written["autoscaling_config"]["target_ongoing_requests"] == 4.0
        assert written["user_config"] == {"max_batch_size": 4, "batch_wait_timeout_s": 0.0}
        assert applied["autoscaling_config"]["min_replicas"] == 1
        assert applied["autoscaling_config"]["max_replicas"] == 3
        assert applied["autoscaling_config"]["target_ongoing_requests"] == 4.0
        assert applied["ray_actor_options"]["num_cpus"] == 0.25
        assert applied["user_config"] == {"max_batch_size": 4, "batch_wait_timeout_s": 0.0}


def test_write_config_refuses_an_empty_registry(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "registry").mkdir()
    status = main(
        ["serve", "--registry", str(tmp_path / "registry"), "--write-config", str(tmp_path / "s.yaml")]
    )
    assert status == 2
    assert "holds no task models" in capsys.readouterr().err
    assert not (tmp_path / "s.yaml").exists()
