"""Virtual edges at scale: N tiny-model edges on a bounded edge-worker pool, on the virtual clock, 2 CPUs.

For each N (default 1,000 and 10,000), on a fresh local Ray with `--cpus` CPUs:
- memory: USS of the driver + the CloudCoordinator + the pool's EdgeWorker processes, before any edge and
  with N idle (spawned, not trained) virtual edges: per idle edge, the total / N and the marginal growth / N;
- wall time of the edge phase: every edge trains (1 epoch on its 4-image shard) and uploads to a real
  coordinator (validation, durable registry write, receipt), in the virtual clock's arrival order, as the
  engine's `time: virtual` pool run does (fleet + coordinator; the end-of-run cloud round is not run: a
  BAIM of N learners is the bounded-BAIM problem, not the pool's);
- orchestration overhead per edge: (wall - sum of the edges' measured training seconds / workers) / N;
- the virtual clock's own cost (edge_works + simulate) for N edges;
- upload latency with `--burst` (default 1,000) valid uploads submitted at once to an idle coordinator
  (the same measurement as bench_upload_latency.py): p50 / p90 / p99 of the acknowledgement (`received`:
  bytes durable) and of the decision (`accepted`, after validation), beside the same burst sent to a no-op
  actor (what Ray alone costs to deliver the calls: the floor under the acknowledgement).

Goals (issue): overhead <= 20 ms per edge, <= 2 MB per idle edge, ack p99 < 200 ms. Prints the numbers and
the machine's load (`os.getloadavg`); asserts nothing.

    .venv/bin/python benchmarks/bench_scale.py [--edges 1000 10000] [--cpus 2] [--burst 1000]
        [--train-up-to N]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import ray

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_upload_latency import payloads, percentiles, timed_uploads

from actors.coordinator import CloudCoordinator
from orchestrator.cloud.local import local_training_round
from orchestrator.core.metrics import Ledger
from orchestrator.core.reports import EdgeReport
from orchestrator.core.scenario import Scenario
from orchestrator.data.partitions import make_partitions
from orchestrator.data.sources import resolve_source
from orchestrator.runtime.fleet import EdgeFleet, EdgeLost
from orchestrator.runtime.virtual_clock import edge_works, simulate

EDGE = {"shard_size": 4, "batch_size": 4, "num_cpus": 0.5, "model": {"widths": [4], "latent_dim": 2}}


def scale_scenario(count: int, root: Path, max_loss_ratio: float = 2.5) -> Scenario:
    """N identical tiny edges of one task (as scenarios/scale_1k.yaml, with N edges)."""
    scenario = Scenario.model_validate({
        "name": f"bench-scale-{count}",
        "seed": 1,
        "time": "virtual",
        "placement": {"mode": "pool"},
        "data": {"root": str(root / "no-celeba"), "resolution": 8, "test_per_task": 16, "cloud_per_task": 32,
                 "holdout_per_task": 16, "procedural": {"num_images": 4 * count + 400, "native_size": 16}},
        "tasks": [{"name": "all", "expression": "Male or not Male"}],
        "edge_groups": [{"prefix": "e", "count": count, "task": "all", **EDGE}],
        "cloud": {"strategies": ["finetune"], "epochs": 1, "batch_size": 32, "top_k": 1,
                  "connection_height": 0, "num_workers": 1, "cpus_per_worker": 0.5,
                  "fusion": {"min_new_models": 10**6, "max_wait_seconds": 10**6}},
        "baselines": {"fedavg": {"enabled": False}},
        "serving": {"enabled": False},
    })  # fmt: skip
    document = scenario.model_dump(mode="json")
    document["cloud"]["uploads"]["max_loss_ratio"] = max_loss_ratio
    return Scenario.model_validate(document)


class EchoCoordinator:
    """Answers `receive` at once with a final receipt, doing nothing: the same burst against it measures
    what Ray alone costs to deliver N calls and their answers (the floor under the coordinator's ack)."""

    async def receive(self, edge_id: str, version: int, weights: bytes, spec_json: str, sha256: str) -> Any:
        return {"status": "accepted", "accepted": True, "key": edge_id}


def uss_mb(pids: list[int]) -> float:
    """Unique memory (private clean + dirty pages, Linux /proc) of the processes, in MiB."""
    total_kb = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith(("Private_Clean:", "Private_Dirty:")):
                    total_kb += int(line.split()[1])
        except OSError:
            continue
    return total_kb / 1024


def descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, stack = [], [root]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def ray_processes(title: str) -> list[int]:
    """This driver's Ray worker processes whose title starts with `ray::<title>`."""
    found = []
    for pid in descendants(os.getpid()):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if cmdline.startswith(f"ray::{title}"):
            found.append(pid)
    return found


def start_coordinator(scenario: Scenario, registry: Path) -> Any:
    coordinator_cls = ray.remote(CloudCoordinator).options(
        num_cpus=0.5, max_restarts=-1, max_task_retries=-1, max_concurrency=1000
    )
    coordinator = coordinator_cls.remote(scenario, str(registry), round_runner=local_training_round)
    ray.get(coordinator.status.remote())
    return coordinator


def measure(count: int, cpus: int, burst: int, train: bool, root: Path) -> dict[str, Any]:
    """The numbers for `count` edges; with `train` false only memory and the virtual clock."""
    scenario = scale_scenario(count, root)
    source = resolve_source(scenario.data)
    partitions = make_partitions(source, scenario)
    ray.init(num_cpus=cpus, include_dashboard=False, configure_logging=False, log_to_driver=False)
    try:
        coordinator = start_coordinator(scenario, root / "registry")
        driver = os.getpid()
        before = uss_mb([driver, *ray_processes("CloudCoordinator")])

        clock_started = time.perf_counter()
        simulation = simulate(edge_works(scenario, partitions), scenario.timeline)
        clock_seconds = time.perf_counter() - clock_started

        fleet = EdgeFleet(scenario, source, partitions, reserve_cpus=0.5)
        for edge in scenario.all_edges():
            fleet.spawn(edge.id)
        fleet.poll_starts()
        workers = [w for ws in fleet.pool.workers().values() for w in ws]
        ray.get([w.ran.options(concurrency_group="control").remote() for w in workers])  # workers are up
        time.sleep(2.0)  # let the processes settle
        pool = ray_processes("EdgeWorker")
        idle_total = uss_mb([driver, *ray_processes("CloudCoordinator"), *pool])
        idle_driver_coordinator = uss_mb([driver, *ray_processes("CloudCoordinator")])

        result: dict[str, Any] = {
            "edges": count, "cpus": cpus, "workers": len(workers), "virtual_clock_s": clock_seconds,
            "simulated_s": simulation.end_s, "mem_before_mb": before, "mem_idle_total_mb": idle_total,
            "mem_idle_driver_coordinator_mb": idle_driver_coordinator,
            "pool_mb": idle_total - idle_driver_coordinator, "mb_per_idle_edge_total": idle_total / count,
            "mb_per_idle_edge_marginal": (idle_driver_coordinator - before) / count,
            "loadavg_before": os.getloadavg(),
        }  # fmt: skip
        print(json.dumps(result), flush=True)
        if not train:
            return result
        started = time.perf_counter()
        refs = {fleet.call(f.edge_id, "run", coordinator): f.edge_id for f in simulation.uploads_in_order()}
        train_seconds, upload_seconds, accepted = 0.0, 0.0, 0
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=min(len(pending), 256), timeout=5.0)
            for ref in ready:
                answer = fleet.answer(refs[ref], ref)
                if isinstance(answer, EdgeLost):
                    raise RuntimeError(f"edge {answer.edge_id} lost: {answer.status} {answer.error}")
                report = EdgeReport.model_validate_json(answer)
                accepted += report.status == "accepted"
                ledger = Ledger.from_dict(report.ledger, export_metrics=False)
                seconds = ledger.edge_costs(report.edge_id)["seconds"]
                train_seconds += seconds.get("edge_train", 0.0)
                upload_seconds += seconds.get("edge_upload", 0.0)  # to the acknowledgement and the decision
        wall = time.perf_counter() - started
        fleet.release_all()
        ray.kill(coordinator)

        result.update(accepted=accepted, wall_s=wall, train_s_sum=train_seconds, upload_s_sum=upload_seconds,
                      upload_ms_per_edge=1000 * upload_seconds / len(workers) / count,
                      overhead_ms_per_edge=1000 * (wall - train_seconds / len(workers)) / count,
                      wall_ms_per_edge=1000 * wall / count)  # fmt: skip
        print(json.dumps(result), flush=True)
        burst = min(burst, count)
        if burst == 0:  # --burst 0: the edge phase only
            return result | {"burst": 0, "loadavg": os.getloadavg()}
        # Fresh (untrained) learners: the relative loss check is widened so that every one is accepted; every
        # check still runs, so each upload costs what a trained one does.
        burst_scenario = scale_scenario(burst, root / "burst", max_loss_ratio=100.0)
        burst_coordinator = start_coordinator(burst_scenario, root / "burst" / "registry")
        load_at_burst = os.getloadavg()
        prepared = payloads(burst_scenario)
        timed = timed_uploads(burst_coordinator, prepared)
        ray.kill(burst_coordinator)
        echo = ray.remote(EchoCoordinator).options(num_cpus=0.5, max_concurrency=1000).remote()
        floor = timed_uploads(echo, prepared)
        ray.kill(echo)
    finally:
        ray.shutdown()
    result.update(
        burst=burst, loadavg_at_burst=load_at_burst, loadavg=os.getloadavg(),
        ack_ms={k: 1000 * v for k, v in percentiles(timed.acks).items()},
        decided_ms={k: 1000 * v for k, v in percentiles(timed.decided).items()},
        ray_floor_ms={k: 1000 * v for k, v in percentiles(floor.acks).items()},
    )  # fmt: skip
    return result


