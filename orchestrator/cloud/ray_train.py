"""The Ray Train round runner: one `TorchTrainer` job per (round, strategy) over `baim.loop.train_strategy`.

Shape (Ray's `torch_fashion_mnist_example`): `train_loop_per_worker(config)` builds the model and the data on
each worker, wraps the BAIM in DDP and runs the one loop with `RayTrainHooks` (rank collectives, a report
every epoch, rank-0 checkpoints; on a restart the checkpoint wins); the driver `run_training_round` only
builds the `ScalingConfig` / `RunConfig` and calls `fit()`. Decisions and their reasons:
docs/design/training.md.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from pydantic import Field, field_validator, model_validator
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from actors.publishing import publish_baim, publish_task_models
from actors.rounds import RoundRequest, RoundResult
from baim.compaction import Batch, PruningSchedule
from baim.continual import freeze_for_continual
from baim.costs import count_params
from baim.loop import EpochOutcome, Evaluation, LoopSchedule, on_cadence, start_strategy, train_strategy
from baim.model import BAIM
from baim.model_config import ConnectionSpec
from baim.seeding import epoch_seed, eval_seed
from baim.serialization import from_files
from baim.training import Strategy, apply_strategy, make_optimizer
from orchestrator.cloud import IMPORT_STARTED_AT
from orchestrator.cloud.data import CachedFaces
from orchestrator.cloud.keep import holdout_loss, kept_strategy
from orchestrator.cloud.pruning import pruning_schedule, score_batches, score_seed
from orchestrator.cloud.resources import WORKER_GROUP_START_RETRIES, check_cluster_resources, failure_config
from orchestrator.core.artifacts import ArtifactPayload, pack_module
from orchestrator.core.names import BAIM_OWNER, FUSED_BAIM_OWNER, SPEC_FILE, WEIGHTS_FILE
from orchestrator.core.progress import CloudEpochProgress, publish_epoch
from orchestrator.core.receipts import PublishedTaskModel, RayTrainStrategyRun
from orchestrator.core.registry import Registry
from orchestrator.core.scenario import CHECKPOINT_EVERY_DEFAULT, DataConfig, Scenario, StrictModel
from orchestrator.data.sources import resolve_source

logger = logging.getLogger(__name__)

ROUND_CONFIG_KEY = "round"  # the one key of train_loop_config
OPTIMIZER_FILE = "optimizer.safetensors"  # checkpoint files beside WEIGHTS_FILE and SPEC_FILE
PROGRESS_FILE = "progress.json"
TRAINER_NAMED = "cloud.trainer: ray_train"
HEALTH_CHECK_INTERVAL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"  # Ray Train's own setting
HEALTH_CHECK_INTERVAL_S = "0.25"  # used when the environment does not set it


# ---- configuration and results ----------------------------------------------------------------------


class WorkerCrash(StrictModel):
    """Fault injection for tests and chaos runs: one rank dies (os._exit) during one epoch."""

    epoch: int = Field(
        ge=2,
        description=(
            "Epoch (1-based) during which the rank dies, after its first training step and after the "
            "last checkpoint is committed. After the run's first checkpoint (checkpoint_every), so one "
            "exists to resume from."
        ),
    )
    rank: int = Field(default=0, ge=0, description="World rank of the worker that dies.")


class TrainRoundConfig(StrictModel):
    """Everything one Ray Train run needs; carried to every worker under train_loop_config["round"]."""

    round_id: int = Field(ge=0, description="Training round number (the coordinator's round index).")
    registry_uri: str = Field(min_length=1, description="Registry the fused BAIM is read from.")
    baim_owner: str = Field(default=BAIM_OWNER, description="Registry owner of the BAIM to start from.")
    baim_version: str = Field(min_length=1, description="Registry version of the BAIM to start from.")
    strategy: Literal["finetune", "freeze", "scratch"] = Field(
        description=(
            "finetune: all parameters; freeze: learners fixed; scratch: same architecture, re-initialised."
        )
    )
    epochs: int = Field(ge=1, description="Epochs to train.")
    lr: float = Field(gt=0, description="Adam learning rate.")
    batch_size: int = Field(
        ge=1, description="Global batch size; each worker takes batch_size / num_workers."
    )
    kld_weight: float = Field(
        ge=0,
        description="KLD weight of the loss; must equal the BAIM spec's (the BAIM computes its loss).",
    )
    prune_interval: int = Field(ge=1, description="Prune connections after every this many epochs.")
    prune_ratio: float = Field(
        ge=0, lt=1, description="Fraction of surviving connections removed per pruning (without a budget)."
    )
    task_model_budget: float | None = Field(
        default=None,
        gt=1.0,
        description="Largest task model / its squad's parameters, reached by the last pruning (None: none).",
    )
    recovery_epochs: int = Field(default=0, ge=0, description="Final epochs without pruning.")
    prune_shape: Literal["geometric", "cubic"] = Field(
        default="cubic", description="How the budget's targets shrink per pruning (cloud.prune_shape)."
    )
    prune_score_images: int = Field(
        default=64, ge=1, description="Cloud images per task on which connections are scored."
    )
    seed: int = Field(
        ge=0, description="Seeds sampling order, training noise, evaluation noise and scratch init."
    )
    data: DataConfig = Field(
        description="Where the images come from; the driver makes `root` absolute so every worker finds it."
    )
    cloud_indices: dict[str, list[int]] = Field(
        description="Per task name: indices of the cloud's common training shard in the data source."
    )
    test_indices: dict[str, list[int]] = Field(description="Per task name: indices of the test images.")
    eval_batch_size: int = Field(default=64, ge=1, description="Batch size of test-loss evaluation.")
    flop_counting: Literal["after_change", "first_batch", "every_batch"] = Field(
        default="after_change",
        description=(
            "Count FLOPs on the first step of the run and the first after each pruning, scaled by samples "
            "(after_change); on the first step of each epoch (first_batch); or on every step."
        ),
    )
    checkpoint_every: int = Field(
        default=CHECKPOINT_EVERY_DEFAULT,
        ge=1,
        description=(
            "Checkpoint (and compare the ranks' state hashes) after every this many epochs and after the "
            "last; a failure loses at most this many epochs."
        ),
    )
    evaluate_every: int = Field(
        default=1, ge=1, description="Measure the test loss after every this many epochs and after the last."
    )
    crash: WorkerCrash | None = Field(default=None, description="Fault injection: a worker dies once.")
    frozen_learners: list[str] | None = Field(
        default=None,
        description=(
            "A continual gate_only round: learners (and the connections among them) kept fixed; None: the "
            "strategy decides what trains."
        ),
    )

    @field_validator("cloud_indices")
    @classmethod
    def _some_training_data(cls, value: dict[str, list[int]]) -> dict[str, list[int]]:
        if sum(len(indices) for indices in value.values()) == 0:
            raise ValueError("expected at least one training image across tasks, received none")
        return value

    @model_validator(mode="after")
    def _crash_within_run(self) -> TrainRoundConfig:
        if self.crash is not None and self.crash.epoch > self.epochs:
            raise ValueError(f"crash.epoch: expected <= epochs ({self.epochs}), received {self.crash.epoch}")
        first_checkpoint = min(self.checkpoint_every, self.epochs)
        if self.crash is not None and self.crash.epoch <= first_checkpoint:
            raise ValueError(
                f"crash.epoch: expected after the first checkpoint (epoch {first_checkpoint}, "
                f"checkpoint_every {self.checkpoint_every}), received {self.crash.epoch}"
            )
        self.pruning().pruning_epochs(self.epochs)  # a budget needs a pruning epoch (ValueError)
        return self

    def pruning(self) -> PruningSchedule:
        """The loop's pruning schedule."""
        return pruning_schedule(
            self.prune_interval,
            self.prune_ratio,
            self.task_model_budget,
            self.recovery_epochs,
            self.prune_shape,
        )

    def checkpoints_after(self, epoch: int) -> bool:
        """Whether `epoch` ends with a checkpoint: every checkpoint_every-th epoch and the last."""
        return on_cadence(epoch, self.checkpoint_every, self.epochs)

    def evaluates_after(self, epoch: int) -> bool:
        """Whether the test loss is measured after `epoch`: every evaluate_every-th epoch and the last."""
        return on_cadence(epoch, self.evaluate_every, self.epochs)

    def run_name(self, input_sha256: str) -> str:
        """Ray Train run name: the same round, strategy and input BAIM resume the same run."""
        return f"round-{self.round_id:04d}-{self.strategy}-{input_sha256[:12]}"


