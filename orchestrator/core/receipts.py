"""What the cloud coordinator hands out: upload receipts, round records and errors, status and summary.

Typed contracts (pydantic, `extra="forbid"`); over Ray and into report.json they travel as their
`model_dump()`, whose keys are the ones listed here, in this order.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from orchestrator.core.metrics import LedgerSnapshot
from orchestrator.core.scenario import StrictModel

# What an upload named, echoed in its receipt: an actor call can carry any value, so a receipt keeps a JSON
# scalar as sent and anything else as its (cut) repr.
Echo = str | int | float | bool | None
ECHO_REPR_CHARS = 100
Admission = Literal["admitted", "registry_only", "pruned"]
UploadPhase = Literal["received", "accepted", "rejected"]


def echo(value: object) -> Echo:
    """`value` itself when it is a JSON scalar, else its repr cut to ECHO_REPR_CHARS."""
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return repr(value)[:ECHO_REPR_CHARS]


class UploadReceipt(StrictModel):
    """The coordinator's answer to one upload: a pure function of the upload and its outcome.

    Two phases: `received` (its bytes are durable in the registry, validation follows) and then `accepted`
    or `rejected`; an upload that fails the checks run before storing it (unknown edge, size, sha256) is
    `rejected` at once, without having been received.
    """

    key: str = Field(description="edge_id@version#sha256 of the upload (each part cut): its identity.")
    edge_id: Echo = Field(description="The edge id the upload named.")
    version: Echo = Field(description="The version the upload named (an int >= 1 when accepted).")
    sha256: Echo = Field(description="The sha256 the upload declared.")
    accepted: bool = Field(description="True once the upload is validated and its artifact is durable.")
    reason: str = Field(description="Short rejection code (empty when accepted).")
    detail: str = Field(description="What was wrong, in words (empty when accepted).")
    learner: str | None = Field(description="The BAIM learner name of an accepted upload.")
    artifact: str | None = Field(description="owner@version of an accepted upload in the registry.")
    holdout_loss: float | None = Field(
        default=None,
        description="The plausibility check's loss on its task's held-out images (None: rejected).",
    )
    admission: Admission | None = Field(
        default=None,
        description=(
            "What became of an accepted upload (None: not accepted). admitted: its learner is in the BAIM. "
            "registry_only: stored, not fused (cloud.max_learners_per_task, or its learner was in already). "
            "pruned: admitted and trained, then removed by model-level pruning (cloud.min_selection_rate)."
        ),
    )
    admission_detail: str = Field(
        default="", description="Why it was kept only in the registry or pruned, or whom it replaced."
    )
    status: UploadPhase = Field(
        description="received: bytes durable, not decided yet; then accepted or rejected (final).",
    )
    received_at: float | None = Field(
        default=None,
        description="Unix seconds when its bytes were durable (None: rejected before it was stored).",
    )
    decided_at: float | None = Field(
        default=None, description="Unix seconds when it was accepted or rejected (None: not decided yet)."
    )


CHOSEN_BY = (
    "Why this runner trained it: 'cloud.trainer: <name>' when the scenario named it, or the auto rule with "
    "the estimated FLOPs and the threshold (cloud.trainer: auto)."
)


class LocalStrategyRun(StrictModel):
    """One strategy of a round trained in the coordinator's process (`orchestrator.cloud.local`)."""

    train_loss: list[float] = Field(description="Sample-weighted mean training loss per epoch.")
    test_loss: list[float | None] = Field(
        description="Mean test loss over every task's test images, per epoch (None: not evaluated)."
    )
    flops: int = Field(ge=0, description="Training FLOPs (forward + backward), every step counted.")
    seconds: float = Field(ge=0, description="Wall-clock seconds of the strategy's training.")
    epochs: int = Field(ge=1, description="Epochs trained.")
    connections: list[int] = Field(description="Surviving linear projection connections after each epoch.")
    runner: Literal["local"] = Field(description="Which runner trained it.")
    chosen_by: str = Field(description=CHOSEN_BY)
    test_loss_per_task: list[dict[str, float]] = Field(
        default_factory=list, description="Mean test loss per task, per epoch ({}: not evaluated after it)."
    )
    flops_per_epoch: list[int] = Field(default_factory=list, description="Training FLOPs of each epoch.")
    seconds_per_epoch: list[float] = Field(
        default_factory=list, description="Wall-clock seconds of each epoch (train, prune, evaluate)."
    )


