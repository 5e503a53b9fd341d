"""EdgeNode: one edge of the system. It trains a small VAE on its private shard and uploads it once.

A plain class; the edge fleet (orchestrator.runtime.fleet) wraps it with `ray.remote(...).options(...)` and
the resources the scenario declares. Threads, devices and the simulated link: docs/ARCHITECTURE.md ("Edges").
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any, Literal, Protocol

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from baim.config import LearnerSpec
from baim.costs import count_flops, forward_backward_flops
from baim.learners import VAELearner
from baim.seeding import derive_seed
from baim.training import evaluate, train_epoch, vae_batch_loss
from orchestrator.core.artifacts import ArtifactPayload, load_module, pack_state
from orchestrator.core.metrics import Ledger
from orchestrator.core.names import MAX_MODEL_BYTES
from orchestrator.core.reports import EdgeNodeStatus, EdgeReport, FedAvgClientReport
from orchestrator.core.scenario import EdgeConfig
from orchestrator.data.datasets import FaceDataset
from orchestrator.data.sources import DataSource

logger = logging.getLogger(__name__)

# FLOPs of one batch by (pass, learner spec, batch size, KL weight): they depend on nothing else, and counting
# (FlopCounterMode, a forward and a backward) costs a few training steps per edge.
_FLOPS_PER_BATCH: dict[tuple[str, LearnerSpec, int, float], int] = {}

PoisonMode = Literal["nan", "wrong_shapes", "scale", "sign_flip", "noise"]
UPLOAD_VERSION = 1  # each edge uploads its model once (DESIGN.md); a second model would be version 2
UPLOAD_ATTEMPTS = 5  # re-sends after the coordinator was unreachable (the upload is idempotent)
UPLOAD_TIMEOUT_SECONDS = 120.0  # one attempt's wait for a receipt, restarts of the coordinator included
SLEEP_SLICE_SECONDS = 0.05  # simulated delays sleep in slices so that `leave` interrupts them


class EdgeLeft(Exception):  # noqa: N818 (control flow, not an error)
    """Raised inside the training loop when the edge was told to leave."""


def edge_seed(scenario_seed: int, edge_id: str) -> int:
    """A per-edge seed from the scenario seed: stable across processes (unlike hash())."""
    return derive_seed("edge", scenario_seed, edge_id)


def learner_name(edge_id: str) -> str:
    """The BAIM learner name of an edge's model: the edge id with `.` (allowed in ids, not in learner
    names, which become module keys) replaced by `_`."""
    return edge_id.replace(".", "_")


def upload_spec(edge: EdgeConfig, spec: LearnerSpec) -> dict[str, Any]:
    """The JSON spec an edge sends beside its weights."""
    return {"kind": "learner", "edge_id": edge.id, "task": edge.task, "learner": spec.to_dict()}


def edge_device(num_gpus: float, cuda_available: bool) -> torch.device:
    """Where an edge trains: `cuda` when it declares GPUs (Ray reserved them) and CUDA is usable, else CPU.

    A declared GPU without CUDA (a CPU-only PyTorch build, a driver problem) falls back to the CPU rather
    than failing: the edge still trains, only slower, and the log says so.
    """
    if num_gpus < 0:
        raise ValueError(f"num_gpus: expected >= 0, received {num_gpus}")
    return torch.device("cuda") if num_gpus > 0 and cuda_available else torch.device("cpu")


def link_delay_seconds(nbytes: int, bandwidth_mbps: float, latency_ms: float, time_scale: float) -> float:
    """Simulated transfer time of `nbytes` over a link: time_scale * (latency + bits / bandwidth)."""
    return time_scale * (latency_ms / 1000.0 + nbytes * 8 / (bandwidth_mbps * 1e6))


def validation_split(size: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, validation) positions of a shard of `size` images: a seeded draw of round(fraction * size)
    images (at least 1, leaving at least 1 to train on) for validation, both lists sorted."""
    if size < 2:
        raise ValueError(f"size: expected >= 2 images to split, received {size}")
    count = min(size - 1, max(1, round(fraction * size)))
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[count:]), sorted(order[:count])


