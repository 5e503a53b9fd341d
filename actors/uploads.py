"""Upload validation (every check an edge upload must pass) and the bookkeeping of rejected receipts.

The checks, in order, and why each exists: docs/design/coordinator.md, "Validation".
"""

from __future__ import annotations

import collections
import os
from typing import Any, NamedTuple

import torch

from baim.config import LearnerSpec
from baim.learners import VAELearner, noise_for
from orchestrator.core.artifacts import ArtifactPayload, check_payload_integrity, load_module
from orchestrator.core.errors import ArtifactRejected
from orchestrator.core.names import MAX_VERSION, edge_owner, version_name
from orchestrator.core.receipts import UploadReceipt
from orchestrator.core.scenario import EdgeConfig, Scenario, UploadLimits
from orchestrator.data.datasets import FaceDataset
from orchestrator.data.partitions import Partitions
from orchestrator.data.sources import DataSource

PLAUSIBILITY_IMAGES = 16  # held-out images per task used to check an upload's loss
PLAUSIBILITY_SEED = 0  # fixed noise, so the check gives the same number for the same upload
UNKNOWN_EDGES = "(edges not in the scenario)"  # one allowance of kept rejected receipts for all of them
MAX_DEFAULT_VALIDATIONS = 16  # asyncio's default pool has min(32, CPUs + 4) threads: leave some for writes
UPLOAD_SPEC_KEYS = ["edge_id", "kind", "learner", "task"]


class UploadRejected(Exception):  # noqa: N818 (a rejection is an outcome, carried as data)
    """A rejection with a short code (a Prometheus label) and a human-readable detail.

    Codes: the artifact checks' `orchestrator.core.errors.REJECTION_CODES`, plus the upload-level ones raised
    here: unknown_edge, bad_version, implausible_loss, implausible_weights.
    """

    def __init__(self, code: str, detail: str) -> None:
        self.code = code
        self.detail = detail
        super().__init__(f"{code}: {detail}")


class ValidUpload(NamedTuple):
    """An upload that passed every check: its learner and the loss on its task's held-out images."""

    learner: VAELearner
    holdout_loss: float


def upload_key(edge_id: Any, version: Any, sha256: Any) -> str:
    """An upload's identity, `edge_id@version#sha256`, each part cut (the key is logged and stored)."""
    return f"{edge_id!s:.100}@{version!s:.20}#{sha256!s:.64}"


def declared_spec(edge: EdgeConfig, resolution: int) -> LearnerSpec:
    """The learner architecture the scenario declares for `edge`."""
    return LearnerSpec(tuple(edge.model.widths), edge.model.latent_dim, resolution)


