"""The cloud's relay desk: personalised adapters arrive like uploads, a relay round takes them into the BAIM.

`RelayDesk.receive` validates one relayed adapter as an upload is validated (known edge and task, size,
safetensors and JSON spec, exact layer names, shapes and dtypes, finite values, a merged change at most
`personalisation.max_relative_delta` of each layer's norm), against the very task model version the edge
trained on, which must be the task's current one. Accepted adapters wait (one per edge: a newer relay
replaces the older) for `run_round`, which loads the BAIM of that version, takes the adapters in with
`personalisation.relay_method` (baim.relay) and, with `relay_guard`, keeps the result only if no task's loss
on the cloud's held-out images rose. An accepted round is published as the next `baim` version with every
task's model (actors.publishing), so Serve, which follows `task/<task>`, rolls to it; a rejected one
publishes nothing. The coordinator calls this (CloudCoordinator.relay, relay_round); so does the
evaluation's driver-side relay stage, with the same code.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader

from actors.edge import learner_name
from actors.publishing import publish_baim, publish_task_models
from baim.adapters import adapter_from_bytes, lora_weight_deltas, merge_lora
from baim.decompose import TaskModel, decompose
from baim.model import BAIM
from baim.relay import Batch, RelayedAdapter, RelaySettings, RelayStats, guarded_update, relay_round
from baim.training import evaluate
from orchestrator.core.artifacts import pack_module
from orchestrator.core.names import BAIM_OWNER, task_owner
from orchestrator.core.receipts import echo
from orchestrator.core.registry import ArtifactNotFound, Registry
from orchestrator.core.relay import RelayReceipt, RelayRoundRecord, RelayTaskRecord
from orchestrator.core.scenario import Scenario
from orchestrator.data.datasets import FaceDataset
from orchestrator.data.partitions import Partitions
from orchestrator.data.sources import DataSource

logger = logging.getLogger(__name__)

PENDING_KEY = "relay/pending"  # state/relay/pending.json: the pending adapters; their bytes in blobs/relay/
EVAL_BATCH = 64  # images per batch of every loss the desk measures
MAX_SPEC_CHARS = 1_000_000  # an adapter spec lists layer names: far below this


class RelayRejected(ValueError):  # noqa: N818 (reads as what happened)
    """A relayed adapter the desk refused: a short code and what was wrong."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code, self.detail = code, detail


@dataclass
class PendingRelay:
    adapter: RelayedAdapter
    edge_id: str
    model_version: str
    nbytes: int


