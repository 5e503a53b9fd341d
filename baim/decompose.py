"""Task-oriented decomposition: the BAIM's exact, compact model for one task.

`decompose(baim, task)` keeps:
- the task's squad members (whole learners) and its LSGate (with every member's row and admission offset);
- the gate encoder (reconstruction reads the gate code from the image; generation draws it from the prior);
- every surviving connection into a stage the task can run, and, transitively, every feeding learner of any
  squad, cut after the deepest stage it feeds (`baim.model.compact_config`);
and drops everything else (other squads' LSGates, learners and stages no route of this task reaches,
connections into them).

A TaskModel is a BAIM with a single squad, wrapped so that its API is per task. It runs the same code on the
same weights, so for the same input and the same noise (noise is keyed by learner name: pass the same `seed`
or `eps`) it computes what the BAIM computes for that task: same selection, same stages, same sums in the same
order. Values agree to float tolerance (a stage may run on a different number of rows in the two models,
which can change the last bits of a convolution), and bit-identically when the rows are the same.
The parameter count is at most the BAIM's, and strictly smaller whenever the BAIM has another squad (its
LSGate is dropped).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from baim.model import BAIM, BAIMOutput, Noise, compact_config
from baim.model_config import BAIMConfig

logger = logging.getLogger(__name__)


class TaskModel(nn.Module):
    """One task's standalone model: forward (reconstruct), generate, spec; saved as a normal artifact."""

    def __init__(self, config: BAIMConfig) -> None:
        super().__init__()
        if len(config.squads) != 1:
            raise ValueError(
                f"config: a task model has exactly one squad, received {len(config.squads)} "
                f"({list(config.tasks)})"
            )
        self.baim = BAIM(config)

    @property
    def task(self) -> str:
        return self.baim.config.tasks[0]

    @property
    def config(self) -> BAIMConfig:
        return self.baim.config

    def forward(self, x: torch.Tensor, eps: Noise | None = None, seed: int | None = None) -> BAIMOutput:
        """Reconstruct x (B, C, R, R); gate_weights are (B, learners of this model) in its arrival order."""
        return self.baim(x, 0, eps=eps, seed=seed)

    @torch.no_grad()
    def generate(self, n: int, seed: int | None = None, eps: Noise | None = None) -> torch.Tensor:
        """n images (n, C, R, R) in [0, 1]; the same seed gives the same images."""
        return self.baim.generate(0, n, seed=seed, eps=eps)

    def spec(self) -> dict[str, Any]:
        return {"kind": "task_model", **self.baim.config.to_dict()}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> TaskModel:
        if not isinstance(spec, dict) or spec.get("kind") != "task_model":
            kind = spec.get("kind") if isinstance(spec, dict) else type(spec).__name__
            raise ValueError(f"spec: expected a dict with kind 'task_model', received kind {kind!r}")
        return cls(BAIMConfig.from_dict({k: v for k, v in spec.items() if k != "kind"}))


@torch.no_grad()
def decompose(baim: BAIM, task: str) -> TaskModel:
    """The compact, exact model of `task` (see module docstring); weights are copies, not shared."""
    if task not in baim.config.tasks:
        raise ValueError(f"task: expected one of {list(baim.config.tasks)}, received {task!r}")
    config = compact_config(baim.config, [baim.config.squad(task)])
    model = TaskModel(config)
    source = baim.state_dict()
    prefix = "baim."
    state = {key: source[key[len(prefix) :]].clone() for key in model.state_dict()}
    model.load_state_dict(state, strict=True)
    model.to(next(baim.parameters()).device)
    logger.info(
        "decomposed task %s: %d learners (%d truncated feeders), %d connections, %d of %d parameters",
        task,
        len(config.learners),
        sum(entry.depth is not None for entry in config.learners),
        len(config.connections or ()),
        sum(p.numel() for p in model.parameters()),
        sum(p.numel() for p in baim.parameters()),
    )
    return model