def fresh_learner_rms(spec: LearnerSpec) -> dict[str, float]:
    """RMS of every tensor of a freshly initialised learner of `spec` (seeded, so the same on every run),
    plus "*" for the whole learner: the scale the weight-norm check compares an upload's tensors with.

    Draws from a forked global RNG, so callers' random streams are left as they were.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(PLAUSIBILITY_SEED)
        state = VAELearner(spec).state_dict()
    squares = {name: float((t.double() ** 2).sum()) for name, t in state.items()}
    rms = {name: (squares[name] / state[name].numel()) ** 0.5 for name in state}
    rms["*"] = (sum(squares.values()) / sum(t.numel() for t in state.values())) ** 0.5
    return rms


def largest_rms_ratio(learner: VAELearner, fresh_rms: dict[str, float]) -> tuple[str, float]:
    """(tensor name, ratio) of the learner's tensor whose RMS is the largest multiple of its fresh RMS.

    Tensors that start at zero (GroupNorm biases) are measured against the whole fresh learner's RMS.
    """
    worst, largest = "", 0.0
    for name, tensor in learner.state_dict().items():
        rms = float(tensor.double().pow(2).mean().sqrt())
        scale = fresh_rms[name] if fresh_rms[name] > 0 else fresh_rms["*"]
        if rms / scale > largest:
            worst, largest = name, rms / scale
    return worst, largest


def validation_slots(limits: UploadLimits) -> int:
    """How many received uploads may be validated at once: `limits.max_concurrent_validations`, or when
    that is None one per CPU this process may use, at least 2 and at most MAX_DEFAULT_VALIDATIONS."""
    if limits.max_concurrent_validations is not None:
        return limits.max_concurrent_validations
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(2, min(cpus, MAX_DEFAULT_VALIDATIONS))


class UploadValidator:
    """Every check of an upload against the scenario and the cloud's own held-out images. CPU-heavy and
    thread-safe (the coordinator runs several at once in threads)."""

    def __init__(self, scenario: Scenario, source: DataSource, partitions: Partitions) -> None:
        self.scenario = scenario
        self.limits = scenario.cloud.uploads
        self.source = source
        self.partitions = partitions
        self.edges = {edge.id: edge for edge in scenario.all_edges()}
        resolution = scenario.data.resolution
        self.declared = {edge_id: declared_spec(edge, resolution) for edge_id, edge in self.edges.items()}
        self.fresh_rms = {spec: fresh_learner_rms(spec) for spec in set(self.declared.values())}
        self._holdout: dict[str, torch.Tensor] = {}

    def check_receivable(self, edge_id: Any, version: Any, weights: Any, spec_json: Any, sha256: Any) -> None:
        """The checks run before an upload's bytes are stored (cheap: no parsing): a scenario edge, a valid
        version, the payload's types, its size and its sha256 over the bytes. Raises UploadRejected."""
        if not isinstance(edge_id, str) or edge_id not in self.edges:
            raise UploadRejected("unknown_edge", f"edge_id {edge_id!r} is not an edge of this scenario")
        if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= MAX_VERSION:
            raise UploadRejected(
                "bad_version", f"version: expected an int >= 1 and <= {MAX_VERSION}, received {version!r:.40}"
            )
        if not isinstance(spec_json, str):
            raise UploadRejected("bad_spec", f"spec_json: expected str, received {type(spec_json).__name__}")
        try:
            spec_json.encode()
        except UnicodeEncodeError as err:
            raise UploadRejected("bad_spec", f"spec_json is not encodable UTF-8 text: {err}") from None
        try:
            check_payload_integrity(
                ArtifactPayload(weights=weights, spec_json=spec_json, sha256=sha256),
                artifact_id=f"{edge_owner(edge_id)}@{version_name(version)}",
                max_bytes=self.limits.max_upload_bytes,
            )
        except ArtifactRejected as err:
            raise UploadRejected(err.code, err.reason) from None

    def validate(self, edge_id: Any, version: Any, weights: Any, spec_json: Any, sha256: Any) -> ValidUpload:
        """The uploaded learner, loaded, with its holdout loss; raises UploadRejected naming the first check
        that failed (`check_receivable`'s first)."""
        self.check_receivable(edge_id, version, weights, spec_json, sha256)
        edge = self.edges[edge_id]
        try:
            learner = load_module(
                ArtifactPayload(weights=weights, spec_json=spec_json, sha256=sha256),
                VAELearner,
                artifact_id=f"{edge_owner(edge_id)}@{version_name(version)}",
                max_bytes=self.limits.max_upload_bytes,
                check_spec=lambda spec: self._check_spec(spec, edge),
            )
        except ArtifactRejected as err:
            raise UploadRejected(err.code, err.reason) from None
        except RecursionError:  # json.loads of a spec nested thousands of levels deep
            raise UploadRejected("bad_spec", "spec JSON nests too deeply to parse") from None
        return ValidUpload(learner, self._check_plausible(learner, edge.task))

    def _check_spec(self, spec: dict[str, Any], edge: EdgeConfig) -> None:
        """The spec names this edge, its task and exactly the architecture the scenario declares for it."""
        if sorted(spec) != UPLOAD_SPEC_KEYS:
            raise UploadRejected(
                "bad_spec", f"spec keys: expected edge_id, kind, learner, task, received {sorted(spec)}"
            )
        if spec["edge_id"] != edge.id:
            raise UploadRejected(
                "bad_spec", f"spec edge_id: expected {edge.id!r}, received {spec['edge_id']!r}"
            )
        if spec["task"] != edge.task:
            raise UploadRejected("bad_spec", f"spec task: expected {edge.task!r}, received {spec['task']!r}")
        try:
            learner_spec = LearnerSpec.from_dict(spec["learner"])
        except (ValueError, TypeError) as err:
            raise UploadRejected("bad_spec", f"spec learner: {err}") from None
        declared = self.declared[edge.id]
        if learner_spec != declared:
            raise UploadRejected(
                "bad_spec",
                f"spec learner: expected the declared {declared.to_dict()}, "
                f"received {learner_spec.to_dict()}",
            )

    def _check_plausible(self, learner: VAELearner, task: str) -> float:
        """Its loss on held-out images of its task (returned), and its weights' scale, are those of a real
        model."""
        limits = self.limits
        loss = self.plausibility_loss(learner, task)
        if not loss < limits.max_plausibility_loss:  # also catches NaN
            raise UploadRejected(
                "implausible_loss",
                f"loss on {PLAUSIBILITY_IMAGES} held-out images of task {task!r}: "
                f"expected a finite value below {limits.max_plausibility_loss}, received {loss:.6g}",
            )
        reference = self.reference_loss(task)
        if reference > 0 and loss > limits.max_loss_ratio * reference:
            raise UploadRejected(
                "implausible_loss",
                f"loss on {PLAUSIBILITY_IMAGES} held-out images of task {task!r}: expected at most "
                f"{limits.max_loss_ratio} x {reference:.6g} (the loss of predicting the holdout's mean "
                f"image), received {loss:.6g} ({loss / reference:.3g} x)",
            )
        name, ratio = largest_rms_ratio(learner, self.fresh_rms[learner.spec])
        if ratio > limits.max_weight_norm_ratio:
            raise UploadRejected(
                "implausible_weights",
                f"tensor {name!r}: expected an RMS at most {limits.max_weight_norm_ratio} x that of a fresh "
                f"learner of the declared architecture, received {ratio:.4g} x",
            )
        return loss

    @torch.no_grad()
    def plausibility_loss(self, learner: VAELearner, task: str) -> float:
        images = self.holdout_images(task)
        eps = noise_for("plausibility", PLAUSIBILITY_SEED, images.shape[0], learner.spec.latent_dim)
        learner.eval()
        return float(learner.loss(images, self.scenario.cloud.kld_weight, eps=eps).loss)

    def reference_loss(self, task: str) -> float:
        """The holdout's pixel variance: the MSE of predicting every holdout image by their mean image.

        It needs no trusted model, only the cloud's own images; 0 when the holdout has fewer than two
        distinct images (then the relative check is skipped: there is nothing to compare with).
        """
        images = self.holdout_images(task)
        if images.shape[0] < 2:
            return 0.0
        return float(((images - images.mean(dim=0, keepdim=True)) ** 2).mean())

    def holdout_images(self, task: str) -> torch.Tensor:
        if task not in self._holdout:
            indices = self.partitions.holdout.get(task, [])[:PLAUSIBILITY_IMAGES]
            if not indices:  # no holdout configured: fall back to the task's cloud images
                indices = self.partitions.cloud[task][:PLAUSIBILITY_IMAGES]
            dataset = FaceDataset(self.source, indices, self.scenario.data.resolution)
            self._holdout[task] = torch.stack([dataset[i] for i in range(len(dataset))])  # type: ignore[misc]
        return self._holdout[task]


