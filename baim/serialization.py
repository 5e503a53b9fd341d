"""Build any model of this package from its JSON spec, and save / load it as safetensors + spec.

Spec kinds (a JSON object, always with "kind"):
- "learner" -> VAELearner: flat, {"kind": "learner", **LearnerSpec.to_dict()}, or as an edge uploads it,
  {"kind": "learner", "edge_id", "task", "learner": LearnerSpec.to_dict()}
- "baim": {"kind": "baim", **BAIMConfig.to_dict()} -> BAIM
- "task_model": {"kind": "task_model", **BAIMConfig.to_dict()} (one squad) -> TaskModel
- "generation_model": {"kind": "generation_model", **BAIMConfig.to_dict()} (one squad, generation_only)
  -> GenerationModel

Specs written before `mixture` existed load as mixture "blend" (`baim.model_config`): an old artifact keeps
computing what it computed.

Weights are safetensors and specs JSON: loading never unpickles. `to_bytes` / `from_bytes` round-trip
bit-identically (keys, shapes, dtypes, values, buffers).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn

from baim.config import LearnerSpec
from baim.decompose import GenerationModel, TaskModel
from baim.learners import VAELearner
from baim.model import BAIM

SPEC_KINDS: dict[str, type[nn.Module]] = {
    "learner": VAELearner,
    "baim": BAIM,
    "task_model": TaskModel,
    "generation_model": GenerationModel,
}
# A wrapped learner spec: the architecture under "learner" beside who made it: an edge upload (edge_id,
# task) or a FedAvg model (baseline, round; a client update adds its edge_id).
WRAPPED_LEARNER_KEYS = ("baseline", "edge_id", "kind", "learner", "round", "task")


def kinds_of(module_type: type[nn.Module]) -> tuple[str, ...]:
    """The spec kinds whose modules are instances of `module_type` (nn.Module: every kind)."""
    return tuple(kind for kind, cls in SPEC_KINDS.items() if issubclass(cls, module_type))


def learner_spec(spec: dict[str, Any]) -> LearnerSpec:
    """The LearnerSpec of a "learner" spec, flat or wrapped (ValueError naming what is wrong)."""
    if "learner" not in spec:
        return LearnerSpec.from_dict({k: v for k, v in spec.items() if k != "kind"})
    unknown = sorted(set(spec) - set(WRAPPED_LEARNER_KEYS))
    if unknown:
        raise ValueError(f"learner spec: unknown keys {unknown}; expected only {list(WRAPPED_LEARNER_KEYS)}")
    return LearnerSpec.from_dict(spec["learner"])


def build_from_spec(spec: dict[str, Any]) -> nn.Module:
    """A freshly initialised module of the spec's architecture (load its weights next)."""
    if not isinstance(spec, dict):
        raise ValueError(f"spec: expected a JSON object, received {type(spec).__name__}")
    kind = spec.get("kind")
    if kind == "learner":
        return VAELearner(learner_spec(spec))
    if kind == "baim":
        return BAIM.from_spec(spec)
    if kind == "task_model":
        return TaskModel.from_spec(spec)
    if kind == "generation_model":
        return GenerationModel.from_spec(spec)
    raise ValueError(f"spec kind: expected one of {list(SPEC_KINDS)}, received {kind!r}")


def module_spec(module: nn.Module) -> dict[str, Any]:
    """The JSON spec of a VAELearner, BAIM, TaskModel or GenerationModel."""
    if isinstance(module, VAELearner):
        return {"kind": "learner", **module.spec.to_dict()}
    if isinstance(module, (BAIM, TaskModel, GenerationModel)):
        return module.spec()
    raise ValueError(
        f"module: expected a VAELearner, BAIM, TaskModel or GenerationModel, received {type(module).__name__}"
    )


def state_and_spec(module: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(CPU, contiguous copies of the state_dict tensors, spec): what an artifact stores."""
    state = {key: value.detach().to("cpu").contiguous().clone() for key, value in module.state_dict().items()}
    return state, module_spec(module)


def canonical_json(obj: Any) -> str:
    """The one JSON encoding of a spec (sorted keys, no whitespace); artifact sha256s are computed over it."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def to_bytes(module: nn.Module) -> tuple[bytes, str]:
    """(safetensors bytes, canonical spec JSON)."""
    state, spec = state_and_spec(module)
    return safetensors.torch.save(state), canonical_json(spec)


def load_state(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load `state` into `module`, requiring exactly its keys, shapes and dtypes (ValueError naming them)."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"weights: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
    for key, tensor in state.items():
        want = expected[key]
        if tuple(tensor.shape) != tuple(want.shape) or tensor.dtype != want.dtype:
            raise ValueError(
                f"weights[{key!r}]: expected {want.dtype} of shape {tuple(want.shape)}, "
                f"received {tensor.dtype} of shape {tuple(tensor.shape)}"
            )
    module.load_state_dict(state, strict=True)


def from_bytes(weights: bytes, spec_json: str) -> nn.Module:
    """Rebuild a module from `to_bytes` output (safetensors + JSON only: nothing is unpickled)."""
    try:
        spec = json.loads(spec_json)
    except (TypeError, json.JSONDecodeError) as error:
        raise ValueError(f"spec_json: expected a JSON object, could not parse it: {error}") from error
    module = build_from_spec(spec)
    load_state(module, parse_safetensors(weights, "weights"))
    return module


def from_files(weights_path: str | Path, spec_path: str | Path) -> nn.Module:
    """Rebuild a module from a safetensors file and a JSON spec file (e.g. a training checkpoint)."""
    return from_bytes(Path(weights_path).read_bytes(), Path(spec_path).read_text())


def parse_safetensors(data: bytes, what: str) -> dict[str, torch.Tensor]:
    """The tensors in safetensors bytes (nothing is unpickled); ValueError naming `what` when malformed."""
    if not isinstance(data, (bytes, bytearray)):
        raise ValueError(f"{what}: expected safetensors bytes, received {type(data).__name__}")
    try:
        return safetensors.torch.load(bytes(data))
    except Exception as error:  # safetensors raises its own error types for malformed bytes
        raise ValueError(f"{what}: expected safetensors bytes, could not parse them: {error}") from error
