"""FedAvg's one piece of math: the example-weighted average of client state dicts.

Pure, like flower's `aggregate`: no I/O, no logging, no Ray. Preconditions that do not hold raise
ValueError saying which one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch


def weighted_average(
    states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]
) -> dict[str, torch.Tensor]:
    """sum_i weights[i] * states[i] / sum_i weights[i], tensor by tensor.

    `weights` are usually the clients' example counts. Each must be finite and >= 0, and their total > 0.
    Every state must have the same keys and shapes. Accumulates in float64 and returns each tensor in the
    first state's dtype.
    """
    if not states:
        raise ValueError("states: expected at least one client state, received an empty list")
    if len(weights) != len(states):
        raise ValueError(f"weights: expected {len(states)} values (one per state), received {len(weights)}")
    for index, weight in enumerate(weights):
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"weights[{index}]: expected a finite value >= 0, received {weight}")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError(f"weights: expected a positive total, received {total}")

    reference = states[0]
    for index, state in enumerate(states[1:], start=1):
        if set(state) != set(reference):
            missing = sorted(set(reference) - set(state))
            unexpected = sorted(set(state) - set(reference))
            raise ValueError(
                f"states[{index}]: keys differ from states[0] (missing {missing}, unexpected {unexpected})"
            )
        for name, tensor in state.items():
            if tensor.shape != reference[name].shape:
                raise ValueError(
                    f"states[{index}][{name!r}]: expected shape {tuple(reference[name].shape)}, "
                    f"received {tuple(tensor.shape)}"
                )

    averaged: dict[str, torch.Tensor] = {}
    for name, first in reference.items():
        if not first.is_floating_point():
            raise ValueError(f"states[0][{name!r}]: expected a floating-point tensor, received {first.dtype}")
        accumulator = torch.zeros(first.shape, dtype=torch.float64)
        for state, weight in zip(states, weights, strict=True):
            accumulator += state[name].detach().to("cpu", torch.float64) * (weight / total)
        averaged[name] = accumulator.to(first.dtype)
    return averaged
