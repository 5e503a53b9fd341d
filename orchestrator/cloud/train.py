"""Cloud BAIM training on Ray Train: one `TorchTrainer` run per (round, strategy).

Shape (Ray's `torch_fashion_mnist_example`): `train_loop_per_worker(config)` builds the model and the data on
each worker and reports every epoch; the driver `run_training_round(cfg, ...)` only builds the
`ScalingConfig` / `RunConfig`, calls `fit()`, then publishes what the last checkpoint holds.

Decisions, and why:

- Config. `train_loop_config` carries one typed `TrainRoundConfig` under the key "round". It names the fused
  BAIM by registry artifact (owner, version), so every worker (on any node) reads the same verified
  safetensors + JSON spec from the registry; nothing is unpickled from an artifact.
- Top-K routing leaves parameters without gradients. Each rank routes its own samples, so a learner (or a
  connection, or another task's LSGate) can be used on one rank and not on the other, or on neither. DDP runs
  with `find_unused_parameters=True`: every step it marks the parameters the local graph did not reach as
  ready with zero gradient, so the all-reduce averages (used-rank gradient + zeros) / world_size, the same
  on every rank; a parameter no rank used keeps `grad=None` and Adam skips it, exactly as in a one-process
  loop. The alternative, adding `0 * p.sum()` for every parameter, gives every parameter a zero gradient, and
  Adam would then keep moving idle parameters with their old momentum: different optimiser semantics and
  extra work. The price of the choice is one autograd-graph traversal per step.
- Bit-identical ranks. Same initial weights (from the registry, and DDP broadcasts rank 0's anyway), the
  same averaged gradients, the same deterministic optimiser: every epoch each rank hashes its state_dict
  (sha256), the hashes are all-gathered, and rank 0 reports them (`state_sha256_per_rank`).
- Data. The cloud's common shard (all tasks) is one dataset; a `DistributedSampler` (seeded, reshuffled per
  epoch with `set_epoch`, padded so every rank runs the same number of steps) gives each rank its part.
  `batch_size` is global: each rank takes batch_size / world_size, so 1 and 2 workers take the same
  optimisation steps. Images are read lazily from the data source by the process that iterates them and kept
  (as the uint8 pixels they came from, which is lossless) after the first read. The test sets are cut into
  fixed batches; rank r evaluates batches r, r + W, ..., with noise keyed by (seed, task, batch), and the
  per-task (loss sum, count) are all-reduced: the test loss does not depend on the number of workers.
- Training noise. The global RNG (used for the VAEs' eps in training) is seeded per (seed, epoch, rank) at
  the start of each epoch, so a run resumed from a checkpoint repeats exactly what the lost attempt did.
- FLOPs come from `baim.costs.count_flops` (FlopCounterMode) wrapped around real training steps.
  `flop_counting="first_batch"` (default) counts the first step of every epoch on every rank exactly and
  scales it by the samples that rank trained in the epoch; FlopCounterMode's dispatch overhead (about 40 ms
  per step on this CPU) would otherwise dominate small models. Routing changes which learners run, so this is
  exact when a step's cost does not depend on the route (equal learners) and otherwise within the spread of
  the squad's learner sizes. `flop_counting="every_batch"` counts every step exactly, at that overhead.
  Only training FLOPs (forward + backward) are counted, not evaluation.
- Pruning: after the training of every epoch that is a multiple of `prune_interval`,
  `baim.pruning.prune_connections` removes floor(prune_ratio * surviving) connections on every rank. Scores
  come from identical weights, so the choice is identical; it is checked anyway (all-gathered sha256 of the
  surviving connection keys). Pruning deletes parameters, so the optimiser is rebuilt over the surviving
  trainable parameters, carrying each survivor's Adam state over (same parameter objects), and the model is
  wrapped in a new DDP (the old wrapper is deleted first, which removes its gradient hooks; the new one
  re-registers hooks and buckets for the new parameter set and checks shapes agree across ranks).
  Evaluation follows pruning, so the reported test loss is the checkpointed model's.
- Checkpoints: rank 0 writes one per epoch (`weights.safetensors`, `spec.json` (the BAIM spec, including
  the surviving connections: the pruning state), `optimizer.safetensors` (Adam state keyed by parameter
  name, no pickle), `progress.json` (epochs done, the curves so far, pruning log, restarts)) and reports it;
  every rank calls `ray.train.report` once per epoch (it is a barrier). On restart
  `ray.train.get_checkpoint()` wins over the config: epoch, weights, connections and optimiser state come
  from it. The run is named after (round, strategy, input sha256), so rerunning the same round on the same
  storage resumes it as well.
- Metrics: Ray Train v2 keeps only rank 0's metrics and only those attached to checkpoints; the curves are
  therefore carried in `progress.json` and read back from the final checkpoint.
- Resources: a job the cluster can never host (fewer GPUs than workers with `use_gpu=True`, fewer CPUs than
  num_workers x cpus_per_worker once the launching actor's own reservation is taken off) fails at once with
  a clear error, before any worker is requested; Ray Train would otherwise wait for the resources, time out
  and retry. Retries of a worker group that cannot start are bounded (`WORKER_GROUP_START_RETRIES`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from baim.continual import admit
from baim.costs import count_flops, count_params
from baim.decompose import decompose
from baim.model import BAIM
from baim.pruning import prune_connections
from baim.seeding import epoch_seed, eval_seed
from baim.training import Strategy, apply_strategy, make_optimizer
from orchestrator.core.artifacts import ArtifactPayload, pack_module, unpack_payload
from orchestrator.core.metrics import Ledger
from orchestrator.core.registry import Registry
from orchestrator.core.scenario import DataConfig, Scenario
from orchestrator.data.datasets import FaceDataset
from orchestrator.data.sources import DataSource, resolve_source

logger = logging.getLogger(__name__)

ROUND_CONFIG_KEY = "round"  # the one key of train_loop_config
BAIM_OWNER = "baim"
FUSED_OWNER = "baim-fused"  # untrained fused snapshots handed to a round (see `put_fused_snapshot`)
WEIGHTS_FILE = "weights.safetensors"
SPEC_FILE = "spec.json"
OPTIMIZER_FILE = "optimizer.safetensors"
PROGRESS_FILE = "progress.json"
DECOMPOSITION_CHECK_IMAGES = 16  # test images per task for the decomposition check


# ---- configuration and results ----------------------------------------------------------------------


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class WorkerCrash(StrictModel):
    """Fault injection for tests and chaos runs: one rank dies (os._exit) during one epoch."""

    epoch: int = Field(
        ge=2,
        description=(
            "Epoch (1-based) during which the rank dies, after its first training step and after the "
            "previous epoch's checkpoint is committed. At least 2, so a checkpoint exists to resume from."
        ),
    )
    rank: int = Field(default=0, ge=0, description="World rank of the worker that dies.")


class TrainRoundConfig(StrictModel):
    """Everything one Ray Train run needs; carried to every worker under train_loop_config["round"]."""

    round_id: int = Field(ge=0, description="Training round number (the coordinator's round index).")
    registry_uri: str = Field(min_length=1, description="Registry the BAIM is read from and published to.")
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
        ge=0, lt=1, description="Fraction of surviving connections removed per pruning."
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
    flop_counting: Literal["first_batch", "every_batch"] = Field(
        default="first_batch",
        description="Count FLOPs on the first step of each epoch and scale by samples, or on every step.",
    )
    crash: WorkerCrash | None = Field(default=None, description="Fault injection: a worker dies once.")

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
        return self

    def run_name(self, input_sha256: str) -> str:
        """Ray Train run name: the same round, strategy and input BAIM resume the same run."""
        return f"round-{self.round_id:04d}-{self.strategy}-{input_sha256[:12]}"


class EpochMetrics(StrictModel):
    """What every epoch reports (rank 0's copy holds the all-reduced values)."""

    epoch: int = Field(description="1-based epoch number.")
    train_loss: float = Field(description="Sample-weighted mean training loss of the epoch, all ranks.")
    test_loss: float = Field(description="Mean test loss over every task's test images, after the epoch.")
    test_loss_per_task: dict[str, float] = Field(description="Mean test loss per task.")
    seconds: float = Field(
        description="Wall-clock seconds of the epoch (train, prune, evaluate), slowest rank."
    )
    train_seconds: float = Field(description="Wall-clock seconds of the training steps, slowest rank.")
    flops: int = Field(description="Training FLOPs (forward + backward) of the epoch, summed over ranks.")
    train_samples: int = Field(description="Samples trained this epoch, summed over ranks (with padding).")
    connections: int = Field(description="Surviving linear projection connections after the epoch.")
    pruned: int = Field(description="Connections pruned at the end of this epoch.")
    params: int = Field(description="BAIM parameters after the epoch.")
    state_sha256_per_rank: list[str] = Field(description="sha256 of each rank's state_dict after the epoch.")


class PublishedTaskModel(StrictModel):
    task: str = Field(description="Task name.")
    artifact: str = Field(description="Registry artifact, owner@version (owner is task/<task>).")
    sha256: str = Field(description="Artifact sha256.")
    params: int = Field(description="Parameters of the decomposed task model.")
    decomposition_max_abs_diff: float = Field(
        description="Largest |BAIM - task model| over reconstruction and generation on the check batch."
    )


class TrainRoundResult(StrictModel):
    """One (round, strategy) run: curves, costs, and what was published."""

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
    baim_artifact: str | None = Field(default=None, description="Published trained BAIM, owner@version.")
    task_models: list[PublishedTaskModel] = Field(default_factory=list, description="Published task models.")

    def summary(self) -> dict[str, Any]:
        """JSON-able per-strategy summary in the coordinator's round format (curves, flops, seconds)."""
        return {
            "runner": "ray_train",
            "epochs": len(self.epochs),
            "train_loss": [e.train_loss for e in self.epochs],
            "test_loss": [e.test_loss for e in self.epochs],
            "test_loss_per_task": [e.test_loss_per_task for e in self.epochs],
            "initial_test_loss": self.initial_test_loss,
            "final_test_loss": self.final_test_loss,
            "flops": self.cloud_flops,
            "seconds": self.train_seconds,
            "wall_seconds": self.wall_seconds,
            "num_workers": self.num_workers,
            "use_gpu": self.use_gpu,
            "resumed_at_epochs": self.resumed_at_epochs,
            "connections": [e.connections for e in self.epochs],
            "checkpoint_uri": self.checkpoint_uri,
        }


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


class CachedFaces(Dataset):
    """(image, task_id) items over several tasks' indices; each image is read once, then kept as uint8.

    The uint8 pixels are what `FaceDataset` decodes before dividing by 255, so returning cached / 255 gives
    the same float tensor bit for bit.
    """

    def __init__(self, source: DataSource, indices: dict[str, list[int]], tasks: list[str], resolution: int):
        self.faces = {
            task: FaceDataset(source, indices[task], resolution) for task in tasks if indices.get(task)
        }
        self.items = [
            (task, tasks.index(task), i) for task in self.faces for i in range(len(self.faces[task]))
        ]
        self._cache: dict[tuple[str, int], torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.items)

    def image(self, task: str, i: int) -> torch.Tensor:
        key = (task, i)
        cached = self._cache.get(key)
        if cached is None:
            pixels = self.faces[task][i]
            assert isinstance(pixels, torch.Tensor)
            cached = (pixels * 255.0).round().to(torch.uint8)
            self._cache[key] = cached
        return cached.float().div_(255.0)

    def __getitem__(self, item: int) -> tuple[torch.Tensor, int]:
        task, task_id, i = self.items[item]
        return self.image(task, i), task_id


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

    def gather_hex(self, hex_digest: str) -> list[str]:
        """Every rank's 32-byte digest, rank order."""
        mine = torch.tensor(list(bytes.fromhex(hex_digest)), dtype=torch.int64, device=self.device)
        if self.world == 1:
            return [hex_digest]
        gathered = [torch.zeros_like(mine) for _ in range(self.world)]
        dist.all_gather(gathered, mine)
        return [bytes(t.cpu().tolist()).hex() for t in gathered]


def _load_start(cfg: TrainRoundConfig, registry: Registry) -> tuple[BAIM, dict[str, Any]]:
    """The fused BAIM from the registry, admitted and prepared for the strategy."""
    artifact_id = f"{cfg.baim_owner}@{cfg.baim_version}"
    payload = registry.get(cfg.baim_owner, cfg.baim_version)
    spec, tensors = unpack_payload(
        payload, artifact_id=artifact_id, max_bytes=registry.max_artifact_bytes, allowed_kinds=("baim",)
    )
    baim = BAIM.from_spec(spec)
    baim.load_state_dict(tensors, strict=True)
    if abs(baim.config.kld_weight - cfg.kld_weight) > 1e-12:
        raise ValueError(
            f"kld_weight: the round asks for {cfg.kld_weight} but BAIM {artifact_id} computes its loss with "
            f"{baim.config.kld_weight}; fuse the BAIM with the scenario's kld_weight"
        )
    admit(baim)  # fused-but-pending learners compete from the first step (see baim.gates)
    apply_strategy(baim, cfg.strategy, baim.learner_modules(), seed=cfg.seed)
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
    """(BAIM with the checkpoint's connections and weights, progress, optimiser tensors)."""
    folder = Path(directory)
    spec = json.loads((folder / SPEC_FILE).read_text())
    progress = json.loads((folder / PROGRESS_FILE).read_text())
    if progress.get("round_id") != cfg.round_id or progress.get("strategy") != cfg.strategy:
        raise ValueError(
            f"checkpoint {directory}: expected round {cfg.round_id} / {cfg.strategy}, received round "
            f"{progress.get('round_id')} / {progress.get('strategy')}"
        )
    baim = BAIM.from_spec(spec)
    # apply_strategy first (it sets requires_grad, and re-initialises for scratch), then the checkpoint's
    # weights overwrite every value: the checkpoint wins.
    apply_strategy(baim, cfg.strategy, baim.learner_modules(), seed=cfg.seed)
    baim.load_state_dict(load_file(str(folder / WEIGHTS_FILE)), strict=True)
    return baim, progress, load_file(str(folder / OPTIMIZER_FILE))


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
) -> tuple[float, dict[str, float]]:
    """Mean test loss overall and per task; rank r takes the test batches r, r + W, ... of every task."""
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
    overall = sum(totals[0::2]) / sum(totals[1::2])
    baim.train()
    return overall, per_task


