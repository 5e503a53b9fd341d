"""The scenario engine: runs a scenario on Ray and writes report.json.

`run_scenario(scenario, out_dir, ...)`:
1. partitions the data (bad sizes fail here, before any actor starts), gives the run a fresh id, and refuses
   a registry (by default out_dir/registry) that already holds another run's coordinator state
   (`RegistryHeldByAnotherRun`, before Ray starts and before anything is written): resuming it would mix two
   runs;
2. joins Ray (`ray.init()` local embedded by default, or `address="auto"` / `"ray://..."`);
3. starts the CloudCoordinator (async actor, `max_restarts=-1`, `max_task_retries=-1`) and one EdgeNode per
   initial edge, each with the resources its scenario entry declares (`num_cpus`, `num_gpus`, `memory`,
   custom resources), so Ray's scheduler decides where and whether each can run;
4. plays the timeline deterministically: events sorted by (at_seconds, position in the file), fired when the
   wall clock since t = 0 passes `at_seconds`. t = 0 is when the coordinator and the initial edges' processes
   are up; the initial edges all begin training then, so event times mean time into the experiment, not time
   spent booting workers (`time_scale` scales link delays and slow-downs, not event times);
5. watches every edge without ever waiting forever: an edge's `run()` result, a Ray error when its process
   died (a `crash` event or an unexpected death), a per-edge timeout, and for edges that never start, a
   check against the cluster's nodes: a demand no alive node can meet is reported `unschedulable`;
6. asks the coordinator to `finish()` (train what is untrained, decompose, publish task models), merges every
   ledger, and writes `out_dir/report.json` (see `orchestrator.report.build`). Failed cloud rounds are printed
   as they happen; when `finish()` raises `RoundFailed` (learners left untrained, nothing published), the
   report is still written (with the round errors, no task models, no evaluation) and then `RunFailed` is
   raised with the round and the cause, so `baim run` exits 1.

Ray is imported here and in the actors only. Library code: progress goes to the `progress` callback (the CLI
prints it) and to the log, never to stdout.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import ray
from ray.exceptions import RayActorError, RayTaskError

from actors.coordinator import (
    STATE_KEY,
    CloudCoordinator,
    RegistryHeldByAnotherRun,
    RoundFailed,
    held_run_id,
)
from orchestrator.cloud.local import local_training_round
from orchestrator.cloud.ray_train import ray_train_round
from orchestrator.core.metrics import Ledger
from orchestrator.core.registry import Registry
from orchestrator.core.scenario import (
    CoordinatorCrashEvent,
    CrashEvent,
    EdgeConfig,
    JoinEvent,
    LeaveEvent,
    LinkEvent,
    PoisonEvent,
    Scenario,
    SlowEvent,
)
from orchestrator.data.partitions import make_partitions
from orchestrator.data.sources import resolve_source
from orchestrator.evaluation.evaluate import EvaluationOptions, evaluate_run
from orchestrator.report.build import build_report, write_report
from orchestrator.report.markdown import write_report_markdown
from orchestrator.runtime.edges import spawn_edge_node

logger = logging.getLogger(__name__)

POLL_SECONDS = 0.2  # the engine's tick: how long one ray.wait blocks at most
PROGRESS_EVERY_SECONDS = 2.0  # how often running edges are asked for progress
FINAL_EDGE_STATUSES = (
    "accepted",
    "rejected",
    "left",
    "upload_failed",
    "crashed",  # killed by a timeline `crash` event
    "died",  # its process died without a crash event
    "failed",  # run() raised
    "timed_out",
    "unschedulable",
)


class RunFailed(Exception):  # noqa: N818 (reads as what happened)
    """The run went through but its result is unusable (a cloud round failed: no task models); report.json
    and report.md were written and say why."""


def new_run_id() -> str:
    """A fresh run id: UTC start time (readable, sortable) and 6 random hex digits (unique)."""
    return f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{secrets.token_hex(3)}"


@dataclass
class EngineOptions:
    """How the engine runs (not what: that is the scenario)."""

    address: str | None = None  # None: a local embedded Ray; "auto" or "ray://host:port": join a cluster
    num_cpus: int | None = None  # CPUs of a local embedded Ray (None: Ray's default, all cores)
    registry_uri: str | None = None  # default: out_dir/registry (must be shared storage on a cluster)
    startup_timeout_s: float = 300.0  # the longest wait for the coordinator and initial edges to boot
    unschedulable_after_s: float = 10.0  # an edge not started after this, with a demand no node meets
    edge_timeout_s: float = 1800.0  # an edge not finished this long after it started is killed
    finish_timeout_s: float = 3600.0  # the coordinator's final round + decomposition
    coordinator_num_cpus: float = 0.5  # it validates uploads and (without Ray Train) runs the local round
    # How a cloud round trains: "ray_train" (TorchTrainer jobs, orchestrator.cloud.ray_train) or "local"
    # (the same loop in a thread of the coordinator; faster to start, for small runs and tests).
    cloud_trainer: Literal["ray_train", "local"] = "ray_train"
    progress: Callable[[str], None] | None = None  # receives one line per progress update (the CLI prints)
    keep_ray: bool = False  # leave a Ray instance this engine started running (e.g. to serve afterwards)
    # After the run: FedAvg baseline, personalisation, FID/KID, sample grids (orchestrator.evaluation).
    evaluation: EvaluationOptions | None = None  # None: skip them (report.md is written either way)


@dataclass
class EdgeTrack:
    """What the engine knows about one edge."""

    config: EdgeConfig
    handle: Any = None
    run_ref: Any = None
    probe_ref: Any = None  # the first progress() call; its answer means "started"
    progress_ref: Any = None  # an outstanding progress() call of a running edge
    spawned_at: float | None = None
    started_at: float | None = None
    status: str = "not_joined"
    report: dict[str, Any] | None = None  # the last report (final, or the last progress for dead edges)
    error: str | None = None
    crash_requested: bool = False
    events: list[str] = field(default_factory=list)

    @property
    def final(self) -> bool:
        return self.status in FINAL_EDGE_STATUSES


def resource_demand(edge: EdgeConfig) -> dict[str, float]:
    """The Ray resources an edge actor asks for, in Ray's names."""
    demand: dict[str, float] = {"CPU": edge.num_cpus}
    if edge.num_gpus > 0:
        demand["GPU"] = edge.num_gpus
    if edge.memory_mb is not None:
        demand["memory"] = float(edge.memory_mb * 1024 * 1024)
    demand.update(edge.custom_resources)
    return demand