class EpochMetrics(StrictModel):
    """What every epoch reports (rank 0's copy holds the all-reduced values)."""

    epoch: int = Field(description="1-based epoch number.")
    train_loss: float = Field(description="Sample-weighted mean training loss of the epoch, all ranks.")
    test_loss: float | None = Field(
        description="Mean test loss over every task's test images, after the epoch (None: not evaluated)."
    )
    test_loss_per_task: dict[str, float] = Field(
        description="Mean test loss per task (empty: not evaluated)."
    )
    seconds: float = Field(
        description="Wall-clock seconds of the epoch (train, prune, evaluate), slowest rank."
    )
    train_seconds: float = Field(description="Wall-clock seconds of the training steps, slowest rank.")
    flops: int = Field(description="Training FLOPs (forward + backward) of the epoch, summed over ranks.")
    train_samples: int = Field(description="Samples trained this epoch, summed over ranks (with padding).")
    connections: int = Field(description="Surviving linear projection connections after the epoch.")
    pruned: int = Field(description="Connections pruned at the end of this epoch.")
    params: int = Field(description="BAIM parameters after the epoch.")
    state_sha256_per_rank: list[str] = Field(
        description="sha256 of each rank's state_dict after the epoch, on checkpoint epochs (else empty)."
    )
    checkpointed: bool = Field(description="Whether the epoch ended with a checkpoint.")
    started_at: float = Field(description="Unix time at which rank 0 started the epoch.")


class FixedCosts(StrictModel):
    """Where a run's wall-clock seconds outside its epochs went (rank 0's clock against the driver's: the
    same machine locally; on a cluster the phases that cross machines carry their clock offset)."""

    to_worker_imports: float = Field(
        description=(
            "fit() called -> rank 0's worker starts importing this module (controller, placement group, "
            "worker processes)."
        )
    )
    imports: float = Field(
        description="Those imports (torch, Ray Train, this package) -> the training function starts."
    )
    load_model: float = Field(description="Reading the BAIM (registry or checkpoint) and preparing it.")
    load_data: float = Field(description="Decoding the cloud's training and test images.")
    initial_evaluation: float = Field(description="The test loss before training (0 when resumed).")
    startup: float = Field(description="fit() called -> the first epoch starts (all of the above).")
    teardown: float = Field(
        description="The last epoch's training and evaluation done -> fit() returned (last checkpoint too)."
    )
    fixed: float = Field(description="startup + teardown: what a round pays whatever its epochs.")