def _maybe_crash(cfg: TrainRoundConfig, epoch: int, rank: int, resumed: bool) -> None:
    """Fault injection: die during cfg.crash.epoch on cfg.crash.rank, on an attempt that did not resume."""
    if cfg.crash is None or resumed or epoch != cfg.crash.epoch or rank != cfg.crash.rank:
        return
    import ray.train
    from ray.train import CheckpointConsistencyMode

    # Ray Train registers a report only when it has polled every rank; wait until the previous epoch's
    # checkpoint is committed, so the restart has it (a real crash may also lose the newest report).
    ray.train.get_all_reported_checkpoints(consistency_mode=CheckpointConsistencyMode.COMMITTED)
    logger.warning("fault injection: rank %d exits during epoch %d", rank, epoch)
    os._exit(1)


def _training_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    task_ids: torch.Tensor,
    losses: list[torch.Tensor],
) -> None:
    """One optimiser step; the (pre-step) loss is appended to `losses`."""
    out = model(images, task_ids)
    optimizer.zero_grad(set_to_none=True)
    out.loss.backward()
    optimizer.step()
    losses.append(out.loss.detach())


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker: train the BAIM for cfg.epochs, reporting and checkpointing every epoch."""
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

    tasks = list(baim.config.tasks)
    unknown = sorted((set(cfg.cloud_indices) | set(cfg.test_indices)) - set(tasks))
    if unknown:
        raise ValueError(f"cloud/test indices name tasks {unknown} that the BAIM does not have ({tasks})")
    source = resolve_source(cfg.data)
    train_set = CachedFaces(source, cfg.cloud_indices, tasks, cfg.data.resolution)
    test_set = CachedFaces(source, cfg.test_indices, tasks, cfg.data.resolution)
    sampler: DistributedSampler[Any] = DistributedSampler(
        train_set, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed
    )
    loader = DataLoader(train_set, batch_size=cfg.batch_size // world, sampler=sampler)

    optimizer = make_optimizer(baim, cfg.lr)
    load_optimizer_tensors(baim, optimizer, optimizer_state)
    model = _wrap(baim)

    if not resumed and len(test_set) > 0:
        loss, per_task = _evaluate(baim, test_set, cfg, ranks, device)
        progress["initial_test_loss"], progress["initial_test_loss_per_task"] = loss, per_task

    for epoch in range(progress["epoch"] + 1, cfg.epochs + 1):
        epoch_started = time.perf_counter()
        torch.manual_seed(epoch_seed(cfg.seed, epoch, rank))
        sampler.set_epoch(epoch)
        loss_sum, samples, flops = 0.0, 0, 0
        per_sample_flops: float | None = None
        for step, (images, task_ids) in enumerate(loader):
            images, task_ids = images.to(device), task_ids.to(device)
            losses: list[torch.Tensor] = []
            if cfg.flop_counting == "every_batch" or step == 0:
                counted = count_flops(_training_step, model, optimizer, images, task_ids, losses)
                flops += counted
                per_sample_flops = counted / images.shape[0]
            else:
                _training_step(model, optimizer, images, task_ids, losses)
                assert per_sample_flops is not None
                flops += round(per_sample_flops * images.shape[0])
            loss_sum += float(losses[0]) * images.shape[0]
            samples += images.shape[0]
            if step == 0:
                _maybe_crash(cfg, epoch, rank, resumed)
        train_seconds = time.perf_counter() - epoch_started

        pruned = 0
        if cfg.prune_ratio > 0 and epoch % cfg.prune_interval == 0:
            removed = prune_connections(baim, cfg.prune_ratio)
            pruned = len(removed)
            digests = ranks.gather_hex(connections_sha256(baim))
            if len(set(digests)) != 1:
                raise RuntimeError(f"pruning diverged across ranks at epoch {epoch}: {digests}")
            progress["pruning"].append({"epoch": epoch, "removed": [spec.key for spec in removed]})
            optimizer = make_optimizer(baim, cfg.lr, previous=optimizer)
            del model  # drops the old DDP reducer and its gradient hooks before re-wrapping
            model = _wrap(baim)

        test_loss, test_per_task = (
            _evaluate(baim, test_set, cfg, ranks, device) if len(test_set) else (math.nan, {})
        )
        totals = ranks.sum([loss_sum, samples, flops])
        metrics = EpochMetrics(
            epoch=epoch,
            train_loss=totals[0] / totals[1],
            test_loss=test_loss,
            test_loss_per_task=test_per_task,
            seconds=ranks.max(time.perf_counter() - epoch_started),
            train_seconds=ranks.max(train_seconds),
            flops=round(totals[2]),
            train_samples=round(totals[1]),
            connections=len(baim.connections.specs),
            pruned=pruned,
            params=count_params(baim),
            state_sha256_per_rank=ranks.gather_hex(state_sha256(baim)),
        )
        progress["epoch"] = epoch
        progress["history"].append(metrics.model_dump())
        if rank == 0:
            logger.info(
                "round %d %s epoch %d/%d: train %.5f test %.5f (%.1fs, %d connections)",
                cfg.round_id, cfg.strategy, epoch, cfg.epochs, metrics.train_loss, test_loss,
                metrics.seconds, metrics.connections,
            )  # fmt: skip
        with tempfile.TemporaryDirectory() as directory:
            reported = None
            if rank == 0:
                _write_checkpoint(directory, baim, optimizer, progress)
                reported = ray.train.Checkpoint.from_directory(directory)
            ray.train.report(
                metrics.model_dump(), checkpoint=reported, checkpoint_dir_name=f"epoch-{epoch:04d}"
            )


# ---- the driver -----------------------------------------------------------------------------------------


def check_resources_fit(
    num_workers: int,
    use_gpu: bool,
    cpus_per_worker: float,
    cluster_total: dict[str, float],
    held_by_caller: dict[str, float],
) -> None:
    """Raise ValueError, naming the setting, when `num_workers` Train workers can never be placed.

    What the job can ever get is the cluster's total minus what the calling process itself holds
    (`held_by_caller`): the actor that launches the job (the coordinator) keeps its own reservation for the
    whole run, so those resources are never free for the workers. Resources held by other actors are not
    subtracted: they are released eventually (finished edges are killed), so they only delay the start.
    """
    if num_workers < 1:
        raise ValueError(f"num_workers: expected >= 1, received {num_workers}")
    if cpus_per_worker <= 0:
        raise ValueError(f"cpus_per_worker: expected > 0, received {cpus_per_worker}")
    gpus_total, gpus_held = cluster_total.get("GPU", 0.0), held_by_caller.get("GPU", 0.0)
    if use_gpu and gpus_total - gpus_held < num_workers:
        raise ValueError(
            f"use_gpu: the round needs {num_workers} GPU(s) (one per worker) but the Ray cluster offers "
            f"{gpus_total:g}{_held_note(gpus_held)}; set cloud.use_gpu: false or add GPU nodes"
        )
    cpus_total, cpus_held = cluster_total.get("CPU", 0.0), held_by_caller.get("CPU", 0.0)
    needed = num_workers * cpus_per_worker
    if cpus_total - cpus_held < needed:
        raise ValueError(
            f"cpus_per_worker: {num_workers} workers x {cpus_per_worker:g} CPUs = {needed:g} CPUs, the Ray "
            f"cluster has {cpus_total:g}{_held_note(cpus_held)}; lower cloud.num_workers or "
            f"cloud.cpus_per_worker, or give Ray more CPUs"
        )


def _held_note(held: float) -> str:
    return f", of which {held:g} stay held by the process launching the job" if held > 0 else ""


def check_cluster_resources(
    num_workers: int, use_gpu: bool, cpus_per_worker: float, *, wait_for_nodes_s: float = 0.0
) -> None:
    """Fail, naming the setting, when the Ray cluster cannot host the workers: at once, or (wait_for_nodes_s
    > 0) after asking the autoscaler for the workers' resources and waiting that long for nodes to join.

    Called from the process that launches the job: when that is a Ray actor or task (the coordinator), its
    own reservation is subtracted (see `check_resources_fit`); a driver holds nothing.
    """
    import ray

    if not ray.is_initialized():
        raise RuntimeError("Ray is not initialised: call ray.init(...) (or run through the driver) first")
    context = ray.get_runtime_context()
    # get_assigned_resources() only works in a worker process (an actor or task), not in a driver.
    held = context.get_assigned_resources() if context.worker.mode == ray.WORKER_MODE else {}

    def check(total: dict[str, float]) -> None:
        check_resources_fit(num_workers, use_gpu, cpus_per_worker, total, held)

    try:
        check(ray.cluster_resources())
        return
    except ValueError:
        if wait_for_nodes_s <= 0:
            raise
    from ray.autoscaler.sdk import request_resources

    bundles = autoscaler_request(num_workers, use_gpu, cpus_per_worker, held)
    logger.info("asking the autoscaler for %s; waiting up to %gs", bundles, wait_for_nodes_s)
    request_resources(bundles=bundles)
    try:
        wait_for_resources(check, ray.cluster_resources, wait_for_nodes_s)
    finally:
        # The request is sticky; once the nodes are up, the job's own placement group keeps them in demand.
        request_resources(bundles=[])


def autoscaler_request(
    num_workers: int, use_gpu: bool, cpus_per_worker: float, held_by_caller: dict[str, float]
) -> list[dict[str, float]]:
    """The bundles to ask the autoscaler for: the workers', plus what the launching process holds.

    Why the latter: the autoscaler sizes the cluster for the request as a whole, ignoring what is in use, so
    without it a cluster of exactly the workers' size looks big enough although the coordinator's share of
    it is never free.
    """
    worker = {"CPU": cpus_per_worker, **({"GPU": 1.0} if use_gpu else {})}
    held = {key: value for key, value in held_by_caller.items() if key in ("CPU", "GPU") and value > 0}
    return ([held] if held else []) + [dict(worker) for _ in range(num_workers)]


def wait_for_resources(
    check: Callable[[dict[str, float]], None],
    cluster_resources: Callable[[], dict[str, float]],
    wait_s: float,
    *,
    poll_s: float = 5.0,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Poll `cluster_resources()` until `check` accepts it (returns) or `wait_s` passed (raises `check`'s
    last ValueError, saying how long it waited)."""
    deadline = clock() + wait_s
    while True:
        try:
            check(cluster_resources())
            return
        except ValueError as err:
            if clock() >= deadline:
                raise ValueError(
                    f"{err} (waited {wait_s:g}s for the autoscaler to add nodes: cloud.wait_for_nodes_s)"
                ) from err
        sleep(min(poll_s, max(0.0, deadline - clock())))


