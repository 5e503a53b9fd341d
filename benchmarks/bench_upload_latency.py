"""Upload acknowledgement latency at the CloudCoordinator: many edges uploading at once during a round.

A real CloudCoordinator Ray actor (async, as the engine starts it) receives N uploads submitted at the same
instant (default 100, each a different edge's valid learner, prepared beforehand so only the upload is
timed) while a cloud training round runs (started first by `--warm` uploads that meet the fusion policy).
Two latencies per upload, from submitting `receive.remote(...)`: to its acknowledgement (`received`: the
bytes durable in the registry, Ray's own overhead) and to its decision (`outcome`: validation, the durable
artifact write, the receipt log). Prints p50 / p90 / p99 / max and the
ratio of p99 to an idle baseline (the same N uploads with no round running). Asserts nothing.

    .venv/bin/python benchmarks/bench_upload_latency.py [--uploads 100] [--trainer local|ray_train]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple

import ray
import torch

from actors.coordinator import CloudCoordinator
from actors.edge import upload_spec
from baim.config import LearnerSpec
from baim.learners import VAELearner
from orchestrator.cloud.local import local_training_round
from orchestrator.cloud.ray_train import ray_train_round
from orchestrator.core.artifacts import ArtifactPayload, pack_state
from orchestrator.core.scenario import Scenario

EDGE = {"shard_size": 4, "batch_size": 4, "num_cpus": 0.01, "model": {"widths": [8, 16], "latent_dim": 8}}


def make_scenario(count: int, root: Path, epochs: int, min_new_models: int) -> Scenario:
    return Scenario.model_validate(
        {
            "name": "bench-upload-latency",
            "data": {
                "root": str(root / "no-celeba"),
                "procedural": {"num_images": 4 * count + 600, "native_size": 32},
                "resolution": 16,
                "test_per_task": 32,
                "cloud_per_task": 256,
                "holdout_per_task": 16,
            },
            "tasks": [{"name": "all", "expression": "Male or not Male"}],
            "edge_groups": [{"prefix": "e", "count": count, "task": "all", **EDGE}],
            "cloud": {
                "strategies": ["finetune"],
                "epochs": epochs,
                "batch_size": 32,
                "top_k": 1,
                "connection_height": 0,
                "cpus_per_worker": 0.5,
                "fusion": {"min_new_models": min_new_models, "max_wait_seconds": 10**6},
            },
            "baselines": {"fedavg": {"enabled": False}},
            "serving": {"enabled": False},
        }
    )


def payloads(scenario: Scenario) -> list[tuple[str, ArtifactPayload]]:
    out = []
    for n, edge in enumerate(scenario.all_edges()):
        torch.manual_seed(n)
        spec = LearnerSpec(tuple(edge.model.widths), edge.model.latent_dim, scenario.data.resolution)
        out.append((edge.id, pack_state(VAELearner(spec).state_dict(), upload_spec(edge, spec))))
    return out


class TwoPhase(NamedTuple):
    """Seconds from submitting each upload to its acknowledgement (`received`) and to its decision."""

    acks: list[float]
    decided: list[float]


def timed_uploads(coordinator: Any, batch: list[tuple[str, ArtifactPayload]]) -> TwoPhase:
    """Submit every upload at once (`receive`); as each acknowledgement arrives, ask for its `outcome`.
    Returns each upload's latency to both; raises when one was not accepted."""
    submitted = time.perf_counter()
    refs = {
        coordinator.receive.remote(
            edge_id=edge_id, version=1, weights=p.weights, spec_json=p.spec_json, sha256=p.sha256
        ): edge_id
        for edge_id, p in batch
    }
    acks, decided = [], []
    outcomes: dict[Any, str] = {}
    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        now = time.perf_counter()
        receipt = ray.get(ready[0])
        if ready[0] in refs:
            acks.append(now - submitted)
            if receipt["status"] == "received":
                outcome = coordinator.outcome.remote(receipt["key"])
                outcomes[outcome] = refs[ready[0]]
                pending.append(outcome)
                continue
        decided.append(now - submitted)
        if receipt is None or not receipt["accepted"]:
            edge_id = outcomes.get(ready[0]) or refs.get(ready[0])
            raise RuntimeError(f"upload of {edge_id} not accepted: {receipt}")
    return TwoPhase(acks, decided)


def percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"p50": statistics.median(ordered), "p90": pick(0.90), "p99": pick(0.99), "max": ordered[-1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--uploads", type=int, default=100)
    parser.add_argument("--warm", type=int, default=4, help="uploads that start the training round first")
    parser.add_argument(
        "--epochs", type=int, default=30, help="cloud epochs: the round must outlast the burst"
    )
    parser.add_argument("--trainer", choices=["local", "ray_train"], default="local")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="bench-upload-"))
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    runner = local_training_round if args.trainer == "local" else ray_train_round
    coordinator_cls = ray.remote(CloudCoordinator).options(
        num_cpus=0.5, max_restarts=-1, max_task_retries=-1, max_concurrency=1000
    )
    count = args.warm + args.uploads

    # Baseline: the same burst with no round running (the policy never fires).
    idle_scenario = make_scenario(count, root / "idle", args.epochs, min_new_models=10**6)
    idle = coordinator_cls.remote(idle_scenario, str(root / "idle" / "registry"), round_runner=runner)
    ray.get(idle.status.remote())
    idle_latencies = timed_uploads(idle, payloads(idle_scenario)[args.warm :])
    ray.kill(idle)

    # Measured: --warm uploads start a round, then the burst arrives while it runs.
    scenario = make_scenario(count, root / "busy", args.epochs, min_new_models=args.warm)
    coordinator = coordinator_cls.remote(scenario, str(root / "busy" / "registry"), round_runner=runner)
    ray.get(coordinator.status.remote())
    prepared = payloads(scenario)
    timed_uploads(coordinator, prepared[: args.warm])
    deadline = time.monotonic() + 300
    while not ray.get(coordinator.status.remote())["round_running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    busy_latencies = timed_uploads(coordinator, prepared[args.warm :])
    status = ray.get(coordinator.status.remote())

    print(
        f"{args.uploads} simultaneous uploads, trainer {args.trainer}, {os.cpu_count()} CPUs, "
        f"load {os.getloadavg()}"
    )
    print(f"{'':36} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    for phase in ("acks", "decided"):
        idle_p, busy_p = (
            percentiles(getattr(idle_latencies, phase)),
            percentiles(getattr(busy_latencies, phase)),
        )
        for name, p in (
            (f"{phase}, idle coordinator", idle_p),
            (f"{phase}, during a training round", busy_p),
        ):
            print(f"{name:36} " + " ".join(f"{p[k] * 1000:8.1f}" for k in ("p50", "p90", "p99", "max")))
        print(f"{phase}: p99 during a round / p99 idle: {busy_p['p99'] / idle_p['p99']:.2f}")
    print(f"round still running after the burst: {status['round_running']} (rounds done: {status['rounds']})")
    ray.shutdown()


if __name__ == "__main__":
    main()
