"""report.json as pydantic models (`RunReport`), and the edge reports that reach the driver on the way.

The sections and where each is built: docs/ARCHITECTURE.md ("report.json"). DESIGN.md lists what report.json
must hold at least; `RunReport.model_dump(mode="json")` is the file.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    Discriminator,
    Field,
    JsonValue,
    SerializerFunctionWrapHandler,
    Tag,
    model_serializer,
    model_validator,
)

from orchestrator.core.receipts import (
    Admission,
    LearnerPruning,
    NewTaskRecord,
    PublishedTaskModel,
    RoundError,
    RoundRecord,
    StrategyRun,
    UploadPhase,
    UploadReceipt,
)
from orchestrator.core.scenario import Scenario, StrictModel

# 2: cloud-trainer choice and fixed start-up per strategy run, download kinds, personalisation methods.
REPORT_FORMAT_VERSION = 2
# The sections the end-of-run measurements add (orchestrator.evaluation); absent from report.json without.
EVALUATION_SECTIONS = (
    "baselines",
    "downloads",
    "personalisation",
    "relay",
    "placements",
    "image_quality",
    "evaluation",
)


ReportModel = StrictModel  # a report section: unknown keys are errors, NaN and infinities stay numbers


class SparseReportModel(ReportModel):
    """A record whose optional keys are written only when they were given (as the JSON it mirrors)."""

    @model_serializer(mode="wrap")
    def _given_keys_only(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        return {key: value for key, value in data.items() if key in self.model_fields_set}


# --------------------------------------------------------------------------------------------------------
# Edge -> driver (JSON strings returned by EdgeNode; parsed and validated by the driver)

EdgeNodeStatus = Literal[
    "created",  # constructed, run() not called yet
    "training",
    "uploading",  # trained; waiting out the simulated link or the coordinator's receipt
    "accepted",  # the coordinator accepted the upload (final)
    "rejected",  # the coordinator rejected the upload with a reason (final)
    "left",  # left gracefully before uploading (final)
    "upload_failed",  # the coordinator stayed unreachable for every attempt (final)
]


class EdgeReport(ReportModel):
    """What an EdgeNode reports about itself (`progress()` and `run()`)."""

    edge_id: str = Field(description="The edge's id.")
    task: str = Field(description="The edge's task.")
    status: EdgeNodeStatus = Field(description="Where the edge is in its life (final from accepted on).")
    epoch: int = Field(ge=0, description="Local epochs finished.")
    epochs: int = Field(ge=0, description="Local epochs planned.")
    steps: int = Field(ge=0, description="Training steps taken.")
    train_loss: float | None = Field(description="Mean training loss of the last epoch; None before one.")
    validation_loss: list[float] = Field(
        default_factory=list,
        description="Loss on the held-out part of the edge's own shard after each epoch (early stopping).",
    )
    best_epoch: int | None = Field(
        default=None, description="The epoch whose weights were uploaded (early stopping), else None."
    )
    shard_size: int = Field(ge=0, description="Images in the edge's private shard.")
    receipt: dict[str, JsonValue] | None = Field(
        description="The coordinator's receipt of the upload; None before one arrived."
    )
    error: str | None = Field(description="Why the upload failed (status upload_failed), else None.")
    ledger: dict[str, Any] = Field(description="The edge's own cost ledger (Ledger.to_dict()).")


class FedAvgClientReport(ReportModel):
    """What an EdgeNode reports about one FedAvg round it trained (`fedavg_round`)."""

    edge_id: str = Field(description="The edge's id.")
    round: int = Field(ge=1, description="The server round.")
    status: Literal["trained", "left"] = Field(description="trained, or left during the round (no update).")
    train_loss: float | None = Field(default=None, description="Training loss of the last local epoch.")
    train_seconds: float = Field(
        default=0.0, ge=0, allow_inf_nan=False, description="Seconds of local training this round."
    )
    flops: int = Field(default=0, ge=0, description="Training FLOPs this round (FlopCounterMode).")
    poisoned: str | None = Field(default=None, description="The poison mode applied to the update, if any.")


# --------------------------------------------------------------------------------------------------------
# report.json: the BAIM run


class DataReport(ReportModel):
    kind: Literal["celeba", "procedural"] = Field(description="Which data the run used.")
    root: str = Field(description="The CelebA folder looked at (also when the procedural set was used).")
    num_images: int = Field(description="Images in the data source.")
    test_split_drawn: bool = Field(description="True: the test split was drawn from the training pool.")
    partition_counts: dict[str, int] = Field(description="Images per official partition (train/valid/test).")
    resolution: int = Field(description="Image side in pixels.")
    shards: dict[str, dict[str, int]] = Field(
        description="Images per split group (test, cloud, holdout per task; edges per edge id)."
    )


class EdgeUpload(ReportModel):
    outcome: Literal["accepted", "rejected", "none"] = Field(description="none: no receipt at all.")
    reason: str = Field(description="Rejection code (orchestrator.core.errors.REJECTION_CODES), or ''.")
    detail: str = Field(description="Rejection detail (expected vs received), or ''.")
    sha256: JsonValue = Field(description="The upload's sha256 as sent, or None without a receipt.")
    artifact: str | None = Field(description="Registry artifact owner@version of an accepted upload.")
    receipt_from: Literal["edge", "coordinator", "none"] = Field(
        description="Whose receipt this is: coordinator when the edge died before its receipt arrived."
    )
    admission: Admission | None = Field(
        default=None,
        description=(
            "The coordinator's last word on an accepted upload: admitted (its learner is in the BAIM), "
            "registry_only (cloud.max_learners_per_task, or its learner came in already) or pruned (removed "
            "by model-level pruning after the round); None: not accepted."
        ),
    )
    decision_seconds: float | None = Field(
        default=None,
        description="From received (bytes durable) to accepted or rejected, in seconds (None: not both).",
    )


class EdgeRow(ReportModel):
    """One edge of the BAIM run."""

    task: str = Field(description="The edge's task.")
    status: str = Field(description="Final status (accepted, rejected, left, crashed, died, ...).")
    error: str | None = Field(description="Why the edge ended as it did, when it was not a clean end.")
    resources: dict[str, float] = Field(description="Ray resources the edge's actor declared.")
    shard_size: int = Field(description="Images in the edge's private shard.")
    epochs_done: int = Field(description="Local epochs finished.")
    local_epochs: int = Field(description="Local epochs planned.")
    validation_loss: list[float] = Field(
        default_factory=list,
        description="Loss on the held-out part of the edge's own shard after each epoch (early stopping).",
    )
    best_epoch: int | None = Field(
        default=None, description="The epoch whose weights were uploaded (early stopping), else None."
    )
    bytes_sent: int = Field(description="Serialized bytes the edge sent (every upload attempt).")
    bytes_received: int = Field(description="Bytes the edge received during the run.")
    flops: int = Field(description="Training FLOPs at the edge (FlopCounterMode).")
    train_seconds: float = Field(description="Wall-clock seconds of local training.")
    upload_seconds: float = Field(description="Wall-clock seconds of uploading (simulated link included).")
    upload: EdgeUpload = Field(description="The upload's outcome.")
    costs_are_final: bool = Field(description="False when the edge died: its costs stop at its last report.")


class UploadRecord(ReportModel):
    """One upload receipt of the coordinator (edge id, version and sha256 as the uploader sent them)."""

    edge_id: JsonValue = Field(description="The uploading edge's id, as sent.")
    version: JsonValue = Field(description="The model version, as sent.")
    accepted: bool = Field(description="Whether the coordinator stored and fused the upload.")
    reason: str = Field(description="Rejection code, or ''.")
    detail: str = Field(description="Rejection detail, or ''.")
    sha256: JsonValue = Field(description="The sha256 the uploader declared.")
    artifact: str | None = Field(description="Registry artifact owner@version of an accepted upload.")
    holdout_loss: float | None = Field(
        default=None, description="The plausibility check's loss on the task's held-out images, or None."
    )
    admission: Admission | None = Field(
        default=None,
        description="admitted, registry_only or pruned (accepted uploads); None when not accepted.",
    )
    admission_detail: str = Field(
        default="", description="Why it was kept only in the registry or pruned, or whom it replaced."
    )
    status: UploadPhase | None = Field(
        default=None,
        description=(
            "received (bytes durable, not decided: the run ended first), accepted or rejected; None in "
            "reports written before two-phase receipts."
        ),
    )
    received_at: float | None = Field(
        default=None, description="Unix seconds when its bytes were durable (None: rejected before that)."
    )
    decided_at: float | None = Field(
        default=None, description="Unix seconds when it was accepted or rejected (None: undecided)."
    )

    @classmethod
    def from_receipt(cls, receipt: UploadReceipt) -> UploadRecord:
        """The report's fields of a coordinator receipt."""
        return cls.model_validate({key: getattr(receipt, key) for key in cls.model_fields})


