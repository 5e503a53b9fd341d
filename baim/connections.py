"""Linear projection connections between learners (the paper's "modularization and linear projection").

A connection (a, i) -> (b, j) takes learner a's stage-i output, projects it to the shape of learner b's
stage-j input and adds it to that input. Which pairs are allowed (0 <= j - i <= h, a != b, same-stage only
from a lower to a higher arrival index, never across the bottleneck) is decided in `baim.model_config`; this
module holds the modules and the graph bookkeeping.

Decisions:
- Projection = 1x1 convolution without bias (a pure linear map of the channels, so a connection whose source
  is zero adds nothing) plus resampling by a power of two: average pooling when the source is larger,
  nearest-neighbour upsampling when it is smaller. Both resamplings act per channel and commute with the 1x1
  conv, so we convolve on the smaller of the two grids (pool first, or convolve first then upsample).
- Zero initialisation: a new connection adds exactly 0, so fusing a learner leaves every output bit-identical.
- Importance of a connection. Data-free (`importance`, the legacy score): the Frobenius norm of its
  projection weight, which bounds how much it can change its target (||W h|| <= ||W|| ||h|| per pixel) but
  ignores how large the source's features are and whether the destination runs at all. On data
  (`ConnectionEnergy`, what `baim.compaction` prunes by): the RMS of the projected signal relative to the RMS
  of the destination stage's whole input, over the rows where the destination ran, i.e.
  sqrt(sum ||P h_src||^2 / sum ||h_in||^2). A connection into a stage that never ran scores 0. Ties are
  broken by the connection's position in the graph's order (creation order): the earliest goes first.
"""

from __future__ import annotations

import logging
import math
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from baim.model_config import ConnectionSpec

logger = logging.getLogger(__name__)

Shape = tuple[int, int, int]  # (C, H, W), H == W