class TrainRoundResult(StrictModel):
    """One (round, strategy) run: curves, costs and where its final checkpoint is."""

    round_id: int = Field(description="Training round number.")
    strategy: str = Field(description="finetune, freeze or scratch.")
    input_artifact: str = Field(description="The BAIM the run started from, owner@version.")
    num_workers: int = Field(description="Ray Train workers.")
    use_gpu: bool = Field(description="Whether workers used a GPU each.")
    initial_test_loss: float | None = Field(description="Test loss before training (None when resumed).")
    initial_test_loss_per_task: dict[str, float] | None = Field(description="Per task, before training.")
    epochs: list[EpochMetrics] = Field(description="Per-epoch curves.")
    final_test_loss: float = Field(description="Test loss after the last epoch.")
    final_test_loss_per_task: dict[str, float] = Field(description="Per task, after the last epoch.")
    cloud_flops: int = Field(description="Training FLOPs of the run, all ranks and epochs.")
    train_seconds: float = Field(description="Sum of the epochs' wall-clock seconds.")
    wall_seconds: float = Field(
        description="Wall-clock seconds of trainer.fit() (start-up and restarts too)."
    )
    resumed_at_epochs: list[int] = Field(description="Epochs at which a restarted attempt resumed.")
    connections_initial: int = Field(description="Connections of the input BAIM.")
    connections_final: int = Field(description="Connections after the last pruning.")
    final_state_sha256: str = Field(description="sha256 of the trained state_dict (rank 0).")
    checkpoint_uri: str = Field(description="The final Ray Train checkpoint (a path or scheme://path).")
    fixed_costs: FixedCosts = Field(description="The run's seconds outside its epochs, by phase.")

    def summary(self, chosen_by: str = TRAINER_NAMED) -> RayTrainStrategyRun:
        """The per-strategy record of the coordinator's rounds (curves, flops, seconds); `chosen_by` says why
        Ray Train ran it."""
        return RayTrainStrategyRun(
            runner="ray_train",
            epochs=len(self.epochs),
            train_loss=[e.train_loss for e in self.epochs],
            test_loss=[e.test_loss for e in self.epochs],
            test_loss_per_task=[e.test_loss_per_task for e in self.epochs],
            initial_test_loss=self.initial_test_loss,
            final_test_loss=self.final_test_loss,
            flops=self.cloud_flops,
            seconds=self.train_seconds,
            wall_seconds=self.wall_seconds,
            num_workers=self.num_workers,
            use_gpu=self.use_gpu,
            resumed_at_epochs=self.resumed_at_epochs,
            connections=[e.connections for e in self.epochs],
            checkpoint_uri=self.checkpoint_uri,
            fixed_seconds=self.fixed_costs.fixed,
            chosen_by=chosen_by,
            flops_per_epoch=[e.flops for e in self.epochs],
            seconds_per_epoch=[e.seconds for e in self.epochs],
        )


def round_config_from_scenario(
    scenario: Scenario,
    cloud_indices: dict[str, list[int]],
    test_indices: dict[str, list[int]],
    *,
    round_id: int,
    registry_uri: str,
    baim_version: str,
    strategy: Strategy,
    baim_owner: str = BAIM_OWNER,
) -> TrainRoundConfig:
    """A TrainRoundConfig from a scenario's cloud and data settings (data root made absolute)."""
    cloud = scenario.cloud
    data = scenario.data.model_copy(update={"root": str(scenario.data.resolved_root())})
    return TrainRoundConfig(
        round_id=round_id,
        registry_uri=registry_uri,
        baim_owner=baim_owner,
        baim_version=baim_version,
        strategy=strategy,
        epochs=cloud.epochs,
        lr=cloud.lr,
        batch_size=cloud.batch_size,
        kld_weight=cloud.kld_weight,
        prune_interval=cloud.prune_interval,
        prune_ratio=cloud.prune_ratio,
        task_model_budget=cloud.task_model_budget,
        recovery_epochs=cloud.recovery_epochs,
        prune_shape=cloud.prune_shape,
        prune_score_images=cloud.prune_score_images,
        checkpoint_every=cloud.checkpoint_every,
        evaluate_every=cloud.evaluate_every,
        seed=scenario.seed,
        data=data,
        cloud_indices=cloud_indices,
        test_indices=test_indices,
    )


# ---- small pure helpers (no Ray) ------------------------------------------------------------------------


def state_sha256(module: nn.Module) -> str:
    """sha256 over every state_dict entry's name, dtype, shape and bytes (in key order)."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def connections_sha256(baim: BAIM) -> str:
    """sha256 of the surviving connection keys, in graph order."""
    return hashlib.sha256("\n".join(spec.key for spec in baim.connections.specs).encode()).hexdigest()


def optimizer_tensors(baim: BAIM, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Optimiser state as flat tensors keyed "<parameter name>:<state field>" (safetensors, no pickle)."""
    names = {id(p): name for name, p in baim.named_parameters()}
    out: dict[str, torch.Tensor] = {}
    for p, state in optimizer.state.items():
        name = names.get(id(p))
        if name is None:
            raise ValueError("optimizer holds a parameter the BAIM does not have; rebuild it after pruning")
        for field_name, value in state.items():
            tensor = value if isinstance(value, torch.Tensor) else torch.tensor(value)
            out[f"{name}:{field_name}"] = tensor.detach().to("cpu").contiguous().clone()
    return out


