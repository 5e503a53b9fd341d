"""comparison.json as pydantic models (`Comparison`): every method of `baim compare` as a curve of measured
points on the same edges, shards and test set, plus the time-to-quality table.

The schema is documented field by field in docs/comparison.md (generated from these models; a test fails
when it drifts). `Comparison.model_dump(mode="json")` is the file, key for key.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from orchestrator.core.scenario import CompareConfig, StrictModel, model_field_tables

COMPARISON_FORMAT_VERSION = 1

MethodFamily = Literal["baim", "fedavg", "fedavg_finetune", "cloud_only", "edge_alone", "centralised"]


class EdgeCost(StrictModel):
    """What one edge spent up to a point: bytes that crossed its link (serialized sizes), its FLOPs."""

    bytes_sent: int = Field(ge=0, description="Serialized bytes the edge sent (uploads, updates, raw data).")
    bytes_received: int = Field(ge=0, description="Serialized bytes the edge received (models).")
    flops: int = Field(ge=0, description="Training FLOPs at the edge (FlopCounterMode).")


class QualityMeasure(StrictModel):
    """FID/KID of one task's generated images against that task's real test images."""

    task: str = Field(description="The task whose real test images the samples are compared with.")
    fid: float = Field(description="Frechet distance of the extractor's features (biased up at small n).")
    kid_mean: float = Field(description="Kernel inception distance, mean over subsets.")
    kid_std: float = Field(description="KID's standard deviation over subsets.")
    num_generated: int = Field(ge=0, description="Generated images.")
    num_real: int = Field(ge=0, description="Real test images.")


class CurvePoint(StrictModel):
    """One measured point of a method: its costs so far and its model's quality at that point."""

    step: int = Field(ge=0, description="Epochs (cloud or local) or rounds done at this point (`step_name`).")
    bytes_sent_per_edge: float = Field(ge=0, description="Mean over `per_edge` of the bytes sent so far.")
    bytes_received_per_edge: float = Field(ge=0, description="Mean over `per_edge` of the bytes received.")
    edge_flops_per_edge: float = Field(ge=0, description="Mean over `per_edge` of the edge FLOPs so far.")
    cloud_flops: int = Field(ge=0, description="FLOPs in the cloud so far (training; aggregation counts 0).")
    wall_seconds: float = Field(ge=0, description="Wall-clock seconds of the method's phases so far.")
    test_loss: float | None = Field(
        description="Test-image-weighted mean of `test_loss_per_task` (None: nothing to measure it on)."
    )
    test_loss_per_task: dict[str, float] = Field(description="Mean VAE test loss per task covered.")
    per_edge: dict[str, EdgeCost] = Field(description="Each participating edge's own costs so far.")
    quality: list[QualityMeasure] = Field(
        default_factory=list, description="FID/KID per task, where image quality was measured at this point."
    )

    @property
    def bytes_per_edge(self) -> float:
        return self.bytes_sent_per_edge + self.bytes_received_per_edge


class MethodCurve(StrictModel):
    """One method's points, in the order it reached them."""

    name: str = Field(description="Unique key: baim:<strategy>, fedavg, fedavg_finetune, cloud_only, "
                      "edge:<edge id>, centralised.")  # fmt: skip
    family: MethodFamily = Field(description="Which kind of method.")
    label: str = Field(description="A short label for tables and plots.")
    description: str = Field(description="What ran, in words.")
    step_name: Literal["epoch", "round", "local epoch"] = Field(description="What `step` counts.")
    privacy_violating: bool = Field(description="True when raw edge data left the edges (the reference).")
    tasks: list[str] = Field(description="The tasks its test loss covers.")
    cap: int = Field(ge=0, description="The most steps the method was allowed (its budget).")
    stop_reason: str = Field(description="Why its curve ends: round_cap, plateau, target, epochs, converged.")
    points: list[CurvePoint] = Field(description="The measured points.")
    samples: str | None = Field(description="Its sample grid (PNG) relative to the output folder, or None.")
    note: str = Field(default="", description="Anything a reader must know to read the curve right.")


class TimeToQualityRow(StrictModel):
    """What one method needed to reach the target (after FedScale's time-to-accuracy)."""

    method: str = Field(description="MethodCurve.name.")
    label: str = Field(description="MethodCurve.label.")
    target_loss: float = Field(description="The target for this method's tasks (mean of their targets).")
    reached: bool = Field(description="Whether a measured point reached test loss <= target.")
    step: int | None = Field(description="The first point's step that reached it (None: not reached).")
    bytes_per_edge: float | None = Field(description="Sent + received per edge at that point.")
    bytes_sent_per_edge: float | None = Field(description="Sent per edge at that point.")
    edge_flops_per_edge: float | None = Field(description="Edge FLOPs per edge at that point.")
    cloud_flops: int | None = Field(description="Cloud FLOPs at that point.")
    wall_seconds: float | None = Field(description="Wall-clock seconds at that point.")
    best_loss: float | None = Field(description="The method's best measured test loss.")
    cap: int = Field(description="The method's step budget.")
    step_name: str = Field(description="What the cap counts.")


