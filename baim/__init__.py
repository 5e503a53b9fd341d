"""BAIM: a bottom-up Big AI Model fused from heterogeneous edge VAEs. Pure PyTorch, no Ray."""

from baim.compaction import (
    PruningSchedule,
    budget_limits,
    config_params,
    connection_contributions,
    prune_on_schedule,
    prune_to_targets,
    squad_params,
    task_model_params,
)
from baim.config import LearnerSpec
from baim.continual import add_task, admit, few_shot_adapt
from baim.costs import FlopCounts, count_flops, count_params, forward_backward_flops, serialized_bytes
from baim.decompose import GenerationModel, TaskModel, decompose, generation_model
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
    "GenerationModel",
    "LearnerEntry",
    "LearnerSpec",
    "LossOutput",
    "PruningSchedule",
    "SquadSpec",
    "Strategy",
    "TaskModel",
    "VAELearner",
    "VAEOutput",
    "add_task",
    "admit",
    "apply_strategy",
    "budget_limits",
    "build_from_spec",
    "config_params",
    "connection_contributions",
    "count_flops",
    "count_params",
    "decompose",
    "evaluate",
    "few_shot_adapt",
    "forward_backward_flops",
    "from_bytes",
    "generation_model",
    "make_optimizer",
    "noise_for",
    "prune_connections",
    "prune_learners",
    "prune_on_schedule",
    "prune_to_targets",
    "selection_frequency",
    "serialized_bytes",
    "squad_params",
    "state_and_spec",
    "task_model_params",
    "to_bytes",
    "train_epoch",
    "vae_batch_loss",
    "vae_loss",
    "vae_loss_per_sample",
]