def main() -> None:
    for count in args.edges:
        train = count <= args.train_up_to
        with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
            result = measure(count, args.cpus, args.burst, train, Path(tmp))
        print(json.dumps(result))
        memory = (
            f"{count:,} edges on {result['workers']} workers ({args.cpus} CPUs, load "
            f"{result['loadavg_before'][0]:.1f}): memory {result['mb_per_idle_edge_total']:.3f} MB per idle "
            f"edge in all (driver + coordinator + pool), {result['mb_per_idle_edge_marginal'] * 1024:.1f} KB "
            f"marginal (goal <= 2 MB); virtual clock {result['virtual_clock_s']:.2f} s"
        )
        if not train:
            print(memory + f"; not trained (above --train-up-to {args.train_up_to})", flush=True)
            continue
        trained = (
            memory + f"; wall {result['wall_s']:.1f} s, {result['accepted']:,} accepted, overhead "
            f"{result['overhead_ms_per_edge']:.1f} ms/edge (goal <= 20; of it "
            f"{result['upload_ms_per_edge']:.1f} waiting for the acknowledgement and the decision)"
        )
        if not result["burst"]:
            print(trained, flush=True)
            continue
        ack, decided = result["ack_ms"], result["decided_ms"]
        print(
            trained + f"; with {result['burst']:,} at once "
            f"(load {result['loadavg_at_burst'][0]:.1f}): ack (received) p50/p90/p99 "
            f"{ack['p50']:.0f}/{ack['p90']:.0f}/{ack['p99']:.0f} ms (goal p99 < 200), decided p50/p90/p99 "
            f"{decided['p50']:.0f}/{decided['p90']:.0f}/{decided['p99']:.0f} ms; the same burst to a no-op "
            f"actor (Ray alone) p99 {result['ray_floor_ms']['p99']:.0f} ms",
            flush=True,
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--edges", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--burst", type=int, default=1000)
    parser.add_argument(
        "--train-up-to", type=int, default=10_000, help="larger N: memory and the virtual clock only"
    )
    args = parser.parse_args()
    main()
