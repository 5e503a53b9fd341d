"""`baim compare`: every method on the same edges, shards and test set, as curves of measured points.

One BAIM run of the scenario (the engine: edges train, with early stopping where configured, upload, the
coordinator fuses and trains every strategy for max(compare.baim_epochs) epochs, decomposes, publishes); its
per-epoch curves are the epoch sweep (each point is the model after that epoch of the one run, not a run
trained for that many epochs: the cheaper reading, and the one a researcher watching the run would see).
Then, with Ray still up: FedAvg until its plateau or round cap, FedAvg's final model fine-tuned on the
cloud's data, each edge's own model, a centralised reference, FID/KID of each method's final model and one
sample grid per method. Costs are the measured ones: bytes are serialized sizes that crossed (uploads,
updates, global models, task-model downloads, the raw shard for the centralised reference), FLOPs come from
FlopCounterMode, seconds are wall-clock. docs/comparison.md documents comparison.json.
"""

from __future__ import annotations

import copy
import io
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import DataLoader, Dataset

from baim.decompose import decompose
from baim.learners import VAELearner
from baim.model import BAIM
from baim.seeding import derive_seed
from baim.training import train_epoch, vae_batch_loss
from orchestrator.baselines.fedavg import homogeneous_spec, mean_test_loss, run_fedavg, test_losses
from orchestrator.core.comparison import (
    Comparison,
    CurvePoint,
    EdgeCost,
    ImageQualityInfo,
    MethodCurve,
    QualityMeasure,
)
from orchestrator.core.names import BAIM_OWNER, MAX_MODEL_BYTES
from orchestrator.core.receipts import RayTrainStrategyRun, StrategyRun
from orchestrator.core.registry import Registry
from orchestrator.core.reports import EdgeRow, FedAvgReport, RunReport
from orchestrator.core.scenario import CompareConfig, Scenario
from orchestrator.data.datasets import FaceDataset
from orchestrator.data.partitions import Partitions
from orchestrator.data.sources import DataSource
from orchestrator.evaluation.evaluate import (
    GENERATION_SEED,
    baim_from_checkpoint,
    epoch_flops,
    learner_sampler,
    task_model_sampler,
)
from orchestrator.evaluation.quality import (
    FeatureExtractor,
    InceptionExtractor,
    extract_features,
    frechet_distance_from_features,
    kid,
)
from orchestrator.report.time_to_quality import default_target, goal_check, time_to_quality
from orchestrator.runtime.engine import EngineOptions, FinishedRun, run_scenario

logger = logging.getLogger(__name__)

BAIM_RUN_DIR = "baim-run"  # the BAIM run's own output folder inside the compare's
SAMPLES_DIR = "samples"
Sampler = Callable[[int, int], torch.Tensor]  # (n, seed) -> images in [0, 1]


@dataclass
class CompareOptions:
    """How the compare runs (what runs: the scenario's `compare` section)."""

    cloud_trainer: Literal["auto", "ray_train", "local"] | None = None  # None: the scenario's cloud.trainer
    address: str | None = None
    num_cpus: int | None = None
    extractor: FeatureExtractor | None = None  # None: pytorch-fid's Inception (offline, from the wheel)
    kid_subsets: int = 50
    progress: Callable[[str], None] | None = None


def baim_scenario(scenario: Scenario) -> Scenario:
    """The scenario the BAIM run gets: cloud.epochs = the sweep's last epoch, evaluated after every epoch
    (the sweep reads its points from the curve), the scratch strategy added when the cloud-only method is
    asked for (and dropped when neither it is nor the scenario lists it), no FedAvg (the compare runs it
    itself, with its own cap) and no serving."""
    compare = scenario.compare
    strategies = [s for s in scenario.cloud.strategies if s != "scratch" or "cloud_only" in compare.methods]
    if "baim" not in compare.methods:
        strategies = [s for s in strategies if s == "scratch"]
    if "cloud_only" in compare.methods and "scratch" not in strategies:
        strategies.append("scratch")
    if not strategies:
        strategies = list(scenario.cloud.strategies)  # the edges' run still needs a cloud round
    cloud = scenario.cloud.model_copy(
        update={"epochs": max(compare.baim_epochs), "strategies": strategies, "evaluate_every": 1}
    )
    fedavg = scenario.baselines.fedavg.model_copy(update={"enabled": False})
    return scenario.model_copy(
        update={
            "cloud": cloud,
            "baselines": scenario.baselines.model_copy(update={"fedavg": fedavg}),
            "serving": scenario.serving.model_copy(update={"enabled": False}),
        }
    )