# Ray Train v2 retries a worker group that cannot be placed forever by default (controller_failure_limit=-1),
# each attempt waiting RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S (60 s by default). `check_cluster_resources`
# rules out clusters that can never host the job; this bound turns the rest (resources held elsewhere for
# much longer than expected, a node lost) into an error after about that many minutes instead of a hang.
WORKER_GROUP_START_RETRIES = 5


def failure_config(max_failures: int) -> Any:
    """Ray Train's FailureConfig: `max_failures` worker failures, a bounded number of worker group starts."""
    import ray.train

    # ray.train.FailureConfig is Train v2's (the default in Ray 2.60) at run time; mypy sees the v1 class,
    # which lacks controller_failure_limit.
    return ray.train.FailureConfig(  # type: ignore[call-arg]
        max_failures=max_failures, controller_failure_limit=WORKER_GROUP_START_RETRIES
    )


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
    if result.checkpoint is None:
        raise RuntimeError(f"training round {cfg.round_id} ({cfg.strategy}) finished without a checkpoint")
    with result.checkpoint.as_directory() as directory:
        progress = json.loads((Path(directory) / PROGRESS_FILE).read_text())
    history = [EpochMetrics.model_validate(entry) for entry in progress["history"]]
    final = history[-1]
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
    )


def _checkpoint_uri(checkpoint: Any) -> str:
    """A path (local storage) or scheme://path that `ray.train.Checkpoint(uri)` opens again."""
    import pyarrow.fs as pafs

    if checkpoint.filesystem is None or isinstance(checkpoint.filesystem, pafs.LocalFileSystem):
        return str(checkpoint.path)
    return f"{checkpoint.filesystem.type_name}://{checkpoint.path}"


