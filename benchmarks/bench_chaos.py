"""Chaos: kill 30% of the edges mid-training, the coordinator during a fusion, a Serve replica under load.

Three measurements on a local Ray instance (tests/integration/test_chaos.py runs the same functions at a
smaller size and asserts the goals):

1. `edge_churn_run`: scenarios/chaos.yaml through the real engine (`run_scenario`): 10 edges, 3 of them
   (30%) crashed by the timeline while training, the coordinator killed while uploads arrive. Printed:
   accepted uploads lost (an edge was told "accepted" but its learner is missing from the final BAIM or its
   artifact from the registry; goal 0), the coordinator's restarts, every edge's final status.
2. `coordinator_kill_during_fusion`: the CloudCoordinator actor as the engine starts it (`max_restarts=-1`,
   `max_task_retries=-1`); all uploads sent at once; the coordinator is killed the moment the first one is
   acknowledged (the others are being validated, stored or fused). Printed: resume time (from the kill to
   the first answer of the restarted actor), accepted uploads lost (goal 0).
3. `serve_replica_kill_under_load`: a task deployment with 2 replicas behind the HTTP proxy on loopback;
   a fixed number of client threads send generate requests back to back; one replica is killed a third of
   the way in. Printed: requests, failed requests (any non-200 or connection error; goal < 1%).

Run: .venv/bin/python benchmarks/bench_chaos.py   (a few minutes on 2 busy cores)
     .venv/bin/python benchmarks/bench_chaos.py --parts serve --serve-trials 3   (part 3 only, 3 kills)
"""

from __future__ import annotations

import argparse
import json
import logging
import socket
import statistics
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import ray
import torch
from ray import serve

from actors.coordinator import CloudCoordinator
from actors.edge import learner_name, upload_spec
from baim.config import LearnerSpec
from baim.learners import VAELearner
from orchestrator.cloud.local import local_training_round
from orchestrator.core.artifacts import ArtifactPayload, pack_module, pack_state
from orchestrator.core.names import task_owner, version_name
from orchestrator.core.registry import Registry
from orchestrator.core.scenario import Scenario, ServingConfig, load_scenario
from orchestrator.runtime.engine import EngineOptions, run_scenario
from serve.app import RegistryWatcher, deployment_name, start_http

REPO = Path(__file__).resolve().parents[1]
CHAOS_SCENARIO = REPO / "scenarios" / "chaos.yaml"
REPLICA_PREFIX = "SERVE_REPLICA::"  # Serve's actor name prefix for replicas (namespace "serve")

logger = logging.getLogger(__name__)


# ---- 1. edges killed mid-training, coordinator killed mid-run (the engine plays scenarios/chaos.yaml) ------


def edge_churn_run(scenario: Scenario, out_dir: Path) -> dict[str, Any]:
    """Run the scenario with the engine on the current Ray instance; count what was acknowledged but lost."""
    started = time.perf_counter()
    report = run_scenario(scenario, out_dir, EngineOptions(edge_timeout_s=900)).model_dump(mode="json")
    registry = Registry(report["registry"])
    final_learners = set(report["cloud"]["learners"])
    acknowledged = [edge_id for edge_id, row in report["edges"].items() if row["status"] == "accepted"]
    lost = [
        edge_id
        for edge_id in acknowledged
        if learner_name(edge_id) not in final_learners or not registry.versions(f"edge/{edge_id}")
    ]
    crash_events = [e for e in scenario.timeline if e.kind == "crash"]
    return {
        "edges": len(report["edges"]),
        "crash_events": len(crash_events),
        "statuses": {edge_id: row["status"] for edge_id, row in report["edges"].items()},
        "crashed": sorted(e for e, row in report["edges"].items() if row["status"] == "crashed"),
        "acknowledged": len(acknowledged),
        "lost": lost,
        "coordinator_restarts": report["cloud"]["coordinator_restarts"],
        "untrained_learners": report["cloud"]["untrained_learners"],
        "test_loss": {task: summary["test_loss"] for task, summary in report["tasks"].items()},
        "seconds": time.perf_counter() - started,
    }


# ---- 2. the coordinator killed during a fusion -------------------------------------------------------------


def honest_payloads(scenario: Scenario) -> dict[str, ArtifactPayload]:
    """One valid (untrained) upload per edge: the checks and fusion do not depend on training."""
    payloads = {}
    for index, edge in enumerate(scenario.all_edges()):
        spec = LearnerSpec(tuple(edge.model.widths), edge.model.latent_dim, scenario.data.resolution)
        torch.manual_seed(index)
        payloads[edge.id] = pack_state(VAELearner(spec).state_dict(), upload_spec(edge, spec))
    return payloads


