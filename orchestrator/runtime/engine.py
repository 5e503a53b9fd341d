"""The scenario engine: runs one scenario's BAIM path on Ray and writes report.json (`run_scenario`).

The steps, the timeline's clock and how edges are watched are in docs/ARCHITECTURE.md ("Runtime").
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import ray
from pydantic import ValidationError
from ray.exceptions import RayActorError, RayTaskError

from actors.coordinator import (
    STATE_KEY,
    CloudCoordinator,
    RegistryHeldByAnotherRun,
    RoundFailed,
    held_run_id,
)
from actors.rounds import RoundRunner
from orchestrator.cloud.auto import auto_training_round
from orchestrator.cloud.local import local_training_round
from orchestrator.cloud.ray_train import ray_train_round
from orchestrator.core.metrics import Ledger
from orchestrator.core.progress import read_epochs
from orchestrator.core.receipts import CoordinatorSummary
from orchestrator.core.registry import Registry
from orchestrator.core.reports import (
    EdgeReport,
    EdgeRow,
    EdgeUpload,
    RoundError,
    RunEvent,
    RunReport,
    UploadRecord,
)
from orchestrator.core.scenario import (
    CoordinatorCrashEvent,
    EdgeConfig,
    Event,
    JoinEvent,
    NewTaskEvent,
    Scenario,
    format_validation_error,
)
from orchestrator.data.partitions import Partitions, make_partitions
from orchestrator.data.sources import DataSource, resolve_source
from orchestrator.data.traces import read_trace
from orchestrator.report.build import build_report, write_report
from orchestrator.report.markdown import write_report_markdown
from orchestrator.runtime.fleet import (
    POLL_SECONDS,
    EdgeFleet,
    EdgeLost,
    EdgeStarted,
    Timeline,
    resource_demand,
)
from orchestrator.runtime.virtual_clock import Simulation, edge_works, simulate, write_simulated_events

logger = logging.getLogger(__name__)

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
    "offline",  # time: virtual: its trace kept it offline (lost before its upload)
)
TIMELINE_KINDS = ("join", "leave", "crash", "slow", "link", "poison", "coordinator_crash")
VIRTUAL_EVENTS_FILE = "virtual_timeline.jsonl"  # every simulated event of a `time: virtual` run


class RunFailed(Exception):  # noqa: N818 (reads as what happened)
    """The run went through but its result is unusable (a cloud round failed: no task models); report.json
    and report.md were written and say why."""


ROUND_RUNNERS: dict[str, RoundRunner] = {
    "auto": auto_training_round,
    "ray_train": ray_train_round,
    "local": local_training_round,
}


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
    # How a cloud round trains, over the scenario's cloud.trainer: "ray_train" (TorchTrainer jobs,
    # orchestrator.cloud.ray_train), "local" (the same loop in a thread of the coordinator), "auto" (by size,
    # orchestrator.cloud.auto); None: the scenario's.
    cloud_trainer: Literal["auto", "ray_train", "local"] | None = None
    progress: Callable[[str], None] | None = None  # receives one line per progress update (the CLI prints)
    keep_ray: bool = False  # leave a Ray instance this engine started running (e.g. to serve afterwards)
    # A stage after a successful run, with Ray still up and the run's actors released (the CLI passes
    # orchestrator.evaluation's: FedAvg baseline, personalisation, FID/KID, sample grids). None: none.
    after_run: Callable[[FinishedRun], RunReport] | None = None


@dataclass(frozen=True)
class FinishedRun:
    """A finished BAIM run, as a stage after it sees it: its report and inputs (report.md not written yet)."""

    report: RunReport
    scenario: Scenario
    source: DataSource
    partitions: Partitions
    out_dir: Path
    progress: Callable[[str], None]
    # The live CloudCoordinator actor while the stage runs, when the scenario relays adapters back to the
    # cloud (personalisation.relay): the stage sends them to its relay() and runs its relay_round().
    coordinator: Any = None


@dataclass
class EdgeTrack:
    """What the engine knows about one edge."""

    config: EdgeConfig
    run_ref: Any = None
    progress_ref: Any = None  # an outstanding progress() call of a running edge
    spawned_at: float | None = None
    started_at: float | None = None
    status: str = "not_joined"
    report: EdgeReport | None = None  # the last report (final, or the last progress for dead edges)
    error: str | None = None

    @property
    def final(self) -> bool:
        return self.status in FINAL_EDGE_STATUSES


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
        self.fleet = EdgeFleet(
            scenario,
            self.source,
            self.partitions,
            unschedulable_after_s=options.unschedulable_after_s,
            reserve_cpus=options.coordinator_num_cpus,
        )
        self.event_log: list[RunEvent] = []
        self.started = 0.0
        self.coordinator: Any = None
        self._status_ref: Any = None  # an outstanding coordinator status() call
        self._round_errors_said: set[tuple[int, int]] = set()  # (round, attempt) already printed
        self.simulation: Simulation | None = None  # time: virtual, once played
        self._epochs_said: set[tuple[int, str, int]] = set()  # cloud (round, strategy, epoch) printed

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

    def run(self) -> RunReport:
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

    def _run(self) -> RunReport:
        wall_start = time.time()
        self._say(
            f"run {self.scenario.name!r}: {len(self.edges)} edges, {len(self.scenario.tasks)} tasks, "
            f"data {self.source.kind} ({self.source.root}), registry {self.registry_uri}, "
            f"run id {self.run_id}"
        )
        coordinator_cls = ray.remote(CloudCoordinator).options(
            num_cpus=self.options.coordinator_num_cpus,
            max_restarts=-1,  # restarted by Ray after a crash; __init__ resumes from the checkpoint
            max_task_retries=-1,  # upload/status/finish are idempotent, so Ray may re-send them
            max_concurrency=1000,
        )
        runner = ROUND_RUNNERS[self.options.cloud_trainer or self.scenario.cloud.trainer]
        # No object-store arguments: a restarted coordinator must be rebuildable from these values alone.
        self.coordinator = coordinator_cls.remote(
            self.scenario, self.registry_uri, round_runner=runner, run_id=self.run_id
        )
        self.started = time.monotonic()  # provisional: the clock restarts once everything is up
        if self.scenario.time == "virtual":
            self._play_virtual()
        else:
            self._play_wall()
        self._say(f"all edges final after {self._elapsed():.1f}s; coordinator finishing (train, decompose)")

        failure: RoundFailed | None = None
        try:
            summary = self._finish()
        except RoundFailed as err:  # Ray raises an error that is also an instance of the actor's error
            failure = err
            summary = ray.get(self.coordinator.summary.remote(), timeout=self.options.finish_timeout_s)
        outcome = CoordinatorSummary.model_validate(summary)
        self._say_round_errors(outcome.round_errors)  # those the polls missed
        failure_text = None if failure is None else _round_failure_text(failure)
        accepted_by_edge = {str(r.edge_id): UploadRecord.from_receipt(r) for r in outcome.accepted}
        ledger = Ledger(export_metrics=False)
        ledger.merge(Ledger.from_snapshot(outcome.ledger, export_metrics=False))
        for track in self.edges.values():
            if track.report is not None:
                ledger.merge(Ledger.from_dict(track.report.ledger, export_metrics=False))
        report = build_report(
            scenario=self.scenario,
            source=self.source,
            partitions=self.partitions,
            edges={
                edge_id: self._edge_row(track, accepted_by_edge.get(edge_id))
                for edge_id, track in self.edges.items()
            },
            coordinator=outcome,
            ledger=ledger,
            events=self.event_log,
            registry_uri=self.registry_uri,
            wall_seconds=time.time() - wall_start,
            simulated_seconds=None if self.simulation is None else self.simulation.end_s,
            run_id=self.run_id,
            failure=failure_text,
        )
        write_report(report, self.out_dir / "report.json")
        self._say(f"wrote {self.out_dir / 'report.json'}")
        if failure_text is not None:  # no task models: nothing to evaluate or serve
            self._say(f"wrote {write_report_markdown(self.out_dir)}")
            raise RunFailed(f"{failure_text} (report: {self.out_dir / 'report.md'})")
        if self.options.after_run is not None:
            # The edges are done; the coordinator too, unless it takes relayed adapters in after the run.
            # Otherwise its CPU goes to the baseline's clients.
            relays = self.scenario.personalisation.relay
            self._release_actors(keep_coordinator=relays)
            run = FinishedRun(
                report, self.scenario, self.source, self.partitions, self.out_dir, self._say,
                coordinator=self.coordinator if relays else None,
            )  # fmt: skip
            try:
                report = self.options.after_run(run)
            finally:
                self._release_actors()
            write_report(report, self.out_dir / "report.json")
        self._say(f"wrote {write_report_markdown(self.out_dir)} and {self.out_dir / 'plots'}")
        return report

    def _play_wall(self) -> None:
        """The timeline on the wall clock: events fire when their time has passed."""
        initial = [track for track in self.edges.values() if track.config.start]
        for track in initial:
            self._spawn(track, reason="start")
        self._wait_until_up(initial)
        self.started = time.monotonic()  # t = 0 of the timeline
        self._record("run_started")
        for track in initial:
            if not track.final:
                self._begin(track)

        timeline = Timeline(self.scenario.timeline)
        last_progress = 0.0
        while timeline or not all(t.final or t.status == "not_joined" for t in self.edges.values()):
            now = self._elapsed()
            for index, event in timeline.due(now):
                self._fire(index, event)
            self._watch(now, last_progress)
            if now - last_progress >= PROGRESS_EVERY_SECONDS:
                last_progress = now

    def _watch(self, now: float, last_progress: float) -> None:
        """One round of watching: results, starts, progress and the coordinator's round errors."""
        self._collect_results()
        self._check_starts()
        ask = now - last_progress >= PROGRESS_EVERY_SECONDS
        self._poll_progress(ask)
        self._poll_coordinator(ask)

    def _play_virtual(self) -> None:
        """The timeline on the virtual clock (orchestrator.runtime.virtual_clock): simulate first, then train
        and upload the edges that upload, in the order of their simulated arrivals; the others are final at
        once with the status the simulation gave them. A coordinator crash fires once every upload that
        arrives before it in simulated time is in."""
        trace = read_trace(self.scenario.traces.path) if self.scenario.traces.path is not None else []
        simulation = simulate(
            edge_works(self.scenario, self.partitions),
            self.scenario.timeline,
            trace,
            offline_upload=self.scenario.traces.offline_upload,
        )
        self.simulation = simulation
        write_simulated_events(simulation, self.out_dir / VIRTUAL_EVENTS_FILE)
        ray.get(self.coordinator.status.remote(), timeout=self.options.startup_timeout_s)
        self.started = time.monotonic()
        self._record("run_started")
        for event in simulation.events:
            if event.kind in TIMELINE_KINDS:
                fields = {k: v for k, v in event.detail.items() if k in ("where", "applied", "note")}
                if event.edge is not None:
                    fields["edge"] = event.edge
                self.event_log.append(RunEvent.model_validate({"t": event.t, "kind": event.kind, **fields}))
        for fate in simulation.fates.values():
            if fate.status != "uploads":
                self._finalise(self.edges[fate.edge_id], fate.status, error=f"simulated: {fate.note}")
        crashes = list(simulation.coordinator_crashes)
        last_progress = 0.0
        for fate in simulation.uploads_in_order():
            while crashes and crashes[0] < (fate.at or 0.0):
                self._drain()
                ray.kill(self.coordinator, no_restart=False)  # Ray restarts it; __init__ resumes
                self._say(f"coordinator killed at simulated {crashes.pop(0):g}s")
            track = self.edges[fate.edge_id]
            self._spawn(track, reason="start" if track.config.start else "join")
            for poison in fate.poison:
                self.fleet.apply(fate.edge_id, poison)
            self._begin(track)
            now = self._elapsed()
            self._watch(now, last_progress)
            last_progress = now if now - last_progress >= PROGRESS_EVERY_SECONDS else last_progress
        self._drain()
        self._say(
            f"virtual clock: {simulation.end_s:.1f} simulated seconds in {self._elapsed():.1f} wall seconds"
        )

    def _drain(self) -> None:
        """Watch until every spawned edge is final."""
        last_progress = 0.0
        while not all(t.final or t.status == "not_joined" for t in self.edges.values()):
            now = self._elapsed()
            self._watch(now, last_progress)
            if now - last_progress >= PROGRESS_EVERY_SECONDS:
                last_progress = now

    def _finish(self) -> Any:
        """The coordinator's finish() (its last round, decomposition, publishing), printing the cloud's
        epochs while it trains; raises Ray's GetTimeoutError after finish_timeout_s."""
        finishing = self.coordinator.finish.remote()
        deadline = time.monotonic() + self.options.finish_timeout_s
        while not ray.wait([finishing], timeout=min(PROGRESS_EVERY_SECONDS, self.options.finish_timeout_s))[
            0
        ]:
            self._say_cloud_epochs()
            if time.monotonic() > deadline:
                break
        self._say_cloud_epochs()
        return ray.get(finishing, timeout=max(0.0, deadline - time.monotonic()))

    # ---- edges ---------------------------------------------------------------------------------------

    def _spawn(self, track: EdgeTrack, reason: str) -> None:
        self.fleet.spawn(track.config.id)
        track.spawned_at = time.monotonic()
        track.status = "pending"
        self._record("edge_spawned", edge=track.config.id, reason=reason)

    def _wait_until_up(self, initial: list[EdgeTrack]) -> None:
        """Wait for the coordinator and the initial edges' processes (or their verdict: unschedulable).

        The timeline's clock starts after this, so `at_seconds` means time into training, not time spent
        booting Python workers (seconds to tens of seconds on a loaded machine).
        """
        deadline = time.monotonic() + self.options.startup_timeout_s
        ray.get(self.coordinator.status.remote(), timeout=self.options.startup_timeout_s)
        edge_ids = [track.config.id for track in initial]
        settled = self.fleet.wait_until_up(edge_ids, max(0.0, deadline - time.monotonic()))
        self._settle_starts(settled)
        waiting = [track.config.id for track in initial if track.status == "pending"]
        if waiting:
            self._say(f"starting the timeline while edges {waiting} still wait for resources")

    def _begin(self, track: EdgeTrack) -> None:
        track.run_ref = self.fleet.call(track.config.id, "run", self.coordinator)

    def _check_starts(self) -> None:
        self._settle_starts(self.fleet.poll_starts())

    def _settle_starts(self, settled: list[EdgeStarted | EdgeLost]) -> None:
        """Edges whose start probe answered are running; those lost starting (or unschedulable) are final."""
        for outcome in settled:
            track = self.edges[outcome.edge_id]
            report = self._parse_report(track, outcome if isinstance(outcome, EdgeLost) else outcome.answer)
            if report is None:
                continue
            track.report = report
            track.started_at = time.monotonic()
            track.status = "running"
            self._say(f"edge {track.config.id} started ({self._elapsed():.1f}s)")

    def _parse_report(self, track: EdgeTrack, answer: Any) -> EdgeReport | None:
        """The edge's report; or None after finalising the edge (lost, or its report is malformed)."""
        if isinstance(answer, EdgeLost):
            self._finalise(track, answer.status, error=answer.error)
            return None
        try:
            return EdgeReport.model_validate_json(answer)
        except ValidationError as err:
            self._finalise(track, "failed", error=f"malformed edge report: {format_validation_error(err)[0]}")
            return None

    def _collect_results(self) -> None:
        running = {t.run_ref: t for t in self.edges.values() if t.run_ref is not None and not t.final}
        if not running:
            time.sleep(POLL_SECONDS)
            return
        ready, _ = ray.wait(list(running), num_returns=len(running), timeout=POLL_SECONDS)
        for ref in ready:
            track = running[ref]
            report = self._parse_report(track, self.fleet.answer(track.config.id, ref))
            if report is None:
                continue
            track.report = report
            self._finalise(track, report.status, error=report.error)
        for track in running.values():
            since = track.started_at if track.started_at is not None else track.spawned_at
            if track.final or since is None:
                continue
            if time.monotonic() - since > self.options.edge_timeout_s:
                self.fleet.release(track.config.id)
                self._finalise(track, "timed_out", error=f"not finished after {self.options.edge_timeout_s}s")

    def _poll_progress(self, ask: bool) -> None:
        """Collect the progress answers that arrived (never blocks); with `ask`, ask running edges again."""
        outstanding = {t.progress_ref: t for t in self.edges.values() if t.progress_ref is not None}
        if outstanding:
            ready, _ = ray.wait(list(outstanding), num_returns=len(outstanding), timeout=0)
            for ref in ready:
                track = outstanding[ref]
                track.progress_ref = None
                answer = self.fleet.answer(track.config.id, ref)
                if isinstance(answer, EdgeLost) or track.final:
                    continue  # a dead edge (_collect_results settles it), or the final report is in
                try:
                    report = EdgeReport.model_validate_json(answer)
                except ValidationError:
                    continue  # progress only; a malformed final report fails the edge
                if track.report is None or report.epoch != track.report.epoch:
                    epochs = f"{report.epoch}/{report.epochs}"
                    loss = "n/a" if report.train_loss is None else f"{report.train_loss:.5f}"
                    validation = (
                        f", validation loss {report.validation_loss[-1]:.5f}"
                        if report.validation_loss
                        else ""
                    )
                    self._say(
                        f"edge {track.config.id}: {report.status} epoch {epochs} loss {loss}{validation}"
                    )
                track.report = report
        if ask and self.fleet.polls_progress:
            for track in self.edges.values():
                edge_id = track.config.id
                if track.status == "running" and track.progress_ref is None and self.fleet.has_actor(edge_id):
                    track.progress_ref = self.fleet.call(edge_id, "progress")

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
                    self._say_round_errors([RoundError.model_validate(e) for e in status["round_errors"]])
        if ask and self._status_ref is None and self.coordinator is not None:
            self._status_ref = self.coordinator.status.remote()
        if ask:
            self._say_cloud_epochs()

    def _say_cloud_epochs(self) -> None:
        """Print every cloud epoch that finished since the last look (the runners record them live)."""
        for progress in read_epochs(Registry(self.registry_uri)):
            key = (progress.round, progress.strategy, progress.epoch)
            if key not in self._epochs_said:
                self._epochs_said.add(key)
                self._say(progress.line())

    def _say_round_errors(self, round_errors: list[RoundError]) -> None:
        for entry in round_errors:
            key = (entry.round, entry.attempts)
            if key in self._round_errors_said:
                continue
            self._round_errors_said.add(key)
            self._record("round_failed", round=entry.round, attempt=entry.attempts, error=entry.error)
            self._say(
                f"cloud round {entry.round} failed (attempt {entry.attempts}; learners "
                f"{', '.join(entry.learners)}): {entry.error}; its learners stay pending (retried after a "
                "new upload or "
                f"{self.scenario.cloud.fusion.max_wait_seconds:g}s)"
            )

    def _finalise(self, track: EdgeTrack, status: str, error: str | None = None) -> None:
        track.status = status
        track.error = error
        self._record("edge_final", edge=track.config.id, status=status, error=error)
        self._say(f"edge {track.config.id}: {status}" + (f" ({error})" if error else ""))
        self.fleet.release(track.config.id)  # done: give its CPUs back to the cloud's training

    # ---- timeline ------------------------------------------------------------------------------------

    def _fire(self, index: int, event: Event) -> None:
        where = f"timeline.{index}"
        if isinstance(event, CoordinatorCrashEvent):
            ray.kill(self.coordinator, no_restart=False)  # Ray restarts it; __init__ resumes
            self._record("coordinator_crash", at=event.at_seconds, where=where)
            self._say(f"{where}: coordinator killed (Ray restarts it from its checkpoint)")
            return
        if isinstance(event, NewTaskEvent):
            # The coordinator queues it and answers at once; the adaptation runs once a trained BAIM exists.
            ray.get(
                self.coordinator.new_task.remote(event.model_dump(mode="json")),
                timeout=self.options.startup_timeout_s,
            )
            self._record("new_task", task=event.task.name, at=event.at_seconds, where=where)
            self._say(f"{where}: new task {event.task.name!r} with {event.shots} shots")
            return
        if isinstance(event, JoinEvent):
            track = self.edges[event.edge_id()]
            self._spawn(track, reason=f"{where} join")
            self._begin(track)
            self._record("join", edge=track.config.id, at=event.at_seconds, where=where)
            return
        track = self.edges[event.edge]
        if not self.fleet.has_actor(event.edge) or track.final:
            self._record(event.kind, edge=event.edge, at=event.at_seconds, where=where,
                         applied=False, note=f"edge is {track.status}")  # fmt: skip
            return
        self.fleet.apply(event.edge, event)
        self._record(event.kind, edge=event.edge, at=event.at_seconds, where=where, applied=True)
        self._say(f"{where}: {event.kind} {event.edge}")

    # ---- helpers -------------------------------------------------------------------------------------

    def _edge_row(self, track: EdgeTrack, accepted: UploadRecord | None = None) -> EdgeRow:
        """The report row of one edge. `accepted`: the coordinator's accepted receipt for this edge, used when
        the edge has none of its own (it died after the coordinator stored its upload, before the ack)."""
        report = track.report
        edge_id = track.config.id
        costs: dict[str, Any] = {}
        if report is not None:
            edge_ledger = Ledger.from_dict(report.ledger, export_metrics=False)
            costs = edge_ledger.edge_costs(edge_id) if edge_id in edge_ledger.edges else {}
        receipt = upload_record(report.receipt) if report is not None and report.receipt else None
        receipt_from: Literal["edge", "coordinator", "none"] = "edge" if receipt is not None else "none"
        if receipt is None and accepted is not None:
            receipt, receipt_from = accepted, "coordinator"
        # The edge's receipt gives the admission at its acknowledgement; a later upload may have displaced it.
        same = accepted is not None and receipt is not None and accepted.artifact == receipt.artifact
        final = accepted if same else receipt
        seconds = costs.get("seconds") or {}
        return EdgeRow(
            task=track.config.task,
            status=track.status,
            error=track.error,
            resources=resource_demand(track.config),
            shard_size=len(self.partitions.edges[edge_id]),
            epochs_done=report.epoch if report is not None else 0,
            local_epochs=track.config.local_epochs,
            validation_loss=report.validation_loss if report is not None else [],
            best_epoch=report.best_epoch if report is not None else None,
            bytes_sent=costs.get("bytes_sent", 0),
            bytes_received=costs.get("bytes_received", 0),
            flops=costs.get("flops", 0),
            train_seconds=seconds.get("edge_train", 0.0),
            upload_seconds=seconds.get("edge_upload", 0.0),
            upload=EdgeUpload(
                outcome="none" if receipt is None else "accepted" if receipt.accepted else "rejected",
                reason=receipt.reason if receipt is not None else "",
                detail=receipt.detail if receipt is not None else "",
                sha256=receipt.sha256 if receipt is not None else None,
                artifact=receipt.artifact if receipt is not None else None,
                receipt_from=receipt_from,
                admission=final.admission if final is not None else None,
                decision_seconds=decision_seconds(receipt),
            ),
            costs_are_final=track.status not in ("crashed", "died", "timed_out"),
        )

    def _release_actors(self, keep_coordinator: bool = False) -> None:
        self.fleet.release_all()
        if self.coordinator is not None and not keep_coordinator:
            ray.kill(self.coordinator, no_restart=True)
            self.coordinator = None

    def _elapsed(self) -> float:
        return time.monotonic() - self.started

    def _record(self, kind: str, **fields: Any) -> None:
        self.event_log.append(
            RunEvent.model_validate({"t": round(self._elapsed(), 3), "kind": kind, **fields})
        )

    def _say(self, line: str) -> None:
        logger.info("%s", line)
        if self.options.progress is not None:
            self.options.progress(line)


def decision_seconds(receipt: UploadRecord | None) -> float | None:
    """Seconds from an upload's receipt (bytes durable) to its decision, when it has both."""
    if receipt is None or receipt.received_at is None or receipt.decided_at is None:
        return None
    return receipt.decided_at - receipt.received_at


def upload_record(receipt: Mapping[str, Any]) -> UploadRecord:
    """The report's fields of a coordinator receipt."""
    fields = {key: receipt[key] for key in UploadRecord.model_fields if key in receipt}
    return UploadRecord.model_validate(fields)


def _round_failure_text(err: RoundFailed) -> str:
    """The coordinator's message (Ray's wrapper adds a traceback around it; `cause` is the error itself)."""
    cause = getattr(err, "cause", None)
    return str(cause if isinstance(cause, RoundFailed) else err)


def run_scenario(scenario: Scenario, out_dir: str | Path, options: EngineOptions | None = None) -> RunReport:
    """Run `scenario` end to end and return the report (also written to out_dir/report.json)."""
    return Engine(scenario, Path(out_dir), options or EngineOptions()).run()