def epochs_without_improvement(losses: list[float], min_delta: float) -> int:
    """Epochs since the best validation loss so far, where an epoch improves on the best by > min_delta."""
    best, since = float("inf"), 0
    for loss in losses:
        if loss < best - min_delta:
            best, since = loss, 0
        else:
            since += 1
    return since


def poison_state(
    state: dict[str, torch.Tensor], mode: PoisonMode, scale: float, seed: int
) -> dict[str, torch.Tensor]:
    """A corrupted copy of a state dict, as an attacker or a faulty edge would send it.

    nan: every value NaN; wrong_shapes: one tensor loses its last row (the spec still claims the declared
    architecture); scale: weights x scale; sign_flip: weights x -1; noise: Gaussian noise of standard
    deviation `scale` x each tensor's own standard deviation, drawn from `seed`.
    """
    generator = torch.Generator().manual_seed(seed)
    poisoned: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        t = tensor.detach().clone()
        if mode == "nan":
            t = torch.full_like(t, float("nan"))
        elif mode == "scale":
            t = t * scale
        elif mode == "sign_flip":
            t = -t
        elif mode == "noise":
            std = float(t.std()) if t.numel() > 1 else float(t.abs().mean())
            t = t + torch.randn(t.shape, generator=generator, dtype=t.dtype) * (scale * max(std, 1e-8))
        elif mode != "wrong_shapes":
            raise ValueError(
                f"poison mode: expected one of nan, wrong_shapes, scale, sign_flip, noise, received {mode!r}"
            )
        poisoned[name] = t
    if mode == "wrong_shapes":
        name = max(poisoned, key=lambda key: (poisoned[key].dim(), poisoned[key].shape[0], key))
        poisoned[name] = poisoned[name][:-1].clone()
    return poisoned


