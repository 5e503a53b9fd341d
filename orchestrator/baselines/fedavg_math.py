"""Aggregation math for the federated baselines: FedAvg's weighted average and three robust rules.

Pure, like Flower's `flwr.server.strategy.aggregate` (whose definitions these follow: `aggregate`,
`aggregate_median`, `aggregate_trimmed_avg`, `aggregate_krum`): no I/O, no logging, no Ray. Each takes the
clients' state dicts and returns one state dict, accumulating in float64 and returning each tensor in the
first state's dtype. Preconditions that do not hold raise ValueError saying which one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

State = Mapping[str, torch.Tensor]


def weighted_average(states: Sequence[State], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """sum_i weights[i] * states[i] / sum_i weights[i], tensor by tensor (Flower's `aggregate`).

    `weights` are usually the clients' example counts. Each must be finite and >= 0, and their total > 0.
    Every state must have the same keys and shapes.
    """
    _check_states(states)
    if len(weights) != len(states):
        raise ValueError(f"weights: expected {len(states)} values (one per state), received {len(weights)}")
    for index, weight in enumerate(weights):
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"weights[{index}]: expected a finite value >= 0, received {weight}")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError(f"weights: expected a positive total, received {total}")

    averaged: dict[str, torch.Tensor] = {}
    for name, first in states[0].items():
        accumulator = torch.zeros(first.shape, dtype=torch.float64)
        for state, weight in zip(states, weights, strict=True):
            accumulator += state[name].detach().to("cpu", torch.float64) * (weight / total)
        averaged[name] = accumulator.to(first.dtype)
    return averaged


def coordinate_median(states: Sequence[State]) -> dict[str, torch.Tensor]:
    """Coordinate-wise median (Flower's `aggregate_median`, numpy's median: the mean of the two middle values
    when the number of states is even). Example counts are ignored."""
    _check_states(states)
    count = len(states)
    out: dict[str, torch.Tensor] = {}
    for name, first in states[0].items():
        ordered = _stacked(states, name).sort(dim=0).values
        middle = ordered[(count - 1) // 2 : count // 2 + 1]  # one value (odd count) or the two middle ones
        out[name] = middle.mean(dim=0).to(first.dtype)
    return out


def trimmed_mean(states: Sequence[State], proportion_to_cut: float) -> dict[str, torch.Tensor]:
    """Coordinate-wise mean after dropping the int(proportion_to_cut * n) smallest and as many largest values
    (Flower's `aggregate_trimmed_avg`, scipy's `trim_mean`). Example counts are ignored."""
    _check_states(states)
    if not 0.0 <= proportion_to_cut < 0.5:
        raise ValueError(f"proportion_to_cut: expected a value in [0, 0.5), received {proportion_to_cut}")
    count = len(states)
    cut = int(proportion_to_cut * count)
    if count - 2 * cut < 1:
        raise ValueError(
            f"proportion_to_cut: {proportion_to_cut} of {count} states cuts {cut} from each end, leaving none"
        )
    out: dict[str, torch.Tensor] = {}
    for name, first in states[0].items():
        ordered = _stacked(states, name).sort(dim=0).values
        out[name] = ordered[cut : count - cut].mean(dim=0).to(first.dtype)
    return out


def krum_scores(states: Sequence[State], num_malicious: int) -> list[float]:
    """Krum score of each state: the sum of squared distances to its n - f - 2 nearest other states (at least
    one), over all tensors flattened into one vector (Blanchard et al. 2017; Flower's `aggregate_krum`)."""
    _check_states(states)
    count = len(states)
    if isinstance(num_malicious, bool) or not isinstance(num_malicious, int) or num_malicious < 0:
        raise ValueError(f"num_malicious: expected an int >= 0, received {num_malicious!r}")
    if count < 2:
        raise ValueError(f"states: Krum needs at least 2 states to compare, received {count}")
    flat = torch.stack(
        [torch.cat([s[n].detach().to("cpu", torch.float64).flatten() for n in states[0]]) for s in states]
    )
    # Row by row (memory n * d, not n^2 * d); exact differences, not cdist's expansion, so ties stay ties.
    distances = torch.stack([(flat - row).pow(2).sum(dim=1) for row in flat])
    neighbours = max(1, count - num_malicious - 2)
    scores = []
    for index in range(count):
        others = torch.cat([distances[index, :index], distances[index, index + 1 :]])
        scores.append(float(others.sort().values[:neighbours].sum()))
    return scores


def krum(
    states: Sequence[State], weights: Sequence[float], num_malicious: int, to_keep: int = 0
) -> tuple[dict[str, torch.Tensor], list[int]]:
    """Krum: the state with the lowest `krum_scores`; with `to_keep` > 0, Multi-Krum: the weighted average of
    the `to_keep` lowest-scoring states. Returns (state, indices chosen, lowest score first); ties go to the
    earlier state."""
    scores = krum_scores(states, num_malicious)
    if isinstance(to_keep, bool) or not isinstance(to_keep, int) or not 0 <= to_keep <= len(states):
        raise ValueError(f"to_keep: expected an int in [0, {len(states)}], received {to_keep!r}")
    ranked = sorted(range(len(states)), key=lambda i: (scores[i], i))
    if to_keep == 0:
        best = ranked[0]
        return {name: t.detach().to("cpu").clone() for name, t in states[best].items()}, [best]
    chosen = ranked[:to_keep]
    return weighted_average([states[i] for i in chosen], [weights[i] for i in chosen]), chosen


AGGREGATIONS = ("mean", "median", "trimmed_mean", "krum")


def aggregate(
    method: str,
    states: Sequence[State],
    weights: Sequence[float],
    *,
    trim_proportion: float = 0.1,
    num_malicious: int = 0,
    to_keep: int = 0,
) -> tuple[dict[str, torch.Tensor], list[int]]:
    """One server aggregation by name: (the new state, indices of the states it used).

    mean: `weighted_average`; median: `coordinate_median`; trimmed_mean: `trimmed_mean` with
    `trim_proportion`; krum: `krum` with `num_malicious` and `to_keep` (capped at the number of states, since
    failed clients make a round smaller than planned; a single state is returned as it is).
    """
    if method not in AGGREGATIONS:
        raise ValueError(f"method: expected one of {', '.join(AGGREGATIONS)}, received {method!r}")
    everyone = list(range(len(states)))
    if method == "mean":
        return weighted_average(states, weights), everyone
    if method == "median":
        return coordinate_median(states), everyone
    if method == "trimmed_mean":
        return trimmed_mean(states, trim_proportion), everyone
    _check_states(states)
    if len(states) == 1:
        return {name: t.detach().to("cpu").clone() for name, t in states[0].items()}, [0]
    return krum(states, weights, num_malicious, min(to_keep, len(states)))


def _stacked(states: Sequence[State], name: str) -> torch.Tensor:
    return torch.stack([state[name].detach().to("cpu", torch.float64) for state in states])


def _check_states(states: Sequence[State]) -> None:
    """At least one state; every state with states[0]'s keys, shapes and floating-point tensors."""
    if not states:
        raise ValueError("states: expected at least one client state, received an empty list")
    reference = states[0]
    for name, tensor in reference.items():
        if not tensor.is_floating_point():
            raise ValueError(
                f"states[0][{name!r}]: expected a floating-point tensor, received {tensor.dtype}"
            )
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