class RayTrainStrategyRun(StrictModel):
    """One strategy of a round trained as a Ray Train job (`orchestrator.cloud.ray_train`)."""

    runner: Literal["ray_train"] = Field(description="Which runner trained it.")
    epochs: int = Field(ge=1, description="Epochs trained.")
    train_loss: list[float] = Field(description="Sample-weighted mean training loss per epoch, all ranks.")
    test_loss: list[float | None] = Field(
        description="Mean test loss over every task's test images, per epoch (None: not evaluated)."
    )
    test_loss_per_task: list[dict[str, float]] = Field(
        description="Mean test loss per task, per epoch (empty: not evaluated)."
    )
    initial_test_loss: float | None = Field(description="Test loss before training (None when resumed).")
    final_test_loss: float = Field(description="Test loss after the last epoch.")
    flops: int = Field(ge=0, description="Training FLOPs of the run, all ranks and epochs.")
    seconds: float = Field(ge=0, description="Sum of the epochs' wall-clock seconds (slowest rank).")
    wall_seconds: float = Field(ge=0, description="Wall-clock seconds of the whole job (start-up included).")
    num_workers: int = Field(ge=1, description="Ray Train workers.")
    use_gpu: bool = Field(description="Whether each worker used a GPU.")
    resumed_at_epochs: list[int] = Field(description="Epochs at which a restarted attempt resumed.")
    connections: list[int] = Field(description="Surviving linear projection connections after each epoch.")
    checkpoint_uri: str = Field(description="The run's final Ray Train checkpoint (a path or scheme://path).")
    fixed_seconds: float = Field(
        description="Seconds of the job outside its epochs: start-up (workers, imports, data) and teardown."
    )
    chosen_by: str = Field(description=CHOSEN_BY)
    flops_per_epoch: list[int] = Field(
        default_factory=list, description="Training FLOPs of each epoch, all ranks."
    )
    seconds_per_epoch: list[float] = Field(
        default_factory=list, description="Wall-clock seconds of each epoch, slowest rank."
    )


StrategyRun = Annotated[LocalStrategyRun | RayTrainStrategyRun, Field(discriminator="runner")]


class ContinualRound(StrictModel):
    """A round after the first: what it kept fixed and what it did to the tasks that existed before it."""

    mode: Literal["gate_only", "finetune_all"] = Field(description="cloud.continual of the round.")
    frozen_learners: list[str] = Field(description="Learners kept fixed (gate_only: the trained ones).")
    new_learners: list[str] = Field(description="Learners the round admitted (untrained before it).")
    trainable_parameters: int = Field(ge=0, description="Parameters the kept strategy trained.")
    test_loss_before: dict[str, float] = Field(description="Per existing task: test loss before the round.")
    test_loss_after: dict[str, float] = Field(description="Per existing task: test loss after the round.")
    forgetting: dict[str, float] = Field(
        description="Per existing task: after - before (above 0: the round made the task worse)."
    )


class RoundRecord(StrictModel):
    """One trained round."""

    round: int = Field(ge=1, description="Round index (1-based).")
    learners: list[str] = Field(description="The learners the round trained (canonical order).")
    baim_version: str = Field(description="Registry version of the trained BAIM (owner baim).")
    seconds: float = Field(ge=0, description="Wall-clock seconds of the round, as the coordinator waited.")
    strategies: dict[str, StrategyRun] = Field(description="Per strategy: curves, FLOPs, seconds.")
    kept: str | None = Field(
        default=None,
        description=(
            "The strategy whose trained BAIM baim_version holds (cloud.keep); None in records written before "
            "cloud.keep existed, which kept the first strategy."
        ),
    )
    holdout_loss: dict[str, float] | None = Field(
        default=None,
        description="Per strategy: mean loss on the cloud's held-out images (measured when keep is best).",
    )
    continual: ContinualRound | None = Field(
        default=None, description="A round after the first: frozen learners and forgetting (None: first)."
    )


