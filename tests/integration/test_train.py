"""Cloud BAIM training on Ray Train: 2 workers, 4 epochs, a tiny BAIM on procedural faces (16x16).

One clean run is shared by the module's tests (its BAIM and task models then go through the one publish
path, `actors.publishing`); it checkpoints and evaluates every 2 epochs. A second run of the same round has
rank 1 die during epoch 4 and must resume from the epoch-2 checkpoint (losing epoch 3, within
checkpoint_every) and end bit-identical to the clean run.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import ray
import torch

from baim.config import LearnerSpec
from baim.learners import VAELearner
from baim.model import BAIM
from baim.training import make_optimizer
from orchestrator.cloud.ray_train import (
    TrainRoundConfig,
    TrainRoundResult,
    WorkerCrash,
    load_optimizer_tensors,
    load_trained_baim,
    optimizer_tensors,
    publish_result,
    run_training_round,
    state_sha256,
)
from orchestrator.cloud.resources import check_cluster_resources
from orchestrator.core.artifacts import pack_module, unpack_payload
from orchestrator.core.receipts import PublishedTaskModel
from orchestrator.core.registry import Registry
from orchestrator.core.scenario import DataConfig, ProceduralConfig
from orchestrator.data.sources import resolve_source

RESOLUTION = 16
PRUNE_RATIO = 0.25
EPOCHS = 4
CHECKPOINT_EVERY = 2
EVALUATE_EVERY = 2


def tiny_baim() -> BAIM:
    """2 tasks x 2 heterogeneous learners, top-1 routing (so some learners idle on each step)."""
    torch.manual_seed(0)
    tasks = ["male", "female"]
    learners = [
        (
            f"e{i}",
            tasks[i % 2],
            VAELearner(LearnerSpec(widths=(4, 8) if i < 2 else (6,), latent_dim=4, resolution=16)),
        )
        for i in range(4)
    ]
    return BAIM.from_learners(tasks, learners, top_k=1, connection_height=1)


@pytest.fixture(scope="module")
def round_setup(ray_session: None, tmp_path_factory: pytest.TempPathFactory) -> tuple[TrainRoundConfig, int]:
    # Prepare: a registry holding the fused BAIM, procedural faces (no CelebA at this root).
    root = tmp_path_factory.mktemp("train")
    data = DataConfig(
        root=str(root / "no-celeba"),
        resolution=RESOLUTION,
        procedural=ProceduralConfig(num_images=300, native_size=32),
    )
    source = resolve_source(data)
    male = np.flatnonzero(source.matching("Male")).tolist()
    female = np.flatnonzero(source.matching("not Male")).tolist()
    baim = tiny_baim()
    registry = Registry(str(root / "registry"))
    registry.put("baim", "v000001", pack_module(baim, baim.spec()))
    cfg = TrainRoundConfig(
        round_id=1,
        registry_uri=registry.uri,
        baim_version="v000001",
        strategy="finetune",
        epochs=EPOCHS,
        lr=0.005,
        batch_size=16,
        kld_weight=baim.config.kld_weight,
        prune_interval=1,
        prune_ratio=PRUNE_RATIO,
        checkpoint_every=CHECKPOINT_EVERY,
        evaluate_every=EVALUATE_EVERY,
        seed=0,
        data=data,
        cloud_indices={"male": male[:48], "female": female[:48]},
        test_indices={"male": male[48:64], "female": female[48:64]},
    )
    return cfg, len(baim.connections.specs)


@pytest.fixture(scope="module")
def clean_run(round_setup: tuple[TrainRoundConfig, int]) -> TrainRoundResult:
    cfg, _ = round_setup
    return run_training_round(cfg, num_workers=2, cpus_per_worker=1.0, max_failures=0)


@pytest.fixture(scope="module")
def published(
    round_setup: tuple[TrainRoundConfig, int], clean_run: TrainRoundResult
) -> tuple[str, dict[str, PublishedTaskModel]]:
    """The clean run's trained BAIM and task models, through the one publish path."""
    cfg, _ = round_setup
    return publish_result(cfg, clean_run)


def test_loss_falls(clean_run: TrainRoundResult) -> None:
    assert clean_run.initial_test_loss is not None
    assert [e.epoch for e in clean_run.epochs] == [1, 2, 3, 4]
    assert clean_run.final_test_loss == clean_run.epochs[-1].test_loss < clean_run.initial_test_loss
    assert clean_run.epochs[-1].train_loss < clean_run.epochs[0].train_loss
    assert set(clean_run.final_test_loss_per_task) == {"male", "female"}
    assert all(math.isfinite(v) for v in clean_run.final_test_loss_per_task.values())


