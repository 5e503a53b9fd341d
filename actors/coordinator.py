"""CloudCoordinator: accepts edge uploads concurrently, fuses them into the BAIM, trains it in rounds.

A plain class whose public methods are coroutines; the engine runs it as an async Ray actor
(`ray.remote(CloudCoordinator).options(max_restarts=-1, max_task_retries=-1, ...)`), and unit tests drive it
with `asyncio.run`. Its event loop only does cheap, structural work; everything CPU-heavy goes to a thread
(upload validation, registry writes) and a training round runs outside the loop altogether (a Ray Train job
or a local loop, in a thread that only waits for it), so an upload is never queued behind a round.

Per upload (`upload`): validate (size limit, sha256, spec, tensor names and shapes against the learner the
spec rebuilds, dtypes, finite values, and plausibility: the loss on a few held-out cloud images of the edge's
task must be finite, below `cloud.uploads.max_plausibility_loss` and below `cloud.uploads.max_loss_ratio`
times the holdout's pixel variance, and no tensor's RMS may exceed `cloud.uploads.max_weight_norm_ratio`
times its RMS in a fresh learner of the declared architecture), write it durably to the registry as
`edge/<edge_id>@v<version>`, record it in the checkpoint, *then* acknowledge. A receipt is a pure function of
the upload and its outcome, so re-sending the same upload (a retry after a restart) returns the same receipt.
Rejections are data: a receipt with `accepted=False`, a short reason code and the detail. Only the last
`cloud.uploads.rejected_receipts_per_edge` rejected receipts of each edge are kept (the ledger counts all), so
an edge sending many bad uploads does not pile up receipts; at most `cloud.uploads.max_concurrent_validations`
uploads are validated at once, which bounds the memory of parsing them.

Fusion: each accepted learner joins the live BAIM at once (`BAIM.from_learners` for the first, then
`BAIM.add_learner`, function-preserving). The fusion policy (`cloud.fusion`) starts a round after
`min_new_models` new learners, or once the oldest untrained one waited `max_wait_seconds`. A round trains a
snapshot; learners that arrive meanwhile are fused again on top of the trained BAIM and join the next round.
Arrival order varies from run to run and the fused structure depends on it, so a round trains its new
learners re-fused in canonical order (the scenario's edge order, `_canonical_baim`), and its training and test
noise is seeded (`seeded_loss`): the same uploads and seed give the same trained BAIM.

Failed rounds: a round whose runner raises (e.g. `cloud.use_gpu: true` on a cluster without GPUs, or any
deterministic Ray Train error) loses nothing: its learners stay pending, and the error is recorded per round
index (`round_errors`: round, attempts, learners, error text; checkpointed). The same pending set is not tried
again until it changes (a new upload was fused) or `cloud.fusion.max_wait_seconds` passed since the failure,
so a deterministic error costs one attempt per change or per wait, not one per policy tick. `finish()` never
publishes task models from an untrained BAIM: when learners are still untrained after its last attempt, it
raises `RoundFailed` naming the round and the cause (the engine writes the report, prints the error and
`baim run` exits 1). Why fail rather than publish the last trained BAIM: the user asked for every accepted
upload to be trained; task models that silently leave some out (or were never trained at all) look like a
success and are not one.

Durability: after every accepted upload and every round the coordinator writes its state document
(`coordinator/state`: the run id, accepted uploads in arrival order, the trained BAIM version, rounds, round
errors, rejections, ledger). A restarted coordinator reads it, reloads the last trained BAIM (`baim@vN`) and
re-fuses every accepted upload the registry holds that the trained BAIM lacks: nothing acknowledged is ever
lost. It resumes only a state document of its own run (`run_id`, a constructor argument, so a Ray restart of
the same actor keeps it); a registry holding another run's state raises `RegistryHeldByAnotherRun`.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import time
from typing import Any

import torch
from torch.utils.data import DataLoader

from actors.edge import learner_name
from actors.rounds import RoundFailed, RoundRequest, RoundRunner, round_error_text
from baim.config import LearnerSpec
from baim.costs import count_params
from baim.decompose import TaskModel, decompose
from baim.learners import VAELearner, noise_for
from baim.model import BAIM
from orchestrator.core.artifacts import ArtifactPayload, check_shapes, pack_module, unpack_payload
from orchestrator.core.errors import ArtifactRejected
from orchestrator.core.metrics import Ledger
from orchestrator.core.registry import ArtifactNotFound, Registry
from orchestrator.core.scenario import Scenario, UploadLimits
from orchestrator.data.datasets import FaceDataset
from orchestrator.data.partitions import Partitions, make_partitions
from orchestrator.data.sources import DataSource, resolve_source

logger = logging.getLogger(__name__)

STATE_KEY = "coordinator/state"
BAIM_OWNER = "baim"
PLAUSIBILITY_IMAGES = 16  # held-out images per task used to check an upload's loss
PLAUSIBILITY_SEED = 0  # fixed noise, so the check gives the same number for the same upload
POLICY_TICK_SECONDS = 0.25  # how often the fusion policy's wait timer is checked
MAX_VERSION = 999_999  # version names are v000001 .. v999999
UNKNOWN_EDGES = "(edges not in the scenario)"  # one allowance of kept rejected receipts for all of them
MAX_DEFAULT_VALIDATIONS = 16  # asyncio's default pool has min(32, CPUs + 4) threads: leave some for writes


def edge_owner(edge_id: str) -> str:
    return f"edge/{edge_id}"


def version_name(version: int) -> str:
    return f"v{version:06d}"


class UploadRejected(Exception):  # noqa: N818 (a rejection is an outcome, carried as data)
    """A rejection with a short code (a Prometheus label) and a human-readable detail.

    Codes: the artifact checks' `orchestrator.core.errors.REJECTION_CODES`, plus the upload-level ones raised
    here: unknown_edge, bad_version, implausible_loss, implausible_weights.
    """

    def __init__(self, code: str, detail: str) -> None:
        self.code = code
        self.detail = detail
        super().__init__(f"{code}: {detail}")


class RegistryHeldByAnotherRun(Exception):  # noqa: N818 (reads as the situation it reports)
    """The registry already holds the coordinator state of another run (another `run_id`).

    Resuming it would load that run's ledger, rounds and BAIM into this one (then reject every upload as a
    `version_conflict`, or fail on edge ids it does not know). `held_run_id` is the id found there (None for a
    state written without one).
    """

    def __init__(self, message: str, held_run_id: str | None) -> None:
        self.held_run_id = held_run_id
        super().__init__(message)

    def __reduce__(self) -> tuple[type[RegistryHeldByAnotherRun], tuple[str, str | None]]:
        return (type(self), (str(self), self.held_run_id))


def held_run_id(state: dict[str, Any]) -> str | None:
    """The run id a state document belongs to (None: written before run ids existed, or without one)."""
    run_id = state.get("run_id")
    return run_id if isinstance(run_id, str) else None


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
    """How many uploads may be validated at once: `limits.max_concurrent_validations`, or when that is None
    one per CPU this process may use, at least 2 and at most MAX_DEFAULT_VALIDATIONS."""
    if limits.max_concurrent_validations is not None:
        return limits.max_concurrent_validations
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(2, min(cpus, MAX_DEFAULT_VALIDATIONS))


def _load_learner(spec: LearnerSpec, tensors: dict[str, torch.Tensor]) -> VAELearner:
    learner = VAELearner(spec)
    learner.load_state_dict(tensors, strict=True)
    return learner


class CloudCoordinator:
    """The cloud side of a run. See the module docstring.

    Args:
        scenario: the validated scenario (edges, tasks, cloud config).
        registry_uri: where uploads, BAIM versions, task models and the state document live.
        source, partitions: the run's data; the coordinator reads only holdout, cloud and test images.
            None: derived from the scenario here (deterministic, so equal to the driver's). The engine
            passes None so that a restarted coordinator depends on nothing but its own arguments.
        round_runner: trains one round (blocking; called in a thread). Default `local_training_round`.
        run_id: the run this coordinator belongs to (the engine makes one per run). It only resumes a state
            document with the same id, and raises `RegistryHeldByAnotherRun` for another one. None (plain
            use, tests) matches only a state written with None.
    """

    def __init__(
        self,
        scenario: Scenario,
        registry_uri: str,
        source: DataSource | None = None,
        partitions: Partitions | None = None,
        *,
        round_runner: RoundRunner,
        torch_threads: int = 1,
        run_id: str | None = None,
    ) -> None:
        torch.set_num_threads(torch_threads)
        self.run_id = run_id
        self.scenario = scenario
        self.cloud = scenario.cloud
        self.registry_uri = registry_uri
        self.registry = Registry(
            registry_uri, max_artifact_bytes=max(scenario.cloud.uploads.max_upload_bytes, 1 << 30)
        )
        self.source = source if source is not None else resolve_source(scenario.data)
        self.partitions = partitions if partitions is not None else make_partitions(self.source, scenario)
        self.round_runner = round_runner
        self.edges = {edge.id: edge for edge in scenario.all_edges()}
        self.learner_names = {edge_id: learner_name(edge_id) for edge_id in self.edges}
        self.learner_rank = {name: rank for rank, name in enumerate(self.learner_names.values())}
        self.ledger = Ledger()
        self._holdout: dict[str, torch.Tensor] = {}
        self._fresh_rms = {spec: fresh_learner_rms(spec) for spec in self._declared_specs()}

        # State (what the checkpoint holds).
        self.accepted: list[dict[str, Any]] = []  # receipts of accepted uploads, in arrival order
        self.rejected: dict[str, dict[str, Any]] = {}  # receipt by upload key, the last few per edge
        self._rejected_keys: dict[str, collections.deque[str]] = {}  # per edge, oldest first
        self.rounds: list[dict[str, Any]] = []
        # Per failed round index: {"round", "attempts", "learners" (of the last attempt), "error" (the last)}.
        # One entry per index (a retry updates it), so the list stays as short as the rounds list.
        self.round_errors: list[dict[str, Any]] = []
        self.baim_version: str | None = None  # last trained BAIM in the registry
        self.restarts = 0

        # Live structure (rebuilt from the state on restart).
        self.baim: BAIM | None = None
        self.trained_learners: set[str] = set()  # learners inside the last trained BAIM
        self.pending_since: float | None = None  # when the oldest untrained learner arrived
        # The pending set of the last failed round and when it failed (monotonic): the back-off. Not
        # checkpointed: a restarted coordinator tries once more (the restart may have cured the cause).
        self._last_failure: tuple[frozenset[str], float] | None = None
        # Set by finish(): from then on rounds start only from finish() itself, never from the policy timer
        # or summary(), so the report of a failed finish() describes a coordinator that is not training.
        self._finishing = False
        self._lock = asyncio.Lock()  # guards the BAIM structure (fusion, round start and end)
        self._state_lock = asyncio.Lock()  # orders state document writes
        self._validation_slots = asyncio.Semaphore(validation_slots(self.cloud.uploads))
        self._state_changes = 0  # bumped by every checkpoint request ...
        self._state_written = 0  # ... and the change count the last write covered (group commit)
        self._to_fuse: list[tuple[str, VAELearner]] = []  # accepted, acknowledged, not yet fused
        self._fusion_task: asyncio.Task[None] | None = None
        self._inflight: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._round_task: asyncio.Task[None] | None = None
        self._policy_task: asyncio.Task[None] | None = None
        self._resume()

    # ---- public API (coroutines) ------------------------------------------------------------------

    async def upload(
        self, edge_id: str, version: int, weights: bytes, spec_json: str, sha256: str
    ) -> dict[str, Any]:
        """Validate, store durably, fuse; return the receipt (idempotent for the same upload)."""
        self._start_policy_timer()
        key = f"{edge_id!s:.100}@{version!s:.20}#{sha256!s:.64}"  # bounded: it is logged and stored
        for receipt in self.accepted:
            if receipt["key"] == key:
                return dict(receipt)
        if key in self.rejected:
            return dict(self.rejected[key])
        if key not in self._inflight:
            future = asyncio.ensure_future(
                self._handle_upload(key, edge_id, version, weights, spec_json, sha256)
            )
            self._inflight[key] = future
            future.add_done_callback(lambda _: self._inflight.pop(key, None))
        return dict(await asyncio.shield(self._inflight[key]))

    async def status(self) -> dict[str, Any]:
        """A JSON-able snapshot for progress displays and tests (after fusing what is queued)."""
        await self._fuse_queued()
        return {
            "accepted": [r["edge_id"] for r in self.accepted],
            "rejected": {r["edge_id"]: r["reason"] for r in self.rejected.values()},
            "learners": list(self.baim.config.learner_names) if self.baim is not None else [],
            "pending": self._pending_learners(),
            "rounds": len(self.rounds),
            "round_running": self._round_task is not None and not self._round_task.done(),
            "baim_version": self.baim_version,
            "restarts": self.restarts,
            "round_errors": [dict(e) for e in self.round_errors],
        }

    async def finish(self) -> dict[str, Any]:
        """Train whatever is still untrained, decompose every task, publish the task models; summary.

        Untrained learners get one more round unless that very set failed less than
        `cloud.fusion.max_wait_seconds` ago (the back-off: retrying a deterministic error at once only
        doubles the wait). If learners are still untrained after that, nothing is published and
        `RoundFailed` is raised, naming the round and its last error; `summary()` still returns the state
        for a report.

        Idempotent: called again (e.g. retried after a restart) it trains nothing new and republishes the
        same task models.
        """
        self._finishing = True
        await self._fuse_queued()
        await self._wait_for_rounds()
        pending = self._pending_learners()
        if pending and not self._backing_off(pending):
            await self._start_round()
            await self._wait_for_rounds()
        pending = self._pending_learners()
        if pending:
            failed = self.round_errors[-1] if self.round_errors else None
            if failed is None or failed["round"] != len(self.rounds) + 1:  # cannot happen; say so if it does
                failed = {"round": len(self.rounds) + 1, "attempts": 0, "error": "no round was started"}
            raise RoundFailed(failed["round"], failed["error"], failed["attempts"], pending)
        tasks = await asyncio.to_thread(self._publish_task_models)
        return {**self._summary(), "tasks": tasks}

    async def summary(self) -> dict[str, Any]:
        """What `finish()` returns, without training or publishing anything (`tasks` is empty): for the report
        of a run whose `finish()` raised."""
        await self._fuse_queued()
        return {**self._summary(), "tasks": {}}

    async def _wait_for_rounds(self) -> None:
        """Until no round runs (a round that ends may start the next one for late arrivals)."""
        while self._round_task is not None and not self._round_task.done():
            await asyncio.shield(self._round_task)

    def _summary(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "accepted": [dict(r) for r in self.accepted],
            "rejected": [dict(r) for r in self.rejected.values()],
            "learners": list(self.baim.config.learner_names) if self.baim is not None else [],
            "untrained_learners": self._pending_learners(),
            "baim_version": self.baim_version,
            "baim_params": count_params(self.baim) if self.baim is not None else 0,
            "rounds": [dict(r) for r in self.rounds],
            "round_errors": [dict(e) for e in self.round_errors],
            "restarts": self.restarts,
            "ledger": self.ledger.to_dict(),
        }

    # ---- upload handling --------------------------------------------------------------------------

    async def _handle_upload(
        self, key: str, edge_id: str, version: int, weights: bytes, spec_json: str, sha256: str
    ) -> dict[str, Any]:
        receipt: dict[str, Any] = {
            "key": key,
            "edge_id": edge_id,
            "version": version,
            "sha256": sha256,
            "accepted": False,
            "reason": "",
            "detail": "",
            "learner": None,
            "artifact": None,
        }
        try:
            try:
                async with self._validation_slots:  # bounds the memory of uploads being parsed at once
                    learner = await asyncio.to_thread(
                        self._validate, edge_id, version, weights, spec_json, sha256
                    )
            except UploadRejected:
                raise
            except Exception as err:  # whatever else a malformed upload triggers is still a rejection
                logger.exception("upload %s raised during validation", key[:200])
                raise UploadRejected(
                    "invalid", f"validation failed: {type(err).__name__}: {err}"[:500]
                ) from None
            payload = ArtifactPayload(weights=weights, spec_json=spec_json, sha256=sha256)
            owner, vname = edge_owner(edge_id), version_name(version)
            try:
                # verified=True: _validate just ran unpack_payload on these very bytes; the registry only
                # re-checks their size and sha256 (cheap), then writes them durably before the ack.
                await asyncio.to_thread(self.registry.put, owner, vname, payload, verified=True)
            except ArtifactRejected as err:  # e.g. version_conflict: the version holds another model
                raise UploadRejected(err.code, err.reason) from None
        except UploadRejected as err:
            receipt.update(reason=err.code, detail=err.detail)
            self._remember_rejection(receipt)
            self.ledger.record_upload(
                edge_id if isinstance(edge_id, str) and edge_id else "unknown",
                "rejected",
                reason=err.code,
                version=version if isinstance(version, int) and version >= 0 else None,
                detail=err.detail,
            )
            await self._checkpoint()
            logger.warning("rejected upload %s: %s (%s)", key, err.code, err.detail)
            return receipt

        receipt.update(accepted=True, learner=self.learner_names[edge_id], artifact=f"{owner}@{vname}")
        self.accepted.append(receipt)
        self.ledger.record_upload(edge_id, "accepted", version=version)
        await self._checkpoint()  # durable (registry + state document) before the acknowledgement
        # Fusion happens after the acknowledgement, in arrival order, off the event loop: its cost grows
        # with the BAIM, and a restarted coordinator re-fuses from the registry anyway.
        self._to_fuse.append((edge_id, learner))
        self._schedule_fusion()
        logger.info("accepted upload %s as learner %s", key, receipt["learner"])
        return receipt

    def _remember_rejection(self, receipt: dict[str, Any]) -> None:
        """Keep a rejected receipt (re-sending that upload returns it), and drop the same edge's oldest ones
        beyond `cloud.uploads.rejected_receipts_per_edge`.

        Why: every kept receipt is in memory and in each state document write, so keeping all of them let an
        edge sending distinct bad uploads grow both without bound (quadratic total checkpoint work). Edge ids
        not in the scenario are chosen by the sender, so they share one allowance. The ledger still counts
        every rejection (it also lists each upload, see docs/security-audit.md); a re-sent upload whose
        receipt was dropped is validated (and counted) again.
        """
        key, edge_id = receipt["key"], receipt["edge_id"]
        if key in self.rejected:  # already kept (e.g. a state document listing it twice): just replace
            self.rejected[key] = receipt
            return
        edge = edge_id if isinstance(edge_id, str) and edge_id in self.edges else UNKNOWN_EDGES
        kept = self._rejected_keys.setdefault(edge, collections.deque())
        self.rejected[key] = receipt
        kept.append(key)
        while len(kept) > self.cloud.uploads.rejected_receipts_per_edge:
            del self.rejected[kept.popleft()]

    def _validate(
        self, edge_id: str, version: int, weights: bytes, spec_json: str, sha256: str
    ) -> VAELearner:
        """Every check of an upload; CPU-heavy, so it runs in a thread. Raises UploadRejected."""
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
        limits = self.cloud.uploads
        payload = ArtifactPayload(weights=weights, spec_json=spec_json, sha256=sha256)
        try:
            spec, tensors = unpack_payload(
                payload,
                artifact_id=f"{edge_owner(edge_id)}@{version_name(version)}",
                max_bytes=limits.max_upload_bytes,
                allowed_kinds=("learner",),
            )
        except ArtifactRejected as err:
            raise UploadRejected(err.code, err.reason) from None
        except RecursionError:  # json.loads of a spec nested thousands of levels deep
            raise UploadRejected("bad_spec", "spec JSON nests too deeply to parse") from None

        edge = self.edges[edge_id]
        declared = LearnerSpec(
            widths=tuple(edge.model.widths),
            latent_dim=edge.model.latent_dim,
            resolution=self.scenario.data.resolution,
        )
        if set(spec) != {"kind", "edge_id", "task", "learner"}:
            raise UploadRejected(
                "bad_spec", f"spec keys: expected edge_id, kind, learner, task, received {sorted(spec)}"
            )
        if spec["edge_id"] != edge_id:
            raise UploadRejected(
                "bad_spec", f"spec edge_id: expected {edge_id!r}, received {spec['edge_id']!r}"
            )
        if spec["task"] != edge.task:
            raise UploadRejected("bad_spec", f"spec task: expected {edge.task!r}, received {spec['task']!r}")
        try:
            learner_spec = LearnerSpec.from_dict(spec["learner"])
        except (ValueError, TypeError) as err:
            raise UploadRejected("bad_spec", f"spec learner: {err}") from None
        if learner_spec != declared:
            raise UploadRejected(
                "bad_spec",
                f"spec learner: expected the declared {declared.to_dict()}, "
                f"received {learner_spec.to_dict()}",
            )
        learner = VAELearner(learner_spec)  # built once: the shape template, then the loaded model
        expected = {name: tuple(t.shape) for name, t in learner.state_dict().items()}
        try:
            check_shapes(tensors, expected, artifact_id=f"{edge_owner(edge_id)}@{version_name(version)}")
        except ArtifactRejected as err:
            raise UploadRejected(err.code, err.reason) from None
        learner.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=True)

        loss = self._plausibility_loss(learner, edge.task)
        if not loss < limits.max_plausibility_loss:  # also catches NaN
            raise UploadRejected(
                "implausible_loss",
                f"loss on {PLAUSIBILITY_IMAGES} held-out images of task {edge.task!r}: "
                f"expected a finite value below {limits.max_plausibility_loss}, received {loss:.6g}",
            )
        reference = self._reference_loss(edge.task)
        if reference > 0 and loss > limits.max_loss_ratio * reference:
            raise UploadRejected(
                "implausible_loss",
                f"loss on {PLAUSIBILITY_IMAGES} held-out images of task {edge.task!r}: expected at most "
                f"{limits.max_loss_ratio} x {reference:.6g} (the loss of predicting the holdout's mean "
                f"image), received {loss:.6g} ({loss / reference:.3g} x)",
            )
        name, ratio = largest_rms_ratio(learner, self._fresh_rms[learner_spec])
        if ratio > limits.max_weight_norm_ratio:
            raise UploadRejected(
                "implausible_weights",
                f"tensor {name!r}: expected an RMS at most {limits.max_weight_norm_ratio} x that of a fresh "
                f"learner of the declared architecture, received {ratio:.4g} x",
            )
        return learner

    @torch.no_grad()
    def _plausibility_loss(self, learner: VAELearner, task: str) -> float:
        images = self._holdout_images(task)
        eps = noise_for("plausibility", PLAUSIBILITY_SEED, images.shape[0], learner.spec.latent_dim)
        learner.eval()
        return float(learner.loss(images, self.cloud.kld_weight, eps=eps).loss)

    def _reference_loss(self, task: str) -> float:
        """The holdout's pixel variance: the MSE of predicting every holdout image by their mean image.

        It needs no trusted model, only the cloud's own images; 0 when the holdout has fewer than two
        distinct images (then the relative check is skipped: there is nothing to compare with).
        """
        images = self._holdout_images(task)
        if images.shape[0] < 2:
            return 0.0
        return float(((images - images.mean(dim=0, keepdim=True)) ** 2).mean())

    def _declared_specs(self) -> set[LearnerSpec]:
        resolution = self.scenario.data.resolution
        return {
            LearnerSpec(tuple(edge.model.widths), edge.model.latent_dim, resolution)
            for edge in self.edges.values()
        }

    def _holdout_images(self, task: str) -> torch.Tensor:
        if task not in self._holdout:
            indices = self.partitions.holdout.get(task, [])[:PLAUSIBILITY_IMAGES]
            if not indices:  # no holdout configured: fall back to the task's cloud images
                indices = self.partitions.cloud[task][:PLAUSIBILITY_IMAGES]
            dataset = FaceDataset(self.source, indices, self.scenario.data.resolution)
            self._holdout[task] = torch.stack([dataset[i] for i in range(len(dataset))])  # type: ignore[misc]
        return self._holdout[task]

    # ---- fusion, rounds, checkpoints ------------------------------------------------------------------

    def _schedule_fusion(self) -> None:
        if self._fusion_task is None or self._fusion_task.done():
            self._fusion_task = asyncio.ensure_future(self._fuse_queued())

    async def _fuse_queued(self) -> None:
        """Fuse every queued learner in arrival order (a thread does the work), then apply the policy.

        An item leaves the queue only once fused, so a task cancelled midway (or an event loop that closes)
        loses nothing: the next call fuses it (`_fuse` skips a learner that is already in).
        """
        async with self._lock:
            while self._to_fuse:
                edge_id, learner = self._to_fuse[0]
                with self.ledger.fusion():
                    await asyncio.to_thread(self._fuse, edge_id, learner)
                self._to_fuse.pop(0)
        await self._maybe_start_round()

    def _fuse(self, edge_id: str, learner: VAELearner) -> None:
        name, task = self.learner_names[edge_id], self.edges[edge_id].task
        if self.baim is not None and name in self.baim.config.learner_names:
            return
        self.baim = self._fuse_into(self.baim, name, task, learner)
        if self.pending_since is None:
            self.pending_since = time.monotonic()

    def _fuse_into(self, baim: BAIM | None, name: str, task: str, learner: VAELearner) -> BAIM:
        if baim is None:
            return BAIM.from_learners(
                [task],
                [(name, task, learner)],
                top_k=self.cloud.top_k,
                connection_height=self.cloud.connection_height,
                kld_weight=self.cloud.kld_weight,
                seed=self.scenario.seed,
            )
        baim.add_learner(name, task, learner)
        return baim

    def _canonical_baim(self, baim: BAIM) -> BAIM:
        """`baim` with its untrained learners fused in canonical order: the scenario's edge order.

        Fusion follows arrival order, which varies between runs (edges finish at different times, uploads
        run concurrently), and the fused BAIM depends on it: learner and task order, which member founds a
        squad (its LSGate row is drawn from the seed) and which join it pending (zero rows), the candidate
        connections. So a round trains the last trained BAIM (from the registry) with its new learners
        re-fused in canonical order; nothing is rebuilt when they arrived in that order already.
        """
        pending = self._pending_learners()
        unknown = len(self.learner_rank)  # not in the scenario (an old registry): after the others, by name
        ordered = sorted(pending, key=lambda name: (self.learner_rank.get(name, unknown), name))
        if pending == ordered:
            return baim
        base: BAIM | None = None
        if self.baim_version is not None:
            payload = self.registry.get(BAIM_OWNER, self.baim_version)
            spec, tensors = unpack_payload(payload, artifact_id=f"baim@{self.baim_version}", max_bytes=2**40)
            base = BAIM.from_spec(spec)
            base.load_state_dict(tensors)
        for name in ordered:
            base = self._fuse_into(base, name, baim.config.learner(name).task, baim.learner(name))
        assert base is not None  # ordered is non-empty: pending != ordered
        logger.info("round learners re-fused in canonical order: %s (arrived as %s)", ordered, pending)
        return base

    def _pending_learners(self) -> list[str]:
        if self.baim is None:
            return []
        return [name for name in self.baim.config.learner_names if name not in self.trained_learners]

    async def _maybe_start_round(self) -> None:
        if self._finishing:
            return  # finish() decides about the last round itself
        if self._round_task is not None and not self._round_task.done():
            return  # arrivals during a round join the next one
        pending = self._pending_learners()
        if not pending:
            return
        if self._backing_off(pending):
            return  # this very set failed a moment ago: wait for a new upload or max_wait_seconds
        waited = time.monotonic() - (self.pending_since or time.monotonic())
        if len(pending) >= self.cloud.fusion.min_new_models or waited >= self.cloud.fusion.max_wait_seconds:
            await self._start_round()

    def _backing_off(self, pending: list[str]) -> bool:
        """True while `pending` is the set whose round failed last, less than max_wait_seconds ago."""
        if self._last_failure is None:
            return False
        failed_set, failed_at = self._last_failure
        recent = time.monotonic() - failed_at < self.cloud.fusion.max_wait_seconds
        return recent and frozenset(pending) == failed_set

    async def _start_round(self) -> None:
        async with self._lock:
            if self.baim is None or (self._round_task is not None and not self._round_task.done()):
                return
            self.baim = baim = await asyncio.to_thread(self._canonical_baim, self.baim)
            snapshot = await asyncio.to_thread(pack_module, baim, baim.spec())
            members = list(baim.config.learner_names)
            request = RoundRequest(
                round_index=len(self.rounds) + 1,
                baim=snapshot,
                strategies=list(self.cloud.strategies),
                scenario=self.scenario,
                source=self.source,
                partitions=self.partitions,
                registry_uri=self.registry_uri,
            )
            self.ledger.record_event("round_started", round=request.round_index, learners=len(members))
            self._round_task = asyncio.ensure_future(self._run_round(request, members))

    async def _run_round(self, request: RoundRequest, members: list[str]) -> None:
        logger.info(
            "round %d: training %d learners (%s)", request.round_index, len(members), request.strategies
        )
        started = time.perf_counter()
        try:
            result = await asyncio.to_thread(self.round_runner, request)
        except Exception as err:  # a failed round loses nothing: its learners stay pending
            logger.exception("round %d failed", request.round_index)
            await self._record_round_failure(request.round_index, members, round_error_text(err))
            return
        seconds = time.perf_counter() - started
        async with self._lock:
            version = await asyncio.to_thread(self.registry.next_version, BAIM_OWNER)
            await asyncio.to_thread(self.registry.put, BAIM_OWNER, version, result.trained)
            late = (
                [name for name in self.baim.config.learner_names if name not in members] if self.baim else []
            )
            self.baim = await asyncio.to_thread(self._continue_from, result.trained, late)
            self.baim_version = version
            self.trained_learners = set(members)
            self.pending_since = time.monotonic() if late else None
            self._last_failure = None
            for strategy, summary in result.strategies.items():
                self.ledger.record_cloud_flops(strategy, summary.flops)
                self.ledger.record_seconds(f"train/{strategy}", summary.seconds)
            self.rounds.append(
                {
                    "round": request.round_index,
                    "learners": members,
                    "baim_version": version,
                    "seconds": seconds,
                    "strategies": {name: run.model_dump() for name, run in result.strategies.items()},
                }
            )
            self.ledger.record_event("round_finished", round=request.round_index, baim_version=version)
            await self._checkpoint()
        logger.info("round %d done in %.1fs: BAIM %s", request.round_index, seconds, version)
        await self._maybe_start_round()

    async def _record_round_failure(self, round_index: int, members: list[str], error: str) -> None:
        """Record the error under its round index (checkpointed); back off from this pending set."""
        pending = [name for name in members if name not in self.trained_learners]
        self._last_failure = (frozenset(pending), time.monotonic())
        entry = next((e for e in self.round_errors if e["round"] == round_index), None)
        if entry is None:
            entry = {"round": round_index, "attempts": 0}
            self.round_errors.append(entry)
        entry.update(attempts=entry["attempts"] + 1, learners=pending, error=error)
        self.ledger.record_event("round_failed", round=round_index, attempt=entry["attempts"], error=error)
        await self._checkpoint()

    def _continue_from(self, trained_payload: ArtifactPayload, late: list[str]) -> BAIM:
        """The trained BAIM with the learners that arrived during the round fused again on top of it."""
        spec, tensors = unpack_payload(trained_payload, artifact_id="trained BAIM", max_bytes=2**40)
        trained = BAIM.from_spec(spec)
        trained.load_state_dict(tensors)
        for name in late:
            trained.add_learner(name, self._task_of(name), self.baim.learner(name))  # type: ignore[union-attr]
        return trained

    def _task_of(self, name: str) -> str:
        return self.baim.config.learner(name).task if self.baim is not None else ""

    def _start_policy_timer(self) -> None:
        if self._policy_task is None:
            self._policy_task = asyncio.ensure_future(self._policy_timer())

    async def _policy_timer(self) -> None:
        while True:
            await asyncio.sleep(POLICY_TICK_SECONDS)
            try:
                await self._maybe_start_round()
            except Exception:  # keep the timer alive; the failure is logged
                logger.exception("fusion policy check failed")

    async def _checkpoint(self) -> None:
        """Write the state document; returns once a write that includes this call's changes is durable.

        Group commit: writes are ordered by a lock, and callers whose changes a later snapshot already
        covered return without writing again, so a burst of uploads costs a few writes, not one each.
        """
        self._state_changes += 1
        mine = self._state_changes
        async with self._state_lock:
            if self._state_written >= mine:
                return
            covered = self._state_changes
            state = self._state()  # snapshot taken in the event loop: consistent
            await asyncio.to_thread(self.registry.put_json, STATE_KEY, state)
            self._state_written = covered

    def _state(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "accepted": list(self.accepted),
            "rejected": list(self.rejected.values()),
            "rounds": list(self.rounds),
            "round_errors": [dict(e) for e in self.round_errors],
            "baim_version": self.baim_version,
            "trained_learners": sorted(self.trained_learners),
            "restarts": self.restarts,
            "ledger": self.ledger.to_dict(),
        }

    def _resume(self) -> None:
        """Rebuild from the last state document and the registry (a no-op on a fresh registry)."""
        state = self.registry.get_json(STATE_KEY)
        if state is None:
            # The first checkpoint, written at start: a coordinator killed before any upload still
            # restarts from a checkpoint (and counts the restart).
            self.registry.put_json(STATE_KEY, self._state())
            return
        if held_run_id(state) != self.run_id:
            held = held_run_id(state) or "(none recorded)"
            raise RegistryHeldByAnotherRun(
                f"registry {self.registry_uri} holds the coordinator state of run {held}, not of this run "
                f"({self.run_id or 'no run id'}); refusing to resume another run's uploads, rounds and BAIM",
                held_run_id(state),
            )
        self.restarts = int(state.get("restarts", 0)) + 1
        for receipt in state["rejected"]:  # oldest first: the same bound applies to an older, longer list
            self._remember_rejection(receipt)
        self.rounds = list(state["rounds"])
        self.round_errors = [dict(e) for e in state.get("round_errors", [])]
        self.ledger = Ledger.from_dict(state["ledger"])
        self.baim_version = state["baim_version"]
        if self.baim_version is not None:
            payload = self.registry.get(BAIM_OWNER, self.baim_version)
            spec, tensors = unpack_payload(payload, artifact_id=f"baim@{self.baim_version}", max_bytes=2**40)
            self.baim = BAIM.from_spec(spec)
            self.baim.load_state_dict(tensors)
            self.trained_learners = set(state["trained_learners"])

        # Every accepted upload: those the state lists (arrival order), then any the registry holds that the
        # state missed (stored, then the coordinator died before its checkpoint).
        receipts = {r["key"]: r for r in state["accepted"]}
        order = [r["key"] for r in state["accepted"]]
        for owner in self.registry.owners("edge/"):
            edge_id = owner.removeprefix("edge/")
            for vname in self.registry.versions(owner):
                ref = self.registry.ref(owner, vname)
                version = int(vname.removeprefix("v"))
                key = f"{edge_id}@{version}#{ref.sha256}"
                if key not in receipts:
                    receipts[key] = {
                        "key": key,
                        "edge_id": edge_id,
                        "version": version,
                        "sha256": ref.sha256,
                        "accepted": True,
                        "reason": "",
                        "detail": "",
                        "learner": self.learner_names.get(edge_id),
                        "artifact": f"{owner}@{vname}",
                    }
                    order.append(key)
                    self.ledger.record_upload(edge_id, "accepted", version=version)
        self.accepted = [receipts[key] for key in order]
        for receipt in self.accepted:
            name = receipt["learner"]
            if self.baim is not None and name in self.baim.config.learner_names:
                continue
            payload = self._stored_upload(receipt)
            spec, tensors = unpack_payload(payload, artifact_id=receipt["artifact"], max_bytes=2**40)
            learner = _load_learner(LearnerSpec.from_dict(spec["learner"]), tensors)
            self._fuse(receipt["edge_id"], learner)
        self.ledger.record_event("coordinator_resumed", restarts=self.restarts, accepted=len(self.accepted))
        logger.warning(
            "coordinator resumed (restart %d): %d accepted uploads, BAIM %s, %d pending",
            self.restarts, len(self.accepted), self.baim_version, len(self._pending_learners()),
        )  # fmt: skip
        self.registry.put_json(STATE_KEY, self._state())  # the restart itself is part of the record

    def _stored_upload(self, receipt: dict[str, Any]) -> ArtifactPayload:
        owner, vname = receipt["artifact"].split("@")
        try:
            return self.registry.get(owner, vname)
        except ArtifactNotFound:
            raise RuntimeError(
                f"accepted upload {receipt['artifact']} is missing from {self.registry_uri}"
            ) from None

    # ---- the end of a run -----------------------------------------------------------------------------

    @torch.no_grad()
    def _publish_task_models(self) -> dict[str, dict[str, Any]]:
        """Decompose each task, check it against the BAIM, measure its test loss, publish it."""
        if self.baim is None:
            return {}
        baim = self.baim
        baim.eval()
        resolution = self.scenario.data.resolution
        out: dict[str, dict[str, Any]] = {}
        for task_id, task in enumerate(baim.config.tasks):
            model: TaskModel = decompose(baim, task)
            test = FaceDataset(self.source, self.partitions.test[task], resolution)
            loader = DataLoader(test, batch_size=self.cloud.batch_size)
            max_diff, total, count = 0.0, 0.0, 0
            for batch_index, images in enumerate(loader):
                seed = self.scenario.seed + batch_index
                full = baim(images, task_id, seed=seed)
                alone = model(images, seed=seed)
                max_diff = max(max_diff, float((full.recon - alone.recon).abs().max()))
                total += float(alone.loss) * images.shape[0]
                count += images.shape[0]
            payload = pack_module(model, model.spec())
            version = (
                self.baim_version or "v000000"
            )  # task models carry the version of the BAIM they come from
            ref = self.registry.put(f"task/{task}", version, payload)
            out[task] = {
                "params": count_params(model),
                "baim_params": count_params(baim),
                "learners": list(model.config.learner_names),
                "test_loss": total / count if count else None,
                "test_images": count,
                "decomposition_max_abs_diff": max_diff,
                "artifact": f"{ref.owner}@{ref.version}",
                "sha256": ref.sha256,
            }
        return out


def receipt_json(receipt: dict[str, Any]) -> str:
    return json.dumps(receipt, sort_keys=True)