def load_trained_baim(result: TrainRoundResult) -> BAIM:
    """The trained BAIM from a result's final checkpoint (safetensors + JSON spec only)."""
    import ray.train

    with ray.train.Checkpoint(result.checkpoint_uri).as_directory() as directory:
        spec = json.loads((Path(directory) / SPEC_FILE).read_text())
        weights = load_file(str(Path(directory) / WEIGHTS_FILE))
    baim = BAIM.from_spec(spec)
    baim.load_state_dict(weights, strict=True)
    for p in baim.parameters():
        p.requires_grad_(True)
    return baim.eval()


@torch.no_grad()
def decomposition_max_abs_diff(baim: BAIM, task: str, images: torch.Tensor, seed: int) -> tuple[Any, float]:
    """(task model, largest |BAIM - task model| on reconstructing `images` and on generation), same noise."""
    model = decompose(baim, task)
    task_id = baim.config.tasks.index(task)
    diff = 0.0
    if images.shape[0] > 0:
        full = baim(images, task_id, seed=seed).recon
        alone = model(images, seed=seed).recon
        diff = float((full - alone).abs().max())
    generated_full = baim.generate(task, DECOMPOSITION_CHECK_IMAGES, seed=seed)
    generated_alone = model.generate(DECOMPOSITION_CHECK_IMAGES, seed=seed)
    return model, max(diff, float((generated_full - generated_alone).abs().max()))