def test_checkpoints_and_evaluations_follow_their_cadence(clean_run: TrainRoundResult) -> None:
    # Every 2nd epoch (and the last): a checkpoint with the ranks' hashes, and a test loss.
    assert [e.checkpointed for e in clean_run.epochs] == [False, True, False, True]
    assert [e.test_loss is not None for e in clean_run.epochs] == [False, True, False, True]
    assert [bool(e.test_loss_per_task) for e in clean_run.epochs] == [False, True, False, True]
    assert clean_run.checkpoint_uri.endswith("epoch-0004")
    summary = clean_run.summary()
    assert summary.test_loss == [None, clean_run.epochs[1].test_loss, None, clean_run.final_test_loss]
    assert summary.chosen_by == "cloud.trainer: ray_train"


def test_both_ranks_end_with_identical_weights(clean_run: TrainRoundResult) -> None:
    checked = [e for e in clean_run.epochs if e.checkpointed]
    assert [e.epoch for e in checked] == [2, 4]
    for epoch in checked:
        assert len(epoch.state_sha256_per_rank) == 2
        assert epoch.state_sha256_per_rank[0] == epoch.state_sha256_per_rank[1], f"epoch {epoch.epoch}"
    assert all(e.state_sha256_per_rank == [] for e in clean_run.epochs if not e.checkpointed)
    # The weights changed between checkpoints (the hashes are of real, trained state).
    assert checked[0].state_sha256_per_rank[0] != checked[1].state_sha256_per_rank[0]


def test_fixed_costs_add_up(clean_run: TrainRoundResult) -> None:
    costs = clean_run.fixed_costs
    phases = [
        costs.to_worker_imports,
        costs.imports,
        costs.load_model,
        costs.load_data,
        costs.initial_evaluation,
    ]
    assert all(p >= 0 for p in phases) and costs.teardown > 0
    assert sum(phases) <= costs.startup  # the phases are consecutive parts of the start-up
    assert costs.fixed == pytest.approx(costs.startup + costs.teardown)
    assert clean_run.wall_seconds > costs.fixed  # the epochs lie between start-up and teardown


def test_pruning_schedule_removed_the_expected_connections(
    round_setup: tuple[TrainRoundConfig, int],
    clean_run: TrainRoundResult,
    published: tuple[str, dict[str, PublishedTaskModel]],
) -> None:
    cfg, initial = round_setup
    # prune_interval 1: floor(ratio * surviving) connections go after every epoch.
    expected = initial
    assert clean_run.connections_initial == initial
    for epoch in clean_run.epochs:
        removed = math.floor(PRUNE_RATIO * expected)
        expected -= removed
        assert epoch.pruned == removed
        assert epoch.connections == expected
    assert clean_run.connections_final == expected < initial
    # The published BAIM carries the pruned connection set.
    registry = Registry(cfg.registry_uri)
    spec, _ = unpack_payload(registry.get("baim", published[0]), artifact_id="trained", max_bytes=1 << 30)
    assert len(spec["connections"]) == expected


def test_training_costs_are_counted(clean_run: TrainRoundResult) -> None:
    assert clean_run.cloud_flops == sum(e.flops for e in clean_run.epochs) > 0
    # Each epoch trains the whole 96-image shard (divisible by 2 ranks: no padding).
    assert all(e.train_samples == 96 for e in clean_run.epochs)
    assert clean_run.train_seconds > 0 and clean_run.wall_seconds >= clean_run.train_seconds


def test_publishes_baim_and_exact_smaller_task_models(
    round_setup: tuple[TrainRoundConfig, int],
    clean_run: TrainRoundResult,
    published: tuple[str, dict[str, PublishedTaskModel]],
) -> None:
    cfg, _ = round_setup
    registry = Registry(cfg.registry_uri)
    version, tasks = published
    assert version == "v000002"  # after the fused input, v000001
    assert registry.ref("baim", version).sha256 == pack_module(*_trained(clean_run)).sha256
    assert set(tasks) == {"male", "female"}
    for task, model in tasks.items():
        assert model.artifact == f"task/{task}@{version}"  # task models carry their BAIM's version
        assert registry.ref(f"task/{task}", version).sha256 == model.sha256
        assert model.test_images == 16 and model.test_loss is not None and model.test_loss > 0
        assert model.decomposition_max_abs_diff <= 1e-5
        assert model.params < model.baim_params == clean_run.epochs[-1].params


def _trained(result: TrainRoundResult) -> tuple[BAIM, dict]:
    baim = load_trained_baim(result)
    return baim, baim.spec()


