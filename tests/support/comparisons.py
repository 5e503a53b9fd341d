"""Hand-made curves and comparisons (no run behind them) for the time-to-quality and report tests."""

from __future__ import annotations

from orchestrator.core.comparison import (
    Comparison,
    CurvePoint,
    EdgeCost,
    ImageQualityInfo,
    MethodCurve,
    QualityMeasure,
)
from orchestrator.core.scenario import CompareConfig
from orchestrator.report.time_to_quality import default_target, goal_check, time_to_quality

SIZES = {"a": 100, "b": 300}


def point(step: int, sent: int, flops: int, a: float, b: float, seconds: float = 0.0) -> CurvePoint:
    """One edge, the given costs; test loss per task a, b (weighted mean (100 a + 300 b) / 400)."""
    return CurvePoint(
        step=step,
        bytes_sent_per_edge=sent,
        bytes_received_per_edge=0,
        edge_flops_per_edge=flops,
        cloud_flops=step * 10,
        wall_seconds=seconds,
        test_loss=(100 * a + 300 * b) / 400,
        test_loss_per_task={"a": a, "b": b},
        per_edge={"e": EdgeCost(bytes_sent=sent, bytes_received=0, flops=flops)},
    )


def curve(name: str, family: str, points: list[CurvePoint], tasks: list[str] | None = None) -> MethodCurve:
    return MethodCurve(
        name=name,
        family=family,  # type: ignore[arg-type]
        label=name,
        description="",
        step_name="round" if family == "fedavg" else "epoch",
        privacy_violating=family == "centralised",
        tasks=tasks or ["a", "b"],
        cap=len(points),
        stop_reason="round_cap",
        points=points,
        samples=None,
    )


def fedavg_curve() -> MethodCurve:
    """1 MB and 10 GFLOP per edge per round; mean loss 0.5, 0.3, 0.2, 0.2 (a plateau after round 3)."""
    rounds = ((1, 0.5), (2, 0.3), (3, 0.2), (4, 0.2))
    return curve("fedavg", "fedavg", [point(r, r * 1_000_000, r * 10_000_000_000, x, x) for r, x in rounds])


def baim_curve() -> MethodCurve:
    """A constant 40 kB and 0.5 GFLOP per edge; mean loss per epoch 0.4, 0.25, 0.19."""
    epochs = ((1, 0.4), (2, 0.25), (4, 0.19))
    return curve("baim:finetune", "baim", [point(e, 40_000, 500_000_000, x, x) for e, x in epochs])


def hand_made_comparison() -> Comparison:
    """A whole comparison.json over the two curves, an edge alone and a centralised reference, with FID."""
    edge = curve("edge:e", "edge_alone", [point(6, 0, 2_000, 0.18, 0.18)], ["a"])
    central = curve("centralised", "centralised", [point(1, 3_000_000, 0, 0.15, 0.15)])
    curves = [fedavg_curve(), baim_curve(), edge, central]
    for c in curves:
        c.points[-1].quality = [
            QualityMeasure(task="a", fid=100.0, kid_mean=0.1, kid_std=0.01, num_generated=8, num_real=8)
        ]
    found = default_target(curves, ["a", "b"])
    assert found is not None
    return Comparison(
        scenario="hand-made",
        seed=0,
        data="procedural",
        resolution=16,
        test_images=SIZES,
        settings=CompareConfig(),
        cloud_trainer="local",
        methods=curves,
        time_to_quality=time_to_quality(curves, found[0], SIZES, found[1]),
        goal=goal_check(curves),
        image_quality=ImageQualityInfo(enabled=True, extractor="test", num_samples=8),
        phase_seconds={"total": 1.0},
        baim_run="baim-run",
    )