class LinearProjection(nn.Module):
    """(B, *src_shape) -> (B, *dst_shape): 1x1 conv plus power-of-two resampling, zero-initialised."""

    def __init__(self, src_shape: Shape, dst_shape: Shape) -> None:
        super().__init__()
        src_channels, src_size, _ = src_shape
        dst_channels, dst_size, _ = dst_shape
        if max(src_size, dst_size) % min(src_size, dst_size) != 0:
            raise ValueError(
                "projection: expected spatial sizes that divide one another, "
                f"received {src_size} -> {dst_size}"
            )
        self.src_shape = tuple(src_shape)
        self.dst_shape = tuple(dst_shape)
        self.conv = nn.Conv2d(src_channels, dst_channels, kernel_size=1, bias=False)
        nn.init.zeros_(self.conv.weight)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        src_size, dst_size = self.src_shape[1], self.dst_shape[1]
        if src_size > dst_size:
            return self.conv(F.avg_pool2d(h, kernel_size=src_size // dst_size))
        if src_size < dst_size:
            return F.interpolate(self.conv(h), scale_factor=dst_size // src_size, mode="nearest")
        return self.conv(h)

    def importance(self) -> float:
        """Frobenius norm of the projection weight."""
        return float(torch.linalg.vector_norm(self.conv.weight.detach()).item())


class ConnectionEnergy:
    """Sums, over forward passes, each connection's projected energy and its destination's input energy.

    `BAIM.forward(..., probe=energy)` calls `record` for every stage input that connections add to.
    """

    def __init__(self) -> None:
        self.projected: dict[ConnectionSpec, float] = {}
        self.destination: dict[ConnectionSpec, float] = {}

    @torch.no_grad()
    def record(self, stage_input: torch.Tensor, projected: list[tuple[ConnectionSpec, torch.Tensor]]) -> None:
        """stage_input: the destination's whole input (own signal plus projections), on the rows it ran."""
        total = float(stage_input.double().square().sum())
        for spec, signal in projected:
            self.projected[spec] = self.projected.get(spec, 0.0) + float(signal.double().square().sum())
            self.destination[spec] = self.destination.get(spec, 0.0) + total

    def contributions(self, specs: list[ConnectionSpec]) -> dict[ConnectionSpec, float]:
        """sqrt(projected / destination energy) per connection of `specs`; 0 for one never recorded."""
        scores = {}
        for spec in specs:
            destination = self.destination.get(spec, 0.0)
            scores[spec] = math.sqrt(self.projected[spec] / destination) if destination > 0 else 0.0
        return scores


class ConnectionGraph(nn.Module):
    """The surviving connections, their projections, and an index of what flows into each (learner, stage).

    `shapes[name] = (input_shapes, output_shapes)`, one (C, H, W) per stage of that learner.
    """

    def __init__(
        self,
        specs: list[ConnectionSpec] | tuple[ConnectionSpec, ...],
        shapes: dict[str, tuple[list[Shape], list[Shape]]],
    ) -> None:
        super().__init__()
        self.projections = nn.ModuleDict()
        self.specs: list[ConnectionSpec] = []
        self._into: dict[tuple[str, int], list[ConnectionSpec]] = {}
        self.add(specs, shapes)

    def add(
        self,
        specs: list[ConnectionSpec] | tuple[ConnectionSpec, ...],
        shapes: dict[str, tuple[list[Shape], list[Shape]]],
        *,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """Append zero-initialised connections (already validated against the connection rule).

        The projections are built on `device` with `dtype` (the owning model's); when not given, those of the
        connections already in the graph, else PyTorch's defaults. An empty graph cannot know the model's
        device and dtype, so a model that may have been moved should pass them.
        """
        own_device, own_dtype = self._device_dtype()
        device = own_device if device is None else device
        dtype = own_dtype if dtype is None else dtype
        for spec in specs:
            if spec.key in self.projections:
                raise ValueError(f"connection {spec.key}: already in the graph")
            src_shape = shapes[spec.src][1][spec.src_stage]
            dst_shape = shapes[spec.dst][0][spec.dst_stage]
            self.projections[spec.key] = LinearProjection(src_shape, dst_shape).to(device=device, dtype=dtype)
            self.specs.append(spec)
            self._into.setdefault((spec.dst, spec.dst_stage), []).append(spec)

    def remove(self, specs: list[ConnectionSpec] | tuple[ConnectionSpec, ...]) -> None:
        """Delete connections and their parameters."""
        doomed = set(specs)
        missing = [spec.key for spec in doomed if spec.key not in self.projections]
        if missing:
            raise ValueError(f"remove: connections not in the graph: {sorted(missing)}")
        for spec in doomed:
            del self.projections[spec.key]
        self.specs = [spec for spec in self.specs if spec not in doomed]
        self._into = {}
        for spec in self.specs:
            self._into.setdefault((spec.dst, spec.dst_stage), []).append(spec)

    def into(self, name: str, stage: int) -> list[ConnectionSpec]:
        """Connections that add to learner `name`'s stage-`stage` input, in graph order."""
        return self._into.get((name, stage), [])

    def project(self, spec: ConnectionSpec, h: torch.Tensor) -> torch.Tensor:
        return self.projection(spec)(h)

    def projection(self, spec: ConnectionSpec) -> LinearProjection:
        return cast(LinearProjection, self.projections[spec.key])

    def importance(self) -> dict[ConnectionSpec, float]:
        """Importance of every surviving connection (see module docstring)."""
        return {spec: self.projection(spec).importance() for spec in self.specs}

    def least_important(
        self, count: int, scores: dict[ConnectionSpec, float] | None = None
    ) -> list[ConnectionSpec]:
        """The `count` lowest-scored connections (by `scores`, default `importance()`); ties go to the
        earliest in graph order."""
        if not 0 <= count <= len(self.specs):
            raise ValueError(f"count: expected 0 <= count <= {len(self.specs)}, received {count}")
        scores = self.importance() if scores is None else scores
        missing = [spec.key for spec in self.specs if spec not in scores]
        if missing:
            raise ValueError(f"scores: expected a score for every connection, missing {missing[:5]}")
        ranked = sorted(range(len(self.specs)), key=lambda pos: (scores[self.specs[pos]], pos))
        return [self.specs[pos] for pos in ranked[:count]]

    def _device_dtype(self) -> tuple[torch.device | None, torch.dtype | None]:
        for param in self.parameters():
            return param.device, param.dtype
        return None, None
