"""Fusion cost: seconds for `BAIM.add_learner` to fuse one more learner into a BAIM of N learners.

A BAIM of N - 1 heterogeneous learners (two tasks, connection height 3, every valid pair a candidate
connection, as the paper's case study) is built once per N; then `--adds` more learners are fused one by
one and each `add_learner` call is timed. Prints, per N, the candidate connections the BAIM holds, how many
each add creates, and the median / max seconds per add. Asserts nothing.

Run it before and after a change to compare (the machine is shared and noisy: compare ratios of medians
from back-to-back runs, e.g. `PYTHONPATH=<old checkout> .venv/bin/python benchmarks/bench_fusion.py`).

    .venv/bin/python benchmarks/bench_fusion.py [--sizes 10 30 60] [--adds 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from baim.config import LearnerSpec
from baim.learners import VAELearner
from baim.model import BAIM

torch.set_num_threads(1)
RESOLUTION = 32
# Heterogeneous edge models, cycled: stages (1 to 3 encoder stages), widths and latent sizes differ.
SPECS = (
    LearnerSpec((8, 16), 8, RESOLUTION),
    LearnerSpec((8, 16, 32), 16, RESOLUTION),
    LearnerSpec((16, 32), 8, RESOLUTION),
    LearnerSpec((16,), 4, RESOLUTION),
)
TASKS = ("male", "female")


def edge_learner(n: int) -> tuple[str, str, VAELearner]:
    torch.manual_seed(n)
    return f"edge-{n}", TASKS[n % len(TASKS)], VAELearner(SPECS[n % len(SPECS)])


def time_adds(size: int, adds: int) -> tuple[int, list[int], list[float]]:
    """Build a BAIM of `size - adds` learners, then time `adds` add_learner calls (the last one makes N)."""
    first = [edge_learner(n) for n in range(size - adds)]
    baim = BAIM.from_learners(TASKS, first, top_k=2, connection_height=3)
    created, seconds = [], []
    for n in range(size - adds, size):
        name, task, learner = edge_learner(n)
        started = time.perf_counter()
        new_connections = baim.add_learner(name, task, learner)
        seconds.append(time.perf_counter() - started)
        created.append(len(new_connections))
    return len(baim.connections.specs), created, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 30, 60], help="N after the adds")
    parser.add_argument("--adds", type=int, default=3, help="add_learner calls timed per size")
    args = parser.parse_args()
    if any(size <= args.adds + len(TASKS) for size in args.sizes):
        parser.error(f"--sizes: each N must be larger than --adds + {len(TASKS)}")

    print(f"add_learner on CPU, {torch.get_num_threads()} thread, resolution {RESOLUTION}, height 3")
    print(f"{'N':>4} {'connections':>12} {'new per add':>12} {'median s':>9} {'max s':>8}")
    for size in args.sizes:
        connections, created, seconds = time_adds(size, args.adds)
        print(
            f"{size:>4} {connections:>12} {statistics.median(created):>12.0f} "
            f"{statistics.median(seconds):>9.4f} {max(seconds):>8.4f}"
        )


if __name__ == "__main__":
    main()