class CloudOnlyVAE(StrictModel):
    """The baseline of a few-shot task: one VAE trained in the cloud on the same k images alone."""

    widths: list[int] = Field(description="Its encoder widths (the scenario's largest edge model).")
    latent_dim: int = Field(description="Its latent size.")
    params: int = Field(ge=0, description="Its parameters.")
    steps: int = Field(ge=1, description="Optimiser steps, each over all k images.")
    test_loss: float = Field(description="Its mean test loss on the new task's test images.")


class NewTaskRecord(StrictModel):
    """A task that appeared with k shots: its few-shot LSGate over the existing learners, and the baseline."""

    task: str = Field(description="The new task's name.")
    expression: str = Field(description="Its attribute expression.")
    shots: int = Field(ge=1, description="Images of it the cloud had (k).")
    members: list[str] = Field(description="Existing learners its new squad selects from.")
    steps: int = Field(ge=1, description="Optimiser steps of the LSGate, each over all k images.")
    gate_parameters: int = Field(ge=0, description="Parameters trained: the new LSGate's alone.")
    test_images: int = Field(ge=0, description="Test images of the new task.")
    test_loss_untrained_gate: float = Field(description="Its task model's test loss before the gate trained.")
    test_loss: float | None = Field(description="The published few-shot task model's test loss.")
    cloud_only_vae: CloudOnlyVAE = Field(description="A VAE trained in the cloud on the same k images.")
    baim_version: str = Field(description="The BAIM version that holds the new squad (owner baim).")
    artifact: str = Field(description="The published task model, owner@version.")
    other_tasks_unchanged: bool = Field(
        description="Every other task's test loss is the same before and after (only the new gate trained)."
    )
    seconds: float = Field(ge=0, description="Wall-clock seconds of the few-shot adaptation and publishing.")


class RemovedLearner(StrictModel):
    """A learner model-level pruning took out of its squads."""

    learner: str = Field(description="The learner.")
    task: str = Field(description="The task of the edge that uploaded it.")
    selection_rate: float = Field(description="Its LSGate selection rate on the cloud's common data.")
    kept_as_feeder: bool = Field(
        description="It still feeds other learners: kept, cut after the last stage they read."
    )


class LearnerPruning(StrictModel):
    """Model-level pruning before decomposition (cloud.min_selection_rate)."""

    threshold: float = Field(description="cloud.min_selection_rate.")
    from_version: str = Field(description="The trained BAIM that was pruned (owner baim).")
    baim_version: str = Field(description="The BAIM the task models were decomposed from (owner baim).")
    images: int = Field(ge=0, description="Cloud images the selection rates were measured on.")
    selection_rates: dict[str, float] = Field(description="Per learner: its selection rate.")
    removed: list[RemovedLearner] = Field(description="The learners taken out of their squads.")
    params_before: int = Field(ge=0, description="BAIM parameters before pruning.")
    params_after: int = Field(ge=0, description="BAIM parameters after pruning.")


class RoundError(StrictModel):
    """A round index whose runner raised; one entry per index, updated by each retry."""

    round: int = Field(ge=1, description="Round index (1-based).")
    attempts: int = Field(ge=1, description="How many times this round was tried.")
    learners: list[str] = Field(description="The learners the last attempt was to train.")
    error: str = Field(description="The last attempt's error: `Type: message`, cut.")


class PublishedGenerationModel(StrictModel):
    """A task model's generation-only artifact (owner generation/<task>): what Serve generates with and an
    edge downloads to generate; no encoders."""

    artifact: str = Field(description="Registry artifact, owner@version (the task model's version).")
    sha256: str = Field(description="Artifact sha256.")
    params: int = Field(ge=0, description="Parameters of the generation-only model.")
    nbytes: int = Field(ge=0, description="Its serialized size (weights + spec).")
    max_abs_diff: float = Field(
        description="Largest |task model - generation model| over generate(n, seed) images, same n and seed."
    )
    images_checked: int = Field(ge=0, description="Images generated for that comparison.")