class RelayDesk:
    """Relayed adapters in, relay rounds out (see the module docstring)."""

    def __init__(
        self, registry: Registry, scenario: Scenario, source: DataSource, partitions: Partitions
    ) -> None:
        self.registry = registry
        self.scenario = scenario
        self.source = source
        self.partitions = partitions
        self.edges = {edge.id: edge for edge in scenario.all_edges()}
        self.pending: dict[str, PendingRelay] = {}  # by edge id, in arrival order
        self._index: dict[str, dict[str, object]] = {}  # what PENDING_KEY holds: where each one's bytes are
        self.rounds: list[RelayRoundRecord] = []
        self.last_kept: BAIM | None = None  # the BAIM the last round left in place (published if accepted)
        self._cloud_images: dict[str, torch.Tensor] = {}

    # ---- adapters in -------------------------------------------------------------------------------

    def receive(
        self, edge_id: object, task: object, model_version: object, weights: object, spec_json: object
    ) -> RelayReceipt:
        """Validate one relayed adapter; accepted ones wait for the next relay round."""
        sizes = [len(part) for part in (weights, spec_json) if isinstance(part, bytes | str)]
        sent = {"edge_id": echo(edge_id), "task": echo(task), "model_version": echo(model_version)}
        try:
            pending = self._validate(edge_id, task, model_version, weights, spec_json)
        except RelayRejected as rejected:
            logger.warning("relay from %r rejected: %s (%s)", edge_id, rejected.code, rejected.detail)
            return RelayReceipt(
                **sent, accepted=False, reason=rejected.code, detail=rejected.detail[:500], nbytes=sum(sizes)
            )
        assert isinstance(weights, bytes) and isinstance(spec_json, str)  # checked by _validate
        # Durable before the receipt: a coordinator restarted before the relay round still has it.
        self.registry.put_blob(self._blob(pending.edge_id), weights + spec_json.encode())
        self.pending.pop(pending.edge_id, None)
        self.pending[pending.edge_id] = pending
        self._index[pending.edge_id] = {
            "task": pending.adapter.task,
            "model_version": pending.model_version,
            "weights_bytes": len(weights),
            "spec_bytes": len(spec_json.encode()),
        }
        self.registry.put_json(PENDING_KEY, self._index)
        return RelayReceipt(**sent, accepted=True, reason="", detail="", nbytes=pending.nbytes)

    def resume(self) -> list[RelayReceipt]:
        """Validate again every adapter a previous coordinator accepted and no relay round took in (one
        now stale is dropped, with its receipt saying so); their receipts, in arrival order."""
        index = self.registry.get_json(PENDING_KEY, default={})
        if not isinstance(index, dict):
            raise ValueError(f"state document {PENDING_KEY!r}: expected an object, received {echo(index)!r}")
        receipts = []
        for edge_id, entry in index.items():
            try:
                weights_bytes, spec_bytes = int(entry["weights_bytes"]), int(entry["spec_bytes"])
                data = self.registry.read_blob(self._blob(edge_id), 0, weights_bytes + spec_bytes)
                task, version = entry["task"], entry["model_version"]
            except (KeyError, TypeError, ValueError, ArtifactNotFound) as error:
                logger.warning("relay from %r not resumed: %s", edge_id, error)
                continue
            spec_json = data[weights_bytes:].decode(errors="replace")
            receipts.append(self.receive(edge_id, task, version, data[:weights_bytes], spec_json))
        stale = set(index) - set(self.pending)
        if stale:  # refused on resume: forget them (their receipts said why)
            self._forget(sorted(stale))
        logger.info("relay desk resumed %d pending adapters of %d", len(self.pending), len(index))
        return receipts

    def _blob(self, edge_id: str) -> str:
        return f"relay/{edge_id}"

    def _forget(self, edge_ids: list[str]) -> None:
        for edge_id in edge_ids:
            self._index.pop(edge_id, None)
        self.registry.put_json(PENDING_KEY, self._index)
        for edge_id in edge_ids:
            self.registry.delete_blob(self._blob(edge_id))

    def _validate(
        self, edge_id: object, task: object, model_version: object, weights: object, spec_json: object
    ) -> PendingRelay:
        if not isinstance(edge_id, str) or edge_id not in self.edges:
            raise RelayRejected("unknown_edge", f"edge_id: {echo(edge_id)!r} is not an edge of the scenario")
        if task != self.edges[edge_id].task:
            raise RelayRejected(
                "wrong_task",
                f"task: edge {edge_id!r} serves {self.edges[edge_id].task!r}, received {echo(task)!r}",
            )
        if not isinstance(weights, bytes) or not isinstance(spec_json, str):
            raise RelayRejected(
                "invalid",
                f"expected weights as bytes and the spec as str, received {type(weights).__name__} and "
                f"{type(spec_json).__name__}",
            )
        nbytes = len(weights) + len(spec_json)
        limit = self.scenario.cloud.uploads.max_upload_bytes
        if nbytes > limit or len(spec_json) > MAX_SPEC_CHARS:
            raise RelayRejected("too_large", f"{nbytes} bytes exceed cloud.uploads.max_upload_bytes {limit}")
        current = self.registry.latest(task_owner(task))
        if current is None:
            raise RelayRejected("stale", f"task: {task!r} has no published model yet")
        if model_version != current:
            raise RelayRejected(
                "stale",
                f"model_version: the current {task} model is {current}, received {echo(model_version)!r}",
            )
        model = self.registry.load_module(task_owner(task), current, TaskModel)
        try:
            adapter_from_bytes(
                model, weights, spec_json, max_relative_delta=self.scenario.personalisation.max_relative_delta
            )
        except ValueError as error:
            raise RelayRejected("invalid", str(error)) from None
        # A task model's BAIM names its modules as the whole BAIM does, below "baim.".
        deltas = {key.removeprefix("baim."): delta for key, delta in lora_weight_deltas(model).items()}
        merge_lora(model)
        adapter = RelayedAdapter(learner_name(edge_id), task, deltas, model.eval())
        return PendingRelay(adapter, edge_id, current, nbytes)

    # ---- a relay round -----------------------------------------------------------------------------

    def run_round(self) -> RelayRoundRecord | None:
        """Take every pending adapter of the current BAIM version in (see the module docstring); None when
        none is pending. Adapters of an older version (a round published a newer one since) are dropped."""
        current = self.registry.latest(BAIM_OWNER)
        stale = [edge for edge, item in self.pending.items() if item.model_version != current]
        for edge in stale:
            logger.warning(
                "relay from %s dropped: trained on %s, BAIM is now %s",
                edge,
                self.pending[edge].model_version,
                current,
            )
            del self.pending[edge]
        if stale:
            self._forget(stale)
        if not self.pending or current is None:
            return None
        started = time.perf_counter()
        items = list(self.pending.values())
        baim = self.registry.load_module(BAIM_OWNER, current, BAIM).eval()
        tasks = sorted({item.adapter.task for item in items}, key=baim.config.tasks.index)
        before = {task: self.test_loss(baim, task) for task in tasks}
        config = self.scenario.personalisation
        settings = RelaySettings(
            method=config.relay_method,
            gate_epochs=config.relay_gate_epochs,
            epochs=config.relay_epochs,
            lr=config.relay_lr or self.scenario.cloud.lr,
            distil_weight=config.relay_distil_weight,
            student=config.relay_student,
            generated=config.relay_generated,
            batch_size=self.scenario.cloud.batch_size,
            seed=self.scenario.seed,
        )
        adapters = [item.adapter for item in items]
        order = list(baim.config.tasks)
        stats = RelayStats()
        candidate = baim

        def take_in(target: BAIM) -> None:
            nonlocal stats, candidate
            candidate = target
            stats = relay_round(target, adapters, settings, lambda epochs: self.cloud_batches(order, epochs))

        if config.relay_guard:
            outcome = guarded_update(baim, take_in, self.holdout_losses)
            accepted, kept = outcome.accepted, outcome.baim
            held_before, held_after = outcome.loss_before, outcome.loss_after
        else:
            take_in(baim)
            accepted, kept, held_before, held_after = True, baim, {}, {}
        version, task_versions = None, {}
        if accepted:
            version = publish_baim(self.registry, pack_module(kept, kept.spec()))
            published = publish_task_models(
                self.registry,
                kept,
                version,
                source=self.source,
                test_indices=self.partitions.test,
                resolution=self.scenario.data.resolution,
                batch_size=self.scenario.cloud.batch_size,
                seed=self.scenario.seed,
                task_model_budget=self.scenario.cloud.task_model_budget,
                only=[task for task in kept.config.tasks if self.partitions.test.get(task)],
            )
            task_versions = {task: row.artifact for task, row in published.items()}
        records = {}
        for task in tasks:
            taken = [item for item in items if item.adapter.task == task]
            records[task] = RelayTaskRecord(
                edges=[item.edge_id for item in taken],
                relay_bytes=sum(item.nbytes for item in taken),
                test_loss_before=before[task],
                candidate_test_loss=self.test_loss(candidate, task),
                test_loss_after=self.test_loss(kept, task),
            )
        record = RelayRoundRecord(
            method=config.relay_method,
            from_version=current,
            guarded=config.relay_guard,
            accepted=accepted,
            baim_version=version,
            task_versions=task_versions,
            holdout_loss_before=held_before,
            holdout_loss_after=held_after,
            distillation_loss_before=stats.distillation_before,
            distillation_loss_after=stats.distillation_after,
            tasks=records,
            seconds=time.perf_counter() - started,
        )
        self._forget(list(self.pending))
        self.pending.clear()
        self.rounds.append(record)
        self.last_kept = kept
        return record

    # ---- data and losses ---------------------------------------------------------------------------

    def _images(self, indices: list[int]) -> torch.Tensor:
        faces = FaceDataset(self.source, indices, self.scenario.data.resolution)
        return torch.cat(list(DataLoader(faces, batch_size=EVAL_BATCH)))

    def cloud_batches(self, tasks: list[str], epochs: int) -> list[Batch]:
        """`epochs` shuffled passes (seeded) over the cloud's images of `tasks` (task ids index `tasks`)."""
        for task in tasks:
            if task not in self._cloud_images and self.partitions.cloud.get(task):
                self._cloud_images[task] = self._images(self.partitions.cloud[task])
        present = [task for task in tasks if task in self._cloud_images]
        x = torch.cat([self._cloud_images[task] for task in present])
        t = torch.cat([torch.full((len(self._cloud_images[task]),), tasks.index(task)) for task in present])
        size = self.scenario.cloud.batch_size
        batches = []
        for epoch in range(epochs):
            order = torch.randperm(
                len(x), generator=torch.Generator().manual_seed(self.scenario.seed + epoch)
            )
            batches += [(x[order[i : i + size]], t[order[i : i + size]]) for i in range(0, len(x), size)]
        return batches

    def _loss(self, baim: BAIM, task: str, indices: list[int]) -> float:
        model = decompose(baim, task)
        loader = DataLoader(FaceDataset(self.source, indices, self.scenario.data.resolution), EVAL_BATCH)
        return evaluate(model, loader, lambda module, images: module(images).loss)

    def test_loss(self, baim: BAIM, task: str) -> float:
        """The task model's loss on the task's test images (seeded: the same BAIM gives the same number)."""
        return self._loss(baim, task, self.partitions.test[task])

    def holdout_losses(self, baim: BAIM) -> dict[str, float]:
        """Per task with held-out images: the task model's loss on the cloud's held-out images (seeded)."""
        return {
            task: self._loss(baim, task, self.partitions.holdout[task])
            for task in baim.config.tasks
            if self.partitions.holdout.get(task)
        }
