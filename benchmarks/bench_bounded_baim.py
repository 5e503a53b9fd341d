"""What a bound on learners per task saves: BAIM parameters and fusion seconds for a squad of N learners.

scenarios/scale_1k.yaml's shape (tiny learners: widths [4], latent 2, 8x8 images; top_k 1, connection height
0): N learners of one task are fused one by one, as the coordinator does with N admitted uploads; prints the
BAIM's parameters and the total fusion seconds per N. With `cloud.max_learners_per_task: M` a task's squad is
at most M, whatever the number of edges. Asserts nothing (one thread; the machine may be loaded).

    .venv/bin/python benchmarks/bench_bounded_baim.py [--sizes 8 64 500]
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from baim.config import LearnerSpec
from baim.costs import count_params
from baim.learners import VAELearner
from baim.model import BAIM

SPEC = LearnerSpec((4,), 2, 8)


def fuse_squad(size: int) -> tuple[int, float]:
    """(BAIM parameters, seconds to fuse) for one task's squad of `size` seeded tiny learners."""
    torch.manual_seed(0)
    learners = [(f"m-{i}", "male", VAELearner(SPEC)) for i in range(size)]
    started = time.perf_counter()
    baim = BAIM.from_learners(["male"], learners[:1], top_k=1, connection_height=0, seed=7)
    for name, task, learner in learners[1:]:
        baim.add_learner(name, task, learner)
    return count_params(baim), time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[8, 64, 500], help="squad sizes N")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"load average {os.getloadavg()[0]:.1f}")
    print("| learners in the squad | BAIM params | fusion seconds |")
    print("|---|---|---|")
    for size in args.sizes:
        params, seconds = fuse_squad(size)
        print(f"| {size:,} | {params:,} | {seconds:.2f} |", flush=True)


if __name__ == "__main__":
    main()
