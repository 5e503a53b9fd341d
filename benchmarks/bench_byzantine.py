"""Byzantine edges: each task's test loss with and without an attack, with and without the defence.

The real pipeline at a tiny size: N edges per task (`--edges-per-task`, default 2: four edges) train their
VAEs with the real EdgeNode on their own shards; one of them (`f-1`, a female-task edge: 1 / (2N) of the
edges, 25% at the default) is the attacker. Its upload is replaced by an attack; every upload goes through
the real CloudCoordinator (validation, durable registry write, fusion into the BAIM), then `finish()` trains
the fused BAIM for a short cloud round on the cloud's common data (baim's training loop, `finetune`),
decomposes it and measures each task model's test loss.

Attacks: sign flip, weights x10 and x1000, Gaussian noise (3x each tensor's std), a model trained on the
wrong data (the other task's shard), a model trained on random-noise images.
Defences (the coordinator's own checks, set through the scenario):
- `none`: plausibility checks off (`cloud.uploads.max_plausibility_loss`, `max_loss_ratio` and
  `max_weight_norm_ratio` all 1e30; format checks stay on);
- `gate_default`: the shipped defaults (absolute loss 10.0, loss ratio 2.5, weight-norm ratio 50);
- `gate_relative`: the absolute limit set to 1.25 x the loss of a constant predictor (the holdout's mean
  image), the smallest limit that still means "better than knowing nothing"; an operator can compute it
  from the holdout alone, without seeing any upload.
The weight-norm ratio of each upload to a fresh initialisation is printed as the norm check a gate could add.

Goal (issue 8): the defended loss within 5% of the clean one.
Data: the shared CelebA subset when present, else procedural faces (printed).

Run: .venv/bin/python benchmarks/bench_byzantine.py   (4 edges: about 5 minutes on 2 busy cores; 10: 20)
     .venv/bin/python benchmarks/bench_byzantine.py --edges-per-task 5 --attacks scale_x1000,noise_images \
         --defences none,gate_relative                  (a subset at 10 edges, the attacker 10% of them)
The clean run and the honest edges alone are always measured (every ratio is over them).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, TensorDataset

from actors.coordinator import CloudCoordinator, RoundFailed
from actors.edge import EdgeNode, learner_name, poison_state, upload_spec
from actors.lifecycle import task_test_losses
from actors.uploads import PLAUSIBILITY_IMAGES, PLAUSIBILITY_SEED
from baim.config import LearnerSpec
from baim.learners import VAELearner, noise_for
from baim.model import BAIM
from baim.training import train_epoch, vae_batch_loss
from orchestrator.cloud.local import local_training_round
from orchestrator.core.artifacts import ArtifactPayload, pack_state
from orchestrator.core.receipts import CoordinatorSummary
from orchestrator.core.scenario import Scenario
from orchestrator.data.datasets import FaceDataset
from orchestrator.data.partitions import Partitions, make_partitions
from orchestrator.data.sources import DataSource, resolve_source

torch.set_num_threads(1)
ATTACKER = "f-1"
GOAL = 0.05  # defended loss within 5% of the clean one
EDGE = {"shard_size": 128, "batch_size": 16, "local_epochs": 4, "lr": 3e-3,
        "model": {"widths": [16, 32], "latent_dim": 16}}  # fmt: skip
SCENARIO_BASE = {
    "name": "bench-byzantine",
    "time_scale": 0.0,
    "data": {"resolution": 16, "test_per_task": 128, "cloud_per_task": 192, "holdout_per_task": 32},
    "tasks": [{"name": "male", "expression": "Male"}, {"name": "female", "expression": "not Male"}],
    "cloud": {
        "strategies": ["finetune"],
        "epochs": 3,
        "batch_size": 32,
        "lr": 0.002,
        "top_k": 1,
        "connection_height": 1,
        "fusion": {"min_new_models": 100, "max_wait_seconds": 100_000},  # one round, in finish()
    },
    "baselines": {"fedavg": {"enabled": False}},
    "serving": {"enabled": False},
}
DEFENCES = ("none", "gate_default", "gate_relative", "route_around")
ATTACKS = ("sign_flip", "scale_x10", "scale_x1000", "noise_1std", "noise_3std", "wrong_task_data",
           "noise_images")  # fmt: skip
TASK_PREFIXES = {"male": "m", "female": "f"}  # edge ids: m-0, m-1, ..., f-0, f-1 (the attacker), ...


PROCEDURAL = {"root": "/nonexistent/celeba", "procedural": {"num_images": 4000, "native_size": 32}}


def build_scenario(edges_per_task: int, seed: int, data: str = "auto") -> Scenario:
    """The benchmark's scenario with `edges_per_task` identical edges per task, male edges first.

    `seed` draws the data splits and seeds every training (edges and cloud round). `data`: "auto" (the
    shared CelebA when present) or "procedural".

    Shards are drawn in declaration order after the test, holdout and cloud splits, so those splits are the
    same at every size and the default size (2) gives the four edges the benchmark always had.
    """
    edges = [
        {"id": f"{prefix}-{index}", "task": task, **EDGE}
        for task, prefix in TASK_PREFIXES.items()
        for index in range(edges_per_task)
    ]
    document: dict[str, Any] = SCENARIO_BASE | {"edges": edges, "seed": seed}
    if data == "procedural":  # the faces the plausibility gate cannot tell a sign flip on (see the tests)
        document["data"] = {**document["data"], **PROCEDURAL}
    return Scenario.model_validate(document)


def train_edge(scenario: Scenario, source: DataSource, edge_id: str, indices: list[int]) -> VAELearner:
    """The real EdgeNode's local training on `indices` (its own shard, or another one for an attack)."""
    edge = scenario.edge(edge_id)
    node = EdgeNode(edge, source, indices, resolution=scenario.data.resolution, scenario_seed=scenario.seed,
                    kld_weight=scenario.cloud.kld_weight, time_scale=0.0)  # fmt: skip
    node._train()  # run() minus the upload: the benchmark sends the (possibly attacked) upload itself
    return node.model