class EdgeNode:
    """One edge: private shard, local training, one upload.

    Args:
        edge: the edge's scenario entry (task, model, local epochs, batch size, lr, link).
        source: the run's data source (metadata only, no pixels); the engine ships it once with ray.put.
        indices: the edge's own shard; only these images are ever read, lazily, in this process.
        resolution: image side (the scenario's data.resolution).
        scenario_seed: the scenario seed; the edge's initial weights and batch order derive from it.
        kld_weight: weight of the KL term in the local VAE loss (the cloud's, so the models agree).
        time_scale: multiplies simulated link delays and slow-downs (0 disables them).
        torch_threads: intra-op threads for this process (1 keeps many edges on few cores sane).
    """

    def __init__(
        self,
        edge: EdgeConfig,
        source: DataSource,
        indices: list[int],
        *,
        resolution: int,
        scenario_seed: int,
        kld_weight: float,
        time_scale: float = 1.0,
        torch_threads: int = 1,
    ) -> None:
        if time_scale < 0:
            raise ValueError(f"time_scale: expected >= 0, received {time_scale}")
        torch.set_num_threads(torch_threads)
        self.edge = edge
        self.edge_id = edge.id
        self.spec = LearnerSpec(
            widths=tuple(edge.model.widths), latent_dim=edge.model.latent_dim, resolution=resolution
        )
        self.seed = edge_seed(scenario_seed, edge.id)
        self.kld_weight = kld_weight
        self.time_scale = time_scale
        self.dataset = FaceDataset(source, indices, resolution)  # images are read lazily, in this process
        if len(self.dataset) == 0:
            raise ValueError(f"edge {edge.id}: expected a non-empty shard, received 0 images")
        self.ledger = Ledger(export_metrics=False)
        # Only ask CUDA when a GPU was declared: CPU edges never initialise it.
        self.device = edge_device(edge.num_gpus, edge.num_gpus > 0 and torch.cuda.is_available())
        if edge.num_gpus > 0 and self.device.type == "cpu":
            logger.warning("edge %s declares num_gpus=%g but CUDA is not available: training on the CPU",
                           edge.id, edge.num_gpus)  # fmt: skip

        # Mutable state read by the training loop, written by the event methods (other actor threads).
        self.slow_factor = 1.0
        self.bandwidth_mbps = edge.link.bandwidth_mbps
        self.latency_ms = edge.link.latency_ms
        self.poison_mode: PoisonMode | None = None
        self.poison_scale = 1.0
        self._leave = threading.Event()
        self.status: EdgeNodeStatus = "created"
        self.epoch = 0
        self.steps = 0
        self.train_loss: float | None = None
        self.validation_loss: list[float] = []  # per epoch, with early stopping
        self.best_epoch: int | None = None
        self.receipt: dict[str, Any] | None = None
        self.error: str | None = None
        # Held from training to the upload's acknowledgement, not while waiting for the decision: a pool
        # worker (actors.edge_worker) trains its next edge meanwhile. None: nothing to share.
        self.compute_slot: ComputeSlot | None = None
        self._holds_slot = False
        logger.info(
            "edge %s ready: %d images, spec %s, training on %s",
            edge.id,
            len(self.dataset),
            self.spec,
            self.device,
        )

    # ---- timeline events (called by the driver while run() is in progress) ---------------------------

    def slow_down(self, factor: float) -> None:
        """From now on each training step takes `factor` times its measured time (times time_scale)."""
        if factor < 1:
            raise ValueError(f"factor: expected >= 1, received {factor}")
        self.slow_factor = float(factor)

    def change_link(self, bandwidth_mbps: float | None = None, latency_ms: float | None = None) -> None:
        if bandwidth_mbps is not None:
            if bandwidth_mbps <= 0:
                raise ValueError(f"bandwidth_mbps: expected > 0, received {bandwidth_mbps}")
            self.bandwidth_mbps = float(bandwidth_mbps)
        if latency_ms is not None:
            if latency_ms < 0:
                raise ValueError(f"latency_ms: expected >= 0, received {latency_ms}")
            self.latency_ms = float(latency_ms)

    def poison(self, mode: PoisonMode, scale: float = 10.0) -> None:
        """Corrupt the next upload (see `poison_state`)."""
        poison_state({"probe": torch.zeros(2, 2)}, mode, scale, 0)  # validates `mode` early
        self.poison_mode = mode
        self.poison_scale = float(scale)

    def leave(self) -> None:
        """Stop gracefully: no upload unless it was already sent."""
        self._leave.set()

    def progress(self) -> str:
        """An EdgeReport as JSON: status, epoch, steps, last train loss, the ledger so far."""
        return self._report().model_dump_json()

    # ---- the edge's life -------------------------------------------------------------------------------

    def run(self, coordinator: Any) -> str:
        """Train, pack, (poison,) wait out the link, upload; return the final report as JSON.

        `coordinator` is a Ray actor handle of CloudCoordinator, or (in unit tests) any object whose
        `receive(...)` and `outcome(key)` return what the coordinator's do, or awaitables of it.
        """
        self._take_slot()
        try:
            self._train()
            payload = self._pack()
            self._upload(coordinator, payload)
        except EdgeLeft:
            self.status = "left"
            self.ledger.record_event("edge_left", edge=self.edge_id, epoch=self.epoch)
            logger.info("edge %s left at epoch %d", self.edge_id, self.epoch)
        finally:
            self._give_slot()
        return self._report().model_dump_json()

    def _take_slot(self) -> None:
        if self.compute_slot is not None and not self._holds_slot:
            self.compute_slot.acquire()
            self._holds_slot = True

    def _give_slot(self) -> None:
        if self.compute_slot is not None and self._holds_slot:
            self._holds_slot = False
            self.compute_slot.release()

    def _train(self) -> None:
        self.status = "training"
        torch.manual_seed(self.seed)  # initial weights and noise: the same for the same scenario seed
        model = VAELearner(self.spec).to(self.device)  # drawn on the CPU, then moved: same initial weights
        optimizer = torch.optim.Adam(model.parameters(), lr=self.edge.lr)
        loss_fn = vae_batch_loss(self.kld_weight)  # moves each batch to the model's device
        stopping = self.edge.early_stopping
        train_set: Dataset[Any] = self.dataset
        validation: DataLoader[Any] | None = None
        validation_flops = 0
        if stopping is not None:
            train_part, validation_part = validation_split(
                len(self.dataset), stopping.validation_fraction, derive_seed("validation", self.seed)
            )
            train_set = Subset(self.dataset, train_part)
            validation_set = Subset(self.dataset, validation_part)
            validation = DataLoader(validation_set, batch_size=self.edge.batch_size)
            validation_flops = self._forward_flops(model, validation_set)
        order = torch.Generator().manual_seed(self.seed)
        loader = DataLoader(train_set, batch_size=self.edge.batch_size, shuffle=True, generator=order)

        flops_per_epoch = self._epoch_flops(model, loss_fn, train_set) + validation_flops
        best_state: dict[str, torch.Tensor] | None = None
        for epoch in range(self.edge.local_epochs):
            self._check_leave()
            with self.ledger.phase("edge_train", edge=self.edge_id):
                self.train_loss = train_epoch(model, self._paced(loader), optimizer, loss_fn)
                if validation is not None:
                    self.validation_loss.append(evaluate(model, validation, loss_fn, seed=0))
            self.ledger.record_edge_flops(self.edge_id, flops_per_epoch)
            self.epoch = epoch + 1
            logger.info("edge %s epoch %d/%d loss %.5f", self.edge_id, self.epoch, self.edge.local_epochs,
                        self.train_loss)  # fmt: skip
            if stopping is not None:
                since_best = epochs_without_improvement(self.validation_loss, stopping.min_delta)
                if since_best == 0:
                    best_state, self.best_epoch = _cpu_state(model), self.epoch
                elif since_best >= stopping.patience:
                    logger.info("edge %s converged at epoch %d (best %d)", self.edge_id, self.epoch,
                                self.best_epoch)  # fmt: skip
                    break
        if stopping is not None and best_state is not None:
            model.load_state_dict(best_state)  # the best validation epoch's weights are what is uploaded
        self._check_leave()
        self.model = model
        self.eval_loss = evaluate(model, DataLoader(self.dataset, batch_size=self.edge.batch_size), loss_fn)

    def _forward_flops(self, model: VAELearner, dataset: Dataset[Any]) -> int:
        """Forward FLOPs of one pass over `dataset` (a validation), counted on one full and one last batch."""
        size, batch = len(dataset), self.edge.batch_size  # type: ignore[arg-type]
        full, rest = divmod(size, batch)
        total = 0
        with torch.random.fork_rng(), torch.no_grad():
            for n, count in ((batch, full), (rest, 1)):
                if n and count:
                    key = ("forward", self.spec, n, self.kld_weight)
                    if key not in _FLOPS_PER_BATCH:
                        example = torch.stack([_image(dataset[i]) for i in range(n)]).to(self.device)
                        _FLOPS_PER_BATCH[key] = count_flops(model, example)
                    total += count * _FLOPS_PER_BATCH[key]
        return total

    def _epoch_flops(self, model: VAELearner, loss_fn: Any, dataset: Dataset[Any] | None = None) -> int:
        """FLOPs of one epoch, counted by FlopCounterMode on the real model and real batch shapes.

        FLOPs depend only on shapes, so one full batch and the last partial one are counted once each
        (inside a forked RNG, so counting does not shift the training's random stream), and once per process
        for each architecture and batch size (`_FLOPS_PER_BATCH`: a pool worker trains many edges).
        """
        dataset = self.dataset if dataset is None else dataset
        size = len(dataset)  # type: ignore[arg-type]
        batch = self.edge.batch_size
        full, rest = divmod(size, batch)
        total = 0
        with torch.random.fork_rng():
            for n, count in ((batch, full), (rest, 1)):
                if n == 0 or count == 0:
                    continue
                key = ("train", self.spec, n, self.kld_weight)
                if key not in _FLOPS_PER_BATCH:
                    example = torch.stack([_image(dataset[i]) for i in range(n)])
                    _FLOPS_PER_BATCH[key] = forward_backward_flops(model, example, loss_fn).total
                total += count * _FLOPS_PER_BATCH[key]
        return total

    def _paced(self, loader: Iterable[Any]) -> Iterator[Any]:
        """Yield batches; between steps apply the slow-down and check for `leave`."""
        previous = time.perf_counter()
        for batch in loader:
            self._check_leave()
            yield batch
            now = time.perf_counter()
            step_seconds = now - previous
            self.steps += 1
            if self.slow_factor > 1 and self.time_scale > 0:
                self._sleep((self.slow_factor - 1) * step_seconds * self.time_scale)
            previous = time.perf_counter()

    def _pack(self) -> ArtifactPayload:
        state = _cpu_state(self.model)
        if self.poison_mode is not None:
            state = poison_state(state, self.poison_mode, self.poison_scale, self.seed)
            self.ledger.record_event("edge_poisoned", edge=self.edge_id, mode=self.poison_mode)
            logger.warning("edge %s uploads a poisoned model (%s)", self.edge_id, self.poison_mode)
        return pack_state(state, upload_spec(self.edge, self.spec))

    def _upload(self, coordinator: Any, payload: ArtifactPayload) -> None:
        self.status = "uploading"
        last_error = ""
        for attempt in range(1, UPLOAD_ATTEMPTS + 1):
            delay = link_delay_seconds(payload.nbytes, self.bandwidth_mbps, self.latency_ms, self.time_scale)
            with self.ledger.phase("edge_upload", edge=self.edge_id):
                self._sleep(delay)  # the transfer itself; `leave` during it means nothing was sent
                self._check_leave()
                self.ledger.record_bytes(self.edge_id, "sent", payload.nbytes)
                try:
                    receipt = _call(
                        coordinator,
                        "receive",
                        edge_id=self.edge_id,
                        version=UPLOAD_VERSION,
                        weights=payload.weights,
                        spec_json=payload.spec_json,
                        sha256=payload.sha256,
                    )
                    # Acknowledged as received (durable at the cloud): wait for the decision. None: a
                    # restarted coordinator lost it before its acknowledgement was durable; send it again.
                    if receipt is not None and receipt.get("status") == "received":
                        self._give_slot()
                    while receipt is not None and receipt.get("status") == "received":
                        receipt = _call(coordinator, "outcome", key=receipt["key"])
                except Exception as err:  # unreachable coordinator: retry, the upload is idempotent
                    last_error = f"{type(err).__name__}: {err}"
                    logger.warning("edge %s upload attempt %d failed: %s", self.edge_id, attempt, last_error)
                    continue
                if receipt is None:
                    last_error = "the coordinator had no record of the upload it acknowledged"
                    logger.warning("edge %s upload attempt %d: %s", self.edge_id, attempt, last_error)
                    continue
            self.receipt = receipt
            self.status = "accepted" if receipt.get("accepted") else "rejected"
            return
        self.status = "upload_failed"
        self.error = f"coordinator unreachable after {UPLOAD_ATTEMPTS} attempts: {last_error}"

    # ---- the FedAvg baseline (driven by orchestrator/baselines/fedavg.py) -----------------------------

    def fedavg_round(
        self, weights: bytes, spec_json: str, sha256: str, server_round: int, local_epochs: int
    ) -> tuple[bytes, str, str, str]:
        """One FedAvg client round: verify and load the global model, train it for `local_epochs` on this
        edge's shard, return the update as (weights, spec_json, sha256, report JSON).

        The global model is verified (sha256, safetensors, finite values) before use; nothing is unpickled.
        The link delays the download and the upload as in `run`; slow-down, poison and leave apply too (after
        `leave` the report says "left" and the weights are empty). The server counts the bytes (the payload
        lengths it sent and received); the report carries this round's FLOPs and seconds.
        """
        download = ArtifactPayload(weights=weights, spec_json=spec_json, sha256=sha256)
        model = load_module(
            download,
            VAELearner,
            artifact_id=f"fedavg global model, round {server_round}",
            max_bytes=MAX_MODEL_BYTES,
        )
        spec = json.loads(download.spec_json)  # verified by load_module; the update keeps its keys
        report = FedAvgClientReport(edge_id=self.edge_id, round=server_round, status="trained")
        try:
            self._sleep(
                link_delay_seconds(download.nbytes, self.bandwidth_mbps, self.latency_ms, self.time_scale)
            )
            self._check_leave()
            model.to(self.device)
            optimizer = torch.optim.Adam(model.parameters(), lr=self.edge.lr)
            loss_fn = vae_batch_loss(self.kld_weight)
            round_seed = edge_seed(self.seed, f"fedavg round {server_round}")
            torch.manual_seed(round_seed)  # training noise: the same for the same scenario seed and round
            order = torch.Generator().manual_seed(round_seed)
            loader = DataLoader(self.dataset, batch_size=self.edge.batch_size, shuffle=True, generator=order)
            flops_per_epoch = self._epoch_flops(model, loss_fn)
            started = time.perf_counter()
            for _ in range(local_epochs):
                self._check_leave()
                report.train_loss = train_epoch(model, self._paced(loader), optimizer, loss_fn)
            report.train_seconds = time.perf_counter() - started
            report.flops = flops_per_epoch * local_epochs
            state = _cpu_state(model)
            if self.poison_mode is not None:
                state = poison_state(state, self.poison_mode, self.poison_scale, round_seed)
                report.poisoned = self.poison_mode
            update_spec = {**spec, "edge_id": self.edge_id}
            update = pack_state(state, update_spec)
            self._sleep(
                link_delay_seconds(update.nbytes, self.bandwidth_mbps, self.latency_ms, self.time_scale)
            )
            self._check_leave()
        except EdgeLeft:
            report.status = "left"
            return b"", "", "", report.model_dump_json()
        return update.weights, update.spec_json, update.sha256, report.model_dump_json()

    # ---- helpers ---------------------------------------------------------------------------------------

    def _check_leave(self) -> None:
        if self._leave.is_set():
            raise EdgeLeft

    def _sleep(self, seconds: float) -> None:
        deadline = time.perf_counter() + seconds
        while (left := deadline - time.perf_counter()) > 0:
            if self._leave.is_set():
                return
            time.sleep(min(left, SLEEP_SLICE_SECONDS))

    def _report(self) -> EdgeReport:
        return EdgeReport(
            edge_id=self.edge_id,
            task=self.edge.task,
            status=self.status,
            epoch=self.epoch,
            epochs=self.edge.local_epochs,
            steps=self.steps,
            train_loss=self.train_loss,
            validation_loss=self.validation_loss,
            best_epoch=self.best_epoch,
            shard_size=len(self.dataset),
            receipt=self.receipt,
            error=self.error,
            ledger=self.ledger.to_dict(),
        )


class ComputeSlot(Protocol):
    """What `EdgeNode.compute_slot` needs: lock-like acquire and release."""

    def acquire(self) -> Any: ...

    def release(self) -> Any: ...


def _cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of the model's state on the CPU (what is packed and uploaded)."""
    return {name: t.detach().to("cpu", copy=True) for name, t in model.state_dict().items()}


def _image(item: Any) -> torch.Tensor:
    return item[0] if isinstance(item, (tuple, list)) else item


def _call(coordinator: Any, name: str, **kwargs: Any) -> Any:
    """coordinator.<name>(**kwargs) on a Ray actor handle (waits for its answer) or a plain object."""
    method = getattr(coordinator, name)
    if hasattr(method, "remote"):
        import ray  # only when actually talking to an actor: unit tests run without Ray

        return ray.get(method.remote(**kwargs), timeout=UPLOAD_TIMEOUT_SECONDS)
    result = method(**kwargs)
    if hasattr(result, "__await__"):
        import asyncio

        return asyncio.run(result)
    return result