def fedavg_scenario(scenario: Scenario) -> Scenario:
    """The scenario FedAvg gets: the compare's round cap and plateau rule (the baseline's own target loss
    and aggregation kept)."""
    compare = scenario.compare
    fedavg = scenario.baselines.fedavg.model_copy(
        update={
            "enabled": True,
            "rounds": compare.fedavg_rounds,
            "plateau_patience": compare.fedavg_plateau_patience,
            "plateau_min_delta": compare.fedavg_plateau_min_delta,
        }
    )
    return scenario.model_copy(update={"baselines": scenario.baselines.model_copy(update={"fedavg": fedavg})})


def mean_cost(per_edge: Mapping[str, EdgeCost]) -> tuple[float, float, float]:
    """(bytes sent, bytes received, FLOPs) averaged over the edges."""
    if not per_edge:
        return 0.0, 0.0, 0.0
    n = len(per_edge)
    return (
        sum(c.bytes_sent for c in per_edge.values()) / n,
        sum(c.bytes_received for c in per_edge.values()) / n,
        sum(c.flops for c in per_edge.values()) / n,
    )


def make_point(
    step: int,
    per_edge: Mapping[str, EdgeCost],
    cloud_flops: int,
    wall_seconds: float,
    losses: Mapping[str, float],
    sizes: Mapping[str, int],
) -> CurvePoint:
    """A curve point; its per-edge means and the test-image-weighted mean loss derived from the inputs."""
    sent, received, flops = mean_cost(per_edge)
    total = sum(sizes[task] for task in losses)
    return CurvePoint(
        step=step,
        bytes_sent_per_edge=sent,
        bytes_received_per_edge=received,
        edge_flops_per_edge=flops,
        cloud_flops=cloud_flops,
        wall_seconds=wall_seconds,
        test_loss=sum(losses[t] * sizes[t] for t in losses) / total if total else None,
        test_loss_per_task=dict(losses),
        per_edge=dict(per_edge),
    )


@dataclass
class CloudEpoch:
    """One epoch of a cloud-side training of a lone VAE (fine-tuning after FedAvg, centralised)."""

    losses: dict[str, float]
    flops: int
    seconds: float


def epoch_points(
    epochs: list[CloudEpoch],
    per_edge: Mapping[str, EdgeCost],
    start_flops: int,
    start_seconds: float,
    sizes: Mapping[str, int],
) -> list[CurvePoint]:
    """Points 1..n of a cloud-side training: cloud FLOPs and seconds accumulate from the start's."""
    points, flops, seconds = [], start_flops, start_seconds
    for index, epoch in enumerate(epochs, start=1):
        flops += epoch.flops
        seconds += epoch.seconds
        points.append(make_point(index, per_edge, flops, seconds, epoch.losses, sizes))
    return points


@dataclass
class Generated:
    """A method's final model, as something that draws images, and the tasks to compare them with."""

    method: str
    tasks: list[str]
    samplers: dict[str, Sampler]  # per task; one shared sampler for a model that serves every task
    images: dict[str, torch.Tensor] = field(default_factory=dict)