def train_on_noise_images(scenario: Scenario, edge_id: str, count: int) -> VAELearner:
    """The attacker's edge architecture trained by baim's loop on uniform-noise 'images'."""
    edge = scenario.edge(edge_id)
    torch.manual_seed(scenario.seed)
    learner = VAELearner(declared_spec(scenario, edge_id))
    images = torch.rand(count, 3, scenario.data.resolution, scenario.data.resolution)
    loader = DataLoader(TensorDataset(images), batch_size=edge.batch_size, shuffle=True)
    optimizer = torch.optim.Adam(learner.parameters(), lr=edge.lr)
    for _ in range(edge.local_epochs):
        train_epoch(learner, loader, optimizer, vae_batch_loss(scenario.cloud.kld_weight))
    return learner


def declared_spec(scenario: Scenario, edge_id: str) -> LearnerSpec:
    """The learner an edge declares in the scenario (what EdgeNode builds and the coordinator expects)."""
    edge = scenario.edge(edge_id)
    return LearnerSpec(tuple(edge.model.widths), edge.model.latent_dim, scenario.data.resolution)


def payload_of(scenario: Scenario, edge_id: str, state: dict[str, torch.Tensor]) -> ArtifactPayload:
    return pack_state(state, upload_spec(scenario.edge(edge_id), declared_spec(scenario, edge_id)))


def holdout_images(scenario: Scenario, source: DataSource, partitions: Partitions, task: str) -> torch.Tensor:
    indices = partitions.holdout[task][:PLAUSIBILITY_IMAGES]
    dataset = FaceDataset(source, indices, scenario.data.resolution)
    return torch.stack([dataset[i] for i in range(len(dataset))])  # type: ignore[misc]