def load_optimizer_tensors(
    baim: BAIM, optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]
) -> None:
    """Inverse of `optimizer_tensors`. Adam keeps `step` on the CPU; moments go to the parameter's device."""
    params = dict(baim.named_parameters())
    trainable = {id(p) for group in optimizer.param_groups for p in group["params"]}
    states: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        name, sep, field_name = key.rpartition(":")
        if not sep or name not in params:
            raise ValueError(
                f"optimizer state {key!r}: expected '<parameter name>:<field>' of a BAIM parameter"
            )
        if id(params[name]) not in trainable:
            raise ValueError(f"optimizer state {key!r}: parameter {name!r} is not trained by this optimiser")
        device = params[name].device
        states.setdefault(name, {})[field_name] = tensor if field_name == "step" else tensor.to(device)
    for name, state in states.items():
        optimizer.state[params[name]] = state


# ---- the worker ---------------------------------------------------------------------------------------


class _Ranks:
    """Collectives over the Ray Train process group; the identity when there is one worker."""

    def __init__(self, rank: int, world: int, device: torch.device) -> None:
        self.rank, self.world, self.device = rank, world, device

    def sum(self, values: list[float]) -> list[float]:
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.world > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor.tolist()

    def max(self, value: float) -> float:
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        if self.world > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return float(tensor.item())

    def gather(self, values: list[float]) -> list[list[float]]:
        """Every rank's `values`, rank order: one collective where a sum and a max would take two."""
        mine = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.world == 1:
            return [values]
        gathered = [torch.zeros_like(mine) for _ in range(self.world)]
        dist.all_gather(gathered, mine)
        return [t.tolist() for t in gathered]

    def gather_hex(self, hex_digest: str) -> list[str]:
        """Every rank's 32-byte digest, rank order."""
        mine = torch.tensor(list(bytes.fromhex(hex_digest)), dtype=torch.int64, device=self.device)
        if self.world == 1:
            return [hex_digest]
        gathered = [torch.zeros_like(mine) for _ in range(self.world)]
        dist.all_gather(gathered, mine)
        return [bytes(t.cpu().tolist()).hex() for t in gathered]


def _load_start(cfg: TrainRoundConfig, registry: Registry) -> tuple[BAIM, dict[str, Any]]:
    """The fused BAIM from the registry, prepared for the strategy, and a fresh progress record."""
    baim = registry.load_module(cfg.baim_owner, cfg.baim_version, BAIM)
    artifact_id = f"{cfg.baim_owner}@{cfg.baim_version}"
    if abs(baim.config.kld_weight - cfg.kld_weight) > 1e-12:
        raise ValueError(
            f"kld_weight: the round asks for {cfg.kld_weight} but BAIM {artifact_id} computes its loss with "
            f"{baim.config.kld_weight}; fuse the BAIM with the scenario's kld_weight"
        )
    start_strategy(baim, cfg.strategy, cfg.seed, cfg.frozen_learners)
    progress: dict[str, Any] = {
        "round_id": cfg.round_id,
        "strategy": cfg.strategy,
        "input_artifact": artifact_id,
        "epoch": 0,
        "history": [],
        "pruning": [],
        "resumed_at_epochs": [],
        "connections_initial": len(baim.connections.specs),
        "initial_test_loss": None,
        "initial_test_loss_per_task": None,
    }
    return baim, progress


def _load_checkpoint(
    cfg: TrainRoundConfig, directory: str
) -> tuple[BAIM, dict[str, Any], dict[str, torch.Tensor]]:
    """(BAIM with the checkpoint's connections and weights, progress, optimiser tensors): it wins."""
    folder = Path(directory)
    progress = json.loads((folder / PROGRESS_FILE).read_text())
    if progress.get("round_id") != cfg.round_id or progress.get("strategy") != cfg.strategy:
        raise ValueError(
            f"checkpoint {directory}: expected round {cfg.round_id} / {cfg.strategy}, received round "
            f"{progress.get('round_id')} / {progress.get('strategy')}"
        )
    baim = load_checkpoint_baim(folder)
    if cfg.frozen_learners is None:
        apply_strategy(baim, cfg.strategy, baim.learner_modules(), seed=cfg.seed, reinitialise=False)
    else:
        freeze_for_continual(baim, cfg.frozen_learners, train_new_learners=cfg.strategy == "finetune")
    return baim, progress, load_file(str(folder / OPTIMIZER_FILE))


def load_checkpoint_baim(directory: str | Path) -> BAIM:
    """The BAIM a checkpoint folder holds (WEIGHTS_FILE + SPEC_FILE: safetensors and JSON, no pickle)."""
    folder = Path(directory)
    baim = from_files(folder / WEIGHTS_FILE, folder / SPEC_FILE)
    if not isinstance(baim, BAIM):
        raise ValueError(f"checkpoint {directory}: expected a BAIM, received a {type(baim).__name__}")
    return baim


def _write_checkpoint(
    directory: str, baim: BAIM, optimizer: torch.optim.Optimizer, progress: dict[str, Any]
) -> None:
    folder = Path(directory)
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in baim.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_FILE))
    save_file(optimizer_tensors(baim, optimizer), str(folder / OPTIMIZER_FILE))
    (folder / SPEC_FILE).write_text(json.dumps(baim.spec(), sort_keys=True))
    (folder / PROGRESS_FILE).write_text(json.dumps(progress, sort_keys=True))


def _wrap(baim: BAIM) -> nn.Module:
    import ray.train.torch

    return ray.train.torch.prepare_model(baim, parallel_strategy_kwargs={"find_unused_parameters": True})


