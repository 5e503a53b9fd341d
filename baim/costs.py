"""Measured costs of a model: parameters, serialized bytes and FLOPs.

FLOPs come from `torch.utils.flop_counter.FlopCounterMode`, which counts the matrix multiplications and
convolutions (forward and backward) that actually run, 2 FLOPs per multiply-add; element-wise ops (norms,
activations, the loss's arithmetic) are not counted. Counts depend only on the shapes that run, so they are
exact and deterministic: the same model and batch shape give the same number on every run and device.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
from safetensors.torch import save as safetensors_save
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

# loss_fn(model, batch) -> scalar loss tensor; the same signature baim.training uses.
LossFn = Callable[[nn.Module, Any], torch.Tensor]


class FlopCounts(NamedTuple):
    forward: int  # FLOPs of loss_fn(model, batch)
    backward: int  # FLOPs of loss.backward()

    @property
    def total(self) -> int:
        return self.forward + self.backward


def count_params(module: nn.Module) -> int:
    """Number of parameters (shared parameters counted once)."""
    return sum(p.numel() for p in module.parameters())


def count_trainable_params(module: nn.Module) -> int:
    """Number of parameters that require grad (what an optimiser updates)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def tensors_bytes(tensors: Mapping[str, torch.Tensor]) -> int:
    """Exact size of `tensors` saved with safetensors (no metadata).

    Tensors are copied to contiguous CPU storage first: safetensors refuses views and shared storage.
    """
    return len(safetensors_save({name: t.detach().cpu().contiguous().clone() for name, t in tensors.items()}))


def serialized_bytes(module: nn.Module) -> int:
    """Exact size of the module's state_dict saved with safetensors (no metadata)."""
    return tensors_bytes(module.state_dict())


def count_flops(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> int:
    """FLOPs of one call fn(*args, **kwargs), counted by FlopCounterMode."""
    with FlopCounterMode(display=False) as counter:
        fn(*args, **kwargs)
    return int(counter.get_total_flops())


def forward_backward_flops(module: nn.Module, example_batch: Any, loss_fn: LossFn) -> FlopCounts:
    """FLOPs of one training step's forward (loss_fn) and backward on example_batch.

    Gradients the module held before are restored afterwards, so counting leaves no trace on training.
    The optimiser step is not counted (element-wise).
    """
    saved_grads = {name: p.grad for name, p in module.named_parameters()}
    for p in module.parameters():
        p.grad = None
    try:
        with FlopCounterMode(display=False) as forward_counter:
            loss = loss_fn(module, example_batch)
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ValueError(f"loss_fn: expected a scalar tensor, received {shape}")
        if not loss.requires_grad:
            raise ValueError("loss_fn: expected a loss that requires grad; every parameter is frozen")
        with FlopCounterMode(display=False) as backward_counter:
            loss.backward()
    finally:
        for name, p in module.named_parameters():
            p.grad = saved_grads[name]
    return FlopCounts(
        forward=int(forward_counter.get_total_flops()), backward=int(backward_counter.get_total_flops())
    )
