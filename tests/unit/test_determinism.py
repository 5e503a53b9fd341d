"""Determinism: the same uploads and seed give the same trained BAIM, whatever the arrival order, the global
RNG's state or the process (docs/reliability.md, "Determinism").

The reproduction (`reproduce`): four edge learners are uploaded to a fresh CloudCoordinator (no Ray) in a
given order, torch's global RNG is put in a given state, and `finish()` trains one local round and publishes
the task models. Its fingerprint holds the sha256 of the fused BAIM the round trained (before training), the
trained BAIM's artifact, the final BAIM's state_dict, and the train and test losses. The subprocess test runs
it in two processes with different PYTHONHASHSEED, arrival orders and RNG states; the other tests run parts
of it in this process.

Run by hand: `python -m tests.unit.test_determinism --order 3,1,0,2 --rng-seed 7 --workdir DIR` prints the
fingerprint as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch

from actors.coordinator import CloudCoordinator
from actors.edge import upload_spec
from actors.rounds import RoundRequest, RoundResult
from baim.config import LearnerSpec
from baim.learners import VAELearner
from orchestrator.cloud.local import local_training_round
from orchestrator.core.artifacts import ArtifactPayload, pack_state
from orchestrator.core.progress import read_epochs
from orchestrator.core.registry import Registry
from orchestrator.core.scenario import Scenario, load_scenario

REPO = Path(__file__).resolve().parents[2]
EDGES = ["edge-0", "edge-1", "edge-2", "edge-3"]  # scenarios/tiny.yaml: two per task, mixed sizes
NEVER_TRAIN = {"min_new_models": 100, "max_wait_seconds": 100_000}  # rounds start only from finish()


def tiny_scenario(workdir: Path) -> Scenario:
    """scenarios/tiny.yaml on procedural faces, one strategy (finetune), one epoch, no automatic rounds."""
    document = load_scenario(REPO / "scenarios" / "tiny.yaml").model_dump(mode="json")
    document["data"]["root"] = str(workdir / "no-celeba-here")
    document["data"]["procedural"] = {"num_images": 1500, "native_size": 32}
    document["cloud"].update(strategies=["finetune"], epochs=1, fusion=NEVER_TRAIN)
    return Scenario.model_validate(document)


def edge_payloads(scenario: Scenario) -> dict[str, ArtifactPayload]:
    """Honest uploads: fresh learners of the edges' declared architectures, seeded per edge (so learners of
    the same architecture differ and their order matters).

    Built before any coordinator exists: the coordinator's threads draw from the global RNG (module
    construction), so seeding it while they run would not give the same weights every time.
    """
    payloads = {}
    for index, edge_id in enumerate(EDGES):
        edge = scenario.edge(edge_id)
        spec = LearnerSpec(tuple(edge.model.widths), edge.model.latent_dim, scenario.data.resolution)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(index)
            state = VAELearner(spec).state_dict()
        payloads[edge_id] = pack_state(state, upload_spec(edge, spec))
    return payloads


def state_sha256(module: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode() + b"\0" + str(tensor.dtype).encode() + str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class RecordingRunner:
    """local_training_round, keeping each round's request and result for inspection."""

    def __init__(self) -> None:
        self.rounds: list[tuple[RoundRequest, RoundResult]] = []

    def __call__(self, request: RoundRequest) -> RoundResult:
        result = local_training_round(request)
        self.rounds.append((request, result))
        return result


async def upload_in_order(
    coordinator: CloudCoordinator, payloads: dict[str, ArtifactPayload], order: list[str]
) -> list[str]:
    """Upload one after the other in `order`; returns the live BAIM's learner order (the arrival order)."""
    for edge_id in order:
        payload = payloads[edge_id]
        receipt = await coordinator.upload(
            edge_id=edge_id,
            version=1,
            weights=payload.weights,
            spec_json=payload.spec_json,
            sha256=payload.sha256,
        )
        assert receipt["accepted"], receipt
    return list((await coordinator.status())["learners"])