def unmet_demand(demand: dict[str, float], nodes: list[dict[str, Any]]) -> str | None:
    """Why no alive node can ever host `demand` (by total capacity), or None when one can."""
    alive = [node for node in nodes if node.get("Alive")]
    if not alive:
        return "no alive Ray node"
    for node in alive:
        offered = node.get("Resources", {})
        if all(offered.get(name, 0.0) >= amount for name, amount in demand.items()):
            return None
    largest = {name: max(node.get("Resources", {}).get(name, 0.0) for node in alive) for name in demand}
    missing = {name: amount for name, amount in demand.items() if largest[name] < amount}
    return f"no node offers {missing} (largest offer per node: {largest})"


class Engine:
    """One run of one scenario. Use `run_scenario` unless you need the pieces."""

    def __init__(self, scenario: Scenario, out_dir: Path, options: EngineOptions) -> None:
        self.scenario = scenario
        self.out_dir = Path(out_dir)
        self.options = options
        self.registry_uri = options.registry_uri or str((self.out_dir / "registry").resolve())
        self.run_id = new_run_id()  # the coordinator resumes only a state of this run (Ray restarts keep it)
        self.source = resolve_source(scenario.data)
        self.partitions = make_partitions(self.source, scenario)  # ScenarioError before any actor starts
        self.edges = {edge.id: EdgeTrack(edge) for edge in scenario.all_edges()}
        self.timeline = sorted(enumerate(scenario.timeline), key=lambda item: (item[1].at_seconds, item[0]))
        self.event_log: list[dict[str, Any]] = []
        self.started = 0.0
        self.coordinator: Any = None
        self._source_ref: Any = None
        self._status_ref: Any = None  # an outstanding coordinator status() call
        self._round_errors_said: set[tuple[int, int]] = set()  # (round, attempt) already printed

    def check_registry_is_free(self) -> None:
        """Raise RegistryHeldByAnotherRun when the registry already holds a run's coordinator state.

        Why up front: a new coordinator would take that state for its own restart (old ledger, rounds and
        BAIM; uploads rejected as version conflicts). Nothing is written before this check.
        """
        registry_dir = self.out_dir / "registry"
        if self.options.registry_uri is None and not registry_dir.exists():
            return  # the common case: a fresh --out (and no empty registry folder made here)
        state = Registry(self.registry_uri).get_json(STATE_KEY)
        if state is None:
            return
        held = held_run_id(state) or "unknown (written before runs had ids)"
        if self.options.registry_uri is None:
            message = (
                f"--out {self.out_dir} already holds a run (id {held}, registry {self.registry_uri}); "
                "pick a new --out or delete it"
            )
        else:
            message = (
                f"registry {self.registry_uri} already holds a run (id {held}); "
                "pick another registry or delete it"
            )
        raise RegistryHeldByAnotherRun(message, held_run_id(state))

    # ---- driver --------------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        self.check_registry_is_free()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        started_ray = False
        if not ray.is_initialized():
            ray.init(
                address=self.options.address,
                num_cpus=self.options.num_cpus if self.options.address is None else None,
                include_dashboard=False,
                configure_logging=False,
                log_to_driver=False,
            )
            started_ray = True
        try:
            return self._run()
        finally:
            self._release_actors()
            if started_ray and not self.options.keep_ray:
                ray.shutdown()

    def _run(self) -> dict[str, Any]:
        wall_start = time.time()
        self._say(
            f"run {self.scenario.name!r}: {len(self.edges)} edges, {len(self.scenario.tasks)} tasks, "
            f"data {self.source.kind} ({self.source.root}), registry {self.registry_uri}, "
            f"run id {self.run_id}"
        )
        self._source_ref = ray.put(self.source)
        coordinator_cls = ray.remote(CloudCoordinator).options(
            num_cpus=self.options.coordinator_num_cpus,
            max_restarts=-1,  # restarted by Ray after a crash; __init__ resumes from the checkpoint
            max_task_retries=-1,  # upload/status/finish are idempotent, so Ray may re-send them
            max_concurrency=1000,
        )
        runner = ray_train_round if self.options.cloud_trainer == "ray_train" else local_training_round
        # No object-store arguments: a restarted coordinator must be rebuildable from these values alone.
        self.coordinator = coordinator_cls.remote(
            self.scenario, self.registry_uri, round_runner=runner, run_id=self.run_id
        )
        self.started = time.monotonic()  # provisional: the clock restarts once everything is up
        initial = [track for track in self.edges.values() if track.config.start]
        for track in initial:
            self._spawn(track, reason="start")
        self._wait_until_up(initial)
        self.started = time.monotonic()  # t = 0 of the timeline
        self._record("run_started")
        for track in initial:
            if not track.final:
                self._begin(track)

        pending_events = list(self.timeline)
        last_progress = 0.0
        while pending_events or not all(t.final or t.status == "not_joined" for t in self.edges.values()):
            now = self._elapsed()
            while pending_events and pending_events[0][1].at_seconds <= now:
                index, event = pending_events.pop(0)
                self._fire(index, event)
            self._collect_results()
            self._check_starts()
            ask = now - last_progress >= PROGRESS_EVERY_SECONDS
            self._poll_progress(ask)
            self._poll_coordinator(ask)
            if ask:
                last_progress = now
        self._say(f"all edges final after {self._elapsed():.1f}s; coordinator finishing (train, decompose)")

        failure: RoundFailed | None = None
        try:
            summary = ray.get(self.coordinator.finish.remote(), timeout=self.options.finish_timeout_s)
        except RoundFailed as err:  # Ray raises an error that is also an instance of the actor's error
            failure = err
            summary = ray.get(self.coordinator.summary.remote(), timeout=self.options.finish_timeout_s)
        self._say_round_errors(summary.get("round_errors", []))  # those the polls missed
        failure_text = None if failure is None else _round_failure_text(failure)
        accepted_by_edge = {receipt["edge_id"]: receipt for receipt in summary["accepted"]}
        ledger = Ledger(export_metrics=False)
        ledger.merge(Ledger.from_dict(summary["ledger"], export_metrics=False))
        for track in self.edges.values():
            if track.report is not None:
                ledger.merge(Ledger.from_dict(track.report["ledger"], export_metrics=False))
        report = build_report(
            scenario=self.scenario,
            source=self.source,
            partitions=self.partitions,
            edges={
                edge_id: self._edge_row(track, accepted_by_edge.get(edge_id))
                for edge_id, track in self.edges.items()
            },
            coordinator=summary,
            ledger=ledger,
            events=self.event_log,
            registry_uri=self.registry_uri,
            wall_seconds=time.time() - wall_start,
            run_id=self.run_id,
            failure=failure_text,
        )
        write_report(report, self.out_dir / "report.json")
        self._say(f"wrote {self.out_dir / 'report.json'}")
        if failure_text is not None:  # no task models: nothing to evaluate or serve
            self._say(f"wrote {write_report_markdown(self.out_dir)}")
            raise RunFailed(f"{failure_text} (report: {self.out_dir / 'report.md'})")
        if self.options.evaluation is not None:
            self._release_actors()  # the coordinator is done: its CPU goes to the baseline's clients
            report = evaluate_run(report, self.scenario, self.source, self.partitions, self.out_dir,
                                  self.options.evaluation, progress=self._say)  # fmt: skip
            write_report(report, self.out_dir / "report.json")
        self._say(f"wrote {write_report_markdown(self.out_dir)} and {self.out_dir / 'plots'}")
        return report

    # ---- edges ---------------------------------------------------------------------------------------

    def _spawn(self, track: EdgeTrack, reason: str) -> None:
        edge = track.config
        track.handle = spawn_edge_node(self.scenario, edge, self._source_ref, self.partitions.edges[edge.id])
        track.probe_ref = track.handle.progress.remote()
        track.spawned_at = time.monotonic()
        track.status = "pending"
        self._record("edge_spawned", edge=edge.id, reason=reason)

    def _wait_until_up(self, initial: list[EdgeTrack]) -> None:
        """Wait for the coordinator and the initial edges' processes (or their verdict: unschedulable).

        The timeline's clock starts after this, so `at_seconds` means time into training, not time spent
        booting Python workers (seconds to tens of seconds on a loaded machine).
        """
        deadline = time.monotonic() + self.options.startup_timeout_s
        ray.get(self.coordinator.status.remote(), timeout=self.options.startup_timeout_s)
        while any(track.status == "pending" for track in initial) and time.monotonic() < deadline:
            self._check_starts()
            time.sleep(POLL_SECONDS)
        waiting = [track.config.id for track in initial if track.status == "pending"]
        if waiting:
            self._say(f"starting the timeline while edges {waiting} still wait for resources")

    def _begin(self, track: EdgeTrack) -> None:
        track.run_ref = track.handle.run.remote(self.coordinator)

    def _check_starts(self) -> None:
        """Mark edges started when their first progress answer arrives; find the unschedulable ones."""
        nodes: list[dict[str, Any]] | None = None
        for track in self.edges.values():
            if track.status != "pending" or track.spawned_at is None:
                continue
            ready, _ = ray.wait([track.probe_ref], timeout=0)
            if ready:
                track.probe_ref = None
                # An edge that died starting (e.g. its constructor raised) is final now, not pending.
                probe = self._report_or_finalise(track, ready[0])
                if probe is None:
                    continue
                track.report = probe
                track.started_at = time.monotonic()
                track.status = "running"
                self._say(f"edge {track.config.id} started ({self._elapsed():.1f}s)")
                continue
            if time.monotonic() - track.spawned_at < self.options.unschedulable_after_s:
                continue
            nodes = nodes if nodes is not None else ray.nodes()
            why = unmet_demand(resource_demand(track.config), nodes)
            if why is not None:
                ray.kill(track.handle, no_restart=True)
                self._finalise(track, "unschedulable", error=why)

    def _report_or_finalise(self, track: EdgeTrack, ref: ray.ObjectRef) -> dict[str, Any] | None:
        """The edge's JSON report behind `ref`; or None after finalising the edge when the call failed: its
        actor died ("crashed" when the timeline killed it, else "died"), or the method raised ("failed")."""
        try:
            report: dict[str, Any] = json.loads(ray.get(ref))
        except RayActorError as err:
            status = "crashed" if track.crash_requested else "died"
            self._finalise(track, status, error=f"{type(err).__name__}: {_first_line(err)}")
            return None
        except RayTaskError as err:
            self._finalise(track, "failed", error=str(err).splitlines()[-1])
            return None
        return report

    def _collect_results(self) -> None:
        running = {t.run_ref: t for t in self.edges.values() if t.run_ref is not None and not t.final}
        if not running:
            time.sleep(POLL_SECONDS)
            return
        ready, _ = ray.wait(list(running), num_returns=len(running), timeout=POLL_SECONDS)
        for ref in ready:
            track = running[ref]
            report = self._report_or_finalise(track, ref)
            if report is None:
                continue
            track.report = report
            self._finalise(track, report["status"], error=report.get("error"))
        for track in running.values():
            since = track.started_at if track.started_at is not None else track.spawned_at
            if track.final or since is None:
                continue
            if time.monotonic() - since > self.options.edge_timeout_s:
                ray.kill(track.handle, no_restart=True)
                self._finalise(track, "timed_out", error=f"not finished after {self.options.edge_timeout_s}s")

    def _poll_progress(self, ask: bool) -> None:
        """Collect the progress answers that arrived (never blocks); with `ask`, ask running edges again."""
        outstanding = {t.progress_ref: t for t in self.edges.values() if t.progress_ref is not None}
        if outstanding:
            ready, _ = ray.wait(list(outstanding), num_returns=len(outstanding), timeout=0)
            for ref in ready:
                track = outstanding[ref]
                track.progress_ref = None
                try:
                    report = json.loads(ray.get(ref))
                except (RayActorError, RayTaskError):
                    continue  # a dead edge: _collect_results settles it
                if track.final:
                    continue  # the final report is already in
                if track.report is None or report["epoch"] != track.report.get("epoch"):
                    epochs = f"{report['epoch']}/{report['epochs']}"
                    loss = report["train_loss"]
                    self._say(f"edge {track.config.id}: {report['status']} epoch {epochs} loss {loss}")
                track.report = report
        if ask:
            for track in self.edges.values():
                if track.status == "running" and track.progress_ref is None and track.handle is not None:
                    track.progress_ref = track.handle.progress.remote()

    def _poll_coordinator(self, ask: bool) -> None:
        """Print failed cloud rounds as they happen (never blocks); with `ask`, ask the coordinator again.

        Why: the coordinator's own log does not reach the terminal (log_to_driver=False), and a round that
        fails (e.g. use_gpu without GPUs) should be visible long before the run ends.
        """
        if self._status_ref is not None:
            ready, _ = ray.wait([self._status_ref], timeout=0)
            if ready:
                self._status_ref = None
                try:
                    status = ray.get(ready[0])
                except (RayActorError, RayTaskError):
                    status = None  # restarting after a crash: ask again next time
                if status is not None:
                    self._say_round_errors(status.get("round_errors", []))
        if ask and self._status_ref is None and self.coordinator is not None:
            self._status_ref = self.coordinator.status.remote()

    def _say_round_errors(self, round_errors: list[dict[str, Any]]) -> None:
        for entry in round_errors:
            key = (int(entry["round"]), int(entry["attempts"]))
            if key in self._round_errors_said:
                continue
            self._round_errors_said.add(key)
            self._record("round_failed", round=key[0], attempt=key[1], error=entry["error"])
            self._say(
                f"cloud round {key[0]} failed (attempt {key[1]}; learners {', '.join(entry['learners'])}): "
                f"{entry['error']}; its learners stay pending (retried after a new upload or "
                f"{self.scenario.cloud.fusion.max_wait_seconds:g}s)"
            )

    def _finalise(self, track: EdgeTrack, status: str, error: str | None = None) -> None:
        track.status = status
        track.error = error
        self._record("edge_final", edge=track.config.id, status=status, error=error)
        self._say(f"edge {track.config.id}: {status}" + (f" ({error})" if error else ""))
        if track.handle is not None and status not in ("crashed", "died", "unschedulable", "timed_out"):
            ray.kill(track.handle, no_restart=True)  # done: give its CPUs back to the cloud's training
        track.handle = None

    # ---- timeline ------------------------------------------------------------------------------------

    def _fire(self, index: int, event: Any) -> None:
        where = f"timeline.{index}"
        if isinstance(event, CoordinatorCrashEvent):
            ray.kill(self.coordinator, no_restart=False)  # Ray restarts it; __init__ resumes
            self._record("coordinator_crash", at=event.at_seconds, where=where)
            self._say(f"{where}: coordinator killed (Ray restarts it from its checkpoint)")
            return
        if isinstance(event, JoinEvent):
            track = self.edges[event.edge_id()]
            self._spawn(track, reason=f"{where} join")
            self._begin(track)
            self._record("join", edge=track.config.id, at=event.at_seconds, where=where)
            return
        track = self.edges[event.edge]
        if track.handle is None or track.final:
            self._record(event.kind, edge=event.edge, at=event.at_seconds, where=where,
                         applied=False, note=f"edge is {track.status}")  # fmt: skip
            return
        if isinstance(event, CrashEvent):
            track.crash_requested = True
            ray.kill(track.handle, no_restart=True)
        elif isinstance(event, LeaveEvent):
            track.handle.leave.remote()
        elif isinstance(event, SlowEvent):
            track.handle.slow_down.remote(event.factor)
        elif isinstance(event, LinkEvent):
            track.handle.change_link.remote(event.bandwidth_mbps, event.latency_ms)
        elif isinstance(event, PoisonEvent):
            track.handle.poison.remote(event.mode, event.scale)
        self._record(event.kind, edge=event.edge, at=event.at_seconds, where=where, applied=True)
        self._say(f"{where}: {event.kind} {event.edge}")

    # ---- helpers -------------------------------------------------------------------------------------

    def _edge_row(self, track: EdgeTrack, accepted: dict[str, Any] | None = None) -> dict[str, Any]:
        """The report row of one edge. `accepted`: the coordinator's accepted receipt for this edge, used when
        the edge has none of its own (it died after the coordinator stored its upload, before the ack)."""
        report = track.report or {}
        costs = (report.get("ledger") or {}).get("edges", {}).get(track.config.id, {})
        receipt = report.get("receipt") or {}
        receipt_from = "edge" if receipt else "none"
        if not receipt and accepted is not None:
            receipt, receipt_from = accepted, "coordinator"
        outcome = ("accepted" if receipt.get("accepted") else "rejected") if receipt else "none"
        return {
            "task": track.config.task,
            "status": track.status,
            "error": track.error,
            "resources": resource_demand(track.config),
            "shard_size": len(self.partitions.edges[track.config.id]),
            "epochs_done": report.get("epoch", 0),
            "local_epochs": track.config.local_epochs,
            "bytes_sent": costs.get("bytes_sent", 0),
            "bytes_received": costs.get("bytes_received", 0),
            "flops": costs.get("flops", 0),
            "train_seconds": (costs.get("seconds") or {}).get("edge_train", 0.0),
            "upload_seconds": (costs.get("seconds") or {}).get("edge_upload", 0.0),
            "upload": {
                "outcome": outcome,
                "reason": receipt.get("reason", ""),
                "detail": receipt.get("detail", ""),
                "sha256": receipt.get("sha256"),
                "artifact": receipt.get("artifact"),
                "receipt_from": receipt_from,  # "coordinator": the edge never got its receipt
            },
            "costs_are_final": track.status not in ("crashed", "died", "timed_out"),
        }

    def _release_actors(self) -> None:
        for track in self.edges.values():
            if track.handle is not None:
                ray.kill(track.handle, no_restart=True)
                track.handle = None
        if self.coordinator is not None:
            ray.kill(self.coordinator, no_restart=True)
            self.coordinator = None

    def _elapsed(self) -> float:
        return time.monotonic() - self.started

    def _record(self, kind: str, **fields: Any) -> None:
        self.event_log.append({"t": round(self._elapsed(), 3), "kind": kind, **fields})

    def _say(self, line: str) -> None:
        logger.info("%s", line)
        if self.options.progress is not None:
            self.options.progress(line)


def _first_line(err: BaseException) -> str:
    lines = str(err).splitlines()
    return lines[0] if lines else ""


def _round_failure_text(err: RoundFailed) -> str:
    """The coordinator's message (Ray's wrapper adds a traceback around it; `cause` is the error itself)."""
    cause = getattr(err, "cause", None)
    return str(cause if isinstance(cause, RoundFailed) else err)


def run_scenario(
    scenario: Scenario, out_dir: str | Path, options: EngineOptions | None = None
) -> dict[str, Any]:
    """Run `scenario` end to end and return the report (also written to out_dir/report.json)."""
    return Engine(scenario, Path(out_dir), options or EngineOptions()).run()
