"""How many tiny edge actors this machine runs at once, and the memory each one costs.

Spawns real EdgeNode actors (tiny VAE, 8 procedural images each, num_cpus=0.005 so CPUs never limit the
count) in batches, waits until every actor of the batch answers `progress()`, and after each batch reads
each actor process's unique memory (USS: private clean + private dirty pages, /proc/<pid>/smaps_rollup).
Stops at the goal, when a batch does not come up within the timeout, or when the machine's available memory
falls below a reserve. With --train, every live actor then trains its one epoch and uploads to a real
CloudCoordinator at once. Prints numbers; asserts nothing.

    .venv/bin/python benchmarks/bench_actors.py [--goal 200] [--batch 25] [--reserve-gib 3] [--train]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import ray

from actors.coordinator import CloudCoordinator
from actors.edge import EdgeNode
from orchestrator.cloud.local import local_training_round
from orchestrator.core.scenario import Scenario
from orchestrator.data.partitions import make_partitions
from orchestrator.data.sources import resolve_source

TINY_EDGE = {"shard_size": 8, "batch_size": 8, "num_cpus": 0.005, "model": {"widths": [4], "latent_dim": 2}}


def scenario_with(count: int, root: Path) -> Scenario:
    return Scenario.model_validate(
        {
            "name": "bench-actors",
            "time_scale": 0.0,
            "data": {
                "root": str(root / "no-celeba"),
                "procedural": {"num_images": 8 * count + 200, "native_size": 16},
                "resolution": 8,
                "test_per_task": 16,
                "cloud_per_task": 16,
                "holdout_per_task": 8,
            },
            "tasks": [{"name": "all", "expression": "Male or not Male"}],
            "edge_groups": [{"prefix": "e", "count": count, "task": "all", **TINY_EDGE}],
            "cloud": {
                "strategies": ["finetune"],
                "epochs": 1,
                "top_k": 1,
                "fusion": {"min_new_models": 10**6},
            },
            "baselines": {"fedavg": {"enabled": False}},
            "serving": {"enabled": False},
        }
    )


def unique_bytes(pid: int) -> int:
    """USS of a process: its private pages (what it would free on exit)."""
    total = 0
    with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as f:
        for line in f:
            if line.startswith(("Private_Clean:", "Private_Dirty:")):
                total += int(line.split()[1]) * 1024
    return total


def available_bytes() -> int:
    with open("/proc/meminfo", encoding="ascii") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("MemAvailable not in /proc/meminfo")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--goal", type=int, default=200)
    parser.add_argument("--batch", type=int, default=25)
    parser.add_argument("--reserve-gib", type=float, default=3.0, help="stop when less memory is available")
    parser.add_argument("--batch-timeout-s", type=float, default=600.0)
    parser.add_argument("--train", action="store_true", help="then train and upload with every live actor")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="bench-actors-"))
    scenario = scenario_with(args.goal, workdir)
    source = resolve_source(scenario.data)
    partitions = make_partitions(source, scenario)
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    source_ref = ray.put(source)
    edge_cls = ray.remote(EdgeNode).options(num_cpus=0.005, max_concurrency=2)

    handles: list[ray.actor.ActorHandle] = []  # type: ignore[name-defined]
    pids: list[int] = []
    print(
        f"{'actors':>7} {'batch up s':>10} {'USS/actor MiB':>14} {'USS total GiB':>14} {'available GiB':>14}"
    )
    reason = f"reached the goal of {args.goal}"
    edges = scenario.all_edges()
    while len(handles) < args.goal:
        if available_bytes() < args.reserve_gib * 2**30:
            reason = f"available memory below the {args.reserve_gib} GiB reserve"
            break
        batch = edges[len(handles) : len(handles) + args.batch]
        started = time.perf_counter()
        new = [
            edge_cls.remote(
                edge, source_ref, partitions.edges[edge.id], resolution=8, scenario_seed=0, kld_weight=0.00025
            )
            for edge in batch
        ]
        probes = [h.__ray_call__.remote(lambda self: os.getpid()) for h in new]
        ready, waiting = ray.wait(probes, num_returns=len(probes), timeout=args.batch_timeout_s)
        seconds = time.perf_counter() - started
        handles += new
        pids += ray.get(ready)
        if waiting:
            reason = f"{len(waiting)} actors of the last batch not up after {args.batch_timeout_s}s"
            break
        uss = [unique_bytes(pid) for pid in pids]
        print(
            f"{len(pids):7d} {seconds:10.1f} {sum(uss) / len(uss) / 2**20:14.1f} {sum(uss) / 2**30:14.2f} "
            f"{available_bytes() / 2**30:14.2f}",
            flush=True,
        )
    print(f"largest number of live edge actors: {len(pids)} ({reason})")

    if args.train and pids:
        coordinator = ray.remote(CloudCoordinator).options(num_cpus=0.01, max_concurrency=1000)
        cloud = coordinator.remote(
            scenario, str(workdir / "registry"), source_ref, partitions, round_runner=local_training_round
        )
        started = time.perf_counter()
        reports = [json.loads(r) for r in ray.get([h.run.remote(cloud) for h in handles[: len(pids)]])]
        seconds = time.perf_counter() - started
        accepted = sum(r["status"] == "accepted" for r in reports)
        print(f"{len(reports)} actors trained and uploaded in {seconds:.1f}s; {accepted} accepted")
    ray.shutdown()


if __name__ == "__main__":
    main()
