"""The split cost model: hand-computed latencies, the cheapest placement, measured FLOPs and bytes."""

from __future__ import annotations

import pytest

from baim.costs import count_flops
from baim.placement import (
    ALL_CLOUD,
    ALL_EDGE,
    Link,
    NodeSpeeds,
    Placement,
    choose_placement,
    measure_placements,
    placement_cost,
    transfer_seconds,
)
from baim.split import generate_head, split_points, split_state_to_bytes
from tests.support.models import two_learner_model

# 8 Mbit/s moves 1,000,000 bytes in exactly 1 s; 10 ms one way
LINK = Link(bandwidth_mbps=8.0, latency_ms=10.0)
SPEEDS = NodeSpeeds(edge_flops_per_second=1e9, cloud_flops_per_second=1e11)


def placements() -> list[Placement]:
    return [
        Placement(
            ALL_CLOUD, None, edge_flops=0, cloud_flops=4_000_000_000, uplink_bytes=100, downlink_bytes=50_000
        ),
        Placement(
            "split_after_2",
            2,
            edge_flops=1_000_000_000,
            cloud_flops=3_000_000_000,
            uplink_bytes=200_000,
            downlink_bytes=50_000,
        ),
        Placement(ALL_EDGE, None, edge_flops=4_000_000_000, cloud_flops=0, uplink_bytes=0, downlink_bytes=0),
    ]


def test_transfer_seconds_by_hand():
    assert transfer_seconds(1_000_000, LINK) == pytest.approx(1.01)
    assert transfer_seconds(0, LINK) == 0.0  # nothing sent, no latency either


def test_placement_costs_by_hand():
    all_cloud, split, all_edge = (placement_cost(p, LINK, SPEEDS) for p in placements())

    # all cloud: (0.01 + 100*8/8e6) + (0.01 + 50_000*8/8e6) + 4e9 / 1e11 = 0.0101 + 0.06 + 0.04
    assert all_cloud.transfer_seconds == pytest.approx(0.0701)
    assert all_cloud.edge_seconds == 0.0 and all_cloud.cloud_seconds == pytest.approx(0.04)
    assert all_cloud.total_seconds == pytest.approx(0.1101)
    # split: (0.01 + 0.2) + (0.01 + 0.05) + 1e9 / 1e9 + 3e9 / 1e11 = 0.27 + 1 + 0.03
    assert split.total_seconds == pytest.approx(1.30)
    # all edge: 4e9 / 1e9
    assert all_edge.total_seconds == pytest.approx(4.0) and all_edge.transfer_seconds == 0.0


def test_the_cheapest_placement_depends_on_link_and_speeds():
    slow_link = Link(bandwidth_mbps=0.08, latency_ms=500.0)  # 10 kB/s: all cloud sends for 6.01 s
    fast_edge = NodeSpeeds(edge_flops_per_second=1e10, cloud_flops_per_second=1e11)
    balanced = NodeSpeeds(edge_flops_per_second=2e9, cloud_flops_per_second=1e10)

    assert choose_placement(placements(), LINK, SPEEDS).placement.name == ALL_CLOUD
    # 10 kB/s: any transfer costs seconds; the edge computes 4e9 in 0.4 s
    assert choose_placement(placements(), slow_link, fast_edge).placement.name == ALL_EDGE
    # all cloud 0.0701 + 0.4 = 0.4701; split 0.27 + 0.5 + 0.3 = 1.07; all edge 2.0
    assert choose_placement(placements(), LINK, balanced).total_seconds == pytest.approx(0.4701)


def test_a_split_wins_when_its_head_is_cheap_and_its_state_small():
    options = [
        Placement(ALL_CLOUD, None, 0, 10_000_000_000, 100, 1_000_000),
        Placement("split_after_1", 1, 100_000_000, 1_000_000_000, 10_000, 1_000_000),
        Placement(ALL_EDGE, None, 10_000_000_000, 0, 0, 0),
    ]
    speeds = NodeSpeeds(edge_flops_per_second=1e9, cloud_flops_per_second=2e9)

    best = choose_placement(options, LINK, speeds)

    # all cloud: 0.0101 + 1.01 + 5 = 6.0201; split: 0.02 + 1.01 + 0.1 + 0.5 = 1.63; all edge: 10
    assert best.placement.name == "split_after_1"
    assert best.total_seconds == pytest.approx(1.63)


def test_ties_go_to_the_earliest_placement():
    same = [Placement("first", None, 0, 0, 0, 0), Placement("second", None, 0, 0, 0, 0)]
    assert choose_placement(same, LINK, SPEEDS).placement.name == "first"


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Link(bandwidth_mbps=0, latency_ms=1), "bandwidth_mbps: expected a finite number > 0"),
        (lambda: Link(bandwidth_mbps=1, latency_ms=-1), "latency_ms: expected a finite number >= 0"),
        (lambda: NodeSpeeds(0, 1), "edge_flops_per_second"),
        (lambda: Placement("x", None, -1, 0, 0, 0), "edge_flops: expected an int >= 0"),
        (lambda: choose_placement([], LINK, SPEEDS), "expected at least one"),
    ],
)
def test_bad_inputs_name_the_field(make, message: str):
    with pytest.raises(ValueError, match=message):
        make()


def test_measured_placements_split_the_flops_and_count_the_state_bytes():
    model = two_learner_model(top_k=1)
    n, seed = 4, 2
    everything = count_flops(model.generate, n, seed=seed)

    measured = measure_placements(model, n, seed, request_bytes=30, response_bytes=1234)

    assert [p.name for p in measured] == [
        ALL_CLOUD,
        "split_after_1",
        "split_after_2",
        "split_after_3",
        ALL_EDGE,
    ]
    assert measured[0] == Placement(ALL_CLOUD, None, 0, everything, 30, 1234)
    assert measured[-1] == Placement(ALL_EDGE, None, everything, 0, 0, 0)
    for placement in measured[1:-1]:
        assert placement.cut in split_points(model)
        assert placement.edge_flops + placement.cloud_flops == everything
        state = generate_head(model, n, placement.cut, seed=seed)
        assert placement.uplink_bytes == len(split_state_to_bytes(state))
        assert placement.downlink_bytes == 1234
    heads = [p.edge_flops for p in measured[1:-1]]
    assert heads == sorted(heads) and heads[0] > 0  # a later cut runs more at the edge
