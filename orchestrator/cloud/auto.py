"""`cloud.trainer: auto`: run a round in the coordinator when it is small, else as Ray Train jobs.

A Ray Train job pays a fixed start-up (workers, imports, data; `FixedCosts`) before its first step; the
in-process runner pays none. When a strategy's training is smaller than what one core computes in that
time, the in-process runner finishes first (docs/design/training.md, "Choosing the runner").
"""

from __future__ import annotations

from typing import Literal

import torch

from actors.rounds import RoundRequest, RoundResult
from baim.costs import forward_backward_flops
from baim.model import BAIM
from orchestrator.cloud.local import local_training_round
from orchestrator.cloud.ray_train import ray_train_round
from orchestrator.core.artifacts import load_module

ESTIMATE_SEED = 0  # the random images and noise of the measured step


def estimated_strategy_flops(request: RoundRequest) -> int:
    """One strategy's training FLOPs: one step measured by FlopCounterMode on `cloud.batch_size` random
    images with task ids drawn from the cloud shard, per sample, times the shard's samples and the epochs.
    Every parameter counts as trained (finetune; `freeze` trains fewer, so this bounds it)."""
    cloud = request.scenario.cloud
    baim = load_module(request.baim, BAIM, artifact_id=f"baim round {request.round_index}")
    counts = [len(request.partitions.cloud.get(task, [])) for task in baim.config.tasks]
    samples = sum(counts)
    if samples == 0:
        return 0
    batch = min(cloud.batch_size, samples)
    generator = torch.Generator().manual_seed(ESTIMATE_SEED)
    # A batch drawn from the shard as training draws one, so routing splits it the way training does.
    shard = torch.tensor([t for t, count in enumerate(counts) for _ in range(count)])
    task_ids = shard[torch.randperm(samples, generator=generator)[:batch]]
    resolution = request.scenario.data.resolution
    images = torch.rand(batch, 3, resolution, resolution, generator=generator)
    baim.train()
    step = forward_backward_flops(
        baim, (images, task_ids), lambda model, b: model(b[0], b[1], seed=ESTIMATE_SEED).loss
    )
    return step.total * samples * cloud.epochs // batch


def choose_trainer(request: RoundRequest) -> tuple[Literal["local", "ray_train"], str]:
    """(runner, why) under `cloud.trainer: auto`: Ray Train when the workers use GPUs or a strategy's
    estimated FLOPs exceed `cloud.auto_local_max_flops`, else the in-process runner."""
    cloud = request.scenario.cloud
    if cloud.use_gpu:
        return "ray_train", "cloud.trainer: auto (use_gpu: true)"
    flops = estimated_strategy_flops(request)
    threshold = cloud.auto_local_max_flops
    if flops <= threshold:
        return "local", f"cloud.trainer: auto ({flops:.3g} estimated FLOPs per strategy <= {threshold:.3g})"
    return "ray_train", f"cloud.trainer: auto ({flops:.3g} estimated FLOPs per strategy > {threshold:.3g})"


def auto_training_round(request: RoundRequest) -> RoundResult:
    """The round runner of `cloud.trainer: auto`: the runner `choose_trainer` picks, which each strategy's
    record names (`runner`, `chosen_by`)."""
    runner, why = choose_trainer(request)
    if runner == "local":
        return local_training_round(request, chosen_by=why)
    return ray_train_round(request, chosen_by=why)