class PublishedTaskModel(StrictModel):
    """A decomposed task model as published to the registry (owner task/<task>)."""

    params: int = Field(ge=0, description="Parameters of the task model.")
    baim_params: int = Field(ge=0, description="Parameters of the BAIM it was decomposed from.")
    learners: list[str] = Field(description="The learners the task model kept.")
    test_loss: float | None = Field(description="Mean test loss of the task model (None: no test images).")
    test_images: int = Field(ge=0, description="Test images the loss and the difference were measured on.")
    decomposition_max_abs_diff: float = Field(
        description="Largest |BAIM - task model| over the reconstructions of the test images, same noise."
    )
    artifact: str = Field(description="Registry artifact, owner@version (the BAIM's version).")
    sha256: str = Field(description="Artifact sha256.")
    nbytes: int | None = Field(
        default=None, ge=0, description="Serialized size of the full task model (weights + spec)."
    )
    squad_params: int | None = Field(
        default=None, ge=0, description="Parameters of the task's own squad (its members' whole learners)."
    )
    budget_params: int | None = Field(
        default=None,
        ge=0,
        description="The largest task model cloud.task_model_budget allows (None: no budget).",
    )
    generation: PublishedGenerationModel | None = Field(
        default=None, description="The generation-only artifact published beside it (None: not published)."
    )


class CoordinatorStatus(StrictModel):
    """A snapshot for progress displays and tests."""

    accepted: list[Echo] = Field(description="Edge ids of the accepted uploads, in decision order.")
    received: list[Echo] = Field(description="Edge ids of the uploads received and not decided yet.")
    rejected: dict[str, str] = Field(description="Edge id (as text) -> reason of its kept rejected receipts.")
    learners: list[str] = Field(description="Learners of the live BAIM, in fusion order.")
    pending: list[str] = Field(description="Learners not yet in a trained BAIM.")
    rounds: int = Field(ge=0, description="Rounds trained so far.")
    round_running: bool = Field(description="Whether a round is training now.")
    baim_version: str | None = Field(description="Registry version of the last trained BAIM.")
    restarts: int = Field(ge=0, description="How often this coordinator was restarted from its state.")
    round_errors: list[RoundError] = Field(description="Failed round indices, with their last error.")


class CoordinatorSummary(StrictModel):
    """What `finish()` returns (and `summary()`, with no tasks): the cloud's part of report.json."""

    run_id: str | None = Field(description="The run this coordinator belongs to.")
    accepted: list[UploadReceipt] = Field(description="Receipts of the accepted uploads, in decision order.")
    received: list[UploadReceipt] = Field(
        default_factory=list,
        description="Receipts of uploads received and not decided yet (finish() decides every one first).",
    )
    rejected: list[UploadReceipt] = Field(description="The kept rejected receipts (the newest per edge).")
    learners: list[str] = Field(description="Learners of the live BAIM, in fusion order.")
    untrained_learners: list[str] = Field(description="Learners not in the last trained BAIM.")
    baim_version: str | None = Field(description="Registry version of the last trained BAIM.")
    baim_params: int = Field(ge=0, description="Parameters of the live BAIM (0: none yet).")
    rounds: list[RoundRecord] = Field(description="The trained rounds.")
    round_errors: list[RoundError] = Field(description="Failed round indices, with their last error.")
    restarts: int = Field(ge=0, description="How often this coordinator was restarted from its state.")
    ledger: LedgerSnapshot = Field(description="The coordinator's cost ledger.")
    tasks: dict[str, PublishedTaskModel] = Field(description="Published task models per task (finish only).")
    new_tasks: list[NewTaskRecord] = Field(
        default_factory=list, description="Tasks that appeared with a few shots (new_task events)."
    )
    learner_pruning: LearnerPruning | None = Field(
        default=None, description="Model-level pruning before decomposition (None: not configured, not run)."
    )
