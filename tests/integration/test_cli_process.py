"""The CLI as a newcomer starts it: from a background shell (SIGINT inherited as ignored), and on a machine
where a killed `ray start --head` left its address file behind."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.support.network import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
BAIM = [sys.executable, "-m", "orchestrator"]
STALE_LIMIT_S = 60  # the run must give up on a dead address well within this (goal: about 30 s)


def start_with_sigint_ignored(arguments: list[str]) -> subprocess.Popen[str]:
    """`baim ARGUMENTS` started as a shell starts a background job (`cmd &`): SIGINT inherited as ignored."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("BAIM_API_TOKEN", None)
    return subprocess.Popen(
        ["/bin/sh", "-c", 'trap "" INT; exec "$@"', "sh", *BAIM, *arguments],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_until_serving(process: subprocess.Popen[str], url: str, limit_s: float) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(1)
    process.kill()
    raise AssertionError(f"{url} never answered 200: {process.communicate()[0]}")


def stop_with(process: subprocess.Popen[str], signum: int) -> str:
    process.send_signal(signum)
    try:
        return process.communicate(timeout=120)[0]
    except subprocess.TimeoutExpired:
        process.kill()
        output = process.communicate()[0]
        raise AssertionError(f"signal {signum} did not stop it within 120 s:\n{output}") from None


@pytest.mark.slow  # a whole tiny run (edges, a cloud round, decomposition) before serving: 1-3 min
def test_run_serve_started_with_sigint_ignored_stops_on_sigint(tmp_path: Path) -> None:
    # Prepare: tiny.yaml, serving on (on a free port) after the run
    scenario = yaml.safe_load((REPO_ROOT / "scenarios" / "tiny.yaml").read_text())
    port = free_port()
    scenario["serving"] = {**scenario["serving"], "enabled": True, "port": port}
    path = tmp_path / "tiny-serving.yaml"
    path.write_text(yaml.safe_dump(scenario))

    # Execute
    process = start_with_sigint_ignored(
        ["run", str(path), "--out", str(tmp_path / "out"), "--address", "local", "--no-evaluate"]
    )
    wait_until_serving(process, f"http://127.0.0.1:{port}/tasks", limit_s=600)
    output = stop_with(process, signal.SIGINT)

    # Assert
    assert process.returncode == 0, output
    assert "stopped serving" in output


def test_serve_started_with_sigint_ignored_stops_on_sigint(tmp_path: Path) -> None:
    # Prepare: an empty registry folder is enough to serve (an empty /tasks)
    (tmp_path / "registry").mkdir()
    port = free_port()

    # Execute
    process = start_with_sigint_ignored(
        ["serve", "--registry", str(tmp_path / "registry"), "--address", "local", "--port", str(port)]
    )
    wait_until_serving(process, f"http://127.0.0.1:{port}/healthz", limit_s=240)
    output = stop_with(process, signal.SIGINT)

    # Assert
    assert process.returncode == 0, output
    assert "stopped serving" in output


def dead_address() -> str:
    """host:port where nothing listens (a port just released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{probe.getsockname()[1]}"


@pytest.mark.parametrize(
    "command",
    [["run", str(REPO_ROOT / "scenarios" / "tiny.yaml"), "--no-evaluate"], ["serve"]],
    ids=["run", "serve"],
)
def test_a_stale_ray_address_file_fails_fast_naming_the_fix(tmp_path: Path, command: list[str]) -> None:
    # Prepare: what a killed `ray start --head` leaves: <tmp>/ray/ray_current_cluster naming a dead GCS.
    # RAY_TMPDIR points Ray (and the check) at this test's folder instead of the machine's /tmp/ray.
    address_file = tmp_path / "ray" / "ray_current_cluster"
    address_file.parent.mkdir()
    address_file.write_text(dead_address())
    (tmp_path / "registry").mkdir()
    env = {**os.environ, "RAY_TMPDIR": str(tmp_path)}
    env.pop("RAY_ADDRESS", None)
    extra = (
        ["--out", str(tmp_path / "out")]
        if command[0] == "run"
        else ["--registry", str(tmp_path / "registry")]
    )

    # Execute: the default --address (none), as a newcomer types it
    finished = subprocess.run(
        [*BAIM, *command, *extra],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=STALE_LIMIT_S,
    )

    # Assert
    assert finished.returncode != 0
    assert "--address local" in finished.stderr
    assert str(address_file) in finished.stderr
    assert not (tmp_path / "out").exists()  # nothing started, nothing written


def test_the_address_check_passes_a_live_cluster_and_an_explicit_address(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from orchestrator.cli.main import stale_ray_address

    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert stale_ray_address(None) is None  # no address file: ray.init starts a new instance
    with socket.socket() as live:
        live.bind(("127.0.0.1", 0))
        live.listen()
        monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{live.getsockname()[1]}")
        assert stale_ray_address(None) is None
        assert stale_ray_address("auto") is None
    monkeypatch.setenv("RAY_ADDRESS", dead_address())
    assert "unset RAY_ADDRESS" in (stale_ray_address(None) or "")
    assert stale_ray_address("local") is None and stale_ray_address("ray://head:10001") is None