async def reproduce(workdir: Path, order: list[str], rng_seed: int) -> dict[str, Any]:
    """The reproduction from docs/reliability.md; returns its fingerprint (JSON-able)."""
    scenario = tiny_scenario(workdir)
    payloads = edge_payloads(scenario)
    runner = RecordingRunner()
    coordinator = CloudCoordinator(scenario, str(workdir / "registry"), round_runner=runner)
    arrival = await upload_in_order(coordinator, payloads, order)
    torch.manual_seed(rng_seed)  # whatever state the caller left the global RNG in must not matter
    summary = await coordinator.finish()
    (request, result), *_ = runner.rounds
    assert coordinator.baim is not None
    return {
        "arrival_order": arrival,
        "round_learners": summary["rounds"][0]["learners"],
        "fused_sha256": request.baim.sha256,
        "trained_sha256": result.trained.sha256,
        "final_state_sha256": state_sha256(coordinator.baim),
        "train_loss": result.strategies["finetune"].train_loss,
        "test_loss": {task: out["test_loss"] for task, out in summary["tasks"].items()},
        "task_sha256": {task: out["sha256"] for task, out in summary["tasks"].items()},
    }


def fingerprint_without_arrival(fingerprint: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in fingerprint.items() if key != "arrival_order"}


# ---- tests ---------------------------------------------------------------------------------------------


