"""BAIM: a bottom-up Big AI Model fused from heterogeneous edge VAEs. Pure PyTorch, no Ray."""

from baim.config import LearnerSpec
from baim.costs import FlopCounts, count_flops, count_params, forward_backward_flops, serialized_bytes
from baim.learners import LossOutput, VAELearner, VAEOutput, noise_for, vae_loss, vae_loss_per_sample
from baim.training import STRATEGIES, Strategy, apply_strategy, evaluate, train_epoch, vae_batch_loss

__all__ = [
    "STRATEGIES",
    "FlopCounts",
    "LearnerSpec",
    "LossOutput",
    "Strategy",
    "VAELearner",
    "VAEOutput",
    "apply_strategy",
    "count_flops",
    "count_params",
    "evaluate",
    "forward_backward_flops",
    "noise_for",
    "serialized_bytes",
    "train_epoch",
    "vae_batch_loss",
    "vae_loss",
    "vae_loss_per_sample",
]