def coordinator_kill_during_fusion(scenario: Scenario, registry_uri: str) -> dict[str, Any]:
    """Send every edge's upload at once, kill the coordinator at the first acknowledgement, measure."""
    coordinator_class = ray.remote(CloudCoordinator).options(
        num_cpus=0.25, max_restarts=-1, max_task_retries=-1, max_concurrency=1000
    )  # exactly the engine's options: Ray restarts it and re-sends calls in flight
    coordinator: Any = coordinator_class.remote(scenario, registry_uri, round_runner=local_training_round)
    ray.get(coordinator.status.remote(), timeout=300)  # up and resumed (a fresh registry: nothing to resume)
    payloads = honest_payloads(scenario)
    try:
        refs = {
            coordinator.upload.remote(
                edge_id=edge_id, version=1, weights=p.weights, spec_json=p.spec_json, sha256=p.sha256
            ): edge_id
            for edge_id, p in payloads.items()
        }
        first_done, _ = ray.wait(list(refs), num_returns=1, timeout=300)
        in_flight_at_kill = len(refs) - len(ray.wait(list(refs), num_returns=len(refs), timeout=0)[0])
        killed_at = time.perf_counter()
        ray.kill(coordinator, no_restart=False)
        # Resume time: until the restarted actor (its __init__ resumes from the checkpoint) answers.
        ray.get(coordinator.status.remote(), timeout=300)
        resume_seconds = time.perf_counter() - killed_at
        receipts: dict[str, dict[str, Any]] = {}
        for ref, edge_id in refs.items():
            try:
                receipts[edge_id] = ray.get(ref, timeout=300)
            except ray.exceptions.RayError:  # an edge retries an upload whose call died with the actor
                p = payloads[edge_id]
                receipts[edge_id] = ray.get(
                    coordinator.upload.remote(
                        edge_id=edge_id, version=1, weights=p.weights, spec_json=p.spec_json, sha256=p.sha256
                    ),
                    timeout=300,
                )
        status: dict[str, Any] = ray.get(coordinator.status.remote(), timeout=300)
    finally:
        ray.kill(coordinator, no_restart=True)
    acknowledged = [edge_id for edge_id, receipt in receipts.items() if receipt["accepted"]]
    lost = [edge_id for edge_id in acknowledged if learner_name(edge_id) not in status["learners"]]
    return {
        "uploads": len(payloads),
        "in_flight_at_kill": in_flight_at_kill,
        "first_acknowledged": refs[first_done[0]],
        "resume_seconds": resume_seconds,
        "restarts": status["restarts"],
        "acknowledged": len(acknowledged),
        "rejected": {e: r["reason"] for e, r in receipts.items() if not r["accepted"]},
        "lost": lost,
    }


# ---- 3. a Serve replica killed under a bounded load --------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def publish_task_model(registry_uri: str, task: str, resolution: int) -> None:
    """A servable task model (a lone learner, as an edge uploads it) when the registry holds none."""
    registry = Registry(registry_uri)
    if registry.latest(task_owner(task)) is not None:
        return
    torch.manual_seed(0)
    learner = VAELearner(LearnerSpec(widths=(8, 16), latent_dim=8, resolution=resolution))
    spec = {"kind": "learner", "edge_id": "chaos", "task": task, "learner": learner.spec.to_dict()}
    registry.put(task_owner(task), version_name(1), pack_module(learner, spec))


def replica_names(task: str) -> list[str]:
    return sorted(
        actor["name"]
        for actor in ray.util.list_named_actors(all_namespaces=True)
        if actor["name"].startswith(REPLICA_PREFIX) and f"#{deployment_name(task)}#" in actor["name"]
    )


