"""Knowledge distillation from the BAIM as it was before budgeted pruning, during the epochs that follow.

Pruning to a task-model budget removes cross-task connections whose features the task models used. The cloud
still has the BAIM from just before the first budgeted pruning (every connection the paper's schedule left),
so the epochs after it can learn from it as a teacher (Hinton et al. 2015). A VAE has no soft labels; the
teacher's signal is its reconstruction, and the student's reconstruction loss compares with a mix of the
image and the teacher's reconstruction of it:

    target = (1 - weight) * x + weight * teacher(x).recon

For the MSE this is, up to a constant, (1 - weight) * mse(y, x) + weight * mse(y, teacher), the usual
weighted distillation loss; it applies unchanged to both mixtures (`BAIM.forward(..., target=...)`). The
teacher runs in eval mode (inference routing, top K), without gradients, on its own noise.
"""

from __future__ import annotations

import copy

import torch

from baim.model import BAIM


class Distillation:
    """A frozen copy of a BAIM and the weight of its reconstructions in the training target."""

    def __init__(self, teacher: BAIM, weight: float) -> None:
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0.0 < weight < 1.0:
            raise ValueError(f"weight: expected a float in (0, 1), received {weight!r}")
        self.teacher = teacher
        self.weight = float(weight)

    @classmethod
    def snapshot(cls, baim: BAIM, weight: float) -> Distillation:
        """A teacher copied from `baim` now (its later changes do not reach the copy)."""
        teacher = copy.deepcopy(baim).eval()
        teacher.requires_grad_(False)
        return cls(teacher, weight)

    @torch.no_grad()
    def target(self, x: torch.Tensor, task_ids: torch.Tensor | int | str) -> torch.Tensor:
        """(1 - weight) * x + weight * the teacher's reconstruction of x, x's shape."""
        recon = self.teacher(x, task_ids).recon
        return torch.lerp(x, recon, self.weight)