def publish_round(cfg: TrainRoundConfig, result: TrainRoundResult) -> TrainRoundResult:
    """Publish the trained BAIM as a new `baim` version, then one new `task/<name>` version per task.

    Each task model is checked against the BAIM on up to DECOMPOSITION_CHECK_IMAGES test images of its task
    (reconstruction) and as many generated images, with the same noise; the largest difference is recorded.
    """
    registry = Registry(cfg.registry_uri)
    baim = load_trained_baim(result)
    baim_ref = registry.put(BAIM_OWNER, registry.next_version(BAIM_OWNER), pack_module(baim, baim.spec()))
    source = resolve_source(cfg.data)
    published = []
    for task in baim.config.tasks:
        indices = cfg.test_indices.get(task, [])[:DECOMPOSITION_CHECK_IMAGES]
        faces = FaceDataset(source, indices, cfg.data.resolution)
        images = torch.stack([faces[i] for i in range(len(faces))]) if indices else torch.empty(0)  # type: ignore[misc]
        model, diff = decomposition_max_abs_diff(baim, task, images, cfg.seed)
        owner = f"task/{task}"
        ref = registry.put(owner, registry.next_version(owner), pack_module(model, model.spec()))
        published.append(
            PublishedTaskModel(
                task=task,
                artifact=f"{ref.owner}@{ref.version}",
                sha256=ref.sha256,
                params=count_params(model),
                decomposition_max_abs_diff=diff,
            )
        )
    logger.info("round %d %s published %s@%s and %d task models", cfg.round_id, cfg.strategy,
                baim_ref.owner, baim_ref.version, len(published))  # fmt: skip
    return result.model_copy(
        update={"baim_artifact": f"{baim_ref.owner}@{baim_ref.version}", "task_models": published}
    )