@torch.no_grad()
def _evaluate(
    baim: BAIM, test: CachedFaces, cfg: TrainRoundConfig, ranks: _Ranks, device: torch.device
) -> Evaluation:
    """Mean test loss overall and per task; rank r takes the test batches r, r + W, ... of every task."""
    if len(test) == 0:
        return Evaluation(math.nan)
    baim.eval()
    tasks = list(test.faces)
    sums = [0.0] * (2 * len(tasks))  # (loss sum, count) per task
    for t, task in enumerate(tasks):
        task_id = baim.config.tasks.index(task)
        size = len(test.faces[task])
        for b, start in enumerate(range(0, size, cfg.eval_batch_size)):
            if b % ranks.world != ranks.rank:
                continue
            stop = min(start + cfg.eval_batch_size, size)
            images = torch.stack([test.image(task, i) for i in range(start, stop)]).to(device)
            out = baim(images, task_id, seed=eval_seed(cfg.seed, task_id, b))
            sums[2 * t] += float(out.loss) * (stop - start)
            sums[2 * t + 1] += stop - start
    totals = ranks.sum(sums)
    per_task = {task: totals[2 * t] / totals[2 * t + 1] for t, task in enumerate(tasks)}
    baim.train()
    return Evaluation(sum(totals[0::2]) / sum(totals[1::2]), per_task)


def _maybe_crash(cfg: TrainRoundConfig, epoch: int, rank: int, resumed: bool) -> None:
    """Fault injection: die during cfg.crash.epoch on cfg.crash.rank, on an attempt that did not resume."""
    if cfg.crash is None or resumed or epoch != cfg.crash.epoch or rank != cfg.crash.rank:
        return
    import ray.train
    from ray.train import CheckpointConsistencyMode

    # Ray Train registers a report only when it has polled every rank; wait until the last reported
    # checkpoint is committed, so the restart has it (a real crash may also lose the newest report).
    ray.train.get_all_reported_checkpoints(consistency_mode=CheckpointConsistencyMode.COMMITTED)
    logger.warning("fault injection: rank %d exits during epoch %d", rank, epoch)
    os._exit(1)


