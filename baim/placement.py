"""Where a generation request runs: all in the cloud, all at the edge, or split after a decoder stage.

Split placements follow `baim.split`: the edge runs the head (gate and decoder stages <= cut) and sends its
state, the cloud runs the tail and sends the response back. The edge holds the task model in its toolbox
(downloaded once, not per request), so all_edge sends nothing.

Latency of one request, with the link model of the simulated network (a transfer of b bytes takes
latency + 8 b / bandwidth; a transfer of zero bytes does not happen):

    seconds = sum over transfers (latency_s + 8 * bytes / bandwidth_bps)
              + edge_flops / edge_flops_per_second + cloud_flops / cloud_flops_per_second

- all_cloud: up request_bytes, the cloud runs everything, down response_bytes;
- split_after_{k}: the edge runs the head, up the state's exact safetensors size, the cloud runs the tail,
  down response_bytes;
- all_edge: the edge runs everything, no transfer.
FLOPs are counted by `baim.costs.count_flops` on the actual request (they depend on which learners the gate
selects), bytes are the serialized sizes; only the speeds and the link are declared.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from baim.costs import count_flops
from baim.decompose import OneTaskModel
from baim.split import generate_head, generate_tail, split_points, split_state_to_bytes

ALL_CLOUD = "all_cloud"
ALL_EDGE = "all_edge"


def split_name(cut: int) -> str:
    return f"split_after_{cut}"


def _check_positive(what: str, value: float) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not (math.isfinite(value) and value > 0)
    ):
        raise ValueError(f"{what}: expected a finite number > 0, received {value!r}")


def _check_count(what: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{what}: expected an int >= 0, received {value!r}")


@dataclass(frozen=True)
class Placement:
    """What one placement of a request costs each side."""

    name: str  # ALL_CLOUD, ALL_EDGE or split_name(cut)
    cut: int | None  # the stage after which it is split; None for the two extremes
    edge_flops: int
    cloud_flops: int
    uplink_bytes: int  # edge -> cloud
    downlink_bytes: int  # cloud -> edge

    def __post_init__(self) -> None:
        for what in ("edge_flops", "cloud_flops", "uplink_bytes", "downlink_bytes"):
            _check_count(what, getattr(self, what))


@dataclass(frozen=True)
class Link:
    """The edge's link to the cloud (as declared in a scenario's `link`)."""

    bandwidth_mbps: float  # both directions
    latency_ms: float  # one way, added to every transfer

    def __post_init__(self) -> None:
        _check_positive("bandwidth_mbps", self.bandwidth_mbps)
        if isinstance(self.latency_ms, bool) or not isinstance(self.latency_ms, (int, float)):
            raise ValueError(f"latency_ms: expected a number >= 0, received {self.latency_ms!r}")
        if not (math.isfinite(self.latency_ms) and self.latency_ms >= 0):
            raise ValueError(f"latency_ms: expected a finite number >= 0, received {self.latency_ms!r}")


@dataclass(frozen=True)
class NodeSpeeds:
    """Declared compute of the two sides, in FLOP/s."""

    edge_flops_per_second: float
    cloud_flops_per_second: float

    def __post_init__(self) -> None:
        _check_positive("edge_flops_per_second", self.edge_flops_per_second)
        _check_positive("cloud_flops_per_second", self.cloud_flops_per_second)


class PlacementCost(NamedTuple):
    placement: Placement
    transfer_seconds: float  # both transfers, latency included
    edge_seconds: float
    cloud_seconds: float

    @property
    def total_seconds(self) -> float:
        return self.transfer_seconds + self.edge_seconds + self.cloud_seconds


def transfer_seconds(nbytes: int, link: Link) -> float:
    """latency + 8 * nbytes / bandwidth; 0 when nothing is sent."""
    _check_count("nbytes", nbytes)
    if nbytes == 0:
        return 0.0
    return link.latency_ms / 1000.0 + nbytes * 8 / (link.bandwidth_mbps * 1e6)


def placement_cost(placement: Placement, link: Link, speeds: NodeSpeeds) -> PlacementCost:
    return PlacementCost(
        placement=placement,
        transfer_seconds=transfer_seconds(placement.uplink_bytes, link)
        + transfer_seconds(placement.downlink_bytes, link),
        edge_seconds=placement.edge_flops / speeds.edge_flops_per_second,
        cloud_seconds=placement.cloud_flops / speeds.cloud_flops_per_second,
    )


def choose_placement(placements: Sequence[Placement], link: Link, speeds: NodeSpeeds) -> PlacementCost:
    """The placement of least total seconds; on a tie, the earliest in `placements`."""
    if not placements:
        raise ValueError("placements: expected at least one, received none")
    costs = [placement_cost(p, link, speeds) for p in placements]
    return min(costs, key=lambda cost: cost.total_seconds)  # min keeps the first of equal keys


def measure_placements(
    model: OneTaskModel, n: int, seed: int, request_bytes: int, response_bytes: int
) -> list[Placement]:
    """Every placement of one request (n images, seed), measured: all_cloud, each split (ascending), all_edge.

    `request_bytes` and `response_bytes` are the sizes of the serving protocol's request (all_cloud) and of
    its response (all_cloud and split), which `baim/` does not know; measure them where it is encoded.
    """
    _check_count("request_bytes", request_bytes)
    _check_count("response_bytes", response_bytes)
    everything = count_flops(model.generate, n, seed=seed)
    placements = [Placement(ALL_CLOUD, None, 0, everything, request_bytes, response_bytes)]
    for cut in split_points(model):
        head_flops = count_flops(generate_head, model, n, cut, seed=seed)
        state = generate_head(model, n, cut, seed=seed)  # deterministic: the state the counted run made
        tail_flops = count_flops(generate_tail, model, state, cut)
        uplink = len(split_state_to_bytes(state))
        placements.append(Placement(split_name(cut), cut, head_flops, tail_flops, uplink, response_bytes))
    placements.append(Placement(ALL_EDGE, None, everything, 0, 0, 0))
    return placements
