"""Serve benchmark on loopback: overhead vs a direct call, batching on vs off, autoscaling up and down.

    .venv/bin/python benchmarks/bench_serve.py [--quick]

Prints numbers, asserts nothing. A real decomposed task model (random weights, 32x32 images, three learners)
is written to a temporary registry and served by serve.app exactly as `baim serve` does.

1. Overhead: the same request (n=1) sequentially, through HTTP + Serve, and as a direct in-process call of
   the same work (generate_batch + PNG encoding, which is what a replica runs). Overhead = the difference.
2. Throughput: a bounded load generator (C client threads, persistent connections, a fixed number of
   requests each) against one replica with @serve.batch max_batch_size=8, then =1 (batching off).
3. Autoscaling: min 1 / max 3 replicas, target 2 ongoing requests; load for a while, then idle, printing the
   replica count once a second.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import tempfile
import threading
import time
from collections.abc import Callable

import torch

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
torch.set_num_threads(1)

import ray  # noqa: E402
from ray import serve  # noqa: E402

from baim.config import LearnerSpec  # noqa: E402
from baim.decompose import decompose  # noqa: E402
from baim.learners import VAELearner  # noqa: E402
from baim.model import BAIM  # noqa: E402
from orchestrator.core.artifacts import pack_module  # noqa: E402
from orchestrator.core.registry import Registry  # noqa: E402
from orchestrator.core.scenario import ServingConfig  # noqa: E402
from serve.app import build_app, deployment_name, start_http  # noqa: E402
from serve.models import GenerationRequest, generate_batch, load_model, png_base64  # noqa: E402

TASK = "smiling"
APP = "bench"


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


def deploy(registry_uri: str, serving: ServingConfig, **overrides: float) -> None:
    app = build_app(
        registry_uri, serving, api_token="", poll_seconds=0, autoscaling_overrides=overrides or None
    )
    serve.run(app, name=APP, route_prefix="/")


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
        time.sleep(1.0)
    for thread in threads:
        thread.join()
    return time.perf_counter() - started, failures[0]


def replica_counts() -> tuple[int, int]:
    """(running, starting) replicas of the task deployment."""
    states = serve.status().applications[APP].deployments[deployment_name(TASK)].replica_states
    return int(states.get("RUNNING", 0)), int(states.get("STARTING", 0))


def bench_overhead(registry: Registry, port: int, samples: int) -> None:
    loaded = load_model(registry.get(f"task/{TASK}", "v000001"), task=TASK, model_version="v000001")
    direct = []
    for i in range(samples):
        started = time.perf_counter()
        png_base64(generate_batch(loaded, [GenerationRequest(1, i)])[0])
        direct.append(time.perf_counter() - started)
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    for i in range(10):  # warm-up: connection, handle routing, first batches
        post_generate(connection, 1, i)
    healthz = []
    for _ in range(samples):
        started = time.perf_counter()
        connection.request("GET", "/healthz")
        connection.getresponse().read()
        healthz.append(time.perf_counter() - started)
    served = []
    for i in range(samples):
        started = time.perf_counter()
        post_generate(connection, 1, i)
        served.append(time.perf_counter() - started)
    connection.close()
    d50, d99 = percentile(direct, 50) * 1e3, percentile(direct, 99) * 1e3
    s50, s99 = percentile(served, 50) * 1e3, percentile(served, 99) * 1e3
    print(f"\n== Overhead, n=1, {samples} sequential requests")
    print(f"direct call (generate + PNG): p50 {d50:7.2f} ms   p99 {d99:7.2f} ms")
    print(f"HTTP through Serve:           p50 {s50:7.2f} ms   p99 {s99:7.2f} ms")
    print(
        f"Serve overhead:               p50 {s50 - d50:7.2f} ms   p99 {s99 - d99:7.2f} ms  (goal p50 <= 3 ms)"
    )
    print(f"ratio served/direct:          p50 {s50 / d50:7.2f}x")
    h50, h99 = percentile(healthz, 50) * 1e3, percentile(healthz, 99) * 1e3
    print(f"GET /healthz (proxy + ingress, no model hop): p50 {h50:.2f} ms   p99 {h99:.2f} ms")


def bench_batching(registry_uri: str, port: int, clients: int, requests_each: int) -> None:
    print(f"\n== Throughput, one replica, {clients} clients x {requests_each} requests of n=1")
    results = {}
    for label, max_batch_size in (
        ("batching on (max_batch_size=8)", 8),
        ("batching off (max_batch_size=1)", 1),
    ):
        serving = ServingConfig(
            port=port, min_replicas=1, max_replicas=1, num_cpus=1, max_batch_size=max_batch_size
        )
        deploy(registry_uri, serving)
        load(port, clients, 5)  # warm-up
        seconds, failures = load(port, clients, requests_each)
        results[max_batch_size] = clients * requests_each / seconds
        print(f"{label:34s} {results[max_batch_size]:7.1f} requests/s   ({failures} failed)")
    print(f"batching speed-up: {results[8] / results[1]:.2f}x   (goal >= 1.5x)")


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
    args = parser.parse_args()
    samples, requests_each, load_seconds = (50, 10, 10.0) if args.quick else (300, 40, 25.0)

    with tempfile.TemporaryDirectory() as root:
        registry = Registry(os.path.join(root, "registry"))
        publish_task_model(registry)
        ray.init(num_cpus=4, include_dashboard=False, configure_logging=False, log_to_driver=False)
        port = free_port()
        try:
            start_http(ServingConfig(port=port))
            deploy(registry.uri, ServingConfig(port=port, min_replicas=1, max_replicas=1, num_cpus=1))
            bench_overhead(registry, port, samples)
            bench_batching(registry.uri, port, clients=16, requests_each=requests_each)
            bench_autoscaling(registry.uri, port, clients=12, load_seconds=load_seconds, idle_seconds=60.0)
        finally:
            serve.shutdown()
            ray.shutdown()


if __name__ == "__main__":
    main()
