"""Low-rank adapters (LoRA) on nn.Linear, nn.Conv2d and nn.ConvTranspose2d (parameter-efficient tuning).

An edge personalises a downloaded task model by training small adapters beside frozen base weights, and can
send back only the adapters (GaisNet's parameter-efficient fine-tuning and knowledge relay).

Our own module, not Hugging Face peft: `baim/` stays pure PyTorch; peft pulls transformers, accelerate and
huggingface_hub and takes about 3.7 s to import (it imports transformers); and it rejects nn.ConvTranspose2d,
which every decoder stage of our VAEs uses, unless one registers a custom module. The math below is a few
lines per layer type.

Math. An adapted layer with base weight W computes base(x) + s * B(A(x)), with s = alpha / rank:
- Linear, W (out, in): A (rank, in), B (out, rank); the merged delta is s * B @ A.
- Conv2d, W (out, in, kh, kw): A is a convolution in -> rank with the layer's kernel size, stride, padding and
  dilation, weight (rank, in, kh, kw); B is a 1x1 convolution rank -> out, weight (out, rank).
  Delta[o, i] = s * sum_r B[o, r] A[r, i].
- ConvTranspose2d, W (in, out, kh, kw): A is a transposed convolution in -> rank with the layer's geometry
  (output_padding included), weight (in, rank, kh, kw); B as for Conv2d.
  Delta[i, o] = s * sum_r A[i, r] B[o, r].
B acts per pixel, so it commutes with the spatial operator: merging W + delta computes the same function, up
to float rounding. Only groups=1 and zero padding are supported (all our layers); others are rejected.

Initialisation (LoRA's): B = 0, so a fresh adapter changes no output (bit-identical); A ~ U(-1/sqrt(fan_in),
1/sqrt(fan_in)) with fan_in = in_channels * kh * kw (nn.Linear's default), from a CPU generator keyed by
(seed, layer name), so the same config gives the same adapters on every run and device. No dropout.

How it attaches. The adapter is a child module named "lora" of the layer it adapts, and a forward hook adds
its output to the layer's. The model's classes and module tree stay as they are (a task model is still a
TaskModel) and the base state_dict keys are unchanged; the adapter's keys are "<layer>.lora.A" and
"<layer>.lora.B". `merge_lora` folds adapters into the base weights (the hook then adds nothing),
`unmerge_lora` takes them out again, `strip_lora` removes adapters and hooks, leaving the weights as they are.

What travels (the relay): `adapter_to_bytes` gives safetensors bytes of the adapter tensors and a JSON spec
(rank, alpha, the exact adapted layer names). The receiver applies that spec to its own copy of the base
model and loads the tensors with `load_adapter_state`, which rejects unknown or missing names, wrong shapes or
dtypes, non-finite values and, optionally, adapters whose merged change is implausibly large.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any, cast

import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from baim.costs import tensors_bytes
from baim.gates import seeded_generator
from baim.model_config import _check_keys, _is_int
from baim.serialization import canonical_json, parse_safetensors

logger = logging.getLogger(__name__)

ADAPTER_ATTRIBUTE = "lora"  # the adapter's child-module name inside the layer it adapts
ADAPTER_SPEC_KIND = "lora_adapter"
MAX_RANK = 1024  # far above any useful rank for our layers; bounds what an uploaded spec can make us allocate
SUPPORTED_LAYERS: dict[str, type[nn.Module]] = {
    "Linear": nn.Linear,
    "Conv2d": nn.Conv2d,
    "ConvTranspose2d": nn.ConvTranspose2d,
}
MAX_PROBLEMS_SHOWN = 10


@dataclass(frozen=True)
class LoRAConfig:
    """Which layers get adapters, and their size."""

    rank: int = 4  # r: inner dimension of each adapter
    alpha: float = 8.0  # the adapter's output is scaled by alpha / rank
    # Each entry is a supported layer type name ("Linear", "Conv2d", "ConvTranspose2d") or an fnmatch pattern
    # over qualified module names ("baim.learners.*.decoder_stages.*"); a layer is adapted if it matches any.
    target_modules: tuple[str, ...] = tuple(SUPPORTED_LAYERS)
    seed: int = 0  # keys the adapters' initialisation

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, list):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if not _is_int(self.rank) or not 1 <= self.rank <= MAX_RANK:
            raise ValueError(f"rank: expected an int in [1, {MAX_RANK}], received {self.rank!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)):
            raise ValueError(f"alpha: expected a number > 0, received {self.alpha!r}")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"alpha: expected a finite number > 0, received {self.alpha!r}")
        if not isinstance(self.target_modules, tuple) or not self.target_modules:
            raise ValueError(
                f"target_modules: expected a non-empty list of names, received {self.target_modules!r}"
            )
        for index, entry in enumerate(self.target_modules):
            if not isinstance(entry, str) or not entry:
                raise ValueError(f"target_modules[{index}]: expected a non-empty string, received {entry!r}")
        if not _is_int(self.seed):
            raise ValueError(f"seed: expected an int, received {self.seed!r}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


class LoRAAdapter(nn.Module):
    """The low-rank path of one layer, s * B(A(x)); subclasses give A's operator and the merged delta."""

    merged: bool  # True while the delta is folded into the base weight (the path then adds nothing)

    def __init__(self, a_shape: tuple[int, ...], out_features: int, fan_in: int, config: LoRAConfig) -> None:
        super().__init__()
        self.rank = config.rank
        self.alpha = float(config.alpha)
        self.scaling = config.scaling
        self.fan_in = fan_in
        self.merged = False
        self.handle: RemovableHandle | None = None  # the forward hook that adds this path
        self.A = nn.Parameter(torch.empty(a_shape))
        self.B = nn.Parameter(torch.zeros(out_features, config.rank))

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """A ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)), B = 0 (so the adapter starts as a no-op)."""
        bound = 1.0 / math.sqrt(self.fan_in)
        with torch.no_grad():
            values = torch.rand(self.A.shape, generator=generator, dtype=torch.float64) * 2.0 - 1.0
            self.A.copy_(values * bound)
            self.B.zero_()

    def delta_weight(self) -> torch.Tensor:
        """What merging adds to the base weight, in its layout."""
        return self.delta_from(self.A, self.B)

    def delta_from(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """s * (the product of b and a) in the base weight's layout, for any A, B of this adapter's shapes."""
        raise NotImplementedError


class LinearLoRA(LoRAAdapter):
    def __init__(self, layer: nn.Linear, config: LoRAConfig) -> None:
        super().__init__((config.rank, layer.in_features), layer.out_features, layer.in_features, config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scaling * F.linear(F.linear(x, self.A), self.B)

    def delta_from(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.scaling * (b @ a)


class Conv2dLoRA(LoRAAdapter):
    def __init__(self, layer: nn.Conv2d, config: LoRAConfig) -> None:
        kh, kw = layer.kernel_size
        a_shape = (config.rank, layer.in_channels, kh, kw)
        super().__init__(a_shape, layer.out_channels, layer.in_channels * kh * kw, config)
        self.stride, self.padding, self.dilation = layer.stride, layer.padding, layer.dilation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.conv2d(x, self.A, None, self.stride, self.padding, self.dilation)
        return self.scaling * F.conv2d(h, self.B[:, :, None, None])

    def delta_from(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.scaling * torch.einsum("or,rihw->oihw", b, a)


class ConvTranspose2dLoRA(LoRAAdapter):
    def __init__(self, layer: nn.ConvTranspose2d, config: LoRAConfig) -> None:
        kh, kw = layer.kernel_size
        a_shape = (layer.in_channels, config.rank, kh, kw)
        super().__init__(a_shape, layer.out_channels, layer.in_channels * kh * kw, config)
        # numeric padding: _make_adapter rejects string padding
        self.stride, self.padding = layer.stride, cast(tuple[int, int], layer.padding)
        self.output_padding, self.dilation = layer.output_padding, layer.dilation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.conv_transpose2d(
            x, self.A, None, self.stride, self.padding, self.output_padding, 1, self.dilation
        )
        return self.scaling * F.conv2d(h, self.B[:, :, None, None])

    def delta_from(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.scaling * torch.einsum("irhw,or->iohw", a, b)


def _make_adapter(name: str, layer: nn.Module, config: LoRAConfig) -> LoRAAdapter:
    is_conv = isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d))
    if is_conv and (layer.groups != 1 or layer.padding_mode != "zeros" or isinstance(layer.padding, str)):
        raise ValueError(
            f"target {name!r}: LoRA supports convolutions with groups=1, zero padding and numeric "
            f"padding, received groups={layer.groups}, padding_mode={layer.padding_mode!r}, "
            f"padding={layer.padding!r}"
        )
    adapter: LoRAAdapter
    if isinstance(layer, nn.Linear):
        adapter = LinearLoRA(layer, config)
    elif isinstance(layer, nn.ConvTranspose2d):
        adapter = ConvTranspose2dLoRA(layer, config)
    elif isinstance(layer, nn.Conv2d):
        adapter = Conv2dLoRA(layer, config)
    else:
        raise ValueError(
            f"target {name!r}: expected one of {list(SUPPORTED_LAYERS)}, received {type(layer).__name__}"
        )
    adapter.reset_parameters(seeded_generator(config.seed, name))
    weight = cast(torch.Tensor, layer.weight)
    return adapter.to(device=weight.device, dtype=weight.dtype)


def _add_adapter_output(
    layer: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: torch.Tensor
) -> torch.Tensor:
    """Forward hook of an adapted layer: output + s * B(A(input))."""
    adapter = cast(LoRAAdapter, getattr(layer, ADAPTER_ATTRIBUTE))
    if adapter.merged:
        return output
    if len(args) != 1 or kwargs:
        raise ValueError(
            f"LoRA on {type(layer).__name__}: expected the layer to be called with its input only, received "
            f"{len(args)} positional and {sorted(kwargs)} keyword arguments (output_size is not supported)"
        )
    return output + adapter(args[0])


# ---- wrapping -------------------------------------------------------------------------------------------


def target_layers(model: nn.Module, target_modules: tuple[str, ...] | list[str]) -> list[str]:
    """Qualified names of the supported layers that `target_modules` selects, in module order.

    Raises ValueError naming every name pattern that selects no supported layer (a typo must not silently
    adapt nothing), or when nothing at all is selected. A layer type the model lacks is not an error.
    """
    supported = [
        (name, layer)
        for name, layer in model.named_modules()
        if type(layer) in SUPPORTED_LAYERS.values()  # exact types: subclasses may compute something else
    ]
    chosen: set[str] = set()
    unmatched = []
    for entry in target_modules:
        if entry in SUPPORTED_LAYERS:
            chosen.update(name for name, layer in supported if type(layer).__name__ == entry)
            continue
        hits = {name for name, _ in supported if fnmatchcase(name, entry)}
        if not hits:
            unmatched.append(entry)
        chosen |= hits
    if unmatched or not chosen:
        examples = [name for name, _ in supported[:4]]
        raise ValueError(
            f"target_modules: {list(unmatched or target_modules)} select no layer; expected layer types "
            f"{list(SUPPORTED_LAYERS)} or patterns over names of supported layers, such as {examples}"
        )
    return [name for name, _ in supported if name in chosen]


def apply_lora(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Attach an adapter to every target layer and freeze everything else; returns the adapted layer names.

    Afterwards only adapter parameters require grad. Outputs are unchanged until the adapters train (B = 0).
    """
    if not isinstance(config, LoRAConfig):
        raise TypeError(f"config: expected a LoRAConfig, received {type(config).__name__}")
    if adapted_layers(model):
        raise ValueError(f"model: already has adapters on {adapted_layers(model)[:5]}; strip_lora first")
    names = target_layers(model, config.target_modules)
    for p in model.parameters():
        p.requires_grad_(False)
        p.grad = None
    for name in names:
        layer = model.get_submodule(name)
        if hasattr(layer, ADAPTER_ATTRIBUTE):
            raise ValueError(f"target {name!r}: the layer already has an attribute {ADAPTER_ATTRIBUTE!r}")
        adapter = _make_adapter(name, layer, config)
        layer.add_module(ADAPTER_ATTRIBUTE, adapter)
        adapter.handle = layer.register_forward_hook(_add_adapter_output, with_kwargs=True)
    logger.info(
        "LoRA rank %d alpha %g on %d layers: %d trainable of %d parameters",
        config.rank,
        config.alpha,
        len(names),
        sum(p.numel() for p in lora_parameters(model)),
        sum(p.numel() for p in model.parameters()),
    )
    return names


def _adapters(model: nn.Module) -> dict[str, tuple[nn.Module, LoRAAdapter]]:
    """{layer name: (layer, its adapter)} for every adapted layer, in module order."""
    found = {}
    for name, layer in model.named_modules():
        adapter = getattr(layer, ADAPTER_ATTRIBUTE, None)
        if isinstance(adapter, LoRAAdapter):
            found[name] = (layer, adapter)
    return found


def adapted_layers(model: nn.Module) -> list[str]:
    """Names of the layers that carry an adapter."""
    return list(_adapters(model))


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapters' parameters (A and B of every adapted layer)."""
    return [p for _, adapter in _adapters(model).values() for p in adapter.parameters()]


def _adapter_key(layer_name: str, tensor: str) -> str:
    return f"{layer_name}.{ADAPTER_ATTRIBUTE}.{tensor}" if layer_name else f"{ADAPTER_ATTRIBUTE}.{tensor}"


# ---- merge, unmerge, strip ------------------------------------------------------------------------------


@torch.no_grad()
def merge_lora(model: nn.Module) -> None:
    """Fold every (unmerged) adapter into its layer's weight: W += delta. Outputs stay the same."""
    for layer, adapter in _adapters(model).values():
        if not adapter.merged:
            weight = cast(torch.Tensor, layer.weight)
            weight.add_(adapter.delta_weight().to(weight.dtype))
            adapter.merged = True


@torch.no_grad()
def unmerge_lora(model: nn.Module) -> None:
    """Take every merged adapter out of its layer's weight again: W -= delta (exact up to float rounding)."""
    for layer, adapter in _adapters(model).values():
        if adapter.merged:
            weight = cast(torch.Tensor, layer.weight)
            weight.sub_(adapter.delta_weight().to(weight.dtype))
            adapter.merged = False


def strip_lora(model: nn.Module) -> None:
    """Remove every adapter and its hook; the weights stay as they are (merged adapters stay folded in).

    `merge_lora` then `strip_lora` gives a plain model with the base state_dict keys; `strip_lora` alone
    gives back the base model exactly. Parameters stay frozen: call requires_grad_(True) to train them again.
    """
    for layer, adapter in _adapters(model).values():
        if adapter.handle is not None:
            adapter.handle.remove()
        delattr(layer, ADAPTER_ATTRIBUTE)


@torch.no_grad()
def lora_weight_deltas(model: nn.Module) -> dict[str, torch.Tensor]:
    """{state_dict key of an adapted layer's weight: its merged delta}: what merging adds, for folding the
    adapters into another copy of the base model (`add_weight_deltas`)."""
    return {
        (f"{name}.weight" if name else "weight"): adapter.delta_weight().detach().clone()
        for name, (_, adapter) in _adapters(model).items()
    }


@torch.no_grad()
def add_weight_deltas(module: nn.Module, deltas: dict[str, torch.Tensor]) -> None:
    """Add each delta to the parameter of that name (every name and shape checked before anything changes)."""
    params = dict(module.named_parameters())
    problems = []
    for key, delta in deltas.items():
        if key not in params:
            problems.append(f"{key!r}: not a parameter of the module")
        elif tuple(delta.shape) != tuple(params[key].shape):
            problems.append(
                f"{key!r}: expected shape {tuple(params[key].shape)}, received {tuple(delta.shape)}"
            )
        elif not bool(torch.isfinite(delta).all()):
            problems.append(f"{key!r}: non-finite values")
    _raise_problems("weight deltas", problems)
    for key, delta in deltas.items():
        params[key].add_(delta.to(device=params[key].device, dtype=params[key].dtype))


# ---- what an edge sends, and what the receiver checks ----------------------------------------------------


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors only, keyed like the model's state_dict (CPU, contiguous copies)."""
    state = {}
    for name, (_, adapter) in _adapters(model).items():
        for tensor_name, tensor in adapter.state_dict().items():
            state[_adapter_key(name, tensor_name)] = tensor.detach().to("cpu").contiguous().clone()
    return state


def adapter_bytes(model: nn.Module) -> int:
    """Exact size of the adapter tensors saved as safetensors: what an edge uploads besides the spec."""
    return tensors_bytes(adapter_state(model))


def adapter_spec(model: nn.Module) -> dict[str, Any]:
    """JSON-able description of the adapters: kind, rank, alpha and the exact adapted layer names."""
    adapters = _adapters(model)
    if not adapters:
        raise ValueError("model: has no adapters (apply_lora first)")
    first = next(iter(adapters.values()))[1]
    return {"kind": ADAPTER_SPEC_KIND, "rank": first.rank, "alpha": first.alpha, "layers": list(adapters)}


def config_from_spec(spec: object) -> LoRAConfig:
    """The LoRAConfig that rebuilds the adapters an `adapter_spec` describes (ValueError naming the field)."""
    d = _check_keys("adapter spec", spec, {"kind", "rank", "alpha", "layers"}, set())
    if d["kind"] != ADAPTER_SPEC_KIND:
        raise ValueError(f"adapter spec kind: expected {ADAPTER_SPEC_KIND!r}, received {d['kind']!r}")
    layers = d["layers"]
    if not isinstance(layers, list) or not layers or not all(isinstance(n, str) for n in layers):
        raise ValueError(
            f"adapter spec layers: expected a non-empty list of layer names, received {layers!r}"
        )
    if len(set(layers)) != len(layers):
        raise ValueError("adapter spec layers: expected distinct names, received duplicates")
    return LoRAConfig(rank=d["rank"], alpha=d["alpha"], target_modules=tuple(layers))


def validate_adapter_state(
    model: nn.Module, state: dict[str, torch.Tensor], max_relative_delta: float | None = None
) -> None:
    """Check `state` against the adapters attached to `model`; ValueError listing every problem.

    Names must be exactly the model's adapter keys, each tensor of its dtype and shape and finite. With
    `max_relative_delta`, each layer's merged delta must satisfy ||delta||_F <= max_relative_delta * ||W||_F
    (a plausibility bound against poisoned or diverged adapters).
    """
    expected = {
        _adapter_key(name, key): tensor
        for name, (_, adapter) in _adapters(model).items()
        for key, tensor in adapter.state_dict().items()
    }
    if not expected:
        raise ValueError("model: has no adapters to validate against (apply_lora first)")
    if not isinstance(state, dict):
        raise ValueError(f"adapter state: expected a dict of tensors, received {type(state).__name__}")
    problems = []
    unknown = sorted(set(state) - set(expected))
    missing = sorted(set(expected) - set(state))
    if unknown:
        problems.append(f"unknown names {unknown[:5]}")
    if missing:
        problems.append(f"missing names {missing[:5]}")
    for key in sorted(set(state) & set(expected)):
        tensor, want = state[key], expected[key]
        if not isinstance(tensor, torch.Tensor):
            problems.append(f"{key!r}: expected a tensor, received {type(tensor).__name__}")
        elif tensor.dtype != want.dtype or tuple(tensor.shape) != tuple(want.shape):
            problems.append(
                f"{key!r}: expected {want.dtype} of shape {tuple(want.shape)}, "
                f"received {tensor.dtype} of shape {tuple(tensor.shape)}"
            )
        elif not bool(torch.isfinite(tensor).all()):
            problems.append(f"{key!r}: non-finite values (NaN or inf)")
    _raise_problems("adapter state", problems)
    if max_relative_delta is not None:
        problems = _implausible_deltas(model, state, max_relative_delta)
        _raise_problems("adapter state", problems)


@torch.no_grad()
def _implausible_deltas(model: nn.Module, state: dict[str, torch.Tensor], bound: float) -> list[str]:
    problems = []
    for name, (layer, adapter) in _adapters(model).items():
        weight = cast(torch.Tensor, layer.weight)
        a, b = (state[_adapter_key(name, t)].to(device=weight.device) for t in ("A", "B"))
        delta = adapter.delta_from(a, b)
        ratio = float(torch.linalg.vector_norm(delta) / torch.linalg.vector_norm(weight).clamp_min(1e-12))
        if ratio > bound:
            problems.append(f"layer {name!r}: ||delta|| / ||W|| = {ratio:.3g} exceeds {bound:g}")
    return problems


def load_adapter_state(
    model: nn.Module, state: dict[str, torch.Tensor], max_relative_delta: float | None = None
) -> None:
    """Validate `state` (see `validate_adapter_state`), then copy it into the model's adapters."""
    validate_adapter_state(model, state, max_relative_delta)
    with torch.no_grad():
        for name, (_, adapter) in _adapters(model).items():
            if adapter.merged:
                raise ValueError(f"layer {name!r}: its adapter is merged; unmerge_lora before loading")
            adapter.A.copy_(state[_adapter_key(name, "A")])
            adapter.B.copy_(state[_adapter_key(name, "B")])


def adapter_to_bytes(model: nn.Module) -> tuple[bytes, str]:
    """(safetensors bytes of the adapter tensors, canonical JSON spec): an adapter upload."""
    return safetensors.torch.save(adapter_state(model)), canonical_json(adapter_spec(model))


def adapter_from_bytes(
    model: nn.Module, weights: bytes, spec_json: str, max_relative_delta: float | None = None
) -> list[str]:
    """Attach the adapters an upload describes to `model` (the receiver's base copy) and load them.

    Nothing is unpickled (safetensors + JSON). On any problem the model is left as it was and ValueError
    says what was wrong. Returns the adapted layer names.
    """
    try:
        spec = json.loads(spec_json)
    except (TypeError, json.JSONDecodeError) as error:
        raise ValueError(f"adapter spec: expected a JSON object, could not parse it: {error}") from error
    config = config_from_spec(spec)
    state = parse_safetensors(weights, "adapter weights")
    trainable = [p.requires_grad for p in model.parameters()]
    names = apply_lora(model, config)
    try:
        if set(names) != set(spec["layers"]):
            raise ValueError(
                f"adapter spec layers: expected exact names of supported layers of this model, received "
                f"{spec['layers'][:5]} (they select {names[:5]})"
            )
        load_adapter_state(model, state, max_relative_delta)
    except ValueError:
        strip_lora(model)
        for p, flag in zip(model.parameters(), trainable, strict=True):
            p.requires_grad_(flag)
        raise
    return names


def _raise_problems(what: str, problems: list[str]) -> None:
    if problems:
        shown = "; ".join(problems[:MAX_PROBLEMS_SHOWN])
        more = (
            f" (and {len(problems) - MAX_PROBLEMS_SHOWN} more)" if len(problems) > MAX_PROBLEMS_SHOWN else ""
        )
        raise ValueError(f"{what}: {shown}{more}")