def test_same_uploads_give_bit_identical_trained_baim_across_processes(tmp_path: Path) -> None:
    # Prepare: two processes differing in hash seed, arrival order and global RNG state.
    runs = [
        ("1", ["edge-0", "edge-1", "edge-2", "edge-3"], 0),
        ("2", ["edge-3", "edge-1", "edge-0", "edge-2"], 7),
    ]
    processes = []
    for hash_seed, order, rng_seed in runs:
        workdir = tmp_path / f"run-{hash_seed}"
        workdir.mkdir()
        command = [
            sys.executable, "-m", "tests.unit.test_determinism",
            "--order", ",".join(order), "--rng-seed", str(rng_seed), "--workdir", str(workdir),
        ]  # fmt: skip
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        processes.append(
            subprocess.Popen(
                command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )

    # Execute: both run at once (they are independent).
    outputs = [process.communicate(timeout=300) for process in processes]

    # Assert
    fingerprints = []
    for process, (stdout, stderr) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, stderr[-3000:]
        fingerprints.append(json.loads(stdout.strip().splitlines()[-1]))
    first, second = fingerprints
    assert first["arrival_order"] == EDGES
    assert second["arrival_order"] == runs[1][1]  # the live BAIM really fused in a different order
    assert first["round_learners"] == EDGES  # the round trained the canonical order
    assert fingerprint_without_arrival(first) == fingerprint_without_arrival(second)


def test_round_trains_learners_in_canonical_order_whatever_the_arrival_order(tmp_path: Path) -> None:
    # Prepare
    scenario = tiny_scenario(tmp_path)
    payloads = edge_payloads(scenario)
    snapshots = []
    for index, order in enumerate([EDGES, ["edge-2", "edge-3", "edge-1", "edge-0"]]):
        runner = RecordingRunner()
        coordinator = CloudCoordinator(scenario, str(tmp_path / f"registry-{index}"), round_runner=runner)

        async def first_round(coordinator: CloudCoordinator = coordinator, order: list[str] = order) -> None:
            await upload_in_order(coordinator, payloads, order)
            await coordinator._start_round()  # the round's input is all this test needs
            assert coordinator._round_task is not None
            await coordinator._round_task

        # Execute
        asyncio.run(first_round())
        request, _ = runner.rounds[0]
        snapshots.append(request.baim)

    # Assert
    assert snapshots[0].sha256 == snapshots[1].sha256
    assert [learner["name"] for learner in json.loads(snapshots[1].spec_json)["learners"]] == EDGES


def test_late_learners_are_refused_in_canonical_order_on_top_of_the_trained_baim(tmp_path: Path) -> None:
    # Prepare: round 1 trains edge-0 and edge-2 (one per task); edge-1 and edge-3 come later.
    scenario = tiny_scenario(tmp_path)
    payloads = edge_payloads(scenario)
    second_rounds = []
    for index, late in enumerate([["edge-1", "edge-3"], ["edge-3", "edge-1"]]):
        runner = RecordingRunner()
        coordinator = CloudCoordinator(scenario, str(tmp_path / f"registry-{index}"), round_runner=runner)

        async def two_rounds(
            coordinator: CloudCoordinator = coordinator, late: list[str] = late
        ) -> list[str]:
            await upload_in_order(coordinator, payloads, ["edge-0", "edge-2"])
            await coordinator.finish()
            arrival = await upload_in_order(coordinator, payloads, late)
            await coordinator.finish()
            return arrival

        # Execute
        arrival = asyncio.run(two_rounds())
        assert arrival == ["edge-0", "edge-2", *late]
        second_rounds.append(runner.rounds[1])

    # Assert: the same round-2 input (rebuilt from the registry's trained BAIM) and the same result.
    (request_a, result_a), (request_b, result_b) = second_rounds
    assert request_a.baim.sha256 == request_b.baim.sha256
    assert result_a.trained.sha256 == result_b.trained.sha256
    names = [learner["name"] for learner in json.loads(request_b.baim.spec_json)["learners"]]
    assert names == ["edge-0", "edge-2", "edge-1", "edge-3"]


def first_round(workdir: Path) -> tuple[RoundRequest, RoundResult]:
    """The request and result of the round `finish()` trains after the four honest uploads."""
    scenario = tiny_scenario(workdir)
    payloads = edge_payloads(scenario)
    runner = RecordingRunner()
    coordinator = CloudCoordinator(scenario, str(workdir / "registry"), round_runner=runner)

    async def upload_and_finish() -> None:
        await upload_in_order(coordinator, payloads, EDGES)
        await coordinator.finish()

    asyncio.run(upload_and_finish())
    return runner.rounds[0]


def test_local_round_does_not_depend_on_the_global_rng(tmp_path: Path) -> None:
    # Prepare: one round's request.
    request, result = first_round(tmp_path)

    # Execute: the same request again, from another global RNG state.
    torch.manual_seed(12345)
    again = local_training_round(request)

    # Assert
    assert again.trained.sha256 == result.trained.sha256
    assert again.strategies["finetune"].test_loss == result.strategies["finetune"].test_loss
    assert again.strategies["finetune"].train_loss == result.strategies["finetune"].train_loss


def test_local_round_prunes_on_the_scenario_schedule(tmp_path: Path) -> None:
    # Prepare: one round's request, replayed with 3 epochs and pruning after every epoch.
    request, _ = first_round(tmp_path)
    document = request.scenario.model_dump(mode="json")
    document["cloud"].update(epochs=3, prune_interval=1, prune_ratio=0.5)
    pruning = dataclasses.replace(request, scenario=Scenario.model_validate(document))
    initial = len(json.loads(request.baim.spec_json)["connections"])

    # Execute
    result = local_training_round(pruning)

    # Assert: floor(ratio * surviving) go after every epoch, as on Ray Train (orchestrator.cloud.train).
    expected, remaining = [], initial
    for _ in range(3):
        remaining -= remaining // 2
        expected.append(remaining)
    assert initial >= 4, "the tiny scenario must offer connections to prune"
    assert result.strategies["finetune"].connections == expected
    assert len(json.loads(result.trained.spec_json)["connections"]) == expected[-1]
    assert local_training_round(pruning).trained.sha256 == result.trained.sha256  # still deterministic


def test_local_round_records_its_epochs_per_task_and_as_live_progress(tmp_path: Path) -> None:
    # Prepare: one round's request, replayed with 2 epochs
    request, _ = first_round(tmp_path)
    document = request.scenario.model_dump(mode="json")
    document["cloud"].update(epochs=2)
    two = dataclasses.replace(request, scenario=Scenario.model_validate(document))

    # Execute
    run = local_training_round(two).strategies["finetune"]

    # Assert: per-epoch FLOPs sum to the total; the mean test loss is the test-image-weighted per-task mean
    assert len(run.flops_per_epoch) == len(run.seconds_per_epoch) == len(run.test_loss_per_task) == 2
    assert sum(run.flops_per_epoch) == run.flops
    sizes = {task: len(indices) for task, indices in two.partitions.test.items() if indices}
    for mean, per_task in zip(run.test_loss, run.test_loss_per_task, strict=True):
        assert set(per_task) == set(sizes)
        weighted = sum(per_task[t] * sizes[t] for t in sizes) / sum(sizes.values())
        assert mean == pytest.approx(weighted, rel=1e-12)
    progress = {(p.round, p.strategy): p for p in read_epochs(Registry(two.registry_uri))}
    newest = progress[(two.round_index, "finetune")]
    assert (newest.epoch, newest.epochs, newest.test_loss) == (2, 2, run.test_loss[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description="Run the determinism reproduction; print its fingerprint.")
    parser.add_argument("--order", required=True, help="comma-separated edge ids, the upload order")
    parser.add_argument("--rng-seed", type=int, required=True, help="global RNG seed set before finish()")
    parser.add_argument("--workdir", type=Path, default=None, help="registry folder (default: a temp dir)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="determinism-"))
    fingerprint = asyncio.run(reproduce(workdir, args.order.split(","), args.rng_seed))
    print(json.dumps(fingerprint, sort_keys=True))


if __name__ == "__main__":
    main()