@torch.no_grad()
def plausibility_loss(scenario: Scenario, learner: VAELearner, images: torch.Tensor) -> float:
    """The coordinator's plausibility number for `learner` (same images, same fixed noise)."""
    eps = noise_for("plausibility", PLAUSIBILITY_SEED, images.shape[0], learner.spec.latent_dim)
    learner.eval()
    return float(learner.loss(images, scenario.cloud.kld_weight, eps=eps).loss)


def norm_ratio(scenario: Scenario, edge_id: str, state: dict[str, torch.Tensor]) -> float:
    """L2 norm of all weights over that of a fresh initialisation of the same architecture."""
    torch.manual_seed(0)
    fresh = VAELearner(declared_spec(scenario, edge_id)).state_dict()
    total = sum(float((t.float() ** 2).sum()) for t in state.values())
    reference = sum(float((t.float() ** 2).sum()) for t in fresh.values())
    return (total / reference) ** 0.5


@dataclass(frozen=True)
class Outcome:
    """One pipeline's result: each task's test loss from the trained BAIM and after model-level pruning."""

    unpruned: dict[str, float]  # the trained BAIM's task models (what a run without pruning publishes)
    pruned: dict[str, float]  # the task models after cloud.min_selection_rate's pruning
    rate: float | None  # the attacker's LSGate selection rate (None: not fused)
    removed: list[str]  # learners the pruning removed


def run_pipeline(
    scenario: Scenario,
    source: DataSource,
    partitions: Partitions,
    uploads: dict[str, ArtifactPayload],
    cache: dict[tuple[str, ...], Outcome],
) -> tuple[dict[str, dict[str, Any]], Outcome]:
    """Every upload through a fresh CloudCoordinator, then finish() (which prunes by the scenario's
    cloud.min_selection_rate before decomposing): receipts and the outcome.

    Training is deterministic (seeded), so the same accepted uploads give the same outcome: `cache` maps the
    accepted uploads' sha256s to it and finish() runs once per distinct set. The unpruned losses are the
    trained BAIM's, measured with the noise the published task models are measured with (decomposition is
    exact). A cloud round that fails (e.g. diverges on a poisoned model) publishes no task model: NaN.
    """

    async def go(coordinator: CloudCoordinator) -> tuple[dict[str, dict[str, Any]], Outcome]:
        receipts = {}
        for edge_id, payload in uploads.items():
            receipts[edge_id] = await coordinator.upload(
                edge_id=edge_id,
                version=1,
                weights=payload.weights,
                spec_json=payload.spec_json,
                sha256=payload.sha256,
            )
        key = tuple(sorted(receipt["sha256"] for receipt in receipts.values() if receipt["accepted"]))
        if key not in cache:
            tasks = [task.name for task in scenario.tasks]
            try:
                summary = CoordinatorSummary.model_validate(await coordinator.finish())
                pruning = summary.learner_pruning
                assert pruning is not None  # the scenario sets cloud.min_selection_rate
                trained = coordinator.registry.load_module("baim", pruning.from_version, BAIM)
                unpruned = task_test_losses(
                    trained, tasks, source=source, test_indices=partitions.test,
                    resolution=scenario.data.resolution, batch_size=scenario.cloud.batch_size,
                    seed=scenario.seed,
                )  # fmt: skip
                cache[key] = Outcome(
                    unpruned=unpruned,
                    pruned={task: float(summary.tasks[task].test_loss or "nan") for task in tasks},
                    rate=pruning.selection_rates.get(learner_name(ATTACKER)),
                    removed=[r.learner for r in pruning.removed],
                )
            except RoundFailed as err:
                print(f"  cloud round failed, no task model published: {err.error}")
                nan = {task: float("nan") for task in tasks}
                cache[key] = Outcome(nan, nan, None, [])
        return receipts, cache[key]

    with tempfile.TemporaryDirectory(prefix="bench-byzantine-") as registry:
        coordinator = CloudCoordinator(
            scenario, registry, source, partitions, round_runner=local_training_round
        )
        return asyncio.run(go(coordinator))