def record_costs(ledger: Ledger, result: TrainRoundResult) -> None:
    """Put a run's cloud FLOPs and seconds into the ledger (the one place costs are recorded)."""
    ledger.record_cloud_flops(result.strategy, result.cloud_flops)
    ledger.record_seconds(f"train/{result.strategy}", result.train_seconds)


def run_training_round(
    cfg: TrainRoundConfig,
    *,
    num_workers: int = 1,
    use_gpu: bool = False,
    cpus_per_worker: float = 1.0,
    storage_path: str | None = None,
    max_failures: int = 1,
    publish: bool = True,
    ledger: Ledger | None = None,
    wait_for_nodes_s: float = 0.0,
) -> TrainRoundResult:
    """Train one round with Ray Train, then (publish=True) publish the BAIM and its task models.

    Ray must be initialised. storage_path defaults to `<registry>/ray_train`. A failed run (more than
    max_failures worker failures) raises RuntimeError; nothing is published then.
    """
    result = _fit(
        cfg,
        num_workers=num_workers,
        use_gpu=use_gpu,
        cpus_per_worker=cpus_per_worker,
        storage_path=storage_path,
        max_failures=max_failures,
        wait_for_nodes_s=wait_for_nodes_s,
    )
    if publish:
        result = publish_round(cfg, result)
    if ledger is not None:
        record_costs(ledger, result)
    return result


