"""Time-to-quality (after FedScale's time-to-accuracy): pure functions over measured curves.

A method reaches a target at its first measured point whose test loss is at or below it; no interpolation
between points (a curve measured every 4 epochs says "by epoch 8", not "at epoch 6.3"). A method whose loss
covers only some tasks (an edge alone: its own task) is held to the mean of those tasks' targets.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from orchestrator.core.comparison import (
    CurvePoint,
    GoalCheck,
    MethodCurve,
    TimeToQuality,
    TimeToQualityRow,
)

BYTES_GOAL = 20.0  # the BAIM at >= 20x fewer bytes per edge than FedAvg, at FedAvg's converged loss
EDGE_FLOPS_GOAL = 10.0  # ... and >= 10x fewer edge FLOPs


def weighted_target(
    tasks: Sequence[str], target_per_task: Mapping[str, float], sizes: Mapping[str, int]
) -> float:
    """The test-image-weighted mean of the tasks' targets (the way every test loss here is averaged)."""
    missing = [task for task in tasks if task not in target_per_task]
    if missing:
        raise ValueError(f"target_per_task: no target for tasks {missing}")
    total = sum(sizes[task] for task in tasks)
    if total == 0:
        raise ValueError(f"sizes: tasks {list(tasks)} have no test images")
    return sum(target_per_task[task] * sizes[task] for task in tasks) / total


def first_reaching(points: Sequence[CurvePoint], target: float) -> CurvePoint | None:
    """The first point whose test loss is <= target, or None."""
    for point in points:
        if point.test_loss is not None and point.test_loss <= target:
            return point
    return None


def best_point(points: Sequence[CurvePoint]) -> CurvePoint | None:
    """The point with the lowest test loss (the earliest among equals), or None when none was measured."""
    measured = [p for p in points if p.test_loss is not None]
    return min(measured, key=lambda p: p.test_loss) if measured else None  # type: ignore[arg-type,return-value]


def time_to_quality_row(curve: MethodCurve, target: float) -> TimeToQualityRow:
    """What `curve` needed to first reach `target`, or "not reached" with its cap."""
    hit = first_reaching(curve.points, target)
    best = best_point(curve.points)
    return TimeToQualityRow(
        method=curve.name,
        label=curve.label,
        target_loss=target,
        reached=hit is not None,
        step=hit.step if hit else None,
        bytes_per_edge=hit.bytes_per_edge if hit else None,
        bytes_sent_per_edge=hit.bytes_sent_per_edge if hit else None,
        edge_flops_per_edge=hit.edge_flops_per_edge if hit else None,
        cloud_flops=hit.cloud_flops if hit else None,
        wall_seconds=hit.wall_seconds if hit else None,
        best_loss=best.test_loss if best else None,
        cap=curve.cap,
        step_name=curve.step_name,
    )


def default_target(
    curves: Sequence[MethodCurve], all_tasks: Sequence[str]
) -> tuple[dict[str, float], str] | None:
    """The best BAIM point over every task (its per-task losses) and where it comes from, or None."""
    candidates = [
        (point, curve)
        for curve in curves
        if curve.family == "baim"
        for point in curve.points
        if point.test_loss is not None and set(all_tasks) <= set(point.test_loss_per_task)
    ]
    if not candidates:
        return None
    point, curve = min(candidates, key=lambda pc: pc[0].test_loss)  # type: ignore[arg-type,return-value]
    return dict(
        point.test_loss_per_task
    ), f"best BAIM task models: {curve.label} at {curve.step_name} {point.step}"


def time_to_quality(
    curves: Sequence[MethodCurve],
    target_per_task: Mapping[str, float],
    sizes: Mapping[str, int],
    source: str,
) -> TimeToQuality:
    """The table for every curve; each is held to the weighted target of the tasks its loss covers."""
    tasks = list(target_per_task)
    rows = [time_to_quality_row(c, weighted_target(c.tasks, target_per_task, sizes)) for c in curves]
    return TimeToQuality(
        target_loss=weighted_target(tasks, target_per_task, sizes),
        target_per_task=dict(target_per_task),
        target_source=source,
        rows=rows,
    )


def goal_check(curves: Sequence[MethodCurve], fedavg_name: str = "fedavg") -> GoalCheck | None:
    """Does a BAIM strategy reach FedAvg's converged (best within its cap) loss at >= BYTES_GOAL fewer bytes
    per edge and >= EDGE_FLOPS_GOAL fewer edge FLOPs than FedAvg needed for it? None without both curves."""
    fedavg = next((c for c in curves if c.name == fedavg_name), None)
    baims = [c for c in curves if c.family == "baim"]
    if fedavg is None or not baims:
        return None
    converged = best_point(fedavg.points)
    if converged is None or converged.test_loss is None:
        return None
    loss = converged.test_loss
    hits = [(hit, c) for c in baims if (hit := first_reaching(c.points, loss)) is not None]
    if not hits:
        return GoalCheck(
            fedavg_converged_loss=loss,
            baim_method=None,
            reached=False,
            bytes_ratio=None,
            edge_flops_ratio=None,
            bytes_goal=BYTES_GOAL,
            edge_flops_goal=EDGE_FLOPS_GOAL,
            met=False,
            text=f"no BAIM strategy reached FedAvg's converged test loss {loss:.5f} "
            f"({fedavg.step_name} {converged.step}) within its epoch sweep",
        )
    hit, curve = min(hits, key=lambda hc: hc[0].bytes_per_edge)
    bytes_ratio = _ratio(converged.bytes_per_edge, hit.bytes_per_edge)
    flops_ratio = _ratio(converged.edge_flops_per_edge, hit.edge_flops_per_edge)
    met = bytes_ratio >= BYTES_GOAL and flops_ratio >= EDGE_FLOPS_GOAL
    return GoalCheck(
        fedavg_converged_loss=loss,
        baim_method=curve.name,
        reached=True,
        bytes_ratio=bytes_ratio,
        edge_flops_ratio=flops_ratio,
        bytes_goal=BYTES_GOAL,
        edge_flops_goal=EDGE_FLOPS_GOAL,
        met=met,
        text=f"{curve.label} reaches FedAvg's converged test loss {loss:.5f} ({fedavg.step_name} "
        f"{converged.step}) at {curve.step_name} {hit.step} with {bytes_ratio:.1f}x fewer bytes per edge and "
        f"{flops_ratio:.1f}x fewer edge FLOPs: goal (>= {BYTES_GOAL:g}x, >= {EDGE_FLOPS_GOAL:g}x) "
        f"{'met' if met else 'missed'}",
    )


def _ratio(numerator: float, denominator: float) -> float:
    return float("inf") if denominator == 0 else numerator / denominator
