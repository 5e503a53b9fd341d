"""EdgeNode as a plain class (no Ray): training, costs, determinism, poison, leave, link delay."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from actors.edge import (
    EdgeNode,
    edge_device,
    epochs_without_improvement,
    link_delay_seconds,
    validation_split,
)
from baim.learners import VAELearner
from baim.seeding import derive_seed
from baim.training import evaluate, vae_batch_loss
from orchestrator.core.artifacts import ArtifactPayload, load_module
from orchestrator.core.names import MAX_MODEL_BYTES
from orchestrator.core.scenario import EarlyStoppingConfig, Scenario
from orchestrator.data.partitions import make_partitions
from orchestrator.data.sources import resolve_source
from tests.support.coordinator import SyncCoordinator, make_coordinator
from tests.support.loop import LoopThread
from tests.support.scenarios import tiny_scenario


def make_edge(scenario: Scenario, edge_id: str, time_scale: float = 0.0) -> EdgeNode:
    source = resolve_source(scenario.data)
    partitions = make_partitions(source, scenario)
    return EdgeNode(
        scenario.edge(edge_id),
        source,
        partitions.edges[edge_id],
        resolution=scenario.data.resolution,
        scenario_seed=scenario.seed,
        kld_weight=scenario.cloud.kld_weight,
        time_scale=time_scale,
    )


def make_cloud(scenario: Scenario, registry: Path, loop: LoopThread) -> SyncCoordinator:
    return SyncCoordinator(make_coordinator(scenario, registry), loop)


class Recorder:
    """Receives uploads and accepts them; keeps what it received (to compare bytes and weights)."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []

    def receive(self, **kwargs: Any) -> dict[str, Any]:
        self.received.append(kwargs)
        return {"status": "accepted", "accepted": True, "reason": ""}


def never(tmp_path: Path) -> Scenario:
    return tiny_scenario(tmp_path, fusion={"min_new_models": 10, "max_wait_seconds": 1000})


def test_link_delay_is_latency_plus_bits_over_bandwidth_times_time_scale() -> None:
    # 1_000_000 bytes = 8 Mbit over 4 Mbit/s = 2 s, plus 50 ms latency, scaled by 0.5.
    assert link_delay_seconds(1_000_000, 4.0, 50.0, 0.5) == pytest.approx(0.5 * 2.05)
    assert link_delay_seconds(1_000_000, 4.0, 50.0, 0.0) == 0.0


def test_edge_trains_uploads_and_counts_its_real_bytes_and_flops(tmp_path: Path, loop: LoopThread) -> None:
    # Prepare
    scenario = never(tmp_path)
    cloud = make_cloud(scenario, tmp_path / "registry", loop)
    edge = make_edge(scenario, "edge-0")

    # Execute
    report = json.loads(edge.run(cloud))

    # Assert
    assert report["status"] == "accepted"
    assert report["receipt"]["artifact"] == "edge/edge-0@v000001"
    assert report["epoch"] == 1 and report["steps"] == 3  # 48 images, batch 16
    costs = report["ledger"]["edges"]["edge-0"]
    stored = cloud.coordinator.registry.get("edge/edge-0", "v000001")
    assert costs["bytes_sent"] == stored.nbytes
    assert costs["bytes_received"] == 0
    assert costs["flops"] > 0
    assert costs["seconds"]["edge_train"] > 0


def test_edge_device_is_cuda_only_when_gpus_are_declared_and_cuda_is_usable() -> None:
    assert edge_device(0.0, cuda_available=False) == torch.device("cpu")
    assert edge_device(0.0, cuda_available=True) == torch.device("cpu")  # GPUs it did not reserve
    assert edge_device(0.5, cuda_available=False) == torch.device("cpu")  # declared, but no CUDA here
    assert edge_device(0.5, cuda_available=True) == torch.device("cuda")
    assert edge_device(2.0, cuda_available=True) == torch.device("cuda")
    with pytest.raises(ValueError, match="num_gpus: expected >= 0"):
        edge_device(-1.0, cuda_available=True)