def run_strategies(
    cfg: TrainRoundConfig,
    strategies: list[Strategy],
    *,
    num_workers: int = 1,
    use_gpu: bool = False,
    cpus_per_worker: float = 1.0,
    storage_path: str | None = None,
    max_failures: int = 1,
    publish: Strategy | Literal["best"] | None = None,
    ledger: Ledger | None = None,
    wait_for_nodes_s: float = 0.0,
) -> dict[str, TrainRoundResult]:
    """The paper's comparison: every strategy from the same fused BAIM, one curve each.

    The runs go one after another (each uses every worker); `cfg.strategy` is replaced per run. `publish`
    names the strategy whose BAIM and task models are published ("best": lowest final test loss), or None.
    """
    if not strategies or len(set(strategies)) != len(strategies):
        raise ValueError(f"strategies: expected a non-empty list without repeats, received {strategies}")
    results: dict[str, TrainRoundResult] = {}
    for strategy in strategies:
        run_cfg = cfg.model_copy(update={"strategy": strategy})
        results[strategy] = run_training_round(
            run_cfg,
            num_workers=num_workers,
            use_gpu=use_gpu,
            cpus_per_worker=cpus_per_worker,
            storage_path=storage_path,
            max_failures=max_failures,
            publish=False,
            ledger=ledger,
            wait_for_nodes_s=wait_for_nodes_s,
        )
    if publish is not None:
        chosen = min(results, key=lambda s: results[s].final_test_loss) if publish == "best" else publish
        if chosen not in results:
            raise ValueError(f"publish: expected one of {list(results)} or 'best', received {publish!r}")
        results[chosen] = publish_round(cfg.model_copy(update={"strategy": chosen}), results[chosen])
    return results


