"""What the cloud hands out for the relay (GaisNet's edge -> cloud leg): a receipt per relayed adapter and a
record per relay round. Typed contracts (pydantic, extra="forbid"), sent over Ray and into report.json as
their `model_dump()`."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from orchestrator.core.receipts import Echo
from orchestrator.core.scenario import StrictModel

RelayMethod = Literal["fold_own", "distil", "average"]


class RelayReceipt(StrictModel):
    """The cloud's answer to one relayed adapter."""

    edge_id: Echo = Field(description="The edge id the relay named.")
    task: Echo = Field(description="The task the relay named.")
    model_version: Echo = Field(description="The task model version the adapter was trained on.")
    accepted: bool = Field(description="True when the adapter passed validation and waits for a relay round.")
    reason: str = Field(
        description="Short rejection code (empty when accepted): unknown_edge, wrong_task, too_large, "
        "stale (not the task's current model version), invalid (spec, names, shapes, dtypes, non-finite "
        "values or an implausibly large change)."
    )
    detail: str = Field(description="What was wrong, in words (empty when accepted).")
    nbytes: int = Field(description="Bytes received: the adapter's safetensors weights plus its JSON spec.")


class RelayTaskRecord(StrictModel):
    """One task's side of a relay round."""

    edges: list[str] = Field(description="Edges whose adapters for this task the round took in.")
    relay_bytes: int = Field(description="Adapter bytes (weights + spec) those edges relayed.")
    test_loss_before: float = Field(description="The task model's test loss before the round.")
    candidate_test_loss: float = Field(description="The round's candidate BAIM's test loss, kept or not.")
    test_loss_after: float = Field(
        description="The test loss of the task model the cloud serves after the round (the candidate's if "
        "accepted, else the unchanged model's)."
    )


class RelayRoundRecord(StrictModel):
    """A relay round: the relayed adapters taken into the BAIM, guarded, and published when accepted."""

    method: RelayMethod = Field(description="How the adapters were taken in (personalisation.relay_method).")
    from_version: str = Field(description="The BAIM version the adapters were trained on and taken into.")
    guarded: bool = Field(description="The round's BAIM was kept only if no task's held-out loss rose.")
    accepted: bool = Field(description="The round's BAIM replaced the previous one.")
    baim_version: str | None = Field(
        description="The BAIM version the round published (None when rejected: nothing was published)."
    )
    task_versions: dict[str, str] = Field(
        description="Per task: the task model artifact published from it (empty when rejected)."
    )
    holdout_loss_before: dict[str, float] = Field(
        description="Per task with held-out images: the cloud's held-out loss before the round."
    )
    holdout_loss_after: dict[str, float] = Field(
        description="Per task: the candidate BAIM's held-out loss, kept or not."
    )
    distillation_loss_before: float | None = Field(
        description="Distil: the student's mean squared difference to its teachers on the cloud batches "
        "before the round (None for the folds)."
    )
    distillation_loss_after: float | None = Field(description="Distil: the same for the candidate.")
    tasks: dict[str, RelayTaskRecord] = Field(description="Per task with at least one adapter taken in.")
    seconds: float = Field(description="Wall-clock seconds of the round (validation not included).")
