"""End-of-run measurements (`evaluate_run`, the engine's `after_run` stage): the FedAvg baseline,
personalisation, download sizes, FID/KID of every phase, and the sample grids under DIR/samples/.

What each section holds and why: docs/ARCHITECTURE.md ("Evaluation").
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader

from actors.edge import edge_seed
from actors.relay import RelayDesk
from baim.adapters import (
    LoRAConfig,
    adapter_bytes,
    adapter_to_bytes,
    apply_lora,
    lora_parameters,
)
from baim.costs import count_params, forward_backward_flops, serialized_bytes
from baim.decompose import OneTaskModel, decompose
from baim.learners import VAELearner
from baim.model import BAIM
from baim.placement import (
    Link,
    NodeSpeeds,
    choose_placement,
    measure_placements,
    placement_cost,
    transfer_seconds,
)
from baim.training import evaluate
from orchestrator.baselines.fedavg import run_fedavg
from orchestrator.cloud.ray_train import load_checkpoint_baim
from orchestrator.core.names import BAIM_OWNER, MAX_MODEL_BYTES
from orchestrator.core.receipts import RayTrainStrategyRun
from orchestrator.core.registry import Registry
from orchestrator.core.relay import RelayReceipt, RelayRoundRecord
from orchestrator.core.reports import (
    Baselines,
    Disabled,
    DisabledWithReason,
    Download,
    Downloads,
    EdgePlacements,
    EvaluationInfo,
    FedAvgReport,
    ImageQuality,
    Personalisation,
    PersonalisedEdge,
    PlacementRow,
    Placements,
    QualitySet,
    RealReference,
    Relay,
    RelayedTask,
    RunReport,
)
from orchestrator.core.scenario import Scenario
from orchestrator.data.datasets import FaceDataset
from orchestrator.data.partitions import Partitions
from orchestrator.data.sources import DataSource
from orchestrator.evaluation.quality import (
    FeatureExtractor,
    InceptionExtractor,
    extract_features,
    frechet_distance_from_features,
    kid,
)
from orchestrator.report.markdown import SAMPLES_DIR
from orchestrator.runtime.engine import FinishedRun
from serve.api import GenerateRequest, GenerateResponse
from serve.client import Toolbox, model_loss_fn, personalise
from serve.models import png_base64

logger = logging.getLogger(__name__)

GENERATION_SEED = 1234  # the same images for the same model on every run


@dataclass
class EvaluationOptions:
    """How much the end-of-run measurements do (sizes chosen for 2 CPU cores by default)."""

    fid_samples: int = 100  # generated and real images per FID/KID set (Inception: ~0.13 s/image on 2 cores)
    grid_samples: int = 16  # images per sample grid saved for the report
    personalise_epochs: int = 2  # local epochs of personalisation per edge (0: skip personalisation)
    run_fedavg: bool = True  # also needs scenario.baselines.fedavg.enabled
    image_quality: bool = True  # compute FID/KID (the grids are saved either way)
    extractor: FeatureExtractor | None = None  # None: pytorch-fid's Inception (offline, from the wheel)
    kid_subsets: int = 100

    def __post_init__(self) -> None:
        for name in ("fid_samples", "grid_samples"):
            if getattr(self, name) < 2:
                raise ValueError(f"{name}: expected >= 2, received {getattr(self, name)}")
        if self.personalise_epochs < 0:
            raise ValueError(f"personalise_epochs: expected >= 0, received {self.personalise_epochs}")


@dataclass
class GeneratedSet:
    """One model whose samples are measured: phase (edge_initial, strategy, personalised, fedavg), a name,
    the task whose real images it is compared with, and a function drawing n images with a seed."""

    phase: str
    name: str
    task: str
    generate: Callable[[int, int], torch.Tensor]  # (n, seed) -> (n, 3, R, R) in [0, 1]


def learner_sampler(model: VAELearner) -> Callable[[int, int], torch.Tensor]:
    def draw(n: int, seed: int) -> torch.Tensor:
        return model.eval().generate(n, generator=torch.Generator().manual_seed(seed)).clamp(0.0, 1.0)

    return draw


def task_model_sampler(model: nn.Module) -> Callable[[int, int], torch.Tensor]:
    def draw(n: int, seed: int) -> torch.Tensor:
        with torch.no_grad():
            return model.eval().generate(n, seed=seed).clamp(0.0, 1.0)  # type: ignore[operator]

    return draw


def save_samples(path: Path, images: torch.Tensor, **metadata: str) -> None:
    """Images in [0, 1] as uint8 (lossless for display) in a safetensors file with string metadata."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = (images.detach().cpu().clamp(0.0, 1.0) * 255).round().to(torch.uint8).contiguous()
    save_file({"images": pixels}, str(path), metadata=metadata)