class RayTrainHooks:
    """`baim.loop.TrainingHooks` of one Ray Train rank: seeded epochs, DDP, collectives, reports."""

    def __init__(
        self,
        cfg: TrainRoundConfig,
        baim: BAIM,
        progress: dict[str, Any],
        ranks: _Ranks,
        loader: DataLoader[Any],
        sampler: DistributedSampler[Any],
        test_set: CachedFaces,
        scores: Sequence[Batch],
        resumed: bool,
    ) -> None:
        self.cfg, self.baim, self.progress, self.ranks = cfg, baim, progress, ranks
        self.loader, self.sampler, self.test_set, self.resumed = loader, sampler, test_set, resumed
        self.scores = scores
        self.epoch_started_at = math.nan

    def batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.epoch_started_at = time.time()
        # The global RNG (the VAEs' eps) is seeded per (seed, epoch, rank): a resumed run repeats exactly what
        # the lost attempt did.
        torch.manual_seed(epoch_seed(self.cfg.seed, epoch, self.ranks.rank))
        self.sampler.set_epoch(epoch)
        return self._device_batches(epoch)

    def _device_batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for step, (images, task_ids) in enumerate(self.loader):
            yield images.to(self.ranks.device), task_ids.to(self.ranks.device)
            if step == 0:  # after the first training step
                _maybe_crash(self.cfg, epoch, self.ranks.rank, self.resumed)

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        images, task_ids = batch
        return model(images, task_ids).loss

    def score_batches(self) -> Sequence[Batch]:
        return self.scores

    def pruned(self, epoch: int, removed: list[ConnectionSpec]) -> nn.Module:
        # Scores come from identical weights, so every rank removes the same connections; checked anyway.
        digests = self.ranks.gather_hex(connections_sha256(self.baim))
        if len(set(digests)) != 1:
            raise RuntimeError(f"pruning diverged across ranks at epoch {epoch}: {digests}")
        self.progress["pruning"].append({"epoch": epoch, "removed": [spec.key for spec in removed]})
        return _wrap(self.baim)

    def evaluate(self, epoch: int) -> Evaluation | None:
        if not self.cfg.evaluates_after(epoch):
            return None
        return _evaluate(self.baim, self.test_set, self.cfg, self.ranks, self.ranks.device)

    def epoch_done(self, outcome: EpochOutcome, optimizer: torch.optim.Optimizer) -> None:
        """Gather the epoch's figures (one collective); on checkpoint epochs compare the ranks' state hashes,
        then every rank reports (a barrier) and rank 0 checkpoints. Other epochs report nothing: their
        figures travel in the next checkpoint's progress."""
        cfg, ranks, baim = self.cfg, self.ranks, self.baim
        checkpoint = cfg.checkpoints_after(outcome.epoch)
        figures = ranks.gather([outcome.loss_sum, outcome.samples, outcome.flops, outcome.seconds,
                                outcome.train_seconds])  # fmt: skip
        evaluation = outcome.evaluation
        hashes = ranks.gather_hex(state_sha256(baim)) if checkpoint else []
        if len(set(hashes)) > 1:
            raise RuntimeError(f"ranks diverged at epoch {outcome.epoch}: state sha256 per rank {hashes}")
        samples = sum(f[1] for f in figures)
        metrics = EpochMetrics(
            epoch=outcome.epoch,
            train_loss=sum(f[0] for f in figures) / samples,
            test_loss=None if evaluation is None else evaluation.loss,
            test_loss_per_task={} if evaluation is None else evaluation.per_task,
            seconds=max(f[3] for f in figures),
            train_seconds=max(f[4] for f in figures),
            flops=round(sum(f[2] for f in figures)),
            train_samples=round(samples),
            connections=len(baim.connections.specs),
            pruned=len(outcome.pruned),
            params=count_params(baim),
            state_sha256_per_rank=hashes,
            checkpointed=checkpoint,
            started_at=self.epoch_started_at,
        )
        self.progress["epoch"] = outcome.epoch
        self.progress["history"].append(metrics.model_dump())
        self.progress["timeline"]["last_epoch_done"] = time.time()
        if ranks.rank == 0:
            logger.info(
                "round %d %s epoch %d/%d: train %.5f test %s (%.1fs, %d connections)",
                cfg.round_id, cfg.strategy, outcome.epoch, cfg.epochs, metrics.train_loss, metrics.test_loss,
                metrics.seconds, metrics.connections,
            )  # fmt: skip
        if ranks.rank == 0:
            progress = CloudEpochProgress(
                round=cfg.round_id, strategy=cfg.strategy, epoch=outcome.epoch, epochs=cfg.epochs,
                train_loss=metrics.train_loss, test_loss=metrics.test_loss, seconds=metrics.seconds,
            )  # fmt: skip
            publish_epoch(Registry(cfg.registry_uri), progress)
        if checkpoint:
            self._checkpoint(outcome.epoch, optimizer)

    def _checkpoint(self, epoch: int, optimizer: torch.optim.Optimizer) -> None:
        import ray.train

        ranks, baim = self.ranks, self.baim
        with tempfile.TemporaryDirectory() as directory:
            reported = None
            if ranks.rank == 0:
                _write_checkpoint(directory, baim, optimizer, self.progress)
                reported = ray.train.Checkpoint.from_directory(directory)
            ray.train.report(
                self.progress["history"][-1], checkpoint=reported, checkpoint_dir_name=f"epoch-{epoch:04d}"
            )


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker: train the BAIM for cfg.epochs, reporting and checkpointing every epoch."""
    entered = time.time()
    import ray.train
    import ray.train.torch

    cfg = config[ROUND_CONFIG_KEY]
    if not isinstance(cfg, TrainRoundConfig):
        cfg = TrainRoundConfig.model_validate(cfg)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    ranks = _Ranks(rank, world, device)
    if cfg.batch_size % world != 0:
        raise ValueError(
            f"batch_size: expected a multiple of num_workers ({world}), received {cfg.batch_size}"
        )

    registry = Registry(cfg.registry_uri)
    checkpoint = ray.train.get_checkpoint()
    optimizer_state: dict[str, torch.Tensor] = {}
    if checkpoint is None:
        baim, progress = _load_start(cfg, registry)
    else:
        with checkpoint.as_directory() as directory:
            baim, progress, optimizer_state = _load_checkpoint(cfg, directory)
        progress["resumed_at_epochs"].append(progress["epoch"] + 1)
        logger.info("rank %d resumes round %d at epoch %d", rank, cfg.round_id, progress["epoch"] + 1)
    resumed = checkpoint is not None
    baim.to(device)
    baim.train()
    timeline = progress["timeline"] = {
        "imports_started": IMPORT_STARTED_AT,
        "train_function": entered,
        "model_ready": time.time(),
    }

    tasks = list(baim.config.tasks)
    unknown = sorted((set(cfg.cloud_indices) | set(cfg.test_indices)) - set(tasks))
    if unknown:
        raise ValueError(f"cloud/test indices name tasks {unknown} that the BAIM does not have ({tasks})")
    source = resolve_source(cfg.data)
    train_set = CachedFaces(source, cfg.cloud_indices, tasks, cfg.data.resolution)
    test_set = CachedFaces(source, cfg.test_indices, tasks, cfg.data.resolution)
    train_set.preload()  # decoding is part of the start-up, not of the first epoch
    test_set.preload()
    timeline["data_ready"] = time.time()
    # Each rank takes its part of the common shard, reshuffled per epoch, padded to equal step counts; the
    # global batch is batch_size, so 1 and 2 workers take the same optimisation steps.
    sampler: DistributedSampler[Any] = DistributedSampler(
        train_set, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed
    )
    loader = DataLoader(train_set, batch_size=cfg.batch_size // world, sampler=sampler)

    optimizer = make_optimizer(baim, cfg.lr)
    load_optimizer_tensors(baim, optimizer, optimizer_state)
    model = _wrap(baim)

    if not resumed and len(test_set) > 0:
        initial = _evaluate(baim, test_set, cfg, ranks, device)
        progress["initial_test_loss"], progress["initial_test_loss_per_task"] = initial.loss, initial.per_task
    timeline["evaluated"] = time.time()

    # Every rank scores connections on the same images (the first of each task's shard) with the same noise.
    scores = score_batches(train_set, tasks, cfg.prune_score_images, cfg.batch_size)
    hooks = RayTrainHooks(cfg, baim, progress, ranks, loader, sampler, test_set, scores, resumed)
    schedule = LoopSchedule(cfg.epochs, cfg.lr, cfg.pruning(), cfg.flop_counting, score_seed(cfg.seed))
    train_strategy(baim, model, optimizer, hooks, schedule, first_epoch=progress["epoch"] + 1)


# ---- the driver -----------------------------------------------------------------------------------------


def default_storage_path(registry_uri: str) -> str:
    """Ray Train storage beside the registry (same filesystem, so every node of a cluster reaches it)."""
    if "://" in registry_uri:
        return registry_uri.rstrip("/") + "/ray_train"
    return os.path.join(os.path.abspath(registry_uri), "ray_train")


def _fit(
    cfg: TrainRoundConfig,
    *,
    num_workers: int,
    use_gpu: bool,
    cpus_per_worker: float,
    storage_path: str | None,
    max_failures: int,
    wait_for_nodes_s: float,
) -> TrainRoundResult:
    import ray.train
    from ray.train.torch import TorchTrainer

    check_cluster_resources(num_workers, use_gpu, cpus_per_worker, wait_for_nodes_s=wait_for_nodes_s)
    if cfg.batch_size % num_workers != 0:
        raise ValueError(
            f"batch_size: expected a multiple of num_workers ({num_workers}), received {cfg.batch_size}"
        )
    if cfg.crash is not None and cfg.crash.rank >= num_workers:
        raise ValueError(f"crash.rank: expected < num_workers ({num_workers}), received {cfg.crash.rank}")
    registry = Registry(cfg.registry_uri)
    input_ref = registry.ref(cfg.baim_owner, cfg.baim_version)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={ROUND_CONFIG_KEY: cfg},
        scaling_config=ray.train.ScalingConfig(
            num_workers=num_workers,
            use_gpu=use_gpu,  # adds {"GPU": 1} per worker
            resources_per_worker={"CPU": cpus_per_worker},
        ),
        run_config=ray.train.RunConfig(
            name=cfg.run_name(input_ref.sha256),
            storage_path=storage_path or default_storage_path(cfg.registry_uri),
            failure_config=failure_config(max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
    )
    # Ray Train's controller polls its workers this often (default 2 s): each state change of a short run
    # (workers up, training done) waits for the next poll. The driver's value propagates to the controller.
    os.environ.setdefault(HEALTH_CHECK_INTERVAL_ENV, HEALTH_CHECK_INTERVAL_S)
    fit_called = time.time()
    started = time.perf_counter()
    try:
        # raises when the run fails for good: max_failures worker failures, or the workers could not be
        # started WORKER_GROUP_START_RETRIES + 1 times in a row
        result = trainer.fit()
    except ray.train.TrainingFailedError as err:
        raise RuntimeError(
            f"training round {cfg.round_id} ({cfg.strategy}) failed (max_failures={max_failures}, "
            f"worker group start retries={WORKER_GROUP_START_RETRIES}): {err}"
        ) from err
    wall_seconds = time.perf_counter() - started
    fit_returned = time.time()
    if result.checkpoint is None:
        raise RuntimeError(f"training round {cfg.round_id} ({cfg.strategy}) finished without a checkpoint")
    with result.checkpoint.as_directory() as directory:
        progress = json.loads((Path(directory) / PROGRESS_FILE).read_text())
    history = [EpochMetrics.model_validate(entry) for entry in progress["history"]]
    final = history[-1]
    assert final.test_loss is not None  # the last epoch is always evaluated
    return TrainRoundResult(
        round_id=cfg.round_id,
        strategy=cfg.strategy,
        input_artifact=progress["input_artifact"],
        num_workers=num_workers,
        use_gpu=use_gpu,
        initial_test_loss=progress["initial_test_loss"],
        initial_test_loss_per_task=progress["initial_test_loss_per_task"],
        epochs=history,
        final_test_loss=final.test_loss,
        final_test_loss_per_task=final.test_loss_per_task,
        cloud_flops=sum(e.flops for e in history),
        train_seconds=sum(e.seconds for e in history),
        wall_seconds=wall_seconds,
        resumed_at_epochs=progress["resumed_at_epochs"],
        connections_initial=progress["connections_initial"],
        connections_final=final.connections,
        final_state_sha256=final.state_sha256_per_rank[0],
        checkpoint_uri=_checkpoint_uri(result.checkpoint),
        fixed_costs=_fixed_costs(progress["timeline"], history[0].started_at, fit_called, fit_returned),
    )


def _fixed_costs(
    timeline: dict[str, float], first_epoch: float, fit_called: float, fit_returned: float
) -> FixedCosts:
    """The phases of a run outside its epochs, from rank 0's timeline of its last attempt (unix times)."""
    startup = first_epoch - fit_called
    teardown = fit_returned - timeline["last_epoch_done"]
    return FixedCosts(
        to_worker_imports=timeline["imports_started"] - fit_called,
        imports=timeline["train_function"] - timeline["imports_started"],
        load_model=timeline["model_ready"] - timeline["train_function"],
        load_data=timeline["data_ready"] - timeline["model_ready"],
        initial_evaluation=timeline["evaluated"] - timeline["data_ready"],
        startup=startup,
        teardown=teardown,
        fixed=startup + teardown,
    )


