"""`baim serve` as a user runs it: a separate process with its own local Ray, serving a registry over HTTP
until SIGTERM or Ctrl-C (SIGINT)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import torch

from baim.config import LearnerSpec
from baim.learners import VAELearner
from orchestrator.core.artifacts import pack_module
from orchestrator.core.registry import Registry

REPO_ROOT = Path(__file__).resolve().parents[2]
SERVE = [sys.executable, "-m", "orchestrator", "serve"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def get_json(url: str, body: dict | None = None) -> tuple[int, dict]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return response.status, json.loads(response.read())


def test_baim_serve_serves_a_registry_until_interrupted(tmp_path: Path) -> None:
    # Prepare: a registry holding one task model (a lone learner, as an edge uploads it).
    torch.manual_seed(0)
    learner = VAELearner(LearnerSpec(widths=(8,), latent_dim=4, resolution=16))
    spec = {"kind": "learner", "edge_id": "edge-0", "task": "male", "learner": learner.spec.to_dict()}
    registry = Registry(str(tmp_path / "registry"))
    registry.put("task/male", "v000001", pack_module(learner, spec))
    port = free_port()
    env = {**os.environ, "BAIM_REGISTRY": registry.uri, "PYTHONUNBUFFERED": "1"}
    env.pop("BAIM_API_TOKEN", None)

    # Execute: the registry comes from $BAIM_REGISTRY, as on a cluster node.
    process = subprocess.Popen(
        # --address local: its own Ray instance, whatever other instance this machine runs (other tests'
        # session holds one; a plain ray.init() may join a running local cluster).
        [*SERVE, "--address", "local", "--port", str(port), "--poll-seconds", "1"],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        tasks: dict = {}
        while time.monotonic() < deadline and process.poll() is None:
            try:
                status, tasks = get_json(f"{base}/tasks")
                if status == 200 and tasks["tasks"]:
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(1)
        assert process.poll() is None, process.communicate()[0]
        generated = get_json(f"{base}/tasks/male/generate", {"n": 2, "seed": 3})
    finally:
        # SIGTERM, as a service manager stops it (Ctrl-C's SIGINT takes the same path; a test run in the
        # background may have SIGINT ignored, which `baim serve` overrides).
        process.send_signal(signal.SIGTERM)
        try:
            output, _ = process.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            process.kill()
            output = process.communicate()[0] + "\n(killed: SIGTERM did not stop it within 120 s)"

    # Assert
    assert [t["task"] for t in tasks["tasks"]] == ["male"], output
    assert generated[0] == 200 and len(generated[1]["images"]) == 2
    assert generated[1]["model_version"] == "v000001"
    assert process.returncode == 0, output
    assert f"serving the task models of {registry.uri} at {base}" in output
    assert "stopped serving" in output
