"""The FedAvg baseline: the same edges and shards as the BAIM run, trained as federated learning.

`FedAvgBaseline` is the strategy (no Ray; one method per phase of a server round, like Flower's FedAvg);
`run_fedavg` drives it on the edge fleet. How the timeline and the costs are handled: docs/ARCHITECTURE.md
("The FedAvg baseline").
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import ray
import torch
from pydantic import ValidationError
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

from baim.config import LearnerSpec
from baim.costs import count_params
from baim.learners import VAELearner
from baim.seeding import derive_seed
from baim.training import evaluate, vae_batch_loss
from orchestrator.baselines.fedavg_math import AGGREGATIONS, aggregate
from orchestrator.core.artifacts import ArtifactPayload, load_module, pack_state
from orchestrator.core.errors import ArtifactRejected
from orchestrator.core.metrics import Ledger
from orchestrator.core.names import MAX_MODEL_BYTES
from orchestrator.core.reports import (
    ClientFailure,
    FedAvgClientReport,
    FedAvgEdgeRow,
    FedAvgFailure,
    FedAvgReport,
    FedAvgRound,
    FedAvgTotals,
    LearnerModel,
    RunEvent,
)
from orchestrator.core.scenario import (
    CoordinatorCrashEvent,
    EdgeConfig,
    Event,
    FedAvgConfig,
    JoinEvent,
    NewTaskEvent,
    Scenario,
    format_validation_error,
)
from orchestrator.data.datasets import FaceDataset
from orchestrator.data.partitions import Partitions
from orchestrator.data.sources import DataSource
from orchestrator.runtime.fleet import POLL_SECONDS, EdgeFleet, EdgeLost, EdgeStarted, Timeline

logger = logging.getLogger(__name__)

BASELINE_NAME = "fedavg"  # the ledger's cloud "strategy" name and the report's key


def fedavg_seed(scenario_seed: int, what: str) -> int:
    """A seed for one purpose of the baseline (initial weights, client sampling), stable across processes."""
    return derive_seed("fedavg", scenario_seed, what)


def homogeneous_spec(scenario: Scenario) -> LearnerSpec:
    """The one model every client trains: `baselines.fedavg.model`, else the largest edge model by
    parameter count (ties: the first declared)."""
    resolution = scenario.data.resolution
    configured = scenario.baselines.fedavg.model
    if configured is not None:
        return LearnerSpec(tuple(configured.widths), configured.latent_dim, resolution)
    candidates = [
        LearnerSpec(tuple(edge.model.widths), edge.model.latent_dim, resolution)
        for edge in scenario.all_edges()
    ]
    return max(candidates, key=lambda spec: count_params(VAELearner(spec)))


def global_spec(spec: LearnerSpec, server_round: int) -> dict[str, Any]:
    """The JSON spec sent beside the global model's weights."""
    return {"kind": "learner", "learner": spec.to_dict(), "baseline": BASELINE_NAME, "round": server_round}


# --------------------------------------------------------------------------------------------------------
# The strategy (no Ray)


@dataclass(frozen=True)
class FitResult:
    """A client's update for one round, as it arrived (verified by `aggregate_fit`)."""

    client_id: str
    payload: ArtifactPayload
    num_examples: int  # the client's shard size, as the server knows it (not as the client claims)


@dataclass(frozen=True)
class FitFailure:
    """A client that was selected but contributed nothing this round, and why (a short code + detail)."""

    client_id: str
    reason: str  # crashed, left, timed_out, failed, rejected, ...
    detail: str = ""


@dataclass
class RoundAggregate:
    """What `aggregate_fit` did: the new global state and who counted."""

    state: dict[str, torch.Tensor]
    aggregated: list[str]  # clients whose update was averaged in
    failures: list[FitFailure]
    updated: bool  # False when the global model was kept (no usable update, or failures not accepted)