def _checkpoint_uri(checkpoint: Any) -> str:
    """A path (local storage) or scheme://path that `ray.train.Checkpoint(uri)` opens again."""
    import pyarrow.fs as pafs

    if checkpoint.filesystem is None or isinstance(checkpoint.filesystem, pafs.LocalFileSystem):
        return str(checkpoint.path)
    return f"{checkpoint.filesystem.type_name}://{checkpoint.path}"


def load_trained_baim(result: TrainRoundResult) -> BAIM:
    """The trained BAIM from a result's final checkpoint, in eval mode."""
    import ray.train

    with ray.train.Checkpoint(result.checkpoint_uri).as_directory() as directory:
        baim = load_checkpoint_baim(directory)
    return baim.eval()


def publish_result(
    cfg: TrainRoundConfig, result: TrainRoundResult
) -> tuple[str, dict[str, PublishedTaskModel]]:
    """A run's trained BAIM and its task models through the one publish path (`actors.publishing`);
    returns the BAIM's version and the published task models."""
    registry = Registry(cfg.registry_uri)
    baim = load_trained_baim(result)
    version = publish_baim(registry, pack_module(baim, baim.spec()))
    tasks = publish_task_models(
        registry,
        baim,
        version,
        source=resolve_source(cfg.data),
        test_indices=cfg.test_indices,
        resolution=cfg.data.resolution,
        batch_size=cfg.eval_batch_size,
        seed=cfg.seed,
        task_model_budget=cfg.task_model_budget,
    )
    return version, tasks


