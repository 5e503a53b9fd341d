"""What a task-model budget costs in test loss, and which pruning schedule / recovery costs least.

quickstart (`scenarios/quickstart.yaml`: its edges, sizes and cloud settings, the shared CelebA subset): the
edges are trained once and fused once; from that same start the cloud finetunes `--epochs` epochs with
pruning every `prune_interval` epochs, once per variant:

- unbudgeted: the paper's schedule (prune_ratio of the surviving connections per pruning, by data score);
  the reference every other variant is compared with.
- geometric: the budget reached in steps whose size / limit shrinks by the same factor, `--recovery` final
  epochs without pruning (`cloud.prune_shape: geometric`).
- one-shot: the budget reached at the first pruning epoch, every later epoch recovers.
- cubic: Zhu & Gupta's (2017) gradual schedule, the excess over the limit falling as (1 - progress)^3
  (`cloud.prune_shape: cubic`), same pruning epochs and recovery as geometric.
- ... + distil W: from the first pruning on, the reconstruction target is (1 - W) x + W * the
  reconstruction of the BAIM as it was just before that pruning (`cloud.distill_weight`, `baim.distill`).
- squad connections only: no cross-task connection from the start (`connection_scope: squad`), the paper's
  schedule: the structure a budget near 1 converges to, trained without any pruning damage.

Every variant draws the same training noise and batches per epoch; the test loss is the task model's (the
BAIM's on that task: decomposition is exact), eval mode, 200 test images per task, seeded noise. Printed:
per task and variant, the task model's parameters / its squad's, the test loss and its change vs unbudgeted
(goal: within 2%), the mean over tasks, and the last epoch's training loss (both tasks; against the
distillation target where one is used), which tells a capacity gap (train and test loss both higher) from
a generalisation one. Asserts nothing.

Run: nice -n 10 .venv/bin/python benchmarks/bench_budget_gap.py [--epochs 10 --recovery 4 --budget 1.15]
     [--variants unbudgeted,geometric,cubic,...] [--distill-weights 0.5]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from inprocess_baim import fuse, load_data, quickstart, test_loss, train_cloud, train_edges

from baim.compaction import PruningSchedule, squad_params, task_model_params
from baim.costs import count_params

VARIANTS = ("unbudgeted", "geometric", "one-shot", "cubic", "geometric+distil", "cubic+distil", "squad-only")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=10, help="cloud epochs of every variant")
    parser.add_argument("--recovery", type=int, default=4, help="recovery epochs of geometric and cubic")
    parser.add_argument("--budget", type=float, default=1.15, help="cloud.task_model_budget")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated of {VARIANTS}")
    parser.add_argument("--distill-weights", default="0.5", help="comma-separated distillation weights")
    args = parser.parse_args()
    variants = args.variants.split(",")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"--variants: unknown {unknown}; expected some of {list(VARIANTS)}")
    weights = [float(w) for w in args.distill_weights.split(",")]
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    scenario = quickstart()
    cloud = scenario.cloud
    started = time.perf_counter()
    data = load_data(scenario)
    learners = train_edges(data)
    print(f"data: {data.source_kind}; edges trained in {time.perf_counter() - started:.0f}s", flush=True)
    interval, ratio, epochs = cloud.prune_interval, cloud.prune_ratio, args.epochs

    def budgeted(shape: str, recovery: int) -> PruningSchedule:
        return PruningSchedule(interval, ratio, args.budget, recovery, shape)  # type: ignore[arg-type]

    runs: list[tuple[str, PruningSchedule, dict[str, Any], str]] = []  # name, schedule, options, scope
    for variant in variants:
        if variant == "unbudgeted":
            runs.append((variant, PruningSchedule(interval, ratio), {}, "all"))
        elif variant == "squad-only":
            runs.append(("squad connections only", PruningSchedule(interval, ratio), {}, "squad"))
        elif variant == "one-shot":
            runs.append((variant, budgeted("geometric", epochs - interval), {}, "all"))
        elif variant in ("geometric", "cubic"):
            runs.append((variant, budgeted(variant, args.recovery), {}, "all"))
        else:
            shape = variant.split("+")[0]
            for weight in weights:
                runs.append(
                    (
                        f"{shape} + distil {weight:g}",
                        budgeted(shape, args.recovery),
                        {"distill_weight": weight},
                        "all",
                    )
                )
    results: dict[str, dict[str, Any]] = {}
    for name, schedule, options, scope in runs:
        baim = fuse(data, learners, mixture="sample", connection_scope=scope)
        t0 = time.perf_counter()
        logs = train_cloud(baim, data, schedule, epochs, **options)
        results[name] = {
            "params": {t: task_model_params(baim.config, t) for t in data.tasks},
            "squad": {t: squad_params(baim.config, t) for t in data.tasks},
            "baim": count_params(baim),
            "loss": {t: test_loss(baim, data, t) for t in data.tasks},
            "curve": [sum(log.test_loss.values()) / len(log.test_loss) for log in logs],
            "train_loss": logs[-1].train_loss,  # the last epoch's training steps (distillation: its target)
            "connections": len(baim.connections.specs),
            "seconds": time.perf_counter() - t0,
        }
        losses = ", ".join(f"{t} {v:.5f}" for t, v in results[name]["loss"].items())
        print(f"  [{name}] {losses}; {results[name]['connections']} connections; "
              f"{results[name]['seconds']:.0f}s", flush=True)  # fmt: skip
    print_table(results, data.tasks, epochs, args.budget)


def print_table(results: dict[str, dict[str, Any]], tasks: list[str], epochs: int, budget: float) -> None:
    reference = results.get("unbudgeted")
    print(f"\nquickstart, {epochs} cloud epochs, budget {budget:g}")
    header = " | ".join(f"{t}: params / squad, test loss, vs unbudgeted" for t in tasks)
    print(f"| variant | {header} | mean test loss, vs unbudgeted | last epoch's train loss |")
    print("|---|" + "---|" * (len(tasks) + 2))
    for name, row in results.items():
        cells = []
        for t in tasks:
            change = "" if reference is None else f"{row['loss'][t] / reference['loss'][t] - 1:+.1%}"
            cells.append(f"{row['params'][t] / row['squad'][t]:.3f}, {row['loss'][t]:.5f}, {change}")
        mean = sum(row["loss"].values()) / len(tasks)
        ref_mean = None if reference is None else sum(reference["loss"].values()) / len(tasks)
        change = "" if ref_mean is None else f"{mean / ref_mean - 1:+.1%}"
        print(f"| {name} | " + " | ".join(cells) + f" | {mean:.5f}, {change} | {row['train_loss']:.5f} |")
    print("\nmean test loss per epoch:")
    print("| epoch | " + " | ".join(results) + " |")
    print("|---|" + "---|" * len(results))
    for e in range(epochs):
        print(f"| {e + 1} | " + " | ".join(f"{row['curve'][e]:.5f}" for row in results.values()) + " |")


if __name__ == "__main__":
    main()
