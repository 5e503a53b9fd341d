"""Time-to-quality and the goal check read hand-made curves exactly."""

from __future__ import annotations

import pytest

from orchestrator.report.time_to_quality import (
    best_point,
    default_target,
    first_reaching,
    goal_check,
    time_to_quality,
    weighted_target,
)
from tests.support.comparisons import SIZES, baim_curve, curve, fedavg_curve, point

FEDAVG = fedavg_curve()
BAIM = baim_curve()


def test_first_reaching_is_the_first_point_at_or_below_the_target_without_interpolation() -> None:
    assert first_reaching(FEDAVG.points, 0.3) is FEDAVG.points[1]  # exactly equal counts
    assert first_reaching(FEDAVG.points, 0.25) is FEDAVG.points[2]  # not 2.5 rounds
    assert first_reaching(FEDAVG.points, 0.1) is None
    assert best_point(FEDAVG.points) is FEDAVG.points[2]  # the earliest of the equal best


def test_weighted_target_averages_the_covered_tasks_by_test_images() -> None:
    assert weighted_target(["a", "b"], {"a": 0.4, "b": 0.2}, SIZES) == pytest.approx(0.25)
    assert weighted_target(["a"], {"a": 0.4, "b": 0.2}, SIZES) == 0.4
    with pytest.raises(ValueError, match="no target for tasks"):
        weighted_target(["c"], {"a": 0.4}, {"c": 1})


def test_time_to_quality_rows_read_the_curves() -> None:
    # An edge alone covering task a only, with losses a = 0.35 then 0.18
    edge = curve(
        "edge:e", "edge_alone", [point(3, 0, 1_000, 0.35, 9.9), point(6, 0, 2_000, 0.18, 9.9)], ["a"]
    )
    edge.points[0].test_loss, edge.points[1].test_loss = 0.35, 0.18
    target = {"a": 0.2, "b": 0.25}  # mean (100 * 0.2 + 300 * 0.25) / 400 = 0.2375

    table = time_to_quality([FEDAVG, BAIM, edge], target, SIZES, "hand-made")

    assert table.target_loss == pytest.approx(0.2375)
    fedavg, baim, alone = table.rows
    assert fedavg.reached and fedavg.step == 3  # 0.3 > 0.2375 at round 2; 0.2 at round 3
    assert fedavg.bytes_per_edge == 3_000_000 and fedavg.edge_flops_per_edge == 30_000_000_000
    assert fedavg.cloud_flops == 30 and fedavg.best_loss == pytest.approx(0.2)
    assert baim.reached and baim.step == 4 and baim.bytes_per_edge == 40_000
    assert alone.target_loss == 0.2 and alone.reached and alone.step == 6  # held to task a's target
    unreachable = time_to_quality([BAIM], {"a": 0.1, "b": 0.1}, SIZES, "hand-made").rows[0]
    assert not unreachable.reached and unreachable.step is None and unreachable.bytes_per_edge is None
    assert unreachable.cap == 3 and unreachable.best_loss == pytest.approx(0.19)


def test_default_target_is_the_best_baim_point_over_every_task() -> None:
    found = default_target([FEDAVG, BAIM], ["a", "b"])
    assert found is not None
    per_task, source = found
    assert per_task == {"a": 0.19, "b": 0.19}
    assert "baim:finetune at epoch 4" in source
    assert default_target([FEDAVG], ["a", "b"]) is None


def test_goal_check_compares_costs_at_fedavgs_converged_loss() -> None:
    # FedAvg converges to 0.2 at round 3: 3 MB, 30 GFLOP. The BAIM first reaches 0.2 at epoch 4 (0.19):
    # 40 kB and 0.5 GFLOP: 75x fewer bytes, 60x fewer edge FLOPs.
    goal = goal_check([FEDAVG, BAIM])
    assert goal is not None and goal.reached and goal.met
    assert goal.fedavg_converged_loss == pytest.approx(0.2)
    assert goal.bytes_ratio == pytest.approx(75.0) and goal.edge_flops_ratio == pytest.approx(60.0)
    worse = curve("baim:freeze", "baim", [point(1, 40_000, 500_000_000, 0.3, 0.3)])
    missed = goal_check([FEDAVG, worse])
    assert missed is not None and not missed.reached and not missed.met and missed.bytes_ratio is None
    assert goal_check([BAIM]) is None