def run_training_round(
    cfg: TrainRoundConfig,
    *,
    num_workers: int = 1,
    use_gpu: bool = False,
    cpus_per_worker: float = 1.0,
    storage_path: str | None = None,
    max_failures: int = 1,
    wait_for_nodes_s: float = 0.0,
) -> TrainRoundResult:
    """Train one (round, strategy) with Ray Train; Ray must be initialised. storage_path defaults to
    `<registry>/ray_train`. A failed run (more than max_failures worker failures) raises RuntimeError.
    Publishing is the caller's (`actors.publishing`)."""
    return _fit(
        cfg,
        num_workers=num_workers,
        use_gpu=use_gpu,
        cpus_per_worker=cpus_per_worker,
        storage_path=storage_path,
        max_failures=max_failures,
        wait_for_nodes_s=wait_for_nodes_s,
    )


def run_strategies(
    cfg: TrainRoundConfig,
    strategies: list[Strategy],
    *,
    num_workers: int = 1,
    use_gpu: bool = False,
    cpus_per_worker: float = 1.0,
    storage_path: str | None = None,
    max_failures: int = 1,
    wait_for_nodes_s: float = 0.0,
) -> dict[str, TrainRoundResult]:
    """The paper's comparison: every strategy from the same fused BAIM, one after another (each uses every
    worker); `cfg.strategy` is replaced per run."""
    if not strategies or len(set(strategies)) != len(strategies):
        raise ValueError(f"strategies: expected a non-empty list without repeats, received {strategies}")
    return {
        strategy: run_training_round(
            cfg.model_copy(update={"strategy": strategy}),
            num_workers=num_workers,
            use_gpu=use_gpu,
            cpus_per_worker=cpus_per_worker,
            storage_path=storage_path,
            max_failures=max_failures,
            wait_for_nodes_s=wait_for_nodes_s,
        )
        for strategy in strategies
    }


def put_fused_snapshot(registry: Registry, round_id: int, payload: ArtifactPayload) -> str:
    """Store an untrained fused BAIM for a round as `baim-fused@r<round>-<sha>`; returns the version.

    Idempotent: the same round and bytes give the same version (a restarted coordinator re-puts it).
    """
    version = f"r{round_id:06d}-{payload.sha256[:12]}"
    registry.put(FUSED_BAIM_OWNER, version, payload)
    return version


def ray_train_round(request: RoundRequest, chosen_by: str = TRAINER_NAMED) -> RoundResult:
    """The round runner: every strategy of the request as Ray Train jobs, launched from the coordinator's
    thread that waits for them; the strategy `cloud.keep` chooses (for best: the lowest loss of the trained
    BAIMs on the cloud's held-out images, measured here) is what the coordinator continues from.
    Scaling (num_workers, use_gpu, cpus_per_worker) comes from the scenario's cloud settings; `chosen_by`
    (why Ray Train runs the round) goes into each strategy's record."""
    tasks = {squad["task"] for squad in json.loads(request.baim.spec_json)["squads"]}
    registry = Registry(request.registry_uri)
    cfg = round_config_from_scenario(
        request.scenario,
        {task: indices for task, indices in request.partitions.cloud.items() if task in tasks},
        {task: indices for task, indices in request.partitions.test.items() if task in tasks},
        round_id=request.round_index,
        registry_uri=request.registry_uri,
        baim_owner=FUSED_BAIM_OWNER,
        baim_version=put_fused_snapshot(registry, request.round_index, request.baim),
        strategy=request.strategies[0],
    ).model_copy(update={"frozen_learners": request.frozen_learners})
    cloud = request.scenario.cloud
    results = run_strategies(
        cfg,
        request.strategies,
        num_workers=cloud.num_workers,
        use_gpu=cloud.use_gpu,
        cpus_per_worker=cloud.cpus_per_worker,
        wait_for_nodes_s=cloud.wait_for_nodes_s,
    )
    losses: dict[str, float] | None = None
    if cloud.keep == "best":
        order = sorted(tasks)
        holdout = CachedFaces(request.source, request.partitions.holdout, order, cfg.data.resolution)
        losses = {
            strategy: holdout_loss(load_trained_baim(result), holdout, cfg.eval_batch_size, cfg.seed)
            for strategy, result in results.items()
        }
    kept = kept_strategy(cloud.keep, list(request.strategies), losses)
    trained = load_trained_baim(results[kept])
    return RoundResult(
        trained=pack_module(trained, trained.spec()),
        strategies={name: result.summary(chosen_by) for name, result in results.items()},
        kept=kept,
        holdout_loss=losses,
    )