def with_defence(scenario: Scenario, limits: dict[str, float], min_selection_rate: float) -> Scenario:
    """The scenario with `cloud.uploads` fields overridden (the coordinator reads its checks from there) and
    `cloud.min_selection_rate` set (0: every rate measured, no learner removed)."""
    document = scenario.model_dump(mode="json")
    document["cloud"]["uploads"].update(limits)
    document["cloud"]["min_selection_rate"] = min_selection_rate
    return Scenario.model_validate(document)


def names_from(text: str, valid: tuple[str, ...]) -> list[str]:
    """A comma-separated subset of `valid`, in the order given; an unknown or repeated name is an error."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in valid]
    if unknown or not names or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(
            f"expected distinct names from {', '.join(valid)}, received {text!r}"
            + (f" (unknown: {', '.join(unknown)})" if unknown else "")
        )
    return names


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--edges-per-task",
        type=int,
        default=2,
        help="edges per task (male, female); the attacker is f-1, so at least 2 (default 2: today's numbers)",
    )
    parser.add_argument(
        "--attacks",
        type=lambda text: names_from(text, ATTACKS),
        default=list(ATTACKS),
        help=f"comma-separated subset of {','.join(ATTACKS)} (default all)",
    )
    parser.add_argument(
        "--defences",
        type=lambda text: names_from(text, DEFENCES),
        default=list(DEFENCES),
        help=f"comma-separated subset of {','.join(DEFENCES)} (default all)",
    )
    parser.add_argument(
        "--seeds",
        type=lambda text: [int(part) for part in text.split(",") if part.strip()],
        default=[11],
        help="comma-separated scenario seeds (data splits, edge and cloud training); the table averages "
        "over them (default 11: today's numbers)",
    )
    parser.add_argument(
        "--data",
        choices=("auto", "procedural"),
        default="auto",
        help="auto: the shared CelebA subset when present, else procedural faces; procedural: always them",
    )
    parser.add_argument(
        "--min-selection-rate",
        type=float,
        default=None,
        help="cloud.min_selection_rate of the route_around defence (default: half a member's uniform share, "
        "0.5 / edges-per-task)",
    )
    args = parser.parse_args(argv)
    if args.edges_per_task < 2:
        parser.error(
            f"--edges-per-task: the attacker is {ATTACKER}, so at least 2; received {args.edges_per_task}"
        )
    if not args.seeds or len(set(args.seeds)) != len(args.seeds) or min(args.seeds) < 0:
        parser.error(f"--seeds: expected distinct seeds >= 0, received {args.seeds}")
    if args.min_selection_rate is None:
        args.min_selection_rate = 0.5 / args.edges_per_task
    return args


# attack, defence, attacker accepted, test loss per task, the attacker's selection rate, learners pruned
Row = tuple[str, str, bool, dict[str, float], float | None, list[str]]


def run_seed(args: argparse.Namespace, seed: int, started: float) -> tuple[dict[str, float], list[Row]]:
    """One seed: the clean losses and a row per (attack, defence)."""
    chosen_attacks: list[str] = args.attacks
    chosen_defences: list[str] = args.defences
    scenario = build_scenario(args.edges_per_task, seed, args.data)
    edge_count = len(scenario.all_edges())
    source = resolve_source(scenario.data)
    partitions = make_partitions(source, scenario)
    tasks = [task.name for task in scenario.tasks]
    print(f"\n=== seed {seed}: data {source.kind} ({source.root}), resolution {scenario.data.resolution}, "
          f"edges {[e.id for e in scenario.all_edges()]}, attacker {ATTACKER} (task female, 1 of "
          f"{edge_count} edges); attacks {chosen_attacks}, defences {chosen_defences}")  # fmt: skip

    # 1. Honest local training (the attacker's honest model is the clean run's f-1).
    honest = {
        edge.id: train_edge(scenario, source, edge.id, partitions.edges[edge.id]).state_dict()
        for edge in scenario.all_edges()
    }
    attacker_state = honest[ATTACKER]
    # Built only when chosen: the two retrained models cost a local training each.
    attack_builders: dict[str, Callable[[], dict[str, torch.Tensor]]] = {
        "sign_flip": lambda: poison_state(attacker_state, "sign_flip", 1.0, seed=1),
        "scale_x10": lambda: poison_state(attacker_state, "scale", 10.0, seed=1),
        "scale_x1000": lambda: poison_state(attacker_state, "scale", 1000.0, seed=1),
        "noise_1std": lambda: poison_state(attacker_state, "noise", 1.0, seed=1),
        "noise_3std": lambda: poison_state(attacker_state, "noise", 3.0, seed=1),
        "wrong_task_data": lambda: train_edge(
            scenario, source, ATTACKER, partitions.edges[f"{TASK_PREFIXES['male']}-0"]
        ).state_dict(),
        "noise_images": lambda: train_on_noise_images(
            scenario, ATTACKER, len(partitions.edges[ATTACKER])
        ).state_dict(),
    }
    attacks = {name: attack_builders[name]() for name in chosen_attacks}
    print(f"local training: {time.perf_counter() - started:.0f}s")

    # 2. The relative gate: 1.25 x the loss of predicting each holdout image by the holdout's mean image.
    holdouts = {task: holdout_images(scenario, source, partitions, task) for task in tasks}
    constant = {task: float(((h - h.mean(0, keepdim=True)) ** 2).mean()) for task, h in holdouts.items()}
    relative_limit = 1.25 * max(constant.values())
    off = {"max_plausibility_loss": 1e30, "max_loss_ratio": 1e30, "max_weight_norm_ratio": 1e30}
    # Upload limits of each defence; every run prunes by --min-selection-rate before decomposing, and
    # route_around is gate_default's run read after that pruning (the others are read before it).
    limits: dict[str, dict[str, float]] = {
        "none": off,
        "gate_default": {},
        "gate_relative": {"max_plausibility_loss": relative_limit},
        "route_around": {},
    }
    print(f"constant-predictor loss per task {({t: round(v, 5) for t, v in constant.items()})}; "
          f"gate_relative limit {relative_limit:.5f}; route_around: the shipped upload checks, then "
          f"cloud.min_selection_rate {args.min_selection_rate:g}")  # fmt: skip

    def loss_of(edge_id: str, state: dict[str, torch.Tensor]) -> float:
        learner = VAELearner(declared_spec(scenario, edge_id))
        learner.load_state_dict(state)
        return plausibility_loss(scenario, learner, holdouts[scenario.edge(edge_id).task])

    print("upload checks (plausibility loss on the task's holdout; norm over a fresh init's):")
    for edge_id, state in honest.items():
        ratio = norm_ratio(scenario, edge_id, state)
        print(f"  honest {edge_id:<16} loss {loss_of(edge_id, state):10.5g}  norm x{ratio:.2f}")
    for name, state in attacks.items():
        print(f"  attack {name:<16} loss {loss_of(ATTACKER, state):10.5g}  "
              f"norm x{norm_ratio(scenario, ATTACKER, state):.2f}")  # fmt: skip

    # 3. The pipeline per (attack, defence).
    cache: dict[tuple[str, ...], Outcome] = {}
    pruning_scenario = with_defence(scenario, {}, args.min_selection_rate)

    def run(uploads: dict[str, ArtifactPayload], defence: str) -> tuple[bool, Outcome]:
        gated = with_defence(scenario, limits[defence], args.min_selection_rate)
        receipts, outcome = run_pipeline(gated, source, partitions, uploads, cache)
        return bool(receipts[ATTACKER]["accepted"]), outcome

    def row(name: str, defence: str, accepted: bool, outcome: Outcome) -> Row:
        losses = outcome.pruned if defence == "route_around" else outcome.unpruned
        return (name, defence, accepted, losses, outcome.rate if accepted else None, outcome.removed)

    clean_uploads = {edge_id: payload_of(scenario, edge_id, state) for edge_id, state in honest.items()}
    _, clean = run(clean_uploads, "none")
    rows: list[Row] = [row("clean", "none", True, clean), row("clean", "route_around", True, clean)]
    # What the honest edges achieve alone: the best any defence can do once the attacker's model is out.
    without_attacker = {e: p for e, p in clean_uploads.items() if e != ATTACKER}
    honest_only = run_pipeline(pruning_scenario, source, partitions, without_attacker, cache)[1]
    rows.append(row("honest_only", "none", False, honest_only))
    for name, state in attacks.items():
        uploads = clean_uploads | {ATTACKER: payload_of(scenario, ATTACKER, state)}
        for defence in chosen_defences:
            accepted, outcome = run(uploads, defence)
            rows.append(row(name, defence, accepted, outcome))
            rate = rows[-1][4]
            print(f"  ran {name} / {defence}: attacker {'accepted' if accepted else 'rejected'}"
                  f"{'' if rate is None else f', selection rate {rate:.3f}'}"
                  f"{f', pruned {outcome.removed}' if defence == 'route_around' else ''} "
                  f"({time.perf_counter() - started:.0f}s)")  # fmt: skip
    return clean.unpruned, rows


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.ERROR)
    started = time.perf_counter()
    per_seed = {seed: run_seed(args, seed, started) for seed in args.seeds}
    tasks = list(next(iter(per_seed.values()))[0])

    # The table: each loss over the same seed's clean run (all edges honest), then averaged over seeds.
    def mean(values: list[float]) -> float:
        return sum(values) / len(values) if values else float("nan")

    keys = [(row[0], row[1]) for row in next(iter(per_seed.values()))[1]]
    header = f"{'attack':<16} {'defence':<14} {'accepted':>8} {'pruned':>6} {'rate':>18}" + "".join(
        f" {t + ' /clean':>14}" for t in tasks
    )
    print(f"\nmean over seeds {args.seeds} ({args.edges_per_task} edges per task; accepted / pruned: seeds "
          f"in which the attacker passed the upload checks / was removed by the pruning; rate: its LSGate "
          f"selection rate on the cloud's common data, mean [min, max] over the seeds it was accepted in; a "
          f"member's uniform share is {1 / args.edges_per_task:.3f}; /clean: over the same seed's clean run "
          "without pruning)")  # fmt: skip
    print(header + "  goal")
    print("-" * len(header) + "------")
    attacker = learner_name(ATTACKER)
    for attack, defence in keys:
        matching = [
            next(r for r in seed_rows if (r[0], r[1]) == (attack, defence))
            for _, seed_rows in per_seed.values()
        ]
        cleans = [clean for clean, _ in per_seed.values()]
        ratios = {t: mean([r[3][t] / c[t] for r, c in zip(matching, cleans, strict=True)]) for t in tasks}
        rates = [r[4] for r in matching if r[4] is not None]
        rate = f"{mean(rates):.3f} [{min(rates):.2f},{max(rates):.2f}]" if rates else "-"
        accepted = sum(r[2] for r in matching)
        pruned = sum(r[2] and attacker in r[5] for r in matching) if defence == "route_around" else "-"
        worst = max(ratios[t] - 1 for t in tasks)
        judged = attack not in ("clean", "honest_only") and defence != "none"
        verdict = ("ok" if worst <= GOAL else "MISSED") if judged else ""
        cells = "".join(f" {ratios[t]:13.3f}x" for t in tasks)
        print(f"{attack:<16} {defence:<14} {accepted:>4}/{len(matching):<3} {pruned!s:>6} {rate:>18}{cells}"
              f"  {verdict}")  # fmt: skip
    print(f"\ngoal: defended loss within {GOAL:.0%} of clean (/clean <= {1 + GOAL:.2f}x, mean over seeds); "
          f"{time.perf_counter() - started:.0f}s")  # fmt: skip


if __name__ == "__main__":
    main()