def put_fused_snapshot(registry: Registry, round_id: int, payload: ArtifactPayload) -> str:
    """Store an untrained fused BAIM for a round as `baim-fused@r<round>-<sha>`; returns the version.

    Idempotent: the same round and bytes give the same version (a restarted coordinator re-puts it).
    """
    version = f"r{round_id:06d}-{payload.sha256[:12]}"
    registry.put(FUSED_OWNER, version, payload)
    return version


def train_fused_baim(
    fused: ArtifactPayload,
    scenario: Scenario,
    cloud_indices: dict[str, list[int]],
    test_indices: dict[str, list[int]],
    *,
    round_id: int,
    registry_uri: str,
    strategies: list[Strategy],
    storage_path: str | None = None,
    max_failures: int = 1,
) -> tuple[ArtifactPayload, dict[str, TrainRoundResult]]:
    """For the coordinator: train a fused BAIM (as artifact bytes) with every strategy on Ray Train.

    Returns (the first strategy's trained BAIM as an artifact, results per strategy). Publishing is left to
    the caller. Scaling (num_workers, use_gpu, cpus_per_worker) comes from scenario.cloud.
    """
    registry = Registry(registry_uri)
    version = put_fused_snapshot(registry, round_id, fused)
    cfg = round_config_from_scenario(
        scenario,
        cloud_indices,
        test_indices,
        round_id=round_id,
        registry_uri=registry_uri,
        baim_owner=FUSED_OWNER,
        baim_version=version,
        strategy=strategies[0],
    )
    cloud = scenario.cloud
    results = run_strategies(
        cfg,
        strategies,
        num_workers=cloud.num_workers,
        use_gpu=cloud.use_gpu,
        cpus_per_worker=cloud.cpus_per_worker,
        storage_path=storage_path,
        max_failures=max_failures,
        wait_for_nodes_s=cloud.wait_for_nodes_s,
    )
    trained = load_trained_baim(results[strategies[0]])
    return pack_module(trained, trained.spec()), results