@pytest.mark.slow  # a second full Ray Train run plus a restart: about 60 s on an idle 2-core machine
def test_killed_worker_resumes_from_checkpoint_and_finishes_identically(
    round_setup: tuple[TrainRoundConfig, int], clean_run: TrainRoundResult, tmp_path: Path
) -> None:
    cfg, _ = round_setup
    crashing = cfg.model_copy(update={"crash": WorkerCrash(epoch=4, rank=1)})
    result = run_training_round(
        crashing,
        num_workers=2,
        cpus_per_worker=1.0,
        storage_path=str(tmp_path / "ray_train"),
        max_failures=1,
    )
    # The last checkpoint before the crash is epoch 2's: epoch 3 is trained again (at most checkpoint_every
    # epochs lost: the finished epochs after that checkpoint, and the one the crash interrupted).
    assert result.resumed_at_epochs == [3]
    assert crashing.crash is not None and crashing.crash.epoch - 2 <= CHECKPOINT_EVERY
    assert [e.epoch for e in result.epochs] == [1, 2, 3, 4]
    # Weights, optimiser state, pruned connections, sampling and noise all come back exactly.
    assert result.final_state_sha256 == clean_run.final_state_sha256
    assert result.connections_final == clean_run.connections_final


def test_use_gpu_without_gpus_fails_clearly(ray_session: None) -> None:
    if ray.cluster_resources().get("GPU", 0) > 0:
        pytest.skip("this machine has GPUs")
    with pytest.raises(ValueError, match=r"use_gpu: the round needs 2 GPU\(s\).*offers 0"):
        check_cluster_resources(num_workers=2, use_gpu=True, cpus_per_worker=1.0)
    # With a wait, the autoscaler is asked (a no-op on a local instance) and the same error comes after it.
    with pytest.raises(ValueError, match=r"needs 2 GPU\(s\).*waited 1s for the autoscaler"):
        check_cluster_resources(num_workers=2, use_gpu=True, cpus_per_worker=1.0, wait_for_nodes_s=1.0)


def test_optimizer_state_round_trips_through_flat_tensors() -> None:
    # Prepare: a few Adam steps on the tiny BAIM.
    baim = tiny_baim()
    optimizer = make_optimizer(baim, lr=0.01)
    images = torch.rand(4, 3, RESOLUTION, RESOLUTION)
    for _ in range(2):
        optimizer.zero_grad()
        baim(images, torch.tensor([0, 1, 0, 1])).loss.backward()
        optimizer.step()
    # Execute
    flat = optimizer_tensors(baim, optimizer)
    rebuilt = make_optimizer(baim, lr=0.01)
    load_optimizer_tensors(baim, rebuilt, flat)
    # Assert: same state for every parameter, step stays on the CPU.
    assert flat and all(key.rpartition(":")[2] in {"step", "exp_avg", "exp_avg_sq"} for key in flat)
    assert optimizer_tensors(baim, rebuilt).keys() == flat.keys()
    for key, value in optimizer_tensors(baim, rebuilt).items():
        assert torch.equal(value, flat[key]), key


def test_optimizer_state_for_an_unknown_parameter_is_rejected() -> None:
    baim = tiny_baim()
    optimizer = make_optimizer(baim, lr=0.01)
    with pytest.raises(ValueError, match=r"'gone\.weight:exp_avg'"):
        load_optimizer_tensors(baim, optimizer, {"gone.weight:exp_avg": torch.zeros(1)})


def test_state_sha256_sees_one_changed_value() -> None:
    baim = tiny_baim()
    before = state_sha256(baim)
    with torch.no_grad():
        next(baim.parameters()).view(-1)[0] += 1e-6
    assert state_sha256(baim) != before


def test_round_config_names_its_errors(round_setup: tuple[TrainRoundConfig, int]) -> None:
    cfg, _ = round_setup
    fields = cfg.model_dump()
    with pytest.raises(ValueError, match=r"crash.epoch: expected <= epochs \(4\), received 5"):
        TrainRoundConfig.model_validate({**fields, "crash": {"epoch": 5, "rank": 0}})
    with pytest.raises(ValueError, match=r"crash.epoch: expected after the first checkpoint \(epoch 2, "):
        TrainRoundConfig.model_validate({**fields, "crash": {"epoch": 2, "rank": 0}})
    with pytest.raises(ValueError, match="epoch_count"):
        TrainRoundConfig.model_validate({**fields, "epoch_count": 3})
    with pytest.raises(ValueError, match="at least one training image"):
        TrainRoundConfig.model_validate({**fields, "cloud_indices": {"male": []}})