class RejectionBook:
    """Rejected receipts by upload key: the newest `per_edge` of each edge (re-sending one returns it).

    Every kept receipt is in memory, so an edge sending distinct bad uploads must not grow them without
    bound (the receipt log keeps every one on disk); edge ids not in the scenario are chosen by the sender,
    so they share one allowance. The ledger still counts every rejection.
    """

    def __init__(self, per_edge: int, known_edges: set[str]) -> None:
        self.per_edge = per_edge
        self.known_edges = known_edges
        self._receipts: dict[str, UploadReceipt] = {}
        self._keys: dict[str, collections.deque[str]] = {}  # per edge, oldest first

    def remember(self, receipt: UploadReceipt) -> None:
        if receipt.key in self._receipts:  # already kept (e.g. a state listing it twice): just replace
            self._receipts[receipt.key] = receipt
            return
        edge = receipt.edge_id if isinstance(receipt.edge_id, str) else None
        kept = self._keys.setdefault(edge if edge in self.known_edges else UNKNOWN_EDGES, collections.deque())
        self._receipts[receipt.key] = receipt
        kept.append(receipt.key)
        while len(kept) > self.per_edge:
            del self._receipts[kept.popleft()]

    def get(self, key: str) -> UploadReceipt | None:
        return self._receipts.get(key)

    def receipts(self) -> list[UploadReceipt]:
        """The kept receipts, in the order they were first kept."""
        return list(self._receipts.values())