def serve_replica_kill_under_load(
    registry_uri: str, task: str, *, clients: int, requests_per_client: int, app_name: str = "chaos"
) -> dict[str, Any]:
    """Deploy `task` with 2 replicas, send a bounded load, kill one replica a third of the way through."""
    serving = ServingConfig(port=free_port(), min_replicas=2, max_replicas=2, num_cpus=0.25, max_batch_size=4)
    serve.shutdown()  # HTTP options apply only to a fresh Serve instance
    start_http(serving)
    RegistryWatcher(registry_uri, serving, app_name=app_name, poll_seconds=0).poll()
    deadline = time.monotonic() + 120
    while len(replica_names(task)) < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    before = replica_names(task)
    url = f"http://127.0.0.1:{serving.port}/tasks/{task}/generate"
    outcomes: list[str] = []
    lock = threading.Lock()
    total = clients * requests_per_client
    kill_after = total // 3

    def client(index: int) -> None:
        for i in range(requests_per_client):
            body = json.dumps({"n": 1, "seed": index * requests_per_client + i}).encode()
            request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=60) as response:
                    outcome = "ok" if response.status == 200 else f"http {response.status}"
            except urllib.error.HTTPError as err:
                outcome = f"http {err.code}"
            except OSError as err:  # connection reset/refused, timeout
                outcome = type(err).__name__
            with lock:
                outcomes.append(outcome)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    while True:
        with lock:
            if len(outcomes) >= kill_after:
                break
        time.sleep(0.01)
    victim = before[0]
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
    killed_at = len(outcomes)
    for thread in threads:
        thread.join(600)
    seconds = time.perf_counter() - started
    deadline = time.monotonic() + 120  # Serve's controller replaces the dead replica
    while (len(replica_names(task)) < 2 or victim in replica_names(task)) and time.monotonic() < deadline:
        time.sleep(0.5)
    after = replica_names(task)
    serve.delete(app_name)
    failures = [o for o in outcomes if o != "ok"]
    return {
        "requests": len(outcomes),
        "failed": len(failures),
        "failed_fraction": len(failures) / max(1, len(outcomes)),
        "failure_kinds": sorted(set(failures)),
        "killed_after_requests": killed_at,
        "replicas_before": len(before),
        "replaced": victim not in after and len(after) == 2,
        "seconds": seconds,
    }


# ---- the benchmark -----------------------------------------------------------------------------------------


PARTS = ("churn", "fusion", "serve")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--parts",
        default=",".join(PARTS),
        help=f"comma-separated subset of {', '.join(PARTS)} (default: all three)",
    )
    parser.add_argument(
        "--serve-trials",
        type=int,
        default=1,
        help="replica kills to measure in part 3, each on a fresh deployment (default 1)",
    )
    args = parser.parse_args()  # fmt: skip
    parts = [part.strip() for part in args.parts.split(",") if part.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"--parts: unknown {unknown}; choose from {list(PARTS)}")
    if args.serve_trials < 1:
        parser.error("--serve-trials must be at least 1")

    logging.basicConfig(level=logging.ERROR)
    scenario = load_scenario(CHAOS_SCENARIO)
    ray.init(num_cpus=4, include_dashboard=False, configure_logging=False, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory(prefix="bench-chaos-") as tmp:
            if "churn" in parts:
                churn = edge_churn_run(scenario, Path(tmp) / "run")
                share = churn["crash_events"] / churn["edges"]
                print(f"1. {CHAOS_SCENARIO.name}: {churn['edges']} edges, {churn['crash_events']} crash "
                      f"events ({share:.0%}), crashed {churn['crashed']}")  # fmt: skip
                print(f"   statuses {churn['statuses']}")
                print(f"   acknowledged uploads {churn['acknowledged']}, lost {len(churn['lost'])} "
                      f"{churn['lost']} "
                      f"(goal 0); coordinator restarts {churn['coordinator_restarts']}; "
                      f"untrained {churn['untrained_learners']}; run {churn['seconds']:.0f}s")  # fmt: skip

            if "fusion" in parts:
                trials = [
                    coordinator_kill_during_fusion(scenario, str(Path(tmp) / f"kill-{trial}"))
                    for trial in range(3)
                ]
                resumes = [t["resume_seconds"] for t in trials]
                print(f"2. coordinator killed at the first acknowledgement of {trials[0]['uploads']} "
                      f"concurrent uploads, 3 trials: in flight at the kill "
                      f"{[t['in_flight_at_kill'] for t in trials]}, "
                      f"resume seconds {[round(r, 2) for r in resumes]} "
                      f"(median {statistics.median(resumes):.2f}), "
                      f"acknowledged {[t['acknowledged'] for t in trials]}, "
                      f"lost {sum(len(t['lost']) for t in trials)} (goal 0)")  # fmt: skip

            if "serve" in parts:
                registry_uri = str(Path(tmp) / "serve-registry")
                task = scenario.tasks[0].name
                publish_task_model(registry_uri, task, scenario.data.resolution)
                loads = [
                    serve_replica_kill_under_load(registry_uri, task, clients=4, requests_per_client=100)
                    for _ in range(args.serve_trials)
                ]
                for trial, load in enumerate(loads, start=1):
                    print(f"3. trial {trial}: Serve replica killed after {load['killed_after_requests']} of "
                          f"{load['requests']} requests (4 clients): failed {load['failed']} = "
                          f"{load['failed_fraction']:.2%} (goal < 1%) {load['failure_kinds']}; "
                          f"replica replaced {load['replaced']}; "
                          f"{load['requests'] / load['seconds']:.1f} req/s")  # fmt: skip
                failed = sum(load["failed"] for load in loads)
                sent = sum(load["requests"] for load in loads)
                print(f"   all trials: failed {failed} of {sent} = {failed / sent:.2%} (goal < 1%)")
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