class StrategyRound(ReportModel):
    """One strategy's run in one round; in JSON the run's keys follow `round` in one object."""

    round: int = Field(description="The round.")
    run: StrategyRun = Field(description="The strategy's run in that round.")

    @model_validator(mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        if isinstance(value, dict) and "run" not in value:
            return {"round": value.get("round"), "run": {k: v for k, v in value.items() if k != "round"}}
        return value

    @model_serializer(mode="wrap")
    def _flat(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        return {"round": data["round"], **data["run"]}


class StrategyTotals(ReportModel):
    flops: int = Field(description="Cloud FLOPs of this strategy, every round.")
    seconds: float = Field(description="Cloud training seconds of this strategy, every round.")
    rounds: list[StrategyRound] = Field(description="This strategy's run in each round.")


class CloudReport(ReportModel):
    strategies: dict[str, StrategyTotals] = Field(description="Per training strategy.")
    flops: dict[str, int] = Field(description="Cloud FLOPs per strategy (the ledger's).")
    seconds: dict[str, float] = Field(description="Cloud training seconds per strategy (the ledger's).")
    rounds: list[RoundRecord] = Field(description="The coordinator's training rounds.")
    round_errors: list[RoundError] = Field(description="Round indexes that failed.")
    baim_version: str | None = Field(description="The last trained BAIM's registry version.")
    baim_params: int = Field(description="Parameters of the BAIM (trained or fused).")
    learners: list[str] = Field(description="Learners in the BAIM.")
    untrained_learners: list[str] = Field(description="Learners no successful round trained.")
    coordinator_restarts: int = Field(description="How often the coordinator resumed from its checkpoint.")
    new_tasks: list[NewTaskRecord] = Field(
        default_factory=list, description="Tasks that appeared with a few shots (new_task events)."
    )
    learner_pruning: LearnerPruning | None = Field(
        default=None, description="Model-level pruning before decomposition (None: not configured)."
    )


class UploadCounts(ReportModel):
    accepted: int = Field(description="Uploads accepted.")
    rejected: dict[str, int] = Field(description="Uploads rejected, per reason code.")


class Totals(ReportModel):
    edge_bytes_sent: int = Field(description="Bytes every edge sent.")
    edge_bytes_received: int = Field(description="Bytes every edge received.")
    edge_flops: int = Field(description="FLOPs at every edge.")
    cloud_flops: int = Field(description="FLOPs in the cloud, every strategy.")
    uploads: UploadCounts = Field(description="Upload outcomes, counted by the ledger.")
    wall_seconds: float = Field(description="Wall-clock seconds of the BAIM run.")
    simulated_seconds: float | None = Field(
        default=None,
        description="Simulated seconds of the run on the virtual clock (time: virtual), else None.",
    )


EventKind = Literal[
    "edge_spawned",
    "run_started",
    "edge_final",
    "round_failed",
    "coordinator_crash",
    "join",
    "leave",
    "crash",
    "slow",
    "link",
    "poison",
    "client_spawned",
    "client_up",
    "clients_still_starting",
    "fedavg_started",
    "new_task",
]


class RunEvent(SparseReportModel):
    """One entry of a run's event log (the timeline as it was played, and what the driver saw)."""

    t: float = Field(description="Seconds since the run's t = 0.")
    kind: EventKind = Field(description="What happened.")
    edge: str | None = Field(default=None, description="The edge it concerns.")
    edges: str | None = Field(default=None, description="Comma-separated edges it concerns.")
    task: str | None = Field(default=None, description="The task it concerns (a new_task event).")
    reason: str | None = Field(default=None, description="Why an edge was spawned.")
    status: str | None = Field(default=None, description="The edge's status after it.")
    round: int | None = Field(default=None, description="The cloud round it concerns.")
    attempt: int | None = Field(default=None, description="The round's attempt.")
    error: str | None = Field(default=None, description="The error, if any.")
    at: float | None = Field(default=None, description="The timeline event's at_seconds.")
    where: str | None = Field(default=None, description="The timeline event, as timeline.<index>.")
    applied: bool | None = Field(default=None, description="False: the event could not act.")
    note: str | None = Field(default=None, description="Why it was not applied.")


# --------------------------------------------------------------------------------------------------------
# report.json: the end-of-run measurements (orchestrator.evaluation, orchestrator.baselines.fedavg)


class LearnerModel(ReportModel):
    kind: Literal["learner"] = Field(description="Always learner.")
    widths: list[int] = Field(description="Channels of each encoder stage.")
    latent_dim: int = Field(description="Latent size.")
    resolution: int = Field(description="Image side.")
    in_channels: int = Field(description="Image channels.")


class FedAvgFailure(ReportModel):
    edge: str = Field(description="The client.")
    reason: str = Field(description="crashed, left, died, timed_out, failed, rejected, ...")
    detail: str = Field(description="What happened.")


class FedAvgRound(ReportModel):
    round: int = Field(description="Server round, from 1.")
    available: list[str] = Field(description="Clients up at the round's start.")
    selected: list[str] = Field(description="Clients sampled for the round.")
    aggregated: list[str] = Field(description="Clients whose update was averaged in.")
    failures: list[FedAvgFailure] = Field(description="Selected clients that contributed nothing.")
    global_updated: bool = Field(description="False: the global model was kept.")
    global_model_bytes: int = Field(description="Serialized bytes of the global model sent to each client.")
    test_loss_per_task: dict[str, float] = Field(description="The new global model's test loss per task.")
    test_loss: float | None = Field(description="Test-image-weighted mean over tasks.")
    seconds: float = Field(description="Wall-clock seconds of the round.")
    bytes_sent: dict[str, int] = Field(
        default_factory=dict, description="Per client: serialized bytes of the update it sent this round."
    )
    bytes_received: dict[str, int] = Field(
        default_factory=dict, description="Per client: serialized bytes of the global model it received."
    )
    flops: dict[str, int] = Field(default_factory=dict, description="Per client: training FLOPs this round.")
    aggregation_flops: int = Field(
        default=0, description="Cloud FLOPs of this round's aggregation (FlopCounterMode: matmuls, convs)."
    )


class ClientFailure(ReportModel):
    round: int = Field(description="The round (0: while starting).")
    reason: str = Field(description="Why the client contributed nothing.")
    detail: str = Field(description="What happened.")


class FedAvgEdgeRow(ReportModel):
    task: str = Field(description="The client's task.")
    status: str = Field(description="not_joined, starting, ready, crashed, left, died, unschedulable.")
    shard_size: int = Field(description="Images in the client's shard.")
    rounds_aggregated: list[int] = Field(description="Rounds whose update was averaged in.")
    failures: list[ClientFailure] = Field(description="Rounds the client failed.")
    bytes_sent: int = Field(description="Bytes the client sent (its updates).")
    bytes_received: int = Field(description="Bytes the client received (the global models).")
    flops: int = Field(description="Training FLOPs at the client.")
    train_seconds: float = Field(description="Seconds of local training, every round.")


class FedAvgTotals(ReportModel):
    edge_bytes_sent: int = Field(description="Bytes every client sent.")
    edge_bytes_received: int = Field(description="Bytes every client received.")
    edge_flops: int = Field(description="FLOPs at every client.")
    seconds: float = Field(description="Seconds of every round.")


class FedAvgReport(ReportModel):
    """The FedAvg baseline on the same edges and shards."""

    enabled: Literal[True] = Field(description="The baseline ran.")
    model: LearnerModel = Field(description="The one homogeneous model every client trains.")
    params: int = Field(description="Its parameters.")
    aggregation: str = Field(default="mean", description="mean, median, trimmed_mean or krum.")
    stop_reason: Literal["round_cap", "target", "plateau"] = Field(
        default="round_cap", description="Why the rounds ended: the cap, the target loss, or a plateau."
    )
    rounds_planned: int = Field(description="Server rounds planned (the cap).")
    local_epochs: int = Field(description="Local epochs per round.")
    client_fraction: float = Field(description="Fraction of clients sampled per round.")
    weighting: str = Field(description="What the average is weighted by.")
    initial_test_loss_per_task: dict[str, float] = Field(description="The initial model's test loss.")
    initial_test_loss: float | None = Field(description="Test-image-weighted mean over tasks.")
    rounds: list[FedAvgRound] = Field(description="Every server round.")
    final_test_loss_per_task: dict[str, float] = Field(description="The final model's test loss per task.")
    final_test_loss: float | None = Field(description="Test-image-weighted mean over tasks.")
    edges: dict[str, FedAvgEdgeRow] = Field(description="Per client.")
    cloud_flops: int = Field(description="Cloud FLOPs of the aggregation.")
    cloud_flops_note: str = Field(description="What the cloud FLOPs count.")
    totals: FedAvgTotals = Field(description="Sums over clients and rounds.")
    events: list[RunEvent] = Field(description="The timeline as the baseline played it.")
    ledger: dict[str, Any] = Field(description="The baseline's cost ledger (Ledger.to_dict()).")


class Disabled(ReportModel):
    enabled: Literal[False] = Field(description="Not measured in this run.")


class DisabledWithReason(Disabled):
    reason: str = Field(description="Why not.")


def _measured_or_disabled(value: Any) -> str | None:
    """The tag of a section that is either measured (`enabled: true`) or not (`enabled: false`)."""
    enabled = value.get("enabled") if isinstance(value, dict) else getattr(value, "enabled", None)
    return {True: "measured", False: "disabled"}.get(enabled) if isinstance(enabled, bool) else None


_ENABLED = Discriminator(
    _measured_or_disabled,
    custom_error_type="enabled",
    custom_error_message="expected a section with `enabled: true` or `enabled: false`",
)
FedAvgSection = Annotated[
    Annotated[FedAvgReport, Tag("measured")] | Annotated[Disabled, Tag("disabled")], _ENABLED
]


class Baselines(ReportModel):
    fedavg: FedAvgSection = Field(description="The FedAvg baseline.")


class Download(ReportModel):
    artifact: str = Field(description="Registry artifact, owner@version.")
    kind: Literal["full", "generation", "baim"] = Field(
        description=(
            "full: the exact task model (reconstruction, personalisation); generation: its generation-only "
            "artifact (no encoders; what Serve generates with); baim: the whole trained BAIM."
        )
    )
    nbytes: int = Field(description="Its serialized size: what an edge downloads.")
    params: int | None = Field(default=None, description="Its parameters.")


class Downloads(ReportModel):
    task_models: dict[str, Download] = Field(
        description="Per task: the published task model (kind full): what a personalising edge downloads."
    )
    generation_models: dict[str, Download] = Field(
        default_factory=dict,
        description="Per task: the generation-only artifact (kind generation), what a generating edge gets.",
    )
    baim: Download | None = Field(description="The whole trained BAIM.")
    strategy_models: dict[str, str] = Field(description="Per strategy: where its trained BAIM was found.")


class PersonalisedEdge(ReportModel):
    task: str = Field(description="The edge's task.")
    model_version: str = Field(description="The task model version downloaded.")
    kind: str = Field(description="The downloaded artifact's spec kind (task_model or learner).")
    download: Literal["full", "generation"] = Field(
        default="full",
        description="Which download: full (the task model, which personalisation fine-tunes) or generation.",
    )
    params: int = Field(description="Its parameters.")
    bytes_received: int = Field(description="Bytes downloaded into the toolbox.")
    epochs: int = Field(description="Personalisation epochs.")
    method: Literal["full", "lora"] = Field(description="Every parameter, or low-rank adapters.")
    trainable_params: int = Field(description="Parameters the fine-tuning trained.")
    upload_bytes: int = Field(
        description="What relaying the result to the cloud costs: the adapters' safetensors bytes (lora), "
        "or the whole model's weights (full)."
    )
    test_loss_before: float = Field(description="Test loss before fine-tuning.")
    test_loss_after: float = Field(description="Test loss after fine-tuning.")
    flops: int = Field(description="Fine-tuning FLOPs.")
    seconds: float = Field(description="Fine-tuning seconds.")


class Personalisation(ReportModel):
    enabled: Literal[True] = Field(description="Edges personalised their task models.")
    where: str = Field(description="Which process did the work.")
    edges: dict[str, PersonalisedEdge] = Field(description="Per edge with an accepted upload.")


class RelayedTask(ReportModel):
    folded: list[str] = Field(description="Edges whose adapters passed validation and were folded in.")
    rejected: dict[str, str] = Field(description="Edges whose adapters were rejected, with the reason.")
    upload_bytes: int = Field(description="Adapter bytes (weights + spec) received from this task's edges.")
    test_loss_before: float = Field(description="The task model's test loss before the relay round.")
    test_loss_after: float = Field(
        description="The task model's test loss after the relay round: the candidate's if the round was "
        "accepted, else the unchanged model's (equal to test_loss_before)."
    )
    candidate_test_loss: float | None = Field(
        default=None,
        description="The relay round's candidate BAIM's test loss for this task, kept or not (None in "
        "reports from before the guard).",
    )


class Relay(ReportModel):
    enabled: Literal[True] = Field(description="Edges relayed their adapters back to the cloud.")
    where: str = Field(description="Which process did the work.")
    method: Literal["fold_own", "distil", "average"] = Field(
        default="average", description="How the adapters were taken in (personalisation.relay_method)."
    )
    gate_epochs: int = Field(description="Epochs of gate training on the cloud's data after folding.")
    distil_epochs: int = Field(default=0, description="Epochs of distillation on the cloud's data (distil).")
    guarded: bool = Field(
        default=False, description="The round's BAIM was kept only if no task's held-out loss rose."
    )
    accepted: bool = Field(
        default=True, description="The round's BAIM replaced the previous one (always, when not guarded)."
    )
    holdout_loss_before: dict[str, float] = Field(
        default_factory=dict,
        description="Per task with held-out images: the cloud's held-out loss before the round.",
    )
    holdout_loss_after: dict[str, float] = Field(
        default_factory=dict, description="Per task: the candidate BAIM's held-out loss, kept or not."
    )
    distillation_loss_before: float | None = Field(
        default=None,
        description="Distil: the student's mean squared difference to its teachers on the cloud batches "
        "before the round.",
    )
    distillation_loss_after: float | None = Field(
        default=None, description="Distil: the same for the candidate after the round."
    )
    baim_version: str | None = Field(
        default=None, description="The BAIM version the accepted round published (None: nothing published)."
    )
    task_versions: dict[str, str] = Field(
        default_factory=dict, description="Per task: the task model artifact the accepted round published."
    )
    tasks: dict[str, RelayedTask] = Field(description="Per task with at least one relayed adapter.")


class PlacementRow(ReportModel):
    name: str = Field(description="all_cloud, all_edge or split_after_<k>.")
    cut: int | None = Field(description="The decoder stage after which it is split; None for the extremes.")
    edge_flops: int = Field(description="FLOPs the edge runs per request (counted).")
    cloud_flops: int = Field(description="FLOPs the cloud runs per request (counted).")
    uplink_bytes: int = Field(description="Bytes edge -> cloud per request (serialized sizes).")
    downlink_bytes: int = Field(description="Bytes cloud -> edge per request.")
    latency_s: float = Field(
        description="Seconds from a user's request to its images under the link model: user <-> edge "
        "transfers, edge <-> cloud transfers, and each side's FLOPs at its declared speed (no queueing)."
    )
    edge_utilisation: float = Field(
        description="Fraction of the edge's declared compute the users' request rate keeps busy (>= 1: the "
        "edge cannot keep up and requests queue without bound)."
    )


class EdgePlacements(ReportModel):
    task: str = Field(description="The edge's task.")
    users: int = Field(description="End users behind the edge.")
    requests_per_second: float = Field(description="Requests per second from all of them.")
    images_per_request: int = Field(description="Images per request.")
    chosen: str = Field(description="The placement of least latency (the cost model's choice).")
    placements: list[PlacementRow] = Field(
        description="Every placement, measured: all_cloud, splits, all_edge."
    )


class Placements(ReportModel):
    enabled: Literal[True] = Field(description="Placements of user requests were measured.")
    cloud_gflops: float = Field(description="Declared compute of a Serve replica, GFLOP/s.")
    edges: dict[str, EdgePlacements] = Field(description="Per edge with users.")


class QualitySet(ReportModel):
    phase: str = Field(description="edge_initial, strategy, personalised or fedavg.")
    name: str = Field(description="Which model of the phase.")
    task: str = Field(description="The task whose real images it is compared with.")
    fid: float = Field(description="Fréchet distance to the real test images.")
    kid_mean: float = Field(description="KID, mean over subsets.")
    kid_std: float = Field(description="KID, standard deviation over subsets.")
    num_generated: int = Field(description="Generated images.")
    num_real: int = Field(description="Real images.")
    kid_subset_size: int = Field(description="Images per KID subset.")


class RealReference(ReportModel):
    fid_real_half_vs_half: float = Field(description="FID of two disjoint halves of the real images.")
    num_per_half: int = Field(description="Images per half.")


class ImageQuality(ReportModel):
    enabled: Literal[True] = Field(description="FID and KID were measured.")
    extractor: str = Field(description="The feature extractor's name.")
    feature_dim: int = Field(description="Its feature size.")
    num_generated: int = Field(description="Generated images per set.")
    num_real: dict[str, int] = Field(description="Real test images per task.")
    kid_subsets: int = Field(description="KID subsets drawn.")
    real_reference: dict[str, RealReference] = Field(description="Per task: the real-vs-real floor.")
    sets: list[QualitySet] = Field(description="Every measured set.")
    generation_seed: int = Field(description="The seed every set was generated with.")


PersonalisationSection = Annotated[
    Annotated[Personalisation, Tag("measured")] | Annotated[Disabled, Tag("disabled")], _ENABLED
]
PlacementsSection = Annotated[
    Annotated[Placements, Tag("measured")] | Annotated[Disabled, Tag("disabled")], _ENABLED
]
RelaySection = Annotated[Annotated[Relay, Tag("measured")] | Annotated[Disabled, Tag("disabled")], _ENABLED]
ImageQualitySection = Annotated[
    Annotated[ImageQuality, Tag("measured")] | Annotated[DisabledWithReason, Tag("disabled")], _ENABLED
]


class EvaluationInfo(ReportModel):
    seconds: dict[str, float] = Field(description="Seconds per measurement stage.")
    fid_samples: int = Field(description="Images per FID/KID set.")
    grid_samples: int = Field(description="Images per sample grid.")
    personalise_epochs: int = Field(description="Personalisation epochs per edge.")
    generation_seed: int = Field(description="The seed of every generated image.")
    samples_dir: str = Field(description="Folder of the sample tensors, under the run's output folder.")


# --------------------------------------------------------------------------------------------------------
# report.json


class RunReport(ReportModel):
    """report.json: what a run did and what it cost."""

    format_version: int = Field(description="This document's format version.")
    run_id: str | None = Field(description="The engine's id of the run (the coordinator state has it too).")
    failure: str | None = Field(description="Why the run failed (no task models published), else None.")
    scenario: Scenario = Field(description="The scenario, as validated.")
    seed: int = Field(description="The scenario's seed.")
    data: DataReport = Field(description="Which data, and the partition sizes.")
    edges: dict[str, EdgeRow] = Field(description="Per edge id.")
    uploads: list[UploadRecord] = Field(
        description="Every accepted receipt and the newest rejected ones per edge (counts are in totals)."
    )
    cloud: CloudReport = Field(description="Cloud training: rounds, costs per strategy, the BAIM.")
    tasks: dict[str, PublishedTaskModel] = Field(description="Per task: the published task model.")
    totals: Totals = Field(description="Sums over edges and strategies.")
    events: list[RunEvent] = Field(description="The timeline as it was played.")
    registry: str = Field(description="The run's registry (a folder or a pyarrow.fs URI).")
    ledger: dict[str, Any] = Field(description="The merged cost ledger (Ledger.to_dict()).")
    baselines: Baselines | None = Field(default=None, description="Baselines that ran (measurements).")
    downloads: Downloads | None = Field(default=None, description="What an edge downloads (measurements).")
    personalisation: PersonalisationSection | None = Field(
        default=None, description="Edges fine-tuning their task models (measurements)."
    )
    relay: RelaySection | None = Field(
        default=None, description="Personalised adapters folded back into the BAIM (GaisNet's relay)."
    )
    placements: PlacementsSection | None = Field(
        default=None, description="Where end users' generation requests run: cloud, edge or split."
    )
    image_quality: ImageQualitySection | None = Field(
        default=None, description="FID/KID of every phase (measurements)."
    )
    evaluation: EvaluationInfo | None = Field(default=None, description="How the measurements ran.")

    @model_serializer(mode="wrap")
    def _measured_sections_only(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        return {
            key: value for key, value in data.items() if key not in EVALUATION_SECTIONS or value is not None
        }