class Comparer:
    """The methods after the BAIM run, with Ray up. Use `run_compare`."""

    def __init__(self, run: FinishedRun, original: Scenario, options: CompareOptions, out_dir: Path) -> None:
        self.run = run
        self.report: RunReport = run.report
        self.scenario = original
        self.config: CompareConfig = original.compare
        self.source: DataSource = run.source
        self.partitions: Partitions = run.partitions
        self.options = options
        self.out_dir = out_dir
        self.tasks = [task.name for task in original.tasks]
        self.sizes = {task: len(self.partitions.test[task]) for task in self.tasks}
        self.resolution = original.data.resolution
        self.kld_weight = original.cloud.kld_weight
        self.registry = Registry(self.report.registry, max_artifact_bytes=MAX_MODEL_BYTES)
        self.curves: list[MethodCurve] = []
        self.generated: list[Generated] = []
        self.phase_seconds: dict[str, float] = {}

    # ---- the whole ----------------------------------------------------------------------------------

    def measure(self) -> tuple[list[MethodCurve], ImageQualityInfo, dict[str, float]]:
        methods = self.config.methods
        with self._phase("baim"):
            self._baim_curves()
        if "edge_alone" in methods:
            with self._phase("edge_alone"):
                self._edge_alone()
        if "fedavg" in methods or "fedavg_finetune" in methods:
            with self._phase("fedavg"):
                fedavg = self._fedavg()
            if "fedavg_finetune" in methods:
                with self._phase("fedavg_finetune"):
                    self._fedavg_finetune(*fedavg)
        if "centralised" in methods:
            with self._phase("centralised"):
                self._centralised()
        with self._phase("image_quality"):
            quality = self._image_quality()
        return self.curves, quality, self.phase_seconds

    # ---- the BAIM and cloud-only (one engine run) ---------------------------------------------------

    def _download_bytes(self, task: str) -> int:
        """Serialized size of the task model an edge of `task` downloads (the published one)."""
        info = self.report.tasks.get(task)
        if info is None:
            return 0
        owner, _, version = info.artifact.rpartition("@")
        return self.registry.ref(owner, version).nbytes

    def _accepted_edges(self) -> dict[str, EdgeRow]:
        return {eid: row for eid, row in self.report.edges.items() if row.upload.outcome == "accepted"}

    def _baim_curves(self) -> None:
        rounds = self.report.cloud.rounds
        if not rounds:
            return
        last = rounds[-1]
        edges = self._accepted_edges()
        edge_seconds = max((r.train_seconds + r.upload_seconds for r in edges.values()), default=0.0)
        kept = self._strategy_baims()
        for strategy, run in last.strategies.items():
            cloud_only = strategy == "scratch"
            if (cloud_only and "cloud_only" not in self.config.methods) or (
                not cloud_only and "baim" not in self.config.methods
            ):
                continue
            # Earlier rounds (uploads that arrived after a round had started) cost FLOPs and seconds too.
            earlier = [r.strategies[strategy] for r in rounds[:-1] if strategy in r.strategies]
            earlier_flops = sum(run.flops for run in earlier)
            earlier_seconds = sum(run.seconds for run in earlier)
            per_edge = {
                eid: EdgeCost(
                    bytes_sent=0 if cloud_only else row.bytes_sent,
                    bytes_received=self._download_bytes(row.task),
                    flops=0 if cloud_only else row.flops,
                )
                for eid, row in edges.items()
            }
            offset_seconds = earlier_seconds + (0.0 if cloud_only else edge_seconds)
            points = self._strategy_points(run, per_edge, earlier_flops, offset_seconds)
            for epoch, losses in enumerate(run.test_loss_per_task, start=1):
                per_task = ", ".join(f"{task} {loss:.5f}" for task, loss in losses.items())
                self._say(f"compare: {strategy} epoch {epoch}/{run.epochs}: test loss {per_task}")
            name = "cloud_only" if cloud_only else f"baim:{strategy}"
            label = "cloud only (scratch)" if cloud_only else f"BAIM {strategy}"
            if cloud_only:
                description = (
                    "the BAIM architecture from random weights, trained on the cloud's data only (no edge "
                    "weights used; edges only download the task model)"
                )
            else:
                description = (
                    f"edges train and upload once; the cloud fuses and trains the BAIM ({strategy}); edges "
                    "download their task model"
                )
            self.curves.append(
                MethodCurve(
                    name=name,
                    family="cloud_only" if cloud_only else "baim",
                    label=label,
                    description=description,
                    step_name="epoch",
                    privacy_violating=False,
                    tasks=self.tasks,
                    cap=max(self.config.baim_epochs),
                    stop_reason="epochs",
                    points=points,
                    samples=None,
                    note="points are epochs of one run of max(baim_epochs) epochs; bytes received are the "
                    "published task model's size (the final epoch's decomposition)"
                    + (
                        f"; the curve is the last of {len(rounds)} rounds (uploads arrived during a round), "
                        "and its cloud FLOPs and seconds include the earlier rounds'"
                        if earlier
                        else ""
                    ),
                )
            )
            if strategy in kept:
                baim = kept[strategy]
                samplers = {task: task_model_sampler(decompose(baim, task)) for task in baim.config.tasks}
                self.generated.append(Generated(name, list(samplers), samplers))

    def _strategy_points(
        self, run: StrategyRun, per_edge: dict[str, EdgeCost], earlier_flops: int, offset_seconds: float
    ) -> list[CurvePoint]:
        if len(run.flops_per_epoch) != run.epochs or len(run.test_loss_per_task) != run.epochs:
            raise ValueError(
                f"the {run.runner} round recorded {len(run.flops_per_epoch)} epochs of FLOPs and "
                f"{len(run.test_loss_per_task)} of per-task losses for {run.epochs} epochs"
            )
        points = []
        for epoch in self.config.baim_epochs:
            if epoch > run.epochs:
                break
            points.append(
                make_point(
                    epoch,
                    per_edge,
                    earlier_flops + sum(run.flops_per_epoch[:epoch]),
                    offset_seconds + sum(run.seconds_per_epoch[:epoch]),
                    run.test_loss_per_task[epoch - 1],
                    self.sizes,
                )
            )
        return points

    def _strategy_baims(self) -> dict[str, BAIM]:
        """Each strategy's trained BAIM where the run kept it: the first strategy's in the registry; the
        others' final Ray Train checkpoints (the in-process runner keeps only the first)."""
        last = self.report.cloud.rounds[-1]
        found: dict[str, BAIM] = {}
        for index, (strategy, run) in enumerate(last.strategies.items()):
            if index == 0 and last.baim_version:
                found[strategy] = self.registry.load_module(BAIM_OWNER, last.baim_version, BAIM).eval()
            elif isinstance(run, RayTrainStrategyRun) and run.checkpoint_uri:
                found[strategy] = baim_from_checkpoint(run.checkpoint_uri)
        return found

    # ---- each edge alone ----------------------------------------------------------------------------

    def _edge_alone(self) -> None:
        for edge_id, row in self._accepted_edges().items():
            owner, _, version = (row.upload.artifact or "").rpartition("@")
            learner = self.registry.load_module(owner, version, VAELearner).eval()
            losses = self._losses(learner, [row.task])
            cost = {edge_id: EdgeCost(bytes_sent=0, bytes_received=0, flops=row.flops)}
            stopped = (
                f"converged (best epoch {row.best_epoch} of {row.epochs_done})"
                if row.best_epoch is not None and row.epochs_done < row.local_epochs
                else f"local_epochs cap ({row.epochs_done})"
            )
            name = f"edge:{edge_id}"
            self.curves.append(
                MethodCurve(
                    name=name,
                    family="edge_alone",
                    label=f"edge {edge_id} alone",
                    description=f"{edge_id}'s own model, trained on its own shard only ({row.task})",
                    step_name="local epoch",
                    privacy_violating=False,
                    tasks=[row.task],
                    cap=row.local_epochs,
                    stop_reason="converged" if row.epochs_done < row.local_epochs else "epochs",
                    points=[make_point(row.epochs_done, cost, 0, row.train_seconds, losses, self.sizes)],
                    samples=None,
                    note=f"{stopped}; validation loss per epoch: "
                    + ", ".join(f"{v:.5f}" for v in row.validation_loss),
                )
            )
            self.generated.append(Generated(name, [row.task], {row.task: learner_sampler(learner)}))
            self._say(f"compare: edge {edge_id} alone: test loss {losses[row.task]:.5f} on {row.task}")

    # ---- FedAvg and FedAvg + cloud fine-tuning ------------------------------------------------------

    def _fedavg(self) -> tuple[FedAvgReport, VAELearner]:
        outcome = run_fedavg(fedavg_scenario(self.scenario), self.source, self.partitions, progress=self._say)
        report = outcome.report
        clients = [cid for cid, row in report.edges.items() if row.rounds_aggregated or row.bytes_received]
        totals = {cid: EdgeCost(bytes_sent=0, bytes_received=0, flops=0) for cid in clients}
        points = [make_point(0, totals, 0, 0.0, report.initial_test_loss_per_task, self.sizes)]
        cloud_flops, seconds = 0, 0.0
        for entry in report.rounds:
            for cid in clients:
                before = totals[cid]
                totals[cid] = EdgeCost(
                    bytes_sent=before.bytes_sent + entry.bytes_sent.get(cid, 0),
                    bytes_received=before.bytes_received + entry.bytes_received.get(cid, 0),
                    flops=before.flops + entry.flops.get(cid, 0),
                )
            cloud_flops += entry.aggregation_flops
            seconds += entry.seconds
            points.append(
                make_point(entry.round, totals, cloud_flops, seconds, entry.test_loss_per_task, self.sizes)
            )
        if "fedavg" in self.config.methods:
            self.curves.append(
                MethodCurve(
                    name="fedavg",
                    family="fedavg",
                    label=f"FedAvg ({report.aggregation})",
                    description=f"one homogeneous VAE ({report.params:,} params), "
                    f"{report.local_epochs} local epoch(s) per round, {report.aggregation} aggregation, "
                    f"client fraction {report.client_fraction:g}",
                    step_name="round",
                    privacy_violating=False,
                    tasks=self.tasks,
                    cap=report.rounds_planned,
                    stop_reason=report.stop_reason,
                    points=points,
                    samples=None,
                    note="clients train on their whole shard (no validation split held out)",
                )
            )
            model = outcome.global_model
            sampler = learner_sampler(model)
            self.generated.append(Generated("fedavg", self.tasks, {task: sampler for task in self.tasks}))
        return report, outcome.global_model

    def _fedavg_finetune(self, report: FedAvgReport, global_model: VAELearner) -> None:
        model = copy.deepcopy(global_model).train()
        cloud_indices = [i for task in self.tasks for i in self.partitions.cloud[task]]
        base = self.curves_by_name("fedavg")
        fedavg_last = base.points[-1] if base is not None else None
        start_costs = fedavg_last.per_edge if fedavg_last else {}
        start_flops = fedavg_last.cloud_flops if fedavg_last else 0
        start_seconds = fedavg_last.wall_seconds if fedavg_last else sum(r.seconds for r in report.rounds)
        points = [
            make_point(
                0, start_costs, start_flops, start_seconds, report.final_test_loss_per_task, self.sizes
            )
        ]
        edges = self.scenario.all_edges()
        lr = self.config.finetune_lr or sum(edge.lr for edge in edges) / len(edges)
        epochs = self._train_in_cloud(
            model, cloud_indices, self.config.finetune_epochs, "fedavg+finetune", lr=lr
        )
        points += epoch_points(epochs, start_costs, start_flops, start_seconds, self.sizes)
        self.curves.append(
            MethodCurve(
                name="fedavg_finetune",
                family="fedavg_finetune",
                label="FedAvg + cloud fine-tuning",
                description="FedAvg's final global model, fine-tuned on the cloud's common data (every "
                "task), which the FL server has too",
                step_name="epoch",
                privacy_violating=False,
                tasks=self.tasks,
                cap=self.config.finetune_epochs,
                stop_reason="epochs",
                points=points,
                samples=None,
                note=f"epoch 0 is FedAvg's final model; edge costs are FedAvg's; Adam lr {lr:g}",
            )
        )
        sampler = learner_sampler(model.eval())
        self.generated.append(
            Generated("fedavg_finetune", self.tasks, {task: sampler for task in self.tasks})
        )

    def curves_by_name(self, name: str) -> MethodCurve | None:
        return next((c for c in self.curves if c.name == name), None)

    # ---- the centralised reference ------------------------------------------------------------------

    def _centralised(self) -> None:
        spec = homogeneous_spec(self.scenario)
        with torch.random.fork_rng():
            torch.manual_seed(derive_seed("centralised", self.scenario.seed))
            model = VAELearner(spec)
        edge_indices = [i for indices in self.partitions.edges.values() for i in indices]
        cloud_indices = [i for task in self.tasks for i in self.partitions.cloud[task]]
        pixels = 3 * self.resolution * self.resolution  # one uint8 image, raw
        per_edge = {
            eid: EdgeCost(bytes_sent=len(indices) * pixels, bytes_received=0, flops=0)
            for eid, indices in self.partitions.edges.items()
            if indices
        }
        points = [make_point(0, per_edge, 0, 0.0, self._losses(model, self.tasks), self.sizes)]
        epochs = self._train_in_cloud(model, edge_indices + cloud_indices, self.config.centralised_epochs,
                                      "centralised")  # fmt: skip
        points += epoch_points(epochs, per_edge, 0, 0.0, self.sizes)
        self.curves.append(
            MethodCurve(
                name="centralised",
                family="centralised",
                label="centralised (privacy-violating upper bound)",
                description="one VAE (FedAvg's model) trained on every edge's raw shard plus the cloud's "
                "data: the raw images leave the edges, so this is a reference, not a method",
                step_name="epoch",
                privacy_violating=True,
                tasks=self.tasks,
                cap=self.config.centralised_epochs,
                stop_reason="epochs",
                points=points,
                samples=None,
                note="bytes sent per edge are its raw shard as uint8 pixels (3 x R x R bytes per image)",
            )
        )
        sampler = learner_sampler(model.eval())
        self.generated.append(Generated("centralised", self.tasks, {task: sampler for task in self.tasks}))

    def _train_in_cloud(
        self, model: VAELearner, indices: list[int], epochs: int, label: str, lr: float | None = None
    ) -> list[CloudEpoch]:
        """Train a lone VAE in this process on `indices` (Adam, `lr` or the cloud's, the cloud's batch size),
        measuring the test loss per task, the FLOPs and the seconds of every epoch."""
        cloud = self.scenario.cloud
        dataset = CachedImages(FaceDataset(self.source, indices, self.resolution))
        loss_fn = vae_batch_loss(self.kld_weight)
        optimizer = torch.optim.Adam(model.parameters(), lr=lr or cloud.lr)
        order = torch.Generator().manual_seed(derive_seed(label, self.scenario.seed))
        loader = DataLoader(dataset, batch_size=cloud.batch_size, shuffle=True, generator=order)
        flops = epoch_flops(model, dataset, cloud.batch_size, loss_fn)
        done: list[CloudEpoch] = []
        with torch.random.fork_rng():
            torch.manual_seed(derive_seed(label, "noise", self.scenario.seed))
            for epoch in range(1, epochs + 1):
                started = time.perf_counter()
                train_loss = train_epoch(model, loader, optimizer, loss_fn)
                seconds = time.perf_counter() - started
                losses = self._losses(model, self.tasks)
                done.append(CloudEpoch(losses, flops, seconds))
                mean = mean_test_loss(losses, self.partitions)
                self._say(
                    f"compare: {label} epoch {epoch}/{epochs}: train loss {train_loss:.5f}, test loss "
                    f"{mean if mean is None else f'{mean:.5f}'} ({seconds:.1f}s)"
                )
        return done

    def _losses(self, model: VAELearner, tasks: Sequence[str]) -> dict[str, float]:
        return test_losses(
            model, self.source, self.partitions, tasks, resolution=self.resolution, kld_weight=self.kld_weight
        )

    # ---- FID/KID and the sample grids ----------------------------------------------------------------

    def _image_quality(self) -> ImageQualityInfo:
        n = self.config.fid_samples
        drawn = max(n, self.config.grid_samples)
        samples = self.out_dir / SAMPLES_DIR
        samples.mkdir(parents=True, exist_ok=True)
        real: dict[str, torch.Tensor] = {}
        for task in self.tasks:
            indices = self.partitions.test[task][: max(n, self.config.grid_samples)]
            faces = FaceDataset(self.source, indices, self.resolution)
            real[task] = torch.stack([faces[i] for i in range(len(faces))])  # type: ignore[misc]
        write_grid(samples / "real.png", [real[t][: self.config.grid_samples] for t in self.tasks])
        for item in self.generated:
            cache: dict[int, torch.Tensor] = {}
            for task in item.tasks:
                sampler = item.samplers[task]
                if id(sampler) not in cache:  # a model serving every task is drawn once
                    cache[id(sampler)] = sampler(drawn, GENERATION_SEED)
                item.images[task] = cache[id(sampler)]
            rows = [item.images[t][: self.config.grid_samples] for t in item.tasks]
            path = samples / f"{item.method.replace(':', '__')}.png"
            write_grid(path, rows if len({id(s) for s in item.samplers.values()}) > 1 else rows[:1])
            curve = self.curves_by_name(item.method)
            if curve is not None:
                curve.samples = str(path.relative_to(self.out_dir))
        if n < 2:
            return ImageQualityInfo(
                enabled=False, extractor="", num_samples=n, reason="compare.fid_samples < 2"
            )
        try:
            extractor = self.options.extractor or InceptionExtractor()
        except FileNotFoundError as err:
            logger.warning("image quality not measured: %s", err)
            return ImageQualityInfo(enabled=False, extractor="", num_samples=n, reason=str(err))
        count = sum(len(item.tasks) for item in self.generated) + len(self.tasks)
        self._say(f"compare: FID/KID with {extractor.name}, {n} images per set, {count} sets")
        real_features = {task: extract_features(real[task][:n], extractor) for task in self.tasks}
        floor: dict[str, float] = {}
        for task, feats in real_features.items():
            half = feats.shape[0] // 2
            if half >= 2:
                floor[task] = frechet_distance_from_features(feats[:half], feats[half:])
        for done, item in enumerate(self.generated, start=1):
            features: dict[int, Any] = {}
            measures = []
            for task in item.tasks:
                key = id(item.images[task])
                if key not in features:
                    features[key] = extract_features(item.images[task][:n], extractor)
                fake, true = features[key], real_features[task]
                subset = max(2, min(fake.shape[0], true.shape[0]) // 2)
                kid_mean, kid_std = kid(
                    fake, true, subsets=self.options.kid_subsets, subset_size=subset, seed=0
                )
                measures.append(
                    QualityMeasure(
                        task=task,
                        fid=frechet_distance_from_features(fake, true),
                        kid_mean=kid_mean,
                        kid_std=kid_std,
                        num_generated=int(fake.shape[0]),
                        num_real=int(true.shape[0]),
                    )
                )
            curve = self.curves_by_name(item.method)
            if curve is not None and curve.points:
                curve.points[-1].quality = measures
            fids = ", ".join(f"{m.task} {m.fid:.1f}" for m in measures)
            self._say(f"compare: FID {done}/{len(self.generated)} {item.method}: {fids}")
        return ImageQualityInfo(enabled=True, extractor=extractor.name, num_samples=n, real_floor=floor)

    # ---- helpers ------------------------------------------------------------------------------------

    @contextmanager
    def _phase(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.phase_seconds[name] = time.perf_counter() - started

    def _say(self, line: str) -> None:
        logger.info("%s", line)
        if self.options.progress is not None:
            self.options.progress(line)


class CachedImages(Dataset[torch.Tensor]):
    """A FaceDataset whose images are decoded once and kept as uint8 (the cloud's own trainings re-read every
    image every epoch otherwise); the same float tensors, since FaceDataset divides uint8 pixels by 255."""

    def __init__(self, faces: FaceDataset) -> None:
        self.faces = faces
        self._cache: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.faces)

    def __getitem__(self, index: int) -> torch.Tensor:
        cached = self._cache.get(index)
        if cached is None:
            image = self.faces[index]
            assert isinstance(image, torch.Tensor)  # no task id: FaceDataset(task_id=None)
            cached = (image * 255.0).round().to(torch.uint8)
            self._cache[index] = cached
        return cached.float().div_(255.0)


def write_grid(path: Path, rows: Sequence[torch.Tensor], per_row: int = 8) -> None:
    """Images in [0, 1] as one PNG: each tensor in `rows` starts a new block of rows of `per_row` images."""
    from PIL import Image
    from torchvision.utils import make_grid

    blocks = [
        make_grid(images.clamp(0, 1), nrow=per_row, padding=1, pad_value=1.0)
        for images in rows
        if len(images)
    ]
    if not blocks:
        return
    width = max(block.shape[2] for block in blocks)
    padded = [torch.nn.functional.pad(b, (0, width - b.shape[2]), value=1.0) for b in blocks]
    grid = torch.cat(padded, dim=1)
    pixels = (grid * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels).resize((pixels.shape[1] * 2, pixels.shape[0] * 2), Image.Resampling.NEAREST).save(
        buffer, "PNG"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue())


def build_comparison(
    scenario: Scenario,
    report: RunReport,
    curves: list[MethodCurve],
    quality: ImageQualityInfo,
    phase_seconds: dict[str, float],
    cloud_trainer: str,
    sizes: dict[str, int],
) -> Comparison:
    """comparison.json from the measured curves: the time-to-quality table and the goal added."""
    tasks = [task.name for task in scenario.tasks]
    config = scenario.compare
    table = None
    if config.target_loss is not None:
        target = {task: config.target_loss for task in tasks}
        table = time_to_quality(curves, target, sizes, f"compare.target_loss = {config.target_loss:g}")
    else:
        found = default_target(curves, tasks)
        if found is not None:
            table = time_to_quality(curves, found[0], sizes, found[1])
    data = report.data
    return Comparison(
        scenario=scenario.name,
        seed=scenario.seed,
        data=f"celeba ({data.root})" if data.kind == "celeba" else "procedural",
        resolution=scenario.data.resolution,
        test_images=sizes,
        settings=config,
        cloud_trainer=cloud_trainer,
        methods=curves,
        time_to_quality=table,
        goal=goal_check(curves),
        image_quality=quality,
        phase_seconds=phase_seconds,
        baim_run=BAIM_RUN_DIR,
    )


def run_compare(scenario: Scenario, out_dir: str | Path, options: CompareOptions | None = None) -> Comparison:
    """Run every method of `scenario.compare` and write DIR/comparison.json (report.md and report.html are
    the report layer's: `orchestrator.report.comparison.write_comparison_report`)."""
    options = options or CompareOptions()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    measured: dict[str, Any] = {}

    def after_run(run: FinishedRun) -> RunReport:
        comparer = Comparer(run, scenario, options, out)
        measured["result"] = comparer.measure()
        measured["report"] = run.report
        measured["sizes"] = comparer.sizes
        return run.report

    started = time.perf_counter()
    engine = EngineOptions(
        address=options.address,
        num_cpus=options.num_cpus,
        cloud_trainer=options.cloud_trainer,
        progress=options.progress,
        after_run=after_run,
    )
    run_scenario(baim_scenario(scenario), out / BAIM_RUN_DIR, engine)
    curves, quality, phases = measured["result"]
    report: RunReport = measured["report"]
    phases = {"baim_run": report.totals.wall_seconds, **phases, "total": time.perf_counter() - started}
    trainer = options.cloud_trainer or scenario.cloud.trainer
    comparison = build_comparison(scenario, report, curves, quality, phases, trainer, measured["sizes"])
    (out / "comparison.json").write_text(comparison.model_dump_json(indent=1) + "\n", encoding="utf-8")
    return comparison
