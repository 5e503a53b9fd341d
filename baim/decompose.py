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
LSGate is dropped). How small it gets is up to connection pruning (`baim.compaction`).

The generation-only model (`generation_model(task_model)`, or `decompose(baim, task, kind="generation")`) is
what generation needs and nothing more: the LSGate (routing reads a gate code drawn from the prior), the
members' decoders (decoder_input and decoder stages), the decoder-phase connections into them and the
decoder stages of their feeders, transitively (`compact_config(..., generation=True)`). Gone: the encoder
stages, fc_mu and fc_logvar of every learner, the gate encoder, encoder-phase connections and feeders that
only feed encoder stages. It runs the task model's generation code on the same weights, in the same order,
so `generate(n, seed)` is bit-identical to the task model's (and to the BAIM's for that task, up to the row
counts of the BAIM's batch, which are the same for a one-task generation batch).
"""

from __future__ import annotations

import logging
from typing import Any, Literal, overload

import torch
from torch import nn

from baim.model import BAIM, BAIMOutput, Noise, compact_config
from baim.model_config import BAIMConfig

TASK_MODEL_KIND = "task_model"
GENERATION_MODEL_KIND = "generation_model"

logger = logging.getLogger(__name__)


class OneTaskModel(nn.Module):
    """A BAIM with a single squad, with a per-task API: what TaskModel and GenerationModel share."""

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

    @torch.no_grad()
    def generate(self, n: int, seed: int | None = None, eps: Noise | None = None) -> torch.Tensor:
        """n images (n, C, R, R) in [0, 1]; the same seed gives the same images."""
        return self.baim.generate(0, n, seed=seed, eps=eps)


class TaskModel(OneTaskModel):
    """One task's standalone model: forward (reconstruct), generate, spec; saved as a normal artifact."""

    def forward(self, x: torch.Tensor, eps: Noise | None = None, seed: int | None = None) -> BAIMOutput:
        """Reconstruct x (B, C, R, R); gate_weights are (B, learners of this model) in its arrival order."""
        return self.baim(x, 0, eps=eps, seed=seed)

    def spec(self) -> dict[str, Any]:
        return {"kind": TASK_MODEL_KIND, **self.baim.config.to_dict()}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> TaskModel:
        config = _config_of(spec, TASK_MODEL_KIND)
        if config.generation_only:
            raise ValueError("spec: a task_model spec cannot be generation_only (that is a generation_model)")
        return cls(config)


class GenerationModel(OneTaskModel):
    """One task's generation-only model (module docstring): `generate` only, no encoders; its images are
    bit-identical to the full task model's `generate(n, seed)`."""

    def __init__(self, config: BAIMConfig) -> None:
        if not config.generation_only:
            raise ValueError("config: a generation model needs generation_only=True, received False")
        super().__init__(config)

    def spec(self) -> dict[str, Any]:
        return {"kind": GENERATION_MODEL_KIND, **self.baim.config.to_dict()}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> GenerationModel:
        return cls(_config_of(spec, GENERATION_MODEL_KIND))


def _config_of(spec: dict[str, Any], kind: str) -> BAIMConfig:
    if not isinstance(spec, dict) or spec.get("kind") != kind:
        received = spec.get("kind") if isinstance(spec, dict) else type(spec).__name__
        raise ValueError(f"spec: expected a dict with kind {kind!r}, received kind {received!r}")
    return BAIMConfig.from_dict({k: v for k, v in spec.items() if k != "kind"})


@overload
def decompose(baim: BAIM, task: str, kind: Literal["task_model"] = ...) -> TaskModel: ...
@overload
def decompose(baim: BAIM, task: str, kind: Literal["generation"]) -> GenerationModel: ...


@torch.no_grad()
def decompose(
    baim: BAIM, task: str, kind: Literal["task_model", "generation"] = "task_model"
) -> TaskModel | GenerationModel:
    """The compact, exact model of `task` (see module docstring); weights are copies, not shared.

    kind "task_model": reconstruction and generation; "generation": the generation-only model.
    """
    if task not in baim.config.tasks:
        raise ValueError(f"task: expected one of {list(baim.config.tasks)}, received {task!r}")
    if kind not in ("task_model", "generation"):
        raise ValueError(f"kind: expected 'task_model' or 'generation', received {kind!r}")
    generation = kind == "generation"
    config = compact_config(baim.config, [baim.config.squad(task)], generation=generation)
    model: TaskModel | GenerationModel = GenerationModel(config) if generation else TaskModel(config)
    _copy_weights(baim, model)
    logger.info(
        "decomposed task %s (%s): %d learners (%d truncated feeders), %d connections, %d of %d parameters",
        task,
        kind,
        len(config.learners),
        sum(entry.depth is not None for entry in config.learners),
        len(config.connections or ()),
        sum(p.numel() for p in model.parameters()),
        sum(p.numel() for p in baim.parameters()),
    )
    return model


@torch.no_grad()
def generation_model(task_model: TaskModel) -> GenerationModel:
    """The generation-only model of a task model (module docstring); weights are copies, not shared."""
    if not isinstance(task_model, TaskModel):
        raise TypeError(f"task_model: expected a TaskModel, received {type(task_model).__name__}")
    config = compact_config(task_model.config, task_model.config.squads, generation=True)
    model = GenerationModel(config)
    _copy_weights(task_model.baim, model)
    return model


def _copy_weights(source: BAIM, model: TaskModel | GenerationModel) -> None:
    """Load copies of `source`'s tensors into `model` (its keys are a subset, under the prefix "baim.")."""
    state = source.state_dict()
    prefix = "baim."
    model.load_state_dict({key: state[key[len(prefix) :]].clone() for key in model.state_dict()}, strict=True)
    model.to(next(source.parameters()).device)