def test_edge_declaring_gpus_picks_its_device_from_cuda_availability(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    scenario = never(tmp_path)
    gpu_edge = scenario.edge("edge-1").model_copy(update={"num_gpus": 1.0})
    source = resolve_source(scenario.data)
    indices = make_partitions(source, scenario).edges["edge-1"]

    def node() -> EdgeNode:
        return EdgeNode(
            gpu_edge,
            source,
            indices,
            resolution=scenario.data.resolution,
            scenario_seed=scenario.seed,
            kld_weight=scenario.cloud.kld_weight,
            time_scale=0.0,
        )

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert node().device == torch.device("cuda")  # constructing touches no GPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    without_cuda = node()
    assert without_cuda.device == torch.device("cpu")
    assert make_edge(scenario, "edge-1").device == torch.device("cpu")

    # Without CUDA it trains and uploads exactly what a CPU edge does.
    gpu_declared, cpu_only = Recorder(), Recorder()
    without_cuda.run(gpu_declared)
    make_edge(scenario, "edge-1").run(cpu_only)
    assert gpu_declared.received[0]["sha256"] == cpu_only.received[0]["sha256"]


def test_flops_are_counted_once_per_architecture_and_batch_size_and_equal_a_fresh_count(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import actors.edge as edge_module
    from baim.costs import forward_backward_flops

    scenario = never(tmp_path)
    monkeypatch.setattr(edge_module, "_FLOPS_PER_BATCH", {})
    first, second = make_edge(scenario, "edge-1"), make_edge(scenario, "edge-1")
    model, loss_fn = VAELearner(first.spec), vae_batch_loss(first.kld_weight)
    full, rest = divmod(len(first.dataset), first.edge.batch_size)  # type: ignore[arg-type]
    batches = [(first.edge.batch_size, full), (rest, 1)]
    fresh = sum(
        count * forward_backward_flops(model, torch.rand(n, 3, first.spec.resolution, first.spec.resolution),
                                       loss_fn).total
        for n, count in batches if n and count
    )  # fmt: skip

    counted = first._epoch_flops(model, loss_fn)
    monkeypatch.setattr(edge_module, "forward_backward_flops", lambda *a: pytest.fail("counted again"))
    again = second._epoch_flops(VAELearner(second.spec), loss_fn)

    assert counted == again == fresh > 0


def test_same_seed_gives_the_same_weights_bytes_and_flops(tmp_path: Path) -> None:
    scenario = never(tmp_path)
    first, second = Recorder(), Recorder()

    report_a = json.loads(make_edge(scenario, "edge-1").run(first))
    report_b = json.loads(make_edge(scenario, "edge-1").run(second))

    assert first.received[0]["sha256"] == second.received[0]["sha256"]
    costs_a, costs_b = report_a["ledger"]["edges"]["edge-1"], report_b["ledger"]["edges"]["edge-1"]
    assert (costs_a["bytes_sent"], costs_a["flops"]) == (costs_b["bytes_sent"], costs_b["flops"])


@pytest.mark.parametrize(("mode", "reason"), [("nan", "non_finite"), ("wrong_shapes", "wrong_shapes")])
def test_poisoned_edge_upload_is_rejected_with_its_reason(
    tmp_path: Path, loop: LoopThread, mode: str, reason: str
) -> None:
    scenario = never(tmp_path)
    cloud = make_cloud(scenario, tmp_path / "registry", loop)
    edge = make_edge(scenario, "edge-2")
    edge.poison(mode)  # type: ignore[arg-type]

    report = json.loads(edge.run(cloud))

    assert report["status"] == "rejected"
    assert report["receipt"]["reason"] == reason
    assert cloud.coordinator.registry.versions("edge/edge-2") == []
    # The bytes were sent all the same.
    assert report["ledger"]["edges"]["edge-2"]["bytes_sent"] > 0


def test_edge_that_leaves_before_finishing_uploads_nothing(tmp_path: Path) -> None:
    scenario = never(tmp_path)
    recorder = Recorder()
    edge = make_edge(scenario, "edge-0")

    edge.leave()
    report = json.loads(edge.run(recorder))

    assert report["status"] == "left"
    assert recorder.received == []
    assert report["ledger"]["edges"] == {}


def test_slow_link_delays_the_upload_by_its_simulated_transfer_time(tmp_path: Path) -> None:
    scenario = never(tmp_path)
    edge = make_edge(scenario, "edge-1", time_scale=1.0)
    edge.change_link(bandwidth_mbps=1.0, latency_ms=100.0)
    recorder = Recorder()

    report = json.loads(edge.run(recorder))

    nbytes = report["ledger"]["edges"]["edge-1"]["bytes_sent"]
    expected = link_delay_seconds(nbytes, 1.0, 100.0, 1.0)  # ~0.36 s for ~32 kB
    assert report["ledger"]["edges"]["edge-1"]["seconds"]["edge_upload"] >= expected


# ---- early stopping --------------------------------------------------------------------------------------


def test_validation_split_is_seeded_disjoint_and_keeps_one_image_each_side() -> None:
    train, validation = validation_split(10, 0.3, seed=5)
    assert len(validation) == 3 and len(train) == 7
    assert sorted(train + validation) == list(range(10))
    assert validation_split(10, 0.3, seed=5) == (train, validation)
    assert len(validation_split(2, 0.01, seed=0)[1]) == 1  # at least one to validate on
    assert len(validation_split(2, 0.99, seed=0)[0]) == 1  # at least one to train on
    with pytest.raises(ValueError, match="size"):
        validation_split(1, 0.5, seed=0)


def test_epochs_without_improvement_counts_from_the_best_beyond_min_delta() -> None:
    assert epochs_without_improvement([], 0.0) == 0
    assert epochs_without_improvement([3.0, 2.0, 1.0], 0.0) == 0
    assert epochs_without_improvement([3.0, 2.0, 2.5, 2.0], 0.0) == 2  # 2.0 again is no improvement
    assert epochs_without_improvement([3.0, 2.0, 1.95], 0.1) == 1  # 0.05 < min_delta


def test_edge_stops_on_its_validation_loss_and_uploads_the_best_epoch(tmp_path: Path) -> None:
    # Prepare: a learning rate so large that the validation loss stops improving long before the cap
    scenario = never(tmp_path)
    edges = [
        edge.model_copy(
            update={
                "local_epochs": 40,
                "lr": 0.05,
                "early_stopping": EarlyStoppingConfig(patience=2, validation_fraction=0.25),
            }
        )
        if edge.id == "edge-0"
        else edge
        for edge in scenario.edges
    ]
    scenario = scenario.model_copy(update={"edges": edges})
    edge = make_edge(scenario, "edge-0")
    recorder = Recorder()

    # Execute
    report = json.loads(edge.run(recorder))

    # Assert: stopped `patience` epochs after the best, before the cap; the best epoch's weights went up
    losses = report["validation_loss"]
    assert report["epoch"] == len(losses) < 40
    best = report["best_epoch"]
    assert losses[best - 1] == min(losses)
    assert report["epoch"] - best == 2
    assert report["steps"] == report["epoch"] * 3  # 36 of 48 images train, batch 16
    sent = recorder.received[0]
    uploaded = load_module(
        ArtifactPayload(sent["weights"], sent["spec_json"], sent["sha256"]),
        VAELearner,
        artifact_id="upload",
        max_bytes=MAX_MODEL_BYTES,
    )
    positions = validation_split(48, 0.25, derive_seed("validation", edge.seed))[1]
    validation = torch.utils.data.Subset(edge.dataset, positions)
    loss_fn = vae_batch_loss(scenario.cloud.kld_weight)
    again = evaluate(uploaded, torch.utils.data.DataLoader(validation, batch_size=16), loss_fn, seed=0)
    assert again == pytest.approx(losses[best - 1], rel=1e-5)