class FedAvgBaseline:
    """Federated averaging (McMahan et al. 2017) of one homogeneous VAE.

    Args (keyword-only, like Flower's FedAvg):
        spec: the homogeneous model every client trains.
        seed: seeds the initial global weights and the client sampling of every round.
        fraction_fit: fraction of the available clients selected each round (default 1.0). At least
            `min_fit_clients` (default 1) are selected while that many are available.
        accept_failures: aggregate a round even when some selected clients failed (default True); with
            False, any failure keeps the previous global model.
        max_update_bytes: updates larger than this are rejected unread (default 1 GiB).
        aggregation: mean (FedAvg), median, trimmed_mean or krum (`fedavg_math.aggregate`), with
            trim_proportion, krum_num_malicious and krum_to_keep as their parameters.
    """

    def __init__(
        self,
        *,
        spec: LearnerSpec,
        seed: int = 0,
        fraction_fit: float = 1.0,
        min_fit_clients: int = 1,
        accept_failures: bool = True,
        max_update_bytes: int = MAX_MODEL_BYTES,
        aggregation: str = "mean",
        trim_proportion: float = 0.1,
        krum_num_malicious: int = 0,
        krum_to_keep: int = 0,
    ) -> None:
        if aggregation not in AGGREGATIONS:
            raise ValueError(
                f"aggregation: expected one of {', '.join(AGGREGATIONS)}, received {aggregation!r}"
            )
        if not 0 < fraction_fit <= 1:
            raise ValueError(f"fraction_fit: expected a value in (0, 1], received {fraction_fit}")
        if min_fit_clients < 1:
            raise ValueError(f"min_fit_clients: expected >= 1, received {min_fit_clients}")
        self.spec = spec
        self.seed = seed
        self.fraction_fit = fraction_fit
        self.min_fit_clients = min_fit_clients
        self.accept_failures = accept_failures
        self.max_update_bytes = max_update_bytes
        self.aggregation = aggregation
        self.trim_proportion = trim_proportion
        self.krum_num_malicious = krum_num_malicious
        self.krum_to_keep = krum_to_keep

    def initialize_parameters(self) -> dict[str, torch.Tensor]:
        """The initial global model: a fresh VAELearner drawn from the seed (the caller's RNG untouched)."""
        with torch.random.fork_rng():
            torch.manual_seed(fedavg_seed(self.seed, "init"))
            model = VAELearner(self.spec)
        return {name: t.detach().clone() for name, t in model.state_dict().items()}

    def num_fit_clients(self, num_available: int) -> int:
        """How many clients a round selects out of `num_available`."""
        wanted = max(math.ceil(self.fraction_fit * num_available), self.min_fit_clients)
        return min(wanted, num_available)

    def configure_fit(self, server_round: int, available: Sequence[str]) -> list[str]:
        """The clients of this round: a seeded sample (same seed and round, same choice), in sorted order."""
        pool = sorted(set(available))
        if not pool:
            return []
        generator = torch.Generator().manual_seed(fedavg_seed(self.seed, f"round {server_round}"))
        order = torch.randperm(len(pool), generator=generator).tolist()
        return sorted(pool[i] for i in order[: self.num_fit_clients(len(pool))])

    def aggregate_fit(
        self,
        server_round: int,
        results: Sequence[FitResult],
        failures: Sequence[FitFailure],
        current: Mapping[str, torch.Tensor],
    ) -> RoundAggregate:
        """Verify every update (sha256, safetensors, dtypes, finite values, the same spec and shapes as the
        global model), then combine the good ones with the configured aggregation (mean: weighted by shard
        size) in client-id order, so the result does not depend on the order updates arrived in.
        `aggregated` lists the clients whose update the rule used (Krum: only the chosen ones).

        An update that fails verification becomes a failure with reason "rejected". With no usable update,
        or with failures and accept_failures=False, the current global model is kept.
        """
        failures = list(failures)
        states: list[dict[str, torch.Tensor]] = []
        weights: list[float] = []
        aggregated: list[str] = []
        for result in sorted(results, key=lambda r: r.client_id):  # arrival order must not change a bit
            try:
                state = self._verified_state(server_round, result, current)
            except ArtifactRejected as err:
                failures.append(FitFailure(result.client_id, "rejected", err.reason))
                continue
            states.append(state)
            weights.append(float(result.num_examples))
            aggregated.append(result.client_id)
        if not states or (failures and not self.accept_failures):
            return RoundAggregate({k: v.clone() for k, v in current.items()}, [], failures, updated=False)
        combined, used = aggregate(
            self.aggregation,
            states,
            weights,
            trim_proportion=self.trim_proportion,
            num_malicious=self.krum_num_malicious,
            to_keep=self.krum_to_keep,
        )
        return RoundAggregate(combined, [aggregated[i] for i in used], failures, updated=True)

    def _verified_state(
        self, server_round: int, result: FitResult, current: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        artifact_id = f"fedavg round {server_round} update from {result.client_id}"

        def same_learner(spec: dict[str, Any]) -> None:
            if spec.get("learner") != self.spec.to_dict():
                raise ArtifactRejected(
                    artifact_id,
                    f"spec: expected learner {self.spec.to_dict()}, received {spec.get('learner')}",
                )

        update = load_module(
            result.payload,
            VAELearner,
            artifact_id=artifact_id,
            max_bytes=self.max_update_bytes,
            check_spec=same_learner,
        )
        tensors = update.state_dict()
        if result.num_examples < 1:
            raise ArtifactRejected(
                artifact_id, f"num_examples: expected >= 1, received {result.num_examples}"
            )
        return tensors


# --------------------------------------------------------------------------------------------------------
# Measuring the global model


def test_losses(
    model: VAELearner,
    source: DataSource,
    partitions: Partitions,
    tasks: Sequence[str],
    *,
    resolution: int,
    kld_weight: float,
    batch_size: int = 64,
) -> dict[str, float]:
    """The model's mean VAE loss on each task's test split (seeded noise: repeatable)."""
    loss_fn = vae_batch_loss(kld_weight)
    losses: dict[str, float] = {}
    for task in tasks:
        indices = partitions.test[task]
        if not indices:
            continue
        loader = DataLoader(FaceDataset(source, indices, resolution), batch_size=batch_size)
        losses[task] = evaluate(model, loader, loss_fn, seed=0)
    return losses


def mean_test_loss(per_task: Mapping[str, float], partitions: Partitions) -> float | None:
    """Test-image-weighted mean over tasks (the BAIM training reports its overall test loss the same way)."""
    sizes = {task: len(partitions.test[task]) for task in per_task}
    total = sum(sizes.values())
    if total == 0:
        return None
    return sum(per_task[task] * sizes[task] for task in per_task) / total


def loss_text(loss: float | None) -> str:
    """A loss for progress lines: 5 decimals, or "n/a" when there was nothing to measure it on (no test
    images, e.g. `test_per_task: all` on a test partition without images of the task)."""
    return "n/a" if loss is None else f"{loss:.5f}"


def stop_reason(losses: Sequence[float | None], config: FedAvgConfig) -> Literal["target", "plateau"] | None:
    """Why FedAvg stops after the last of these per-round test losses: "target" (at or below
    `target_loss`), "plateau" (no improvement beyond `plateau_min_delta` for `plateau_patience` rounds), or
    None to go on (the round cap is the caller's loop)."""
    if not losses or losses[-1] is None:
        return None
    if config.target_loss is not None and losses[-1] <= config.target_loss:
        return "target"
    patience = config.plateau_patience
    if patience is not None:
        known = [loss for loss in losses if loss is not None]
        best, since = float("inf"), 0
        for loss in known:
            if loss < best - config.plateau_min_delta:
                best, since = loss, 0
            else:
                since += 1
        if since >= patience:
            return "plateau"
    return None


@dataclass
class RoundCosts:
    """One round's measured costs per client: bytes sent (updates), received (global model), FLOPs."""

    sent: dict[str, int] = field(default_factory=dict)
    received: dict[str, int] = field(default_factory=dict)
    flops: dict[str, int] = field(default_factory=dict)

    def add(self, client: str, *, sent: int = 0, received: int = 0, flops: int = 0) -> None:
        for table, amount in ((self.sent, sent), (self.received, received), (self.flops, flops)):
            if amount:
                table[client] = table.get(client, 0) + amount


# --------------------------------------------------------------------------------------------------------
# The Ray driver


@dataclass
class Client:
    """What the driver knows about one FedAvg client (an EdgeNode actor)."""

    config: EdgeConfig
    status: str = "not_joined"  # not_joined, starting, ready, crashed, left, died, unschedulable
    rounds: list[int] = field(default_factory=list)  # rounds whose update was aggregated
    failures: list[ClientFailure] = field(default_factory=list)
    train_seconds: float = 0.0

    @property
    def gone(self) -> bool:
        return self.status in ("crashed", "left", "died", "unschedulable")


@dataclass
class FedAvgOutcome:
    """The report section and the final global model (for image quality)."""

    report: FedAvgReport
    global_model: VAELearner
    ledger: Ledger


class FedAvgRun:
    """One FedAvg baseline run on Ray (initialised by the caller). Use `run_fedavg` unless you need parts."""

    def __init__(
        self,
        scenario: Scenario,
        source: DataSource,
        partitions: Partitions,
        *,
        startup_timeout_s: float = 120.0,
        round_timeout_s: float = 1800.0,
        progress: Callable[[str], None] | None = None,
    ) -> None:
        self.scenario = scenario
        self.config = scenario.baselines.fedavg
        self.source = source
        self.partitions = partitions
        self.startup_timeout_s = startup_timeout_s
        self.round_timeout_s = round_timeout_s
        self.progress = progress
        self.spec = homogeneous_spec(scenario)
        self.strategy = FedAvgBaseline(
            spec=self.spec,
            seed=scenario.seed,
            fraction_fit=self.config.client_fraction,
            aggregation=self.config.aggregation,
            trim_proportion=self.config.trim_proportion,
            krum_num_malicious=self.config.krum_num_malicious,
            krum_to_keep=self.config.krum_to_keep,
        )
        self.round_costs = RoundCosts()  # the current round's bytes and FLOPs per client
        self.clients = {edge.id: Client(edge) for edge in scenario.all_edges()}
        self.fleet = EdgeFleet(scenario, source, partitions)
        self.timeline = Timeline(scenario.timeline)
        self.ledger = Ledger(export_metrics=False)
        self.events: list[RunEvent] = []
        self.started = time.monotonic()

    # ---- driver ----------------------------------------------------------------------------------------

    def run(self) -> FedAvgOutcome:
        try:
            return self._run()
        finally:
            self.fleet.release_all()

    def _run(self) -> FedAvgOutcome:
        tasks = [task.name for task in self.scenario.tasks]
        kld_weight = self.scenario.cloud.kld_weight
        resolution = self.scenario.data.resolution
        params = count_params(VAELearner(self.spec))
        self._say(
            f"fedavg: {len(self.clients)} clients, model {list(self.spec.widths)} z{self.spec.latent_dim} "
            f"({params:,} params), {self.config.rounds} rounds x {self.config.local_epochs} local epochs, "
            f"client fraction {self.config.client_fraction}"
        )
        for client in self.clients.values():
            if client.config.start:
                self._spawn(client, reason="start")
        self._wait_until_up()
        self.started = time.monotonic()
        self._record("fedavg_started")

        state = self.strategy.initialize_parameters()
        model = self._model(state)
        initial_losses = test_losses(
            model, self.source, self.partitions, tasks, resolution=resolution, kld_weight=kld_weight
        )
        rounds: list[FedAvgRound] = []
        self.stop_reason: Literal["round_cap", "target", "plateau"] = "round_cap"
        for server_round in range(1, self.config.rounds + 1):
            self.round_costs = RoundCosts()
            self._fire_due()
            self._check_starts()
            round_started = time.perf_counter()
            available = [cid for cid, c in self.clients.items() if c.status == "ready"]
            selected = self.strategy.configure_fit(server_round, available)
            payload = pack_state(state, global_spec(self.spec, server_round))
            weights_ref = ray.put(payload.weights)  # one copy in the object store for every client
            inflight: dict[Any, str] = {}
            for cid in selected:
                ref = self.fleet.call(
                    cid, "fedavg_round", weights_ref, payload.spec_json, payload.sha256, server_round,
                    self.config.local_epochs,
                )  # fmt: skip
                inflight[ref] = cid
                self.ledger.record_bytes(cid, "received", payload.nbytes)
                self.round_costs.add(cid, received=payload.nbytes)
            results, failures = self._collect(server_round, inflight)
            with FlopCounterMode(display=False) as counter:  # the real aggregation call, counted
                aggregate = self.strategy.aggregate_fit(server_round, results, failures, state)
            aggregation_flops = int(counter.get_total_flops())
            self.ledger.record_cloud_flops(BASELINE_NAME, aggregation_flops)
            state = aggregate.state
            for cid in aggregate.aggregated:
                self.clients[cid].rounds.append(server_round)
            for failure in aggregate.failures:
                entry = ClientFailure(round=server_round, reason=failure.reason, detail=failure.detail)
                self.clients[failure.client_id].failures.append(entry)
            model = self._model(state)
            losses = test_losses(
                model, self.source, self.partitions, tasks, resolution=resolution, kld_weight=kld_weight
            )
            seconds = time.perf_counter() - round_started
            self.ledger.record_seconds("fedavg_round", seconds)
            rounds.append(
                FedAvgRound(
                    round=server_round,
                    available=available,
                    selected=selected,
                    aggregated=aggregate.aggregated,
                    failures=[
                        FedAvgFailure(edge=f.client_id, reason=f.reason, detail=f.detail)
                        for f in aggregate.failures
                    ],
                    global_updated=aggregate.updated,
                    global_model_bytes=payload.nbytes,
                    test_loss_per_task=losses,
                    test_loss=mean_test_loss(losses, self.partitions),
                    seconds=seconds,
                    bytes_sent=self.round_costs.sent,
                    bytes_received=self.round_costs.received,
                    flops=self.round_costs.flops,
                    aggregation_flops=aggregation_flops,
                )
            )
            self._say(
                f"fedavg round {server_round}/{self.config.rounds}: {len(aggregate.aggregated)}/"
                f"{len(selected)} updates {self.config.aggregation}, test loss "
                f"{loss_text(rounds[-1].test_loss)} ({seconds:.1f}s)"
            )
            reason = stop_reason([r.test_loss for r in rounds], self.config)
            if reason is not None:
                self.stop_reason = reason
                self._say(f"fedavg: stopping after round {server_round} ({reason.replace('_', ' ')})")
                break
        for index, event in self.timeline.rest():  # events after the last round never happened to it
            self._record(event.kind, where=f"timeline.{index}", applied=False, note="after the last round")
        report = self._report(rounds, initial_losses, params)
        return FedAvgOutcome(report=report, global_model=model.eval(), ledger=self.ledger)

    def _model(self, state: Mapping[str, torch.Tensor]) -> VAELearner:
        model = VAELearner(self.spec)
        model.load_state_dict(dict(state), strict=True)
        return model

    def _collect(
        self, server_round: int, inflight: dict[Any, str]
    ) -> tuple[list[FitResult], list[FitFailure]]:
        """Wait for the round's updates, firing timeline events meanwhile; never wait past the timeout."""
        results: list[FitResult] = []
        failures: list[FitFailure] = []
        deadline = time.monotonic() + self.round_timeout_s
        while inflight:
            self._fire_due()
            ready, _ = ray.wait(list(inflight), num_returns=len(inflight), timeout=POLL_SECONDS)
            for ref in ready:
                cid = inflight.pop(ref)
                outcome = self._result(server_round, cid, ref)
                if isinstance(outcome, FitFailure):
                    failures.append(outcome)
                else:
                    results.append(outcome)
            if inflight and time.monotonic() > deadline:
                for cid in inflight.values():
                    self.fleet.release(cid)
                    self.clients[cid].status = "died"
                    failures.append(FitFailure(cid, "timed_out", f"no update after {self.round_timeout_s}s"))
                inflight = {}
        return results, failures

    def _result(self, server_round: int, cid: str, ref: Any) -> FitResult | FitFailure:
        client = self.clients[cid]
        answer = self.fleet.answer(cid, ref)
        if isinstance(answer, EdgeLost):
            if answer.status != "failed":
                client.status = answer.status
            return FitFailure(cid, answer.status, answer.error)
        if not (
            isinstance(answer, tuple)
            and len(answer) == 4
            and isinstance(answer[0], bytes)
            and all(isinstance(part, str) for part in answer[1:])
        ):
            return FitFailure(cid, "rejected", "expected (weights: bytes, spec_json, sha256, report_json)")
        weights, spec_json, sha256, report_json = answer
        try:
            report = FedAvgClientReport.model_validate_json(report_json)
        except ValidationError as err:
            return FitFailure(cid, "rejected", f"report_json: {format_validation_error(err)[0]}")
        self.ledger.record_edge_flops(cid, report.flops)
        self.round_costs.add(cid, flops=report.flops)
        client.train_seconds += report.train_seconds
        self.ledger.record_seconds("fedavg_edge_train", report.train_seconds, edge=cid)
        if report.status == "left":
            client.status = "left"
            return FitFailure(cid, "left", "the edge left during the round")
        payload = ArtifactPayload(weights=weights, spec_json=spec_json, sha256=sha256)
        self.ledger.record_bytes(cid, "sent", payload.nbytes)
        self.round_costs.add(cid, sent=payload.nbytes)
        return FitResult(cid, payload, num_examples=len(self.partitions.edges[cid]))

    # ---- clients and the timeline ----------------------------------------------------------------------

    def _spawn(self, client: Client, reason: str) -> None:
        self.fleet.spawn(client.config.id)
        client.status = "starting"
        self._record("client_spawned", edge=client.config.id, reason=reason)

    def _wait_until_up(self) -> None:
        """Wait (bounded) for the initial clients; one still starting later joins the first round after."""
        starting = [cid for cid, client in self.clients.items() if client.status == "starting"]
        self._settle_starts(self.fleet.wait_until_up(starting, self.startup_timeout_s))
        waiting = [cid for cid, c in self.clients.items() if c.status == "starting"]
        if waiting:
            self._say(f"fedavg: starting while clients {waiting} still wait for resources")
            self._record("clients_still_starting", edges=",".join(waiting))

    def _check_starts(self) -> None:
        self._settle_starts(self.fleet.poll_starts())

    def _settle_starts(self, settled: list[EdgeStarted | EdgeLost]) -> None:
        for outcome in settled:
            client = self.clients[outcome.edge_id]
            if isinstance(outcome, EdgeLost):
                client.status = "unschedulable" if outcome.status == "unschedulable" else "died"
                client.failures.append(ClientFailure(round=0, reason=client.status, detail=outcome.error))
            else:
                client.status = "ready"
            self._record("client_up", edge=outcome.edge_id, status=client.status)

    def _fire_due(self) -> None:
        for index, event in self.timeline.due(time.monotonic() - self.started):
            self._fire(index, event)

    def _fire(self, index: int, event: Event) -> None:
        where = f"timeline.{index}"
        if isinstance(event, CoordinatorCrashEvent):
            self._record(event.kind, where=where, applied=False, note="FedAvg's server is the driver")
            return
        if isinstance(event, NewTaskEvent):  # FedAvg's one global model has no per-task part to add
            self._record(event.kind, task=event.task.name, where=where, applied=False,
                         note="FedAvg trains one global model for every task")  # fmt: skip
            return
        if isinstance(event, JoinEvent):
            client = self.clients[event.edge_id()]
            self._spawn(client, reason=f"{where} join")
            self._record("join", edge=client.config.id, where=where, applied=True)
            return
        client = self.clients[event.edge]
        if not self.fleet.has_actor(event.edge) or client.gone:
            self._record(
                event.kind, edge=event.edge, where=where, applied=False, note=f"client {client.status}"
            )
            return
        self.fleet.apply(event.edge, event)
        if event.kind in ("crash", "leave"):
            client.status = "crashed" if event.kind == "crash" else "left"  # no later rounds
        self._record(event.kind, edge=event.edge, where=where, applied=True)
        self._say(f"fedavg {where}: {event.kind} {event.edge}")

    # ---- report ----------------------------------------------------------------------------------------

    def _report(
        self, rounds: list[FedAvgRound], initial_losses: dict[str, float], params: int
    ) -> FedAvgReport:
        ledger = self.ledger.to_dict()
        edges: dict[str, FedAvgEdgeRow] = {}
        for cid, client in self.clients.items():
            costs = ledger["edges"].get(cid, {})
            edges[cid] = FedAvgEdgeRow(
                task=client.config.task,
                status=client.status,
                shard_size=len(self.partitions.edges[cid]),
                rounds_aggregated=client.rounds,
                failures=client.failures,
                bytes_sent=costs.get("bytes_sent", 0),
                bytes_received=costs.get("bytes_received", 0),
                flops=costs.get("flops", 0),
                train_seconds=client.train_seconds,
            )
        initial_loss = mean_test_loss(initial_losses, self.partitions)
        final = rounds[-1] if rounds else None
        return FedAvgReport(
            enabled=True,
            aggregation=self.config.aggregation,
            stop_reason=self.stop_reason,
            model=LearnerModel(kind="learner", **self.spec.to_dict()),
            params=params,
            rounds_planned=self.config.rounds,
            local_epochs=self.config.local_epochs,
            client_fraction=self.config.client_fraction,
            weighting="shard size" if self.config.aggregation in ("mean", "krum") else "none",
            initial_test_loss_per_task=initial_losses,
            initial_test_loss=initial_loss,
            rounds=rounds,
            final_test_loss_per_task=final.test_loss_per_task if final else initial_losses,
            final_test_loss=final.test_loss if final else initial_loss,
            edges=edges,
            cloud_flops=sum(ledger["cloud_flops"].values()),
            cloud_flops_note="aggregation is element-wise; FlopCounterMode counts matmuls and convs",
            totals=FedAvgTotals(
                edge_bytes_sent=sum(e.bytes_sent for e in edges.values()),
                edge_bytes_received=sum(e.bytes_received for e in edges.values()),
                edge_flops=sum(e.flops for e in edges.values()),
                seconds=sum(r.seconds for r in rounds),
            ),
            events=self.events,
            ledger=ledger,
        )

    def _record(self, kind: str, **fields: Any) -> None:
        event = {"t": round(time.monotonic() - self.started, 3), "kind": kind, **fields}
        self.events.append(RunEvent.model_validate(event))

    def _say(self, line: str) -> None:
        logger.info("%s", line)
        if self.progress is not None:
            self.progress(line)


def run_fedavg(
    scenario: Scenario,
    source: DataSource,
    partitions: Partitions,
    *,
    startup_timeout_s: float = 120.0,
    round_timeout_s: float = 1800.0,
    progress: Callable[[str], None] | None = None,
) -> FedAvgOutcome:
    """Run the FedAvg baseline of `scenario` on the running Ray instance; returns the report section and the
    final global model. Raises ValueError when the scenario disables the baseline."""
    if not scenario.baselines.fedavg.enabled:
        raise ValueError("baselines.fedavg.enabled: expected true to run the baseline, received false")
    run = FedAvgRun(
        scenario,
        source,
        partitions,
        startup_timeout_s=startup_timeout_s,
        round_timeout_s=round_timeout_s,
        progress=progress,
    )
    return run.run()