def epoch_flops(model: nn.Module, dataset: Any, batch_size: int, loss_fn: Any) -> int:
    """Training FLOPs of one epoch over `dataset` (one full batch and the last partial one, counted)."""
    full, rest = divmod(len(dataset), batch_size)
    total = 0
    with torch.random.fork_rng():
        for n, count in ((batch_size, full), (rest, 1)):
            if n == 0 or count == 0:
                continue
            example = torch.stack([dataset[i] for i in range(n)])
            total += count * forward_backward_flops(model, example, loss_fn).total
    return total


def _parse_artifact(artifact: str) -> tuple[str, str]:
    owner, _, version = artifact.rpartition("@")
    if not owner or not version:
        raise ValueError(f"artifact: expected 'owner@version', received {artifact!r}")
    return owner, version


class RunEvaluation:
    """The measurements of one finished run. Use `evaluate_run`."""

    def __init__(
        self,
        report: RunReport,
        scenario: Scenario,
        source: DataSource,
        partitions: Partitions,
        out_dir: Path,
        options: EvaluationOptions,
        progress: Callable[[str], None] | None = None,
        coordinator: Any = None,
    ) -> None:
        self.report = report
        # The run's live CloudCoordinator actor (relay to it), or None (the same relay desk in this process).
        self.coordinator = coordinator
        self.scenario = scenario
        self.source = source
        self.partitions = partitions
        self.out_dir = Path(out_dir)
        self.options = options
        self.progress = progress
        self.registry = Registry(report.registry, max_artifact_bytes=MAX_MODEL_BYTES)
        self.resolution = scenario.data.resolution
        self.tasks = [task.name for task in scenario.tasks]
        self.sets: list[GeneratedSet] = []
        # Per task: (edge id, task model version, adapter weights, spec) that personalisation relays back.
        self.relay_uploads: dict[str, list[tuple[str, str, bytes, str]]] = {}

    def run(self) -> RunReport:
        seconds: dict[str, float] = {}
        with self._timed(seconds, "fedavg"):
            baselines = Baselines(fedavg=self._fedavg())
        with self._timed(seconds, "models"):
            self._edge_initial_sets()
            downloads = self._strategy_sets()
        with self._timed(seconds, "personalisation"):
            personalisation = self._personalise()
        with self._timed(seconds, "relay"):
            relay = self._relay()
        with self._timed(seconds, "placements"):
            placements = self._placements()
        with self._timed(seconds, "image_quality"):
            image_quality = self._image_quality()
        evaluation = EvaluationInfo(
            seconds=seconds,
            fid_samples=self.options.fid_samples,
            grid_samples=self.options.grid_samples,
            personalise_epochs=self.options.personalise_epochs,
            generation_seed=GENERATION_SEED,
            samples_dir=SAMPLES_DIR,
        )
        return self.report.model_copy(
            update={
                "baselines": baselines,
                "downloads": downloads,
                "personalisation": personalisation,
                "relay": relay,
                "placements": placements,
                "image_quality": image_quality,
                "evaluation": evaluation,
            }
        )

    # ---- FedAvg ----------------------------------------------------------------------------------------

    def _fedavg(self) -> FedAvgReport | Disabled:
        if not (self.options.run_fedavg and self.scenario.baselines.fedavg.enabled):
            return Disabled(enabled=False)
        outcome = run_fedavg(self.scenario, self.source, self.partitions, progress=self.progress)
        model = outcome.global_model
        for task in self.tasks:  # one homogeneous model for every task: compared with each task's images
            self.sets.append(GeneratedSet("fedavg", "global", task, learner_sampler(model)))
        return outcome.report

    # ---- the BAIM path's models --------------------------------------------------------------------------

    def _edge_initial_sets(self) -> None:
        for edge_id, row in self.report.edges.items():
            artifact = row.upload.artifact
            if row.upload.outcome != "accepted" or not artifact:
                continue
            owner, version = _parse_artifact(artifact)
            learner = self.registry.load_module(owner, version, VAELearner)
            self.sets.append(GeneratedSet("edge_initial", edge_id, row.task, learner_sampler(learner)))

    def _load_baim(self, owner: str, version: str) -> BAIM:
        return self.registry.load_module(owner, version, BAIM).eval()

    def _strategy_baims(self) -> dict[str, tuple[BAIM, str]]:
        """Each strategy's trained BAIM of the last round, where the run kept it: the coordinator keeps the
        round's `kept` strategy's (registry `baim@<round version>`); a Ray Train round also leaves every
        strategy's final checkpoint (`checkpoint_uri` in the round's per-strategy summary)."""
        rounds = self.report.cloud.rounds
        if not rounds:
            return {}
        last = rounds[-1]
        kept = last.kept or next(iter(last.strategies), None)  # records before cloud.keep kept the first
        found: dict[str, tuple[BAIM, str]] = {}
        for strategy, summary in last.strategies.items():
            if strategy == kept and last.baim_version:
                baim = self._load_baim(BAIM_OWNER, last.baim_version)
                found[strategy] = (baim, f"{BAIM_OWNER}@{last.baim_version}")
            elif isinstance(summary, RayTrainStrategyRun) and summary.checkpoint_uri:
                found[strategy] = (baim_from_checkpoint(summary.checkpoint_uri), summary.checkpoint_uri)
        return found

    def _strategy_sets(self) -> Downloads:
        """Task models of every kept strategy (FID sets, grids of the BAIM and its task models) and the
        serialized sizes an edge would download."""
        samples = self.out_dir / SAMPLES_DIR
        whole: Download | None = None
        if self.report.cloud.baim_version:
            ref = self.registry.ref(BAIM_OWNER, self.report.cloud.baim_version)
            whole = Download(
                artifact=f"{BAIM_OWNER}@{ref.version}",
                kind="baim",
                nbytes=ref.nbytes,
                params=self.report.cloud.baim_params,
            )
        task_models: dict[str, Download] = {}
        generation_models: dict[str, Download] = {}
        for task, info in self.report.tasks.items():
            owner, version = _parse_artifact(info.artifact)
            task_models[task] = Download(
                artifact=info.artifact,
                kind="full",
                nbytes=self.registry.ref(owner, version).nbytes,
                params=info.params,
            )
            if info.generation is not None:
                owner, version = _parse_artifact(info.generation.artifact)
                generation_models[task] = Download(
                    artifact=info.generation.artifact,
                    kind="generation",
                    nbytes=self.registry.ref(owner, version).nbytes,
                    params=info.generation.params,
                )
        baims = self._strategy_baims()
        for strategy, (baim, where) in baims.items():
            for task in baim.config.tasks:
                model = decompose(baim, task)
                self.sets.append(GeneratedSet("strategy", strategy, task, task_model_sampler(model)))
                if where.startswith(f"{BAIM_OWNER}@"):  # the BAIM the run kept and published from
                    grid = baim.generate(task, self.options.grid_samples, seed=GENERATION_SEED)
                    save_samples(samples / "baim" / f"{task}.safetensors", grid, phase="baim", source=where)
        strategy_models = {strategy: where for strategy, (_, where) in baims.items()}
        return Downloads(
            task_models=task_models,
            generation_models=generation_models,
            baim=whole,
            strategy_models=strategy_models,
        )

    # ---- personalisation -----------------------------------------------------------------------------

    def _personalise(self) -> Personalisation | Disabled:
        if self.options.personalise_epochs == 0 or not self.report.tasks:
            return Disabled(enabled=False)
        edges: dict[str, PersonalisedEdge] = {}
        for edge_id, row in self.report.edges.items():
            if row.upload.outcome != "accepted":
                continue
            edge = self.scenario.edge(edge_id)
            toolbox = Toolbox(self.out_dir / "toolbox" / edge_id, registry=self.registry)
            fetched = toolbox.fetch(edge.task, kind="full")  # fine-tuning needs the encoders
            model = fetched.model
            loss_fn = model_loss_fn(model, self.scenario.cloud.kld_weight)
            shard = FaceDataset(self.source, self.partitions.edges[edge_id], self.resolution)
            order = torch.Generator().manual_seed(GENERATION_SEED)
            loader = DataLoader(shard, batch_size=edge.batch_size, shuffle=True, generator=order)
            test = self._test_loader(edge.task)
            started = time.perf_counter()
            method = self.scenario.personalisation
            seed = edge_seed(self.scenario.seed, f"{edge_id} personalisation")
            trainable = None
            if method.method == "lora":
                lora = LoRAConfig(method.rank, method.alpha, tuple(method.target_modules), seed=seed)
                apply_lora(model, lora)  # before counting FLOPs: frozen weights need no weight gradients
                trainable = lora_parameters(model)
            # Training noise (and so the FLOPs of top-K dispatch) from a seed: the driver's global RNG
            # starts in a different state in every process, and the numbers must not.
            with torch.random.fork_rng():
                torch.manual_seed(seed)
                flops = epoch_flops(model, shard, edge.batch_size, loss_fn) * self.options.personalise_epochs
                before, after = personalise(
                    model,
                    loader,
                    self.options.personalise_epochs,
                    method.lr or edge.lr,
                    eval_loader=test,
                    kld_weight=self.scenario.cloud.kld_weight,
                    trainable=trainable,
                )
            if trainable is not None:
                upload = (edge_id, fetched.model_version, *adapter_to_bytes(model))
                self.relay_uploads.setdefault(edge.task, []).append(upload)
            edges[edge_id] = PersonalisedEdge(
                task=edge.task,
                model_version=fetched.model_version,
                kind=fetched.kind,
                download=fetched.download,
                params=count_params(model) - sum(p.numel() for p in trainable or []),
                bytes_received=fetched.bytes_received,
                epochs=self.options.personalise_epochs,
                method=method.method,
                trainable_params=sum(p.numel() for p in trainable or model.parameters()),
                upload_bytes=adapter_bytes(model) if trainable is not None else serialized_bytes(model),
                test_loss_before=before,
                test_loss_after=after,
                flops=flops,
                seconds=time.perf_counter() - started,
            )
            self._say(f"personalised {edge_id} ({edge.task}): test loss {before:.5f} -> {after:.5f}")
            self.sets.append(GeneratedSet("personalised", edge_id, edge.task, task_model_sampler(model)))
        return Personalisation(enabled=True, where="driver process, on each edge's own shard", edges=edges)

    # ---- the relay: adapters back to the cloud -------------------------------------------------------

    def _relay(self) -> Relay | Disabled:
        """A relay round on the run's last BAIM (GaisNet's cloud -> edge -> cloud loop), by the cloud's
        relay desk (actors.relay) in the driver: every edge's adapters are validated as uploads are, taken
        in by `personalisation.relay_method`, and, with `relay_guard`, the new BAIM is kept (and published
        to the registry as the next version, with its task models) only if no task's held-out loss rose.
        """
        config = self.scenario.personalisation
        if not (config.relay and self.relay_uploads and self.report.cloud.baim_version):
            return Disabled(enabled=False)
        receive, run_round, where = self._relay_desk()
        receipts = {
            task: [receive(edge, task, version, weights, spec) for edge, version, weights, spec in uploads]
            for task, uploads in self.relay_uploads.items()
        }
        record = run_round()
        tasks = {}
        for task, answers in receipts.items():
            row = record.tasks.get(task) if record is not None else None
            if row is None:  # every adapter of this task was rejected: the round did not touch it
                baim = self._load_baim(BAIM_OWNER, str(self.registry.latest(BAIM_OWNER)))
                before = candidate = after = self._task_loss(baim, task)
            else:
                before, candidate, after = row.test_loss_before, row.candidate_test_loss, row.test_loss_after
            tasks[task] = RelayedTask(
                folded=[str(r.edge_id) for r in answers if r.accepted],
                rejected={str(r.edge_id): f"{r.reason}: {r.detail}" for r in answers if not r.accepted},
                upload_bytes=sum(r.nbytes for r in answers),
                test_loss_before=before,
                test_loss_after=after,
                candidate_test_loss=candidate,
            )
            self._say(
                f"relay {task} ({config.relay_method}): {len(tasks[task].folded)} adapters, test loss "
                f"{before:.5f} -> {candidate:.5f} (candidate), {after:.5f} (kept)"
            )
        distil = config.relay_method == "distil"
        return Relay(
            enabled=True,
            where=where,
            method=config.relay_method,
            gate_epochs=0 if distil else config.relay_gate_epochs,
            distil_epochs=config.relay_epochs if distil else 0,
            guarded=config.relay_guard,
            accepted=record is not None and record.accepted,
            holdout_loss_before=record.holdout_loss_before if record is not None else {},
            holdout_loss_after=record.holdout_loss_after if record is not None else {},
            distillation_loss_before=record.distillation_loss_before if record is not None else None,
            distillation_loss_after=record.distillation_loss_after if record is not None else None,
            baim_version=record.baim_version if record is not None else None,
            task_versions=record.task_versions if record is not None else {},
            tasks=tasks,
        )

    def _relay_desk(
        self,
    ) -> tuple[Callable[..., RelayReceipt], Callable[[], RelayRoundRecord | None], str]:
        """(receive an adapter, run the relay round, where it ran): the run's live coordinator when there is
        one, else the same relay desk (actors.relay) in this process."""
        if self.coordinator is None:
            desk = RelayDesk(self.registry, self.scenario, self.source, self.partitions)
            where = "driver process, the cloud's relay desk on the run's last BAIM"
            return desk.receive, desk.run_round, where
        import ray

        coordinator = self.coordinator

        def receive(*args: Any) -> RelayReceipt:
            return RelayReceipt.model_validate(ray.get(coordinator.relay.remote(*args)))

        def run_round() -> RelayRoundRecord | None:
            record = ray.get(coordinator.relay_round.remote())
            return None if record is None else RelayRoundRecord.model_validate(record)

        return receive, run_round, "run's coordinator actor (relay() and relay_round(), after its last round)"

    def _task_loss(self, baim: BAIM, task: str) -> float:
        model = decompose(baim, task)
        return evaluate(model, self._test_loader(task), model_loss_fn(model, self.scenario.cloud.kld_weight))

    def _test_loader(self, task: str) -> DataLoader[Any]:
        """The task's test images in batches of 64: what every test loss of the evaluation is measured on."""
        return DataLoader(FaceDataset(self.source, self.partitions.test[task], self.resolution), 64)

    # ---- placements of end users' requests -----------------------------------------------------------

    def _placements(self) -> Placements | Disabled:
        """For each edge with `users`: every placement of one of their requests (baim.placement), measured
        on the task model the edge downloads, and its latency and edge load under the declared speeds."""
        cloud_speed = self.scenario.serving.gflops * 1e9
        edges: dict[str, EdgePlacements] = {}
        for edge in self.scenario.all_edges():
            users, info = edge.users, self.report.tasks.get(edge.task)
            if users is None or info is None:
                continue
            owner, version = _parse_artifact(info.artifact)
            model = self.registry.load_module(owner, version, OneTaskModel).eval()
            n = users.images_per_request
            request = GenerateRequest(n=n, seed=GENERATION_SEED).model_dump_json().encode()
            response = (
                GenerateResponse(
                    task=edge.task,
                    model_version=version,
                    seed=GENERATION_SEED,
                    images=png_base64(model.generate(n, seed=GENERATION_SEED)),
                )
                .model_dump_json()
                .encode()
            )
            measured = measure_placements(model, n, GENERATION_SEED, len(request), len(response))
            link = Link(edge.link.bandwidth_mbps, edge.link.latency_ms)
            user_link = Link(users.link.bandwidth_mbps, users.link.latency_ms)
            speeds = NodeSpeeds(edge.gflops * 1e9, cloud_speed)
            user_hop = transfer_seconds(len(request), user_link) + transfer_seconds(len(response), user_link)
            rate = users.count * users.requests_per_second
            rows = []
            for placement in measured:
                cost = placement_cost(placement, link, speeds)
                rows.append(
                    PlacementRow(
                        name=placement.name,
                        cut=placement.cut,
                        edge_flops=placement.edge_flops,
                        cloud_flops=placement.cloud_flops,
                        uplink_bytes=placement.uplink_bytes,
                        downlink_bytes=placement.downlink_bytes,
                        latency_s=user_hop + cost.total_seconds,
                        edge_utilisation=rate * cost.edge_seconds,
                    )
                )
            chosen = choose_placement(measured, link, speeds).placement.name
            edges[edge.id] = EdgePlacements(
                task=edge.task,
                users=users.count,
                requests_per_second=rate,
                images_per_request=n,
                chosen=chosen,
                placements=rows,
            )
            self._say(f"placements {edge.id}: {chosen} chosen for {users.count} users at {rate:g} req/s")
        if not edges:
            return Disabled(enabled=False)
        return Placements(enabled=True, cloud_gflops=self.scenario.serving.gflops, edges=edges)

    # ---- image quality ---------------------------------------------------------------------------------

    def _image_quality(self) -> ImageQuality | DisabledWithReason:
        samples = self.out_dir / SAMPLES_DIR
        n = self.options.fid_samples
        real: dict[str, torch.Tensor] = {}
        for task in self.tasks:
            indices = self.partitions.test[task][:n]
            if len(indices) < 2:
                continue
            faces = FaceDataset(self.source, indices, self.resolution)
            real[task] = torch.stack([faces[i] for i in range(len(faces))])  # type: ignore[misc]
            save_samples(samples / "real" / f"{task}.safetensors", real[task][: self.options.grid_samples])
        generated: dict[tuple[str, str], torch.Tensor] = {}
        for item in self.sets:
            key = (item.phase, item.name)
            if key not in generated:  # FedAvg's one model serves every task: draw it once
                generated[key] = item.generate(n, GENERATION_SEED)
            grid = generated[key][: self.options.grid_samples]
            name = f"{item.name}__{item.task}" if item.phase == "strategy" else item.name
            save_samples(samples / item.phase / f"{name}.safetensors", grid, task=item.task)
        if not self.options.image_quality:
            return DisabledWithReason(enabled=False, reason="image quality disabled for this run")
        try:
            extractor = self.options.extractor or InceptionExtractor()
        except FileNotFoundError as err:
            logger.warning("image quality not measured: %s", err)
            return DisabledWithReason(enabled=False, reason=str(err))
        self._say(f"image quality: {extractor.name}, {n} images per set, {len(self.sets)} sets")
        real_features = {task: extract_features(images, extractor) for task, images in real.items()}
        features = {key: extract_features(images, extractor) for key, images in generated.items()}
        rows = []
        for item in self.sets:
            if item.task not in real_features:
                continue
            fake, true = features[(item.phase, item.name)], real_features[item.task]
            # Subsets of half the smaller set: subsets of the whole set would all be equal (std 0).
            subset_size = max(2, min(fake.shape[0], true.shape[0]) // 2)
            kid_mean, kid_std = kid(
                fake, true, subsets=self.options.kid_subsets, subset_size=subset_size, seed=0
            )
            rows.append(
                QualitySet(
                    phase=item.phase,
                    name=item.name,
                    task=item.task,
                    fid=frechet_distance_from_features(fake, true),
                    kid_mean=kid_mean,
                    kid_std=kid_std,
                    num_generated=int(fake.shape[0]),
                    num_real=int(true.shape[0]),
                    kid_subset_size=subset_size,
                )
            )
        reference: dict[str, RealReference] = {}
        for task, feats in real_features.items():  # the floor at this sample count: real vs real
            half = feats.shape[0] // 2
            if half >= 2:
                reference[task] = RealReference(
                    fid_real_half_vs_half=frechet_distance_from_features(feats[:half], feats[half:]),
                    num_per_half=int(half),
                )
        return ImageQuality(
            enabled=True,
            extractor=extractor.name,
            feature_dim=extractor.feature_dim,
            num_generated=n,
            num_real={task: int(images.shape[0]) for task, images in real.items()},
            kid_subsets=self.options.kid_subsets,
            real_reference=reference,
            sets=rows,
            generation_seed=GENERATION_SEED,
        )

    # ---- helpers ---------------------------------------------------------------------------------------

    @contextmanager
    def _timed(self, seconds: dict[str, float], name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            seconds[name] = time.perf_counter() - started

    def _say(self, line: str) -> None:
        logger.info("%s", line)
        if self.progress is not None:
            self.progress(line)


def baim_from_checkpoint(checkpoint_uri: str) -> BAIM:
    """A trained BAIM from a Ray Train checkpoint (safetensors weights + JSON spec; no pickle)."""
    import ray.train

    with ray.train.Checkpoint(checkpoint_uri).as_directory() as directory:
        return load_checkpoint_baim(directory).eval()


def evaluate_run(
    report: RunReport,
    scenario: Scenario,
    source: DataSource,
    partitions: Partitions,
    out_dir: str | Path,
    options: EvaluationOptions | None = None,
    progress: Callable[[str], None] | None = None,
    coordinator: Any = None,
) -> RunReport:
    """The report with `baselines`, `downloads`, `personalisation`, `image_quality` and `evaluation` added
    (see the module docstring). Ray must be running when the FedAvg baseline is on."""
    return RunEvaluation(
        report, scenario, source, partitions, Path(out_dir), options or EvaluationOptions(), progress,
        coordinator,
    ).run()  # fmt: skip


def evaluation_stage(options: EvaluationOptions) -> Callable[[FinishedRun], RunReport]:
    """The engine's `after_run` stage: `evaluate_run` of the finished run with `options`."""

    def measure(run: FinishedRun) -> RunReport:
        return evaluate_run(
            run.report, run.scenario, run.source, run.partitions, run.out_dir, options, run.progress,
            run.coordinator,
        )  # fmt: skip

    return measure
