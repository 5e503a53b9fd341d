"""GaisNet, part 1: LoRA vs full personalisation of a task model, and where split generation should run.

The task model is built in-process the way the quickstart builds it (no Ray): each quickstart edge trains
its VAE on its own shard (its local_epochs, lr, batch size), the cloud fuses them into a BAIM (the scenario's
top_k, connection height, KLD weight), trains it with `finetune` on the cloud shards for CLOUD_EPOCHS (16,
not the quickstart's 4: see there), pruning connections every prune_interval epochs, and decomposes the task
model of TASK.

Personalisation, on EDGE's shard (split 80 / 20 with a fixed seed into a personalisation set and the edge's
held-out images): full fine-tuning (every parameter) against LoRA at ranks 1, 4 and 16 (alpha = rank, so
every rank has scaling 1; targets: every Linear, Conv2d and ConvTranspose2d). Each method gets the same
EPOCHS and its best learning rate from LEARNING_RATES, chosen on the edge's held-out loss; the task's test
split (never used for the choice) is reported beside it. Printed per method: trainable parameters, the bytes
the edge would upload (the full model's safetensors for full fine-tuning, the adapters' for LoRA), edge
training FLOPs (baim.costs: forward + backward, matmuls and convolutions), losses before and after.

Split generation: for N_IMAGES images, every placement (all cloud, split after each decoder stage, all edge)
with measured FLOPs per side and bytes (the split state's exact safetensors size; the generate request's
JSON and the response's JSON with base64 PNGs, encoded as the HTTP API encodes them), and the latency model
of baim.placement for a slow and a fast link with declared edge and cloud speeds. Numbers only; it asserts
nothing.

The relay (`--relay-run RUN`, RUN a finished `baim run scenarios/gaisnet.yaml --no-evaluate` folder): every
edge of the run personalises its task model with the scenario's LoRA settings, then each relay variant
(RELAY_VARIANTS) runs through the cloud's relay desk on a copy of the run's registry, with the edges'
adapters and with the same adapters zeroed (the control): per task the test loss before, of the candidate
and of what the guard kept, the held-out losses it compared, and the bytes relayed.

Run: nice -n 10 .venv/bin/python benchmarks/bench_gaisnet.py   (25 to 35 minutes on 2 loaded cores)
     nice -n 5 .venv/bin/python benchmarks/bench_gaisnet.py --relay-run RUN --relay-only   (about 8 minutes)
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn

from baim.adapters import LoRAConfig, adapter_bytes, apply_lora
from baim.config import LearnerSpec
from baim.costs import count_params, count_trainable_params, forward_backward_flops, serialized_bytes
from baim.decompose import TaskModel, decompose
from baim.learners import VAELearner
from baim.model import BAIM
from baim.placement import Link, NodeSpeeds, measure_placements, placement_cost
from baim.pruning import prune_connections
from baim.training import evaluate, make_optimizer, train_epoch, vae_batch_loss
from orchestrator.core.names import MAX_MODEL_BYTES
from orchestrator.core.scenario import Scenario, load_scenario
from orchestrator.data.datasets import FaceDataset
from orchestrator.data.partitions import make_partitions
from orchestrator.data.sources import resolve_source
from serve.models import png_base64

SCENARIO = Path(__file__).resolve().parent.parent / "scenarios" / "quickstart.yaml"
TASK = "male"
EDGE = "phone-0"
SEED = 0
RANKS = (1, 4, 16)
EPOCHS = 10
LEARNING_RATES = (3e-4, 1e-3, 3e-3, 1e-2, 3e-2)
# The quickstart trains the BAIM for 4 epochs, far from convergence: personalising that model would mostly
# finish the cloud's training and credit whichever method trains the most parameters. Train it longer here.
CLOUD_EPOCHS = 16
CURVE_EPOCHS = (1, 2, 5, 10)
BATCH = 32
HELD_OUT_FRACTION = 0.2
N_IMAGES = 8
LINKS = {
    "slow link (2 Mbit/s, 60 ms)": Link(bandwidth_mbps=2.0, latency_ms=60.0),
    "fast link (200 Mbit/s, 5 ms)": Link(bandwidth_mbps=200.0, latency_ms=5.0),
}
# Declared speeds (effective FLOP/s on these small convolutions): a phone-class edge and one cloud replica.
SPEEDS = NodeSpeeds(edge_flops_per_second=2e9, cloud_flops_per_second=1e11)


def images_of(scenario: Scenario, source: Any, indices: list[int]) -> torch.Tensor:
    faces = FaceDataset(source, indices, scenario.data.resolution)
    return torch.stack([faces[i] for i in range(len(faces))])  # type: ignore[misc]


def batches(x: torch.Tensor, batch: int, seed: int, shuffle: bool = True) -> list[torch.Tensor]:
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed)) if shuffle else None
    x = x[order] if order is not None else x
    return [x[i : i + batch] for i in range(0, len(x), batch)]


def task_model_loss(module: nn.Module, batch: Any) -> torch.Tensor:
    return module(batch).loss


def build_task_model(scenario: Scenario, source: Any, partitions: Any) -> TaskModel:
    tasks = [task.name for task in scenario.tasks]
    learners = []
    for n, edge in enumerate(scenario.edges):
        torch.manual_seed(SEED + n)
        spec = LearnerSpec(tuple(edge.model.widths), edge.model.latent_dim, scenario.data.resolution)
        learner = VAELearner(spec)
        shard = images_of(scenario, source, partitions.edges[edge.id])
        optimizer = torch.optim.Adam(learner.parameters(), lr=edge.lr)
        for epoch in range(edge.local_epochs):
            loader = batches(shard, edge.batch_size, SEED + epoch)
            loss = train_epoch(learner, loader, optimizer, vae_batch_loss(scenario.cloud.kld_weight))
        print(f"  edge {edge.id} ({edge.task}, widths {spec.widths}): local loss {loss:.5f}")
        learners.append((edge.id.replace("-", "_"), edge.task, learner))
    cloud = scenario.cloud
    baim = BAIM.from_learners(
        tasks,
        learners,
        top_k=cloud.top_k,
        connection_height=cloud.connection_height,
        kld_weight=cloud.kld_weight,
        seed=scenario.seed,
    )
    cloud_images = torch.cat([images_of(scenario, source, partitions.cloud[t]) for t in tasks])
    cloud_tasks = torch.cat(
        [torch.full((len(partitions.cloud[t]),), m, dtype=torch.long) for m, t in enumerate(tasks)]
    )

    def baim_loss(module: nn.Module, batch: Any) -> torch.Tensor:
        return module(batch[0], batch[1]).loss

    optimizer = make_optimizer(baim, cloud.lr)
    for epoch in range(CLOUD_EPOCHS):
        order = torch.randperm(len(cloud_images), generator=torch.Generator().manual_seed(SEED + epoch))
        loader = [
            (cloud_images[order[i : i + cloud.batch_size]], cloud_tasks[order[i : i + cloud.batch_size]])
            for i in range(0, len(order), cloud.batch_size)
        ]
        loss = train_epoch(baim, loader, optimizer, baim_loss)
        if (epoch + 1) % cloud.prune_interval == 0:
            prune_connections(baim, cloud.prune_ratio)
            optimizer = make_optimizer(baim, cloud.lr, previous=optimizer)
        print(f"  cloud epoch {epoch}: loss {loss:.5f}, {len(baim.connections.specs)} connections")
    model = decompose(baim, TASK)
    print(f"  task model {TASK}: {count_params(model)} parameters, learners {model.config.learner_names}")
    return model


def personalise(
    model: TaskModel,
    rank: int | None,
    lr: float,
    train: torch.Tensor,
    held_out: torch.Tensor,
    test: torch.Tensor,
) -> dict[str, Any]:
    """One method at one lr: rank None is full fine-tuning."""
    model = copy.deepcopy(model)
    if rank is None:
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        apply_lora(model, LoRAConfig(rank=rank, alpha=float(rank), seed=SEED))
    held_batches, test_batches = batches(held_out, 64, 0, shuffle=False), batches(test, 64, 0, shuffle=False)
    before = (evaluate(model, held_batches, task_model_loss), evaluate(model, test_batches, task_model_loss))
    full, rest = divmod(len(train), BATCH)
    step = forward_backward_flops(model, train[:BATCH], task_model_loss).total
    last = forward_backward_flops(model, train[:rest], task_model_loss).total if rest else 0
    optimizer = make_optimizer(model, lr)
    torch.manual_seed(SEED)
    started = time.perf_counter()
    curve = []
    try:
        for epoch in range(EPOCHS):
            train_epoch(model, batches(train, BATCH, SEED + epoch), optimizer, task_model_loss)
            if epoch + 1 in CURVE_EPOCHS:
                curve.append(evaluate(model, held_batches, task_model_loss))
        after = (
            evaluate(model, held_batches, task_model_loss),
            evaluate(model, test_batches, task_model_loss),
        )
    except FloatingPointError:  # this lr diverged: it loses the sweep
        after = (math.inf, math.inf)
    seconds = time.perf_counter() - started
    return {
        "lr": lr,
        "trainable": count_trainable_params(model),
        "upload_bytes": serialized_bytes(model) if rank is None else adapter_bytes(model),
        "edge_flops": EPOCHS * (full * step + last),
        "held_out": before[0],
        "held_out_after": after[0],
        "test": before[1],
        "test_after": after[1],
        "seconds": seconds,
        "curve": curve,
    }


def personalisation_table(
    model: TaskModel, train: torch.Tensor, held_out: torch.Tensor, test: torch.Tensor
) -> None:
    print(
        f"\nPersonalisation of {TASK} on {EDGE}: {len(train)} images, {len(held_out)} held out, "
        f"{len(test)} task test images; {EPOCHS} epochs, batch {BATCH}, best lr of {LEARNING_RATES}"
    )
    header = (
        f"  {'method':<10} {'lr':>7} {'trainable':>10} {'upload B':>10} {'edge GFLOPs':>11} "
        f"{'held-out before':>15} {'after':>9} {'test before':>11} {'after':>9} {'train s':>8}"
    )
    print(header)
    rows = {}
    for rank in (None, *RANKS):
        runs = [personalise(model, rank, lr, train, held_out, test) for lr in LEARNING_RATES]
        best = min(runs, key=lambda run: run["held_out_after"])
        rows[rank] = best
        name = "full" if rank is None else f"LoRA r{rank}"
        print(
            f"  {name:<10} {best['lr']:7.0e} {best['trainable']:10d} {best['upload_bytes']:10d} "
            f"{best['edge_flops'] / 1e9:11.2f} {best['held_out']:15.5f} {best['held_out_after']:9.5f} "
            f"{best['test']:11.5f} {best['test_after']:9.5f} {best['seconds']:8.1f}"
        )
        swept = ", ".join(f"{run['lr']:.0e}: {run['held_out_after']:.5f}" for run in runs)  # inf: diverged
        print(f"  {'':<10} held-out loss after, per lr: {swept}")
        curve = ", ".join(f"{e}: {loss:.5f}" for e, loss in zip(CURVE_EPOCHS, best["curve"], strict=True))
        print(f"  {'':<10} held-out loss at the best lr after epoch {curve}")
    full = rows[None]
    print("  ratios against full fine-tuning:")
    for rank in RANKS:
        row = rows[rank]
        print(
            f"    LoRA r{rank}: trainable x{row['trainable'] / full['trainable']:.4f}, "
            f"upload bytes x{row['upload_bytes'] / full['upload_bytes']:.4f}, "
            f"edge FLOPs x{row['edge_flops'] / full['edge_flops']:.3f}, "
            f"held-out gain {row['held_out'] - row['held_out_after']:.5f} "
            f"vs {full['held_out'] - full['held_out_after']:.5f}"
        )


def split_table(model: TaskModel) -> None:
    model = model.eval()
    request = json.dumps({"n": N_IMAGES, "seed": SEED})
    images = model.generate(N_IMAGES, seed=SEED)
    response = json.dumps(
        {"task": TASK, "model_version": "v000001", "seed": SEED, "images": png_base64(images)}
    )
    placements = measure_placements(model, N_IMAGES, SEED, len(request), len(response))
    started = time.perf_counter()
    for _ in range(5):
        model.generate(N_IMAGES, seed=SEED)
    seconds = (time.perf_counter() - started) / 5
    measured = placements[-1].edge_flops / seconds
    print(
        f"\nSplit generation of {N_IMAGES} images of {TASK}: request {len(request)} B, "
        f"response {len(response)} B (base64 PNGs); edge {SPEEDS.edge_flops_per_second:.0e} FLOP/s, "
        f"cloud {SPEEDS.cloud_flops_per_second:.0e} FLOP/s declared; this CPU (1 thread) generates them in "
        f"{seconds * 1e3:.1f} ms, {measured:.1e} FLOP/s"
    )
    print(f"  {'placement':<16} {'edge MFLOPs':>11} {'cloud MFLOPs':>12} {'up B':>8} {'down B':>8}")
    for p in placements:
        print(
            f"  {p.name:<16} {p.edge_flops / 1e6:11.2f} {p.cloud_flops / 1e6:12.2f} "
            f"{p.uplink_bytes:8d} {p.downlink_bytes:8d}"
        )
    for label, link in LINKS.items():
        costs = [placement_cost(p, link, SPEEDS) for p in placements]
        best = min(costs, key=lambda cost: cost.total_seconds)
        cloud = costs[0].total_seconds
        print(f"  {label}: chosen {best.placement.name}")
        print(
            f"    {'placement':<16} {'transfer ms':>11} {'edge ms':>8} {'cloud ms':>8} {'total ms':>8} "
            f"{'/ all cloud':>11}"
        )
        for cost in costs:
            print(
                f"    {cost.placement.name:<16} {cost.transfer_seconds * 1e3:11.2f} "
                f"{cost.edge_seconds * 1e3:8.2f} {cost.cloud_seconds * 1e3:8.2f} "
                f"{cost.total_seconds * 1e3:8.2f} {cost.total_seconds / cloud:11.3f}"
            )


# Relay variants measured on one finished run's registry, all from the same relayed adapters:
# (label, personalisation fields). Each also runs with the same adapters zeroed (B = 0: a no-op adapter, the
# teacher is the unpersonalised task model), the control that does the same cloud-side work without any
# knowledge from the edges: the difference between the two rows is what the relay itself brings (for the
# folds and the generated images; distil's zero teacher is the unpersonalised model, so its fair control is
# the "no teacher term" row).
RELAY_VARIANTS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("average + 2 gate epochs", {"relay_method": "average", "relay_gate_epochs": 2}),
    ("fold_own, no gate training", {"relay_method": "fold_own", "relay_gate_epochs": 0}),
    ("fold_own + 2 gate epochs", {"relay_method": "fold_own", "relay_gate_epochs": 2}),
    ("distil, lr 5e-3", {"relay_method": "distil", "relay_lr": 5e-3}),
    ("distil, lr 1e-3", {"relay_method": "distil", "relay_lr": 1e-3}),
    ("distil, whole BAIM, lr 1e-3", {"relay_method": "distil", "relay_lr": 1e-3, "relay_student": "baim"}),
    # distil's fair control: the same training without the teacher term (its "zero" row pulls towards the
    # unpersonalised model instead, which is not the same cloud work)
    ("no teacher term, lr 1e-3", {"relay_method": "distil", "relay_lr": 1e-3, "relay_distil_weight": 0.0}),
    (
        "generated 256/teacher, lr 1e-3",
        {"relay_method": "distil", "relay_lr": 1e-3, "relay_generated": 256, "relay_distil_weight": 0.0},
    ),
    (
        "generated 256/teacher, lr 5e-3",
        {"relay_method": "distil", "relay_lr": 5e-3, "relay_generated": 256, "relay_distil_weight": 0.0},
    ),
)


def zeroed(weights: bytes) -> bytes:
    """The same adapter with every B = 0: it changes nothing (baim.adapters' initialisation)."""
    state = safetensors.torch.load(weights)
    return safetensors.torch.save(
        {key: torch.zeros_like(t) if key.endswith(".B") else t for key, t in state.items()}
    )


def relay_table(run_dir: Path, personalise_epochs: int, variants: list[str] | None) -> None:
    """Personalise every edge of a finished run (its evaluation's LoRA stage), then run each relay variant
    on a copy of the run's registry from the same relayed adapters, and again with them zeroed: per task the
    test loss before, of the candidate and of what the guard kept, the held-out losses it compared, and the
    bytes relayed."""
    from orchestrator.core.registry import Registry
    from orchestrator.core.reports import Relay, RunReport
    from orchestrator.evaluation.evaluate import EvaluationOptions, RunEvaluation

    report = RunReport.model_validate_json((run_dir / "report.json").read_text())
    scenario = Scenario.model_validate(report.scenario)
    source = resolve_source(scenario.data)
    partitions = make_partitions(source, scenario)
    options = EvaluationOptions(personalise_epochs=personalise_epochs, run_fedavg=False, image_quality=False)
    work = Path(tempfile.mkdtemp(prefix="bench-relay-"))
    evaluation = RunEvaluation(report, scenario, source, partitions, work / "out", options)
    started = time.perf_counter()
    evaluation._personalise()
    uploads = evaluation.relay_uploads
    controls = {
        task: [(edge, version, zeroed(weights), spec) for edge, version, weights, spec in rows]
        for task, rows in uploads.items()
    }
    print(
        f"\nRelay on {run_dir} (BAIM {report.cloud.baim_version}): {personalise_epochs} epochs of "
        f"{scenario.personalisation.method} r{scenario.personalisation.rank} personalisation per edge "
        f"({time.perf_counter() - started:.0f} s); each variant starts from the run's BAIM and the same "
        "adapters; 'zero' rows relay them with B = 0 (no edge knowledge, same cloud work)"
    )
    print(
        f"  {'variant':<32} {'adapters':<8} {'task':<15} {'bytes':>8} {'test before':>11} {'candidate':>9} "
        f"{'kept':>8} {'held-out before':>15} {'after':>8} {'guard':>8} {'s':>5}"
    )
    for label, fields in RELAY_VARIANTS:
        if variants and not any(part in label for part in variants):
            continue
        settings = scenario.personalisation.model_copy(update={"relay": True, "relay_guard": True, **fields})
        evaluation.scenario = scenario.model_copy(update={"personalisation": settings})
        for kind, relayed in (("edges", uploads), ("zero", controls)):
            # A copy of the registry per row: an accepted round publishes the next versions into it.
            registry = work / f"registry-{len(list(work.iterdir()))}"
            shutil.copytree(report.registry, registry)
            evaluation.registry = Registry(str(registry), max_artifact_bytes=MAX_MODEL_BYTES)
            evaluation.relay_uploads = relayed
            started = time.perf_counter()
            section = evaluation._relay()
            seconds = time.perf_counter() - started
            assert isinstance(section, Relay)
            verdict = "accepted" if section.accepted else "rejected"
            for task, row in section.tasks.items():
                print(
                    f"  {label:<32} {kind:<8} {task:<15} {row.upload_bytes:8d} {row.test_loss_before:11.5f} "
                    f"{row.candidate_test_loss or math.nan:9.5f} {row.test_loss_after:8.5f} "
                    f"{section.holdout_loss_before.get(task, math.nan):15.5f} "
                    f"{section.holdout_loss_after.get(task, math.nan):8.5f} {verdict:>8} {seconds:5.0f}"
                )
            if section.distillation_loss_before is not None:
                print(
                    f"  {'':<32} {kind:<8} distillation loss {section.distillation_loss_before:.5f} -> "
                    f"{section.distillation_loss_after or math.nan:.5f}"
                )
            shutil.rmtree(registry)
    shutil.rmtree(work)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--relay-run",
        type=Path,
        help="a finished `baim run scenarios/gaisnet.yaml --no-evaluate` folder: print the relay rows on its "
        "registry",
    )
    parser.add_argument("--relay-only", action="store_true", help="skip the personalisation and split tables")
    parser.add_argument(
        "--relay-variants", nargs="*", help="run only the relay variants whose label contains one of these"
    )
    parser.add_argument("--personalise-epochs", type=int, default=2, help="relay: personalisation epochs")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if not args.relay_only:
        tables()
    if args.relay_run is not None:
        relay_table(args.relay_run, args.personalise_epochs, args.relay_variants)
    elif args.relay_only:
        parser.error("--relay-only needs --relay-run DIR")


def tables() -> None:
    scenario = load_scenario(SCENARIO)
    source = resolve_source(scenario.data)
    partitions = make_partitions(source, scenario)
    print(
        f"quickstart data: {source.kind} ({source.num_images} images), "
        f"{scenario.data.resolution}x{scenario.data.resolution}"
    )
    model = build_task_model(scenario, source, partitions)
    shard = images_of(scenario, source, partitions.edges[EDGE])
    order = torch.randperm(len(shard), generator=torch.Generator().manual_seed(SEED))
    held = int(len(shard) * HELD_OUT_FRACTION)
    held_out, train = shard[order[:held]], shard[order[held:]]
    test = images_of(scenario, source, partitions.test[TASK])
    personalisation_table(model, train, held_out, test)
    split_table(model)


if __name__ == "__main__":
    main()
