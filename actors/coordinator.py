"""CloudCoordinator: accepts edge uploads concurrently, fuses them into the BAIM, trains it in rounds.

A plain class whose public methods are coroutines; the engine runs it as an async Ray actor and injects the
round runner. The event loop does only cheap, structural work: validation, registry writes and fusion run in
threads, and a round runs in a thread that only waits for it, so an upload is never queued behind a round.
An upload is acknowledged as `received` once its bytes are durable, then validated with bounded concurrency
and decided (`accepted` or `rejected`); `outcome(key)` waits for the decision. Its parts: `actors.uploads`
(validation, rejected receipts), `actors.receipt_log` (append-only receipts), `actors.fusion` (live BAIM,
policy), `actors.coordinator_state` (state document), `actors.publishing`. Design: docs/design/coordinator.md.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import torch

from actors.admission import Squads
from actors.coordinator_state import (
    STATE_KEY,
    CoordinatorState,
    RegistryHeldByAnotherRun,
    RoundLog,
    StateStore,
    held_run_id,
    stored_uploads,
)
from actors.edge import learner_name
from actors.fusion import LiveBAIM, RoundPolicy
from actors.lifecycle import (
    ContinualStart,
    FewShotPublisher,
    continual_strategy,
    prune_and_record,
    start_continual,
)
from actors.publishing import publish_baim, publish_task_models
from actors.receipt_log import AdmissionChange, DecidedRecord, PrunedRecord, ReceiptLog, ReceivedRecord
from actors.relay import RelayDesk
from actors.rounds import RoundFailed, RoundRequest, RoundRunner, round_error_text
from actors.uploads import RejectionBook, UploadRejected, UploadValidator, upload_key, validation_slots
from baim.costs import count_params
from baim.learners import VAELearner
from baim.model import BAIM
from orchestrator.core.artifacts import ArtifactPayload, load_module, pack_module
from orchestrator.core.errors import ArtifactRejected
from orchestrator.core.metrics import Ledger, UploadCounts
from orchestrator.core.names import BAIM_OWNER, MAX_MODEL_BYTES, edge_owner, version_name
from orchestrator.core.receipts import (
    ContinualRound,
    CoordinatorStatus,
    CoordinatorSummary,
    LearnerPruning,
    NewTaskRecord,
    PublishedTaskModel,
    RoundRecord,
    UploadReceipt,
    echo,
)
from orchestrator.core.registry import ArtifactNotFound, Registry
from orchestrator.core.scenario import NewTaskEvent, Scenario
from orchestrator.data.partitions import Partitions, make_partitions
from orchestrator.data.sources import DataSource, resolve_source

__all__ = ["STATE_KEY", "CloudCoordinator", "RegistryHeldByAnotherRun", "RoundFailed", "held_run_id"]

logger = logging.getLogger(__name__)


def _invalid(key: str, err: Exception) -> UploadRejected:
    """Whatever else a malformed upload triggers while being checked is still a rejection (logged)."""
    logger.exception("upload %s raised while being checked", key[:200])
    return UploadRejected("invalid", f"validation failed: {type(err).__name__}: {err}"[:500])


POLICY_TICK_SECONDS = 0.25  # how often the fusion policy's wait timer is checked
INLINE_CHECK_BYTES = 1_000_000  # smaller uploads are checked (sha256) on the event loop: no thread hop


class CloudCoordinator:
    """The cloud side of a run.

    Args:
        scenario: the validated scenario (edges, tasks, cloud config).
        registry_uri: where uploads, BAIM versions, task models and the state document live.
        source, partitions: the run's data (the coordinator reads holdout, cloud and test images). None:
            derived from the scenario here (deterministic), so a restarted actor needs only its arguments.
        round_runner: trains one round (blocking; called in a thread): `orchestrator.cloud.local.
            local_training_round` or `orchestrator.cloud.ray_train.ray_train_round`.
        run_id: the run this coordinator belongs to. It resumes only a state document with the same id and
            raises `RegistryHeldByAnotherRun` for another one (None matches only a state written with None).
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
            registry_uri, max_artifact_bytes=max(self.cloud.uploads.max_upload_bytes, MAX_MODEL_BYTES)
        )
        self.source = source if source is not None else resolve_source(scenario.data)
        self.partitions = partitions if partitions is not None else make_partitions(self.source, scenario)
        self.round_runner = round_runner
        self.edges = {edge.id: edge for edge in scenario.all_edges()}
        self.learner_names = {edge_id: learner_name(edge_id) for edge_id in self.edges}
        self.validator = UploadValidator(scenario, self.source, self.partitions)
        self.rejected = RejectionBook(self.cloud.uploads.rejected_receipts_per_edge, set(self.edges))
        rank = {name: position for position, name in enumerate(self.learner_names.values())}
        self.live = LiveBAIM(self.cloud, scenario.seed, rank)
        self.policy = RoundPolicy(self.cloud)
        self.squads = Squads(self.cloud.max_learners_per_task)  # which accepted uploads the BAIM holds
        self.store = StateStore(self.registry, run_id)
        self.receipt_log = ReceiptLog(self.registry)
        # State (the checkpoint holds the small part; receipts are in the receipt log).
        self.ledger = Ledger()
        self.accepted: list[UploadReceipt] = []  # in the order they were decided
        self._accepted_index: dict[str, int] = {}  # key -> position in self.accepted
        self._received: dict[str, UploadReceipt] = {}  # received, not decided yet
        self._received_records: dict[str, ReceivedRecord] = {}  # their log records (to decide them again)
        self._undecided: list[ReceivedRecord] = []  # received before a restart: decided once a loop runs
        self._decisions: dict[str, asyncio.Future[UploadReceipt]] = {}  # key -> its running decision
        self._receiving: dict[str, asyncio.Future[UploadReceipt]] = {}  # key -> its running receipt
        self.log = RoundLog([], [])
        self.baim_version: str | None = None  # last trained BAIM in the registry
        self.restarts = 0
        self.new_tasks: list[NewTaskRecord] = []  # few-shot tasks added (actors.lifecycle)
        self.queued_new_tasks: list[NewTaskEvent] = []  # received, waiting for a trained BAIM
        self.learner_pruning: LearnerPruning | None = None  # what finish()'s model-level pruning did
        self._new_task_run: asyncio.Task[None] | None = None
        # Set by finish(): from then on rounds start only from finish() itself, never from the policy timer
        # or summary(), so the report of a failed finish() describes a coordinator that is not training.
        self._finishing = False
        self._lock = asyncio.Lock()  # guards the BAIM structure (fusion, round start and end)
        self._validation_slots = asyncio.Semaphore(validation_slots(self.cloud.uploads))
        self._to_fuse: list[tuple[str, str, VAELearner]] = []  # admitted (edge, key), acknowledged, not fused
        self._fused_keys: dict[str, str] = {}  # learner -> the key of the upload fused into the live BAIM
        self._round_members: set[str] = set()  # the learners the running round trains
        self._fusion_task: asyncio.Task[None] | None = None
        self._round_task: asyncio.Task[None] | None = None
        self._policy_task: asyncio.Task[None] | None = None
        self.relay_desk = RelayDesk(self.registry, scenario, self.source, self.partitions)
        self._resume()

    @property
    def baim(self) -> BAIM | None:
        """The live BAIM (every fused learner)."""
        return self.live.baim

    # ---- public API (coroutines) ------------------------------------------------------------------

    async def receive(
        self, edge_id: str, version: int, weights: bytes, spec_json: str, sha256: str
    ) -> dict[str, Any]:
        """Acknowledge an upload once its bytes are durable: its receipt with status `received` (validation
        follows; `outcome` gives the decision), or its final receipt when it is decided already or fails
        the checks made before storing it. Idempotent: the same upload gets the same receipt."""
        self._start_policy_timer()
        self._start_decisions()
        key = upload_key(edge_id, version, sha256)
        known = self._known(key)
        if known is not None:
            return known.model_dump()
        if key not in self._receiving:
            future = asyncio.ensure_future(self._receive(key, edge_id, version, weights, spec_json, sha256))
            self._receiving[key] = future
            future.add_done_callback(lambda _: self._receiving.pop(key, None))
        return (await asyncio.shield(self._receiving[key])).model_dump()

    async def outcome(self, key: str) -> dict[str, Any] | None:
        """The final receipt of upload `key` (waits while it is validated); None when this coordinator
        never received it (lost before its acknowledgement, or a key it never saw: send the upload again)."""
        self._start_decisions()
        if not isinstance(key, str):
            return None
        if key in self._receiving:
            await asyncio.shield(self._receiving[key])
        if key in self._received and key not in self._decisions:  # its decision failed: try again
            self._undecided.append(self._received_records[key])
            self._start_decisions()
        decision = self._decisions.get(key)
        if decision is not None:
            return (await asyncio.shield(decision)).model_dump()
        known = self._known(key)
        return None if known is None else known.model_dump()

    async def upload(
        self, edge_id: str, version: int, weights: bytes, spec_json: str, sha256: str
    ) -> dict[str, Any]:
        """`receive`, then wait for the decision: the final receipt (idempotent for the same upload)."""
        receipt = await self.receive(edge_id, version, weights, spec_json, sha256)
        if receipt["status"] != "received":
            return receipt
        final = await self.outcome(receipt["key"])
        return final if final is not None else receipt

    async def status(self) -> dict[str, Any]:
        """A snapshot for progress displays and tests (after fusing what is queued)."""
        self._start_decisions()
        await self._fuse_queued()
        return CoordinatorStatus(
            accepted=[r.edge_id for r in self.accepted],
            received=[r.edge_id for r in self._received.values()],
            rejected={str(r.edge_id): r.reason for r in self.rejected.receipts()},
            learners=self.live.learners,
            pending=self.live.pending(),
            rounds=len(self.log.rounds),
            round_running=self._round_task is not None and not self._round_task.done(),
            baim_version=self.baim_version,
            restarts=self.restarts,
            round_errors=self.log.errors,
        ).model_dump()

    async def new_task(self, event: dict[str, Any]) -> dict[str, Any]:
        """Queue a `new_task` event (NewTaskEvent as JSON); it is adapted once a trained BAIM exists and no
        round runs. Returns at once: {"task", "state": "queued" | "done"}. Idempotent per task name."""
        parsed = NewTaskEvent.model_validate(event)
        name = parsed.task.name
        if any(record.task == name for record in self.new_tasks):
            return {"task": name, "state": "done"}
        if any(queued.task.name == name for queued in self.queued_new_tasks):
            return {"task": name, "state": "queued"}
        if name in self.scenario.task_names() or name not in self.partitions.cloud:
            raise ValueError(
                f"task.name: {name!r} is a scenario task, or no new_task event of the scenario declares it "
                "(its shots are drawn with the partitions)"
            )
        self.queued_new_tasks.append(parsed)
        await self._checkpoint()
        self._start_new_tasks()
        return {"task": name, "state": "queued"}

    async def finish(self) -> dict[str, Any]:
        """Train whatever is still untrained, decompose every task, publish the task models; the summary.

        Untrained learners get one more round unless that very set is backing off. If learners are still
        untrained after that, nothing is published and `RoundFailed` names the round and its last error.
        Idempotent: called again it trains nothing new and republishes the same task models.
        """
        self._finishing = True
        await self._wait_for_decisions()  # the last round trains every upload that was received
        await self._fuse_queued()
        await self._wait_for_rounds()
        if self.live.pending() and not self.policy.backing_off(self.live.pending()):
            await self._start_round()
            await self._wait_for_rounds()
        pending = self.live.pending()
        if pending:
            failed = self.log.failure_of_next_round()
            if failed is None:  # cannot happen; say so if it does
                raise RoundFailed(self.log.next_round, "no round was started", 0, pending)
            raise RoundFailed(failed.round, failed.error, failed.attempts, pending)
        await self._adapt_new_tasks()
        await self._wait_for_rounds()  # none starts (finishing); a round that did start ends first
        if self.cloud.min_selection_rate is not None and self.baim_version is not None:
            await self._prune_learners(self.cloud.min_selection_rate, self.baim_version)
            if changes := self._apply_changes(self._pruned_changes()):
                await self.receipt_log.append(PrunedRecord(kind="pruned", changes=changes))
        tasks = await asyncio.to_thread(self._publish_task_models)
        return self._summary(tasks).model_dump()

    async def summary(self) -> dict[str, Any]:
        """What `finish()` returns, without training or publishing (`tasks` is empty): for a failed run."""
        self._start_decisions()
        await self._fuse_queued()
        return self._summary({}).model_dump()

    async def relay(
        self, edge_id: str, task: str, model_version: str, weights: bytes, spec_json: str
    ) -> dict[str, Any]:
        """Validate an edge's relayed LoRA adapter (actors.relay); the receipt (RelayReceipt). Accepted
        adapters wait for `relay_round`. Never raises for a bad adapter: the receipt says what was wrong."""
        async with self._validation_slots:
            receipt = await asyncio.to_thread(
                self.relay_desk.receive, edge_id, task, model_version, weights, spec_json
            )
        self.ledger.record_event(
            "relay_received", edge=str(receipt.edge_id), accepted=receipt.accepted, reason=receipt.reason
        )
        return receipt.model_dump()

    async def relay_round(self) -> dict[str, Any] | None:
        """A relay round on the last published BAIM once no training round runs (RelayRoundRecord, or None
        when no adapter is pending). An accepted round's BAIM is published as the next version with every
        task model (Serve follows them) and becomes the BAIM later rounds continue from."""
        await self._wait_for_rounds()
        async with self._lock:
            record = await asyncio.to_thread(self.relay_desk.run_round)
            if record is None:
                return None
            kept = self.relay_desk.last_kept
            if record.accepted and kept is not None and self.live.baim is not None:
                await asyncio.to_thread(self.live.trained_round, kept, sorted(self.live.trained))
                self.baim_version = record.baim_version
            self.ledger.record_event(
                "relay_round", accepted=record.accepted, from_version=record.from_version,
                baim_version=record.baim_version,
            )  # fmt: skip
            await self._checkpoint()
        return record.model_dump()

    # ---- uploads -------------------------------------------------------------------------------------

    def _known(self, key: str) -> UploadReceipt | None:
        """The receipt of upload `key` if this coordinator has one (received, accepted or kept rejected)."""
        if key in self._received:
            return self._received[key]
        if key in self._accepted_index:
            return self.accepted[self._accepted_index[key]]
        return self.rejected.get(key)

    async def _receive(
        self, key: str, edge_id: Any, version: Any, weights: Any, spec_json: Any, sha256: Any
    ) -> UploadReceipt:
        """Run the checks made before storing, store the bytes and the `received` record durably (group
        commit), start the decision; the `received` receipt (or a rejection)."""
        # What the upload named, echoed in its receipt whatever it was (an actor call can carry any value).
        sent: dict[str, Any] = {"key": key, "edge_id": echo(edge_id), "version": echo(version)}
        sent["sha256"] = echo(sha256)
        try:
            if isinstance(weights, bytes) and len(weights) <= INLINE_CHECK_BYTES:
                self.validator.check_receivable(edge_id, version, weights, spec_json, sha256)
            else:
                await asyncio.to_thread(
                    self.validator.check_receivable, edge_id, version, weights, spec_json, sha256
                )
        except UploadRejected as err:
            return await self._reject(sent, err, received_at=None)
        except Exception as err:  # whatever else a malformed upload triggers is still a rejection
            return await self._reject(sent, _invalid(key, err), received_at=None)
        payload = ArtifactPayload(weights=weights, spec_json=spec_json, sha256=sha256)
        record = ReceivedRecord(  # the log fills in where in its inbox blob the bytes are
            kind="received", key=key, edge_id=edge_id, version=version, sha256=sha256,
            received_at=time.time(), blob="", offset=0, weights_bytes=0, spec_bytes=0,
        )  # fmt: skip
        written = await self.receipt_log.append(record, payload)
        assert isinstance(written, ReceivedRecord)
        receipt = self._received_receipt(written)
        self._received[key] = receipt
        self._received_records[key] = written
        self._decisions[key] = asyncio.ensure_future(self._decide(written))
        logger.debug("received upload %s", key)
        return receipt

    def _received_receipt(self, record: ReceivedRecord) -> UploadReceipt:
        return UploadReceipt(
            key=record.key, edge_id=record.edge_id, version=record.version, sha256=record.sha256,
            status="received", accepted=False, reason="", detail="",
            learner=self.learner_names[record.edge_id], artifact=None, received_at=record.received_at,
        )  # fmt: skip

    def _start_decisions(self) -> None:
        """Decide the uploads a restarted coordinator found received but undecided (needs a running loop)."""
        undecided, self._undecided = self._undecided, []
        for record in undecided:
            self._decisions[record.key] = asyncio.ensure_future(self._decide(record))

    async def _wait_for_decisions(self) -> None:
        """Until every upload received so far (and any received meanwhile) is decided."""
        self._start_decisions()
        while running := [*self._receiving.values(), *self._decisions.values()]:
            await asyncio.gather(*(asyncio.shield(f) for f in running), return_exceptions=True)
            self._start_decisions()

    async def _decide(self, record: ReceivedRecord) -> UploadReceipt:
        """Validate a received upload (at most `validation_slots` at once, its bytes read back from the
        inbox), store its artifact, admit it; its final receipt, once durable in the receipt log."""
        key = record.key
        sent: dict[str, Any] = {"key": key, "edge_id": record.edge_id, "version": record.version}
        sent["sha256"] = record.sha256
        try:
            try:
                try:
                    async with self._validation_slots:  # bounds the memory of uploads being parsed at once
                        payload = await asyncio.to_thread(self.receipt_log.payload, record)
                        valid = await asyncio.to_thread(
                            self.validator.validate, record.edge_id, record.version, payload.weights,
                            payload.spec_json, payload.sha256,
                        )  # fmt: skip
                except UploadRejected:
                    raise
                except Exception as err:
                    raise _invalid(key, err) from None
                owner, vname = edge_owner(record.edge_id), version_name(record.version)
                try:
                    # verified=True: validation just checked these very bytes; the registry only re-checks
                    # their size and sha256 (cheap), then writes them durably.
                    await asyncio.to_thread(self.registry.put, owner, vname, payload, verified=True)
                except ArtifactRejected as err:  # e.g. version_conflict: the version holds another model
                    raise UploadRejected(err.code, err.reason) from None
            except UploadRejected as err:
                receipt = await self._reject(sent, err, received_at=record.received_at)
            else:
                receipt = await self._accept(record, valid.learner, valid.holdout_loss, f"{owner}@{vname}")
        finally:  # a decision that failed (its log write, say) leaves the upload received: `outcome` retries
            self._decisions.pop(key, None)
        self._received_records.pop(key, None)
        if (blob := self.receipt_log.close(record)) is not None:  # its last undecided upload: not needed
            await asyncio.to_thread(self.registry.delete_blob, blob)
        return receipt

    async def _reject(
        self, sent: dict[str, Any], err: UploadRejected, *, received_at: float | None
    ) -> UploadReceipt:
        receipt = UploadReceipt(
            **sent, status="rejected", accepted=False, reason=err.code, detail=err.detail, learner=None,
            artifact=None, received_at=received_at, decided_at=time.time(),
        )  # fmt: skip
        await self.receipt_log.append(DecidedRecord(kind="decided", receipt=receipt))
        self._received.pop(receipt.key, None)
        self.rejected.remember(receipt)
        self._record_in_ledger(receipt)
        logger.warning("rejected upload %s: %s (%s)", receipt.key, err.code, err.detail)
        return receipt

    async def _accept(
        self, record: ReceivedRecord, learner: VAELearner, holdout_loss: float, artifact: str
    ) -> UploadReceipt:
        receipt = self._received_receipt(record).model_copy(
            update={"status": "accepted", "accepted": True, "artifact": artifact, "decided_at": time.time()}
        )
        # Admission in the event loop, with the receipt listed at once: the next decision sees this one.
        receipt, changes = self._admit(receipt, holdout_loss)
        self._accepted_index[receipt.key] = len(self.accepted)
        self.accepted.append(receipt)
        await self.receipt_log.append(DecidedRecord(kind="decided", receipt=receipt, changes=changes))
        self._received.pop(receipt.key, None)
        self._record_in_ledger(receipt)
        # Fusion follows the decision, in decision order, off the event loop: its cost grows with the BAIM,
        # and a restarted coordinator re-fuses from the registry anyway.
        if receipt.admission == "admitted":
            self._to_fuse.append((record.edge_id, receipt.key, learner))
        if self._fusion_task is None or self._fusion_task.done():
            self._fusion_task = asyncio.ensure_future(self._fuse_queued())
        logger.info("accepted upload %s as learner %s (%s)", receipt.key, receipt.learner, receipt.admission)
        return self.accepted[self._accepted_index[receipt.key]]

    def _record_in_ledger(self, receipt: UploadReceipt) -> None:
        edge_id, version = receipt.edge_id, receipt.version
        self.ledger.record_upload(
            edge_id if isinstance(edge_id, str) and edge_id else "unknown",
            "accepted" if receipt.accepted else "rejected",
            reason=receipt.reason,
            version=version if isinstance(version, int) and not isinstance(version, bool) and version >= 0
            else None,
            detail=receipt.detail,
            at=receipt.decided_at,
        )  # fmt: skip

    def _admit(
        self, receipt: UploadReceipt, holdout_loss: float
    ) -> tuple[UploadReceipt, list[AdmissionChange]]:
        """`receipt` with its admission (actors.admission), and the receipts of learners it displaced (their
        new admission, applied here)."""
        name, edge_id = str(receipt.learner), str(receipt.edge_id)
        fixed = self.live.trained | self._round_members
        decision = self.squads.decide(self.edges[edge_id].task, name, receipt.key, holdout_loss, fixed)
        changes = []
        if decision.displaces is not None:
            for other in self.accepted:
                if other.learner == decision.displaces and other.admission == "admitted":
                    detail = (
                        f"displaced by {name} (holdout loss {holdout_loss:.6g}) before any round trained it"
                    )
                    changes.append(AdmissionChange(key=other.key, admission="registry_only", detail=detail))
        self._apply_changes(changes)
        admission = "admitted" if decision.admitted else "registry_only"
        decided = {"holdout_loss": holdout_loss, "admission": admission, "admission_detail": decision.detail}
        return receipt.model_copy(update=decided), changes

    def _apply_changes(self, changes: list[AdmissionChange]) -> list[AdmissionChange]:
        """Apply admission changes to the accepted receipts they name; returns them."""
        for change in changes:
            position = self._accepted_index[change.key]
            update = {"admission": change.admission, "admission_detail": change.detail}
            self.accepted[position] = self.accepted[position].model_copy(update=update)
        return changes

    def _pruned_changes(self) -> list[AdmissionChange]:
        """The admitted uploads whose learner the last model-level pruning removed, not yet marked."""
        pruning = self.learner_pruning
        if pruning is None:
            return []
        removed = {entry.learner: entry for entry in pruning.removed}
        changes = []
        for receipt in self.accepted:
            entry = removed.get(str(receipt.learner))
            if receipt.admission != "admitted" or entry is None:
                continue
            detail = (
                f"removed by model-level pruning of BAIM {pruning.from_version}: selection rate "
                f"{entry.selection_rate:.4g} below cloud.min_selection_rate {pruning.threshold}"
                + (" (kept only as a feeder of other learners)" if entry.kept_as_feeder else "")
            )
            changes.append(AdmissionChange(key=receipt.key, admission="pruned", detail=detail))
        return changes

    async def _fuse_queued(self) -> None:
        """Fuse every queued learner in arrival order (a thread does the work), then apply the policy.

        An item leaves the queue only once fused, so a task cancelled midway loses nothing.
        """
        async with self._lock:
            while True:
                await self._drop_displaced()
                if not self._to_fuse:
                    break
                edge_id, key, learner = self._to_fuse[0]
                if self._still_admitted(edge_id, key):
                    with self.ledger.fusion():
                        await asyncio.to_thread(self._fuse, edge_id, key, learner)
                self._to_fuse.pop(0)
        await self._maybe_start_round()

    def _fuse(self, edge_id: str, key: str, learner: VAELearner) -> None:
        name = self.learner_names[edge_id]
        self.live.fuse(name, self.edges[edge_id].task, learner)
        self._fused_keys.setdefault(name, key)  # fuse() keeps a learner already in as it is

    def _still_admitted(self, edge_id: str, key: str) -> bool:
        """Whether upload `key` still holds its learner's seat (an upload admitted later may displace it)."""
        return self.squads.admitted_keys().get(self.learner_names[edge_id]) == key

    async def _drop_displaced(self) -> None:
        """Drop from the live BAIM the pending learners whose fused upload no longer holds the seat. On return
        none is left (an upload displacing one meanwhile is dropped too), until the caller next awaits."""
        while stale := self._displaced():
            keep = set(self.live.learners) - set(stale)
            for name in await asyncio.to_thread(self.live.drop_pending, keep, self._last_trained):
                del self._fused_keys[name]

    def _displaced(self) -> list[str]:
        admitted = self.squads.admitted_keys()
        return [name for name in self.live.pending() if admitted.get(name) != self._fused_keys.get(name)]

    # ---- rounds --------------------------------------------------------------------------------------

    async def _maybe_start_round(self) -> None:
        if self._finishing or (self._round_task is not None and not self._round_task.done()):
            return  # finish() decides about the last round itself; arrivals during a round join the next
        if self.policy.due(self.live.pending(), self.live.pending_since):
            await self._start_round()

    async def _start_round(self) -> None:
        async with self._lock:
            if self.live.baim is None or (self._round_task is not None and not self._round_task.done()):
                return
            await self._drop_displaced()
            if self.live.baim is None:
                return
            self._round_members = set(self.live.learners)  # from now on no upload displaces them
            baim = await asyncio.to_thread(self.live.canonical, self._last_trained)
            # A round after a trained one is continual: gate_only keeps the trained learners and runs the
            # strategy whose BAIM it continues from alone (actors.lifecycle.continual_strategy).
            continual = self.baim_version is not None
            gate_only = continual and self.cloud.continual == "gate_only"
            strategies = list(self.cloud.strategies)
            if gate_only:
                last_kept = self.log.rounds[-1].kept if self.log.rounds else None
                strategies = [continual_strategy(self.cloud.keep, strategies, last_kept)]
            request = RoundRequest(
                round_index=self.log.next_round,
                baim=await asyncio.to_thread(pack_module, baim, baim.spec()),
                strategies=strategies,
                scenario=self.scenario,
                source=self.source,
                partitions=self.partitions,
                registry_uri=self.registry_uri,
                frozen_learners=sorted(self.live.trained) if gate_only else None,
            )
            members = list(baim.config.learner_names)
            self.ledger.record_event("round_started", round=request.round_index, learners=len(members))
            self._round_task = asyncio.ensure_future(self._run_round(request, members, continual))

    async def _run_round(self, request: RoundRequest, members: list[str], continual: bool) -> None:
        logger.info(
            "round %d: training %d learners (%s)", request.round_index, len(members), request.strategies
        )
        started = time.perf_counter()
        try:
            # A continual round: every task's test loss before it (the fused BAIM computes the trained one's)
            before: ContinualStart | None = None
            if continual:
                before = await asyncio.to_thread(
                    start_continual, request, sorted(self.live.trained), self.cloud.continual
                )
            result = await asyncio.to_thread(self.round_runner, request)
        except Exception as err:  # a failed round loses nothing: its learners stay pending
            self._round_members = set()
            logger.exception("round %d failed", request.round_index)
            pending = [name for name in members if name not in self.live.trained]
            self.policy.failed(pending)
            entry = self.log.failed(request.round_index, pending, round_error_text(err))
            self.ledger.record_event(
                "round_failed", round=entry.round, attempt=entry.attempts, error=entry.error
            )
            await self._checkpoint()
            return
        seconds = time.perf_counter() - started
        trained = await asyncio.to_thread(load_module, result.trained, BAIM, artifact_id="trained BAIM")
        continual_record: ContinualRound | None = None
        if before is not None:
            continual_record = await asyncio.to_thread(before.finish, trained)
        async with self._lock:
            version = await asyncio.to_thread(publish_baim, self.registry, result.trained)
            await asyncio.to_thread(self.live.trained_round, trained, members)
            self._round_members = set()
            self.baim_version = version
            self.policy.succeeded()
            for strategy, run in result.strategies.items():
                self.ledger.record_cloud_flops(strategy, run.flops)
                self.ledger.record_seconds(f"train/{strategy}", run.seconds)
            self.log.rounds.append(
                RoundRecord(
                    round=request.round_index,
                    learners=members,
                    baim_version=version,
                    seconds=seconds,
                    strategies=result.strategies,
                    kept=result.kept,
                    holdout_loss=result.holdout_loss,
                    continual=continual_record,
                )
            )
            self.ledger.record_event("round_finished", round=request.round_index, baim_version=version)
            await self._checkpoint()
        logger.info("round %d done in %.1fs: BAIM %s", request.round_index, seconds, version)
        self._start_new_tasks()
        await self._maybe_start_round()

    # ---- few-shot tasks and model-level pruning (actors.lifecycle) -----------------------------------

    def _start_new_tasks(self) -> None:
        """Adapt the queued new tasks in the background (finish() waits for them)."""
        if self.queued_new_tasks and (self._new_task_run is None or self._new_task_run.done()):
            self._new_task_run = asyncio.ensure_future(self._adapt_new_tasks())

    async def _adapt_new_tasks(self) -> None:
        """Each queued new task, in order, once a trained BAIM exists and no round runs: its few-shot squad
        joins the trained BAIM, which is published as the next `baim` version with the task's model."""
        while self.queued_new_tasks:
            async with self._lock:  # a round starts under the lock: none can start while this adapts
                if not self.queued_new_tasks:  # another caller adapted it while this one waited
                    return
                round_running = self._round_task is not None and not self._round_task.done()
                if self.baim_version is None or round_running:
                    return  # the round's end starts this again
                event = self.queued_new_tasks[0]
                publisher = FewShotPublisher(self.registry, self.scenario, self.source, self.partitions)
                trained, record = await asyncio.to_thread(publisher.run, event, self._last_trained())
                await asyncio.to_thread(self.live.trained_round, trained, sorted(self.live.trained))
                self.baim_version = record.baim_version
                self.new_tasks.append(record)
                self.queued_new_tasks.pop(0)
                self.ledger.record_event("new_task", task=record.task, baim_version=record.baim_version)
                await self._checkpoint()

    async def _prune_learners(self, threshold: float, trained_version: str) -> None:
        """Model-level pruning of the last trained BAIM, once per trained version (finish() may repeat)."""
        if self.learner_pruning is not None and self.learner_pruning.from_version == trained_version:
            return
        async with self._lock:
            self.learner_pruning = await asyncio.to_thread(
                prune_and_record, self.registry, self._last_trained(), trained_version, threshold,
                self.scenario, self.source, self.partitions,
            )  # fmt: skip
            await self._checkpoint()

    async def _wait_for_rounds(self) -> None:
        """Until no round runs (a round that ends may start the next one for late arrivals)."""
        while self._round_task is not None and not self._round_task.done():
            await asyncio.shield(self._round_task)

    def _last_trained(self) -> BAIM | None:
        if self.baim_version is None:
            return None
        return self.registry.load_module(BAIM_OWNER, self.baim_version, BAIM)

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

    # ---- state ---------------------------------------------------------------------------------------

    async def _checkpoint(self) -> None:
        await self.store.checkpoint(self._state)

    def _state(self) -> CoordinatorState:
        # Upload records and counts come back from the receipt log: the document stays small.
        no_uploads = {"uploads": [], "upload_counts": UploadCounts(accepted=0, rejected={})}
        return CoordinatorState(
            run_id=self.run_id,
            rounds=self.log.rounds,
            round_errors=self.log.errors,
            baim_version=self.baim_version,
            trained_learners=sorted(self.live.trained),
            restarts=self.restarts,
            ledger=self.ledger.snapshot().model_copy(update=no_uploads),
            new_tasks=self.new_tasks,
            queued_new_tasks=self.queued_new_tasks,
            learner_pruning=self.learner_pruning,
        )

    def _resume(self) -> None:
        """Rebuild from the last state document, the receipt log and the registry (a fresh registry: write
        the first state document)."""
        state = self.store.read()
        if state is None:  # a coordinator killed before any upload still restarts from a checkpoint
            self.store.write(self._state())
            return
        # The restart is recorded before anything else: a kill while resuming must not lose its count.
        self.restarts = state.restarts + 1
        self.store.write(state.model_copy(update={"restarts": self.restarts}))
        self.log = RoundLog(state.rounds, state.round_errors)
        self.ledger = Ledger.from_snapshot(state.ledger)
        self.baim_version = state.baim_version
        self.new_tasks = list(state.new_tasks)
        self.queued_new_tasks = list(state.queued_new_tasks)  # adapted after the next round or in finish()
        self.learner_pruning = state.learner_pruning
        if self.baim_version is not None:
            self.live.baim = self._last_trained()
            self.live.trained = set(state.trained_learners)
        undecided = self._replay()
        # Uploads the registry holds that the log does not list (stored outside this coordinator).
        unlisted = [
            receipt
            for receipt in stored_uploads(self.registry, self.learner_names)
            if receipt.key not in self._accepted_index and receipt.key not in undecided
        ]
        for receipt in unlisted:
            self._accepted_index[receipt.key] = len(self.accepted)
            self.accepted.append(receipt.model_copy(update={"decided_at": time.time()}))
        # Seat the admitted learners in decision order (an undecided one is decided now, on its loss).
        newly_decided: list[DecidedRecord | PrunedRecord] = []
        for position in range(len(self.accepted)):
            receipt, changes = self._readmit(self.accepted[position])
            self.accepted[position] = receipt
            if receipt.key in {r.key for r in unlisted}:
                newly_decided.append(DecidedRecord(kind="decided", receipt=receipt, changes=changes))
                self._record_in_ledger(receipt)
        if changes := self._apply_changes(self._pruned_changes()):
            newly_decided.append(PrunedRecord(kind="pruned", changes=changes))
        self.receipt_log.write_now(newly_decided)
        for receipt in self.accepted:
            if receipt.admission == "admitted" and receipt.learner not in self.live.learners:
                self._fuse(str(receipt.edge_id), receipt.key, self._stored_learner(receipt))
        # Received, never decided: validated again once the event loop runs (their bytes stay in the inbox).
        self._undecided = list(undecided.values())
        self._received = {key: self._received_receipt(record) for key, record in undecided.items()}
        self._received_records = dict(undecided)
        self.receipt_log.track_open(self._undecided)
        relays = self.relay_desk.resume()  # adapters accepted before the restart, validated again
        self.ledger.record_event(
            "coordinator_resumed",
            restarts=self.restarts,
            accepted=len(self.accepted),
            received=len(undecided),
            relays=sum(receipt.accepted for receipt in relays),
        )
        logger.warning(
            "coordinator resumed (restart %d): %d accepted uploads, %d received to decide again, BAIM %s, "
            "%d pending",
            self.restarts, len(self.accepted), len(undecided), self.baim_version, len(self.live.pending()),
        )  # fmt: skip
        self.store.write(self._state())

    def _replay(self) -> dict[str, ReceivedRecord]:
        """Apply the receipt log (receipts, admission changes, the ledger's upload records); returns the
        uploads received but not decided, by key, in the order they were received."""
        undecided: dict[str, ReceivedRecord] = {}
        for record in self.receipt_log.replay():
            if isinstance(record, ReceivedRecord):
                undecided[record.key] = record
                continue
            if isinstance(record, DecidedRecord):
                receipt = record.receipt
                undecided.pop(receipt.key, None)
                if receipt.accepted:
                    if receipt.key not in self._accepted_index:
                        self._accepted_index[receipt.key] = len(self.accepted)
                        self.accepted.append(receipt)
                    self.accepted[self._accepted_index[receipt.key]] = receipt
                else:  # oldest first: the bound applies to an older, longer list too
                    self.rejected.remember(receipt)
                self._record_in_ledger(receipt)
            self._apply_changes(record.changes)
        return undecided

    def _readmit(self, receipt: UploadReceipt) -> tuple[UploadReceipt, list[AdmissionChange]]:
        """A resumed receipt's seat; one never decided (stored outside this coordinator) is decided now, on
        its holdout loss measured again."""
        task = self.edges[str(receipt.edge_id)].task
        if receipt.admission == "registry_only":
            return receipt, []
        if receipt.admission in ("admitted", "pruned") and receipt.holdout_loss is not None:
            self.squads.seat(task, str(receipt.learner), receipt.key, receipt.holdout_loss)
            return receipt, []
        loss = self.validator.plausibility_loss(self._stored_learner(receipt), task)
        return self._admit(receipt, loss)

    def _stored_learner(self, receipt: UploadReceipt) -> VAELearner:
        owner, vname = str(receipt.artifact).split("@")
        try:
            return self.registry.load_module(owner, vname, VAELearner)
        except ArtifactNotFound:
            raise RuntimeError(
                f"accepted upload {receipt.artifact} is missing from {self.registry_uri}"
            ) from None

    # ---- the end of a run -----------------------------------------------------------------------------

    def _publish_task_models(self) -> dict[str, PublishedTaskModel]:
        if self.live.baim is None:
            return {}
        baim, version = self.live.baim, self.baim_version or version_name(0)
        pruning = self.learner_pruning
        if pruning is not None and pruning.from_version == self.baim_version:
            version = pruning.baim_version  # the pruned BAIM (the trained one when nothing was removed)
            baim = self.registry.load_module(BAIM_OWNER, version, BAIM)
        return publish_task_models(
            self.registry,
            baim,
            version,
            source=self.source,
            test_indices=self.partitions.test,
            resolution=self.scenario.data.resolution,
            batch_size=self.cloud.batch_size,
            seed=self.scenario.seed,
            task_model_budget=self.cloud.task_model_budget,
        )

    def _summary(self, tasks: dict[str, PublishedTaskModel]) -> CoordinatorSummary:
        return CoordinatorSummary(
            run_id=self.run_id,
            accepted=self.accepted,
            received=list(self._received.values()),
            rejected=self.rejected.receipts(),
            learners=self.live.learners,
            untrained_learners=self.live.pending(),
            baim_version=self.baim_version,
            baim_params=count_params(self.live.baim) if self.live.baim is not None else 0,
            rounds=self.log.rounds,
            round_errors=self.log.errors,
            restarts=self.restarts,
            ledger=self.ledger.snapshot(),
            tasks=tasks,
            new_tasks=self.new_tasks,
            learner_pruning=self.learner_pruning,
        )