class TimeToQuality(StrictModel):
    """The headline table: per method, the cost of first reaching the target test loss."""

    target_loss: float = Field(description="Target mean test loss over every task.")
    target_per_task: dict[str, float] = Field(description="Per-task targets (the source point's losses).")
    target_source: str = Field(description="Where the target comes from.")
    rows: list[TimeToQualityRow] = Field(description="One per method.")


class GoalCheck(StrictModel):
    """The project's goal: the BAIM reaches FedAvg's converged loss at >= 20x fewer bytes per edge and
    >= 10x fewer edge FLOPs. Measured, reported either way."""

    fedavg_converged_loss: float | None = Field(description="FedAvg's best test loss within its cap.")
    baim_method: str | None = Field(description="The BAIM strategy that reached it first (fewest bytes).")
    reached: bool = Field(description="Whether any BAIM strategy reached FedAvg's converged loss.")
    bytes_ratio: float | None = Field(description="FedAvg's bytes per edge / the BAIM's, at that loss.")
    edge_flops_ratio: float | None = Field(description="FedAvg's edge FLOPs / the BAIM's, at that loss.")
    bytes_goal: float = Field(description="The bytes ratio aimed at.")
    edge_flops_goal: float = Field(description="The edge FLOPs ratio aimed at.")
    met: bool = Field(description="Both ratios at or above their goals.")
    text: str = Field(description="The outcome in one sentence.")


class ImageQualityInfo(StrictModel):
    enabled: bool = Field(description="Whether FID/KID were measured.")
    extractor: str = Field(description="The feature extractor's name ('' when not measured).")
    num_samples: int = Field(description="Generated and real images per set.")
    reason: str = Field(default="", description="Why not measured, when not.")
    real_floor: dict[str, float] = Field(
        default_factory=dict, description="FID of half the real test images vs the other half, per task."
    )


class Comparison(StrictModel):
    """comparison.json: every method's curve on the same edges, shards and test set."""

    format_version: int = Field(default=COMPARISON_FORMAT_VERSION, description="The file's format.")
    scenario: str = Field(description="The scenario's name.")
    seed: int = Field(description="The scenario's seed.")
    data: str = Field(description="Which data: celeba (with its root) or procedural.")
    resolution: int = Field(description="Image side in pixels.")
    test_images: dict[str, int] = Field(description="Test images per task (the same for every method).")
    settings: CompareConfig = Field(description="The compare section as used (defaults filled).")
    cloud_trainer: str = Field(
        description="cloud.trainer of the BAIM's rounds (auto, ray_train or local; each strategy's record in "
        "baim-run/report.json says which runner ran).",
    )
    methods: list[MethodCurve] = Field(description="Every method's curve.")
    time_to_quality: TimeToQuality | None = Field(description="The headline table (None: no BAIM curve).")
    goal: GoalCheck | None = Field(description="The goal, measured (None: no BAIM or no FedAvg curve).")
    image_quality: ImageQualityInfo = Field(description="How FID/KID were measured.")
    phase_seconds: dict[str, float] = Field(description="Wall-clock seconds of each phase of the compare.")
    baim_run: str = Field(description="The BAIM run's own output folder (report.json, registry).")

    def method(self, name: str) -> MethodCurve:
        for curve in self.methods:
            if curve.name == name:
                return curve
        raise KeyError(f"unknown method {name!r}; methods: {', '.join(c.name for c in self.methods)}")


def comparison_reference_markdown() -> str:
    """docs/comparison.md: the comparison.json schema, generated from these models."""
    sections: list[tuple[str, type[StrictModel]]] = [
        ("Comparison (top level)", Comparison),
        ("methods[]", MethodCurve),
        ("methods[].points[]", CurvePoint),
        ("methods[].points[].per_edge.<edge id>", EdgeCost),
        ("methods[].points[].quality[]", QualityMeasure),
        ("time_to_quality", TimeToQuality),
        ("time_to_quality.rows[]", TimeToQualityRow),
        ("goal", GoalCheck),
        ("image_quality", ImageQualityInfo),
    ]
    lines = [
        "# comparison.json",
        "",
        "<!-- Generated by `baim schema --comparison --out docs/comparison.md` from "
        "orchestrator/core/comparison.py. Do not edit by hand. -->",
        "",
        "`baim compare SCENARIO --out DIR` writes `DIR/comparison.json`: every method as a curve of measured",
        "points on the same edges, shards and test set. Read it with",
        "`Comparison.model_validate_json(text)` (`orchestrator.core.comparison`); unknown keys are errors.",
        "`settings` is the scenario's `compare` section as used (docs/scenario-reference.md, `compare`).",
        "",
        "Every cost is measured: bytes are serialized sizes that crossed an edge's link (its upload,",
        "FedAvg's global models and updates, the task-model download, or, for the centralised reference,",
        "its raw shard as uint8 pixels); FLOPs come from `torch.utils.flop_counter.FlopCounterMode`;",
        "seconds are wall-clock. Test losses are the VAE loss (reconstruction + `cloud.kld_weight` x",
        "KLD) with seeded noise on each task's test split; `test_loss` is their test-image-weighted",
        "mean.",
        "",
    ]
    return "\n".join(lines + model_field_tables(sections))
