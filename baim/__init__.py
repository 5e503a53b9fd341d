"""BAIM: a bottom-up Big AI Model fused from heterogeneous edge VAEs. Pure PyTorch, no Ray."""

from baim.config import LearnerSpec
from baim.continual import add_task, admit, few_shot_adapt
from baim.costs import FlopCounts, count_flops, count_params, forward_backward_flops, serialized_bytes
from baim.decompose import TaskModel, decompose
from baim.learners import LossOutput, VAELearner, VAEOutput, noise_for, vae_loss, vae_loss_per_sample
from baim.model import BAIM, BAIMOutput
from baim.model_config import BAIMConfig, ConnectionSpec, LearnerEntry, SquadSpec
from baim.pruning import prune_connections, prune_learners, selection_frequency
from baim.serialization import build_from_spec, from_bytes, state_and_spec, to_bytes
from baim.training import (
    STRATEGIES,
    Strategy,
    apply_strategy,
    evaluate,
    make_optimizer,
    train_epoch,
    vae_batch_loss,
)

__all__ = [
    "BAIM",
    "STRATEGIES",
    "BAIMConfig",
    "BAIMOutput",
    "ConnectionSpec",
    "FlopCounts",
    "LearnerEntry",
    "LearnerSpec",
    "LossOutput",
    "SquadSpec",
    "Strategy",
    "TaskModel",
    "VAELearner",
    "VAEOutput",
    "add_task",
    "admit",
    "apply_strategy",
    "build_from_spec",
    "count_flops",
    "count_params",
    "decompose",
    "evaluate",
    "few_shot_adapt",
    "forward_backward_flops",
    "from_bytes",
    "make_optimizer",
    "noise_for",
    "prune_connections",
    "prune_learners",
    "selection_frequency",
    "serialized_bytes",
    "state_and_spec",
    "to_bytes",
    "train_epoch",
    "vae_batch_loss",
    "vae_loss",
    "vae_loss_per_sample",
]
