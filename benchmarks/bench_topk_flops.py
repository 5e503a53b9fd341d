"""Forward FLOPs and time of a BAIM for K = 1, 2 and all, as ratios against running all learners.

One task squad of N heterogeneous learners (so K = N runs every learner), 32x32 images, batch 32, CPU with
one thread. Three connection settings: none (pure gating: compute should scale like K / N); every
candidate linear projection connection within height h = 3 (a selected learner's feeders must also run up
to the stages their connections read, so K = 1 costs more than 1 / N); and 10% of them surviving after
connection pruning (weights drawn at random from a fixed seed, then the 90% of smallest norm pruned, which
is about what 22 rounds of the paper's prune_ratio 0.1 leave). FLOPs come from baim.costs
(torch.utils.flop_counter: matmuls and convolutions only), times are the fastest of repeated forwards
(the minimum is the least disturbed by other processes on a shared machine).

Run: .venv/bin/python benchmarks/bench_topk_flops.py
"""

from __future__ import annotations

import time

import torch

from baim.config import LearnerSpec
from baim.costs import count_flops, count_params
from baim.learners import VAELearner
from baim.model import BAIM
from baim.model_config import ConnectionSpec
from baim.pruning import prune_connections

NUM_LEARNERS = 8  # N
RESOLUTION = 32
BATCH = 32
CONNECTION_HEIGHT = 3  # h
REPEATS = 5
SEED = 0


def heterogeneous_specs() -> list[LearnerSpec]:
    """N learners of different depth, width and latent size, like edges of different capacity."""
    generator = torch.Generator().manual_seed(SEED)
    specs = []
    for _ in range(NUM_LEARNERS):
        depth = int(torch.randint(2, 5, (1,), generator=generator))
        base = int(torch.randint(8, 25, (1,), generator=generator))
        widths = tuple(base * 2**s for s in range(depth))
        latent = int(torch.randint(16, 65, (1,), generator=generator))
        specs.append(LearnerSpec(widths=widths, latent_dim=latent, resolution=RESOLUTION))
    return specs


PRUNED_FRACTION = 0.9


def build(
    learners: list[tuple[str, str, VAELearner]], top_k: int, connections: tuple[ConnectionSpec, ...] | None
) -> BAIM:
    """connections=None: every candidate pair survives; (): none; else exactly those."""
    baim = BAIM.from_learners(
        ["faces"],
        learners,
        top_k=top_k,
        connection_height=CONNECTION_HEIGHT,
        seed=SEED,
        connections=connections,
    )
    return baim.eval()


def pruned_connections(learners: list[tuple[str, str, VAELearner]]) -> tuple[ConnectionSpec, ...]:
    """The connections that survive pruning PRUNED_FRACTION of them, given seeded random weights."""
    baim = build(learners, top_k=1, connections=None)
    generator = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for param in baim.connection_parameters():
            param.copy_(torch.randn(param.shape, generator=generator))
    prune_connections(baim, PRUNED_FRACTION)
    return tuple(baim.connections.specs)


def fastest_seconds(baim: BAIM, x: torch.Tensor) -> float:
    seconds = []
    with torch.no_grad():
        baim(x, "faces", seed=SEED)  # warm-up
        for _ in range(REPEATS):
            start = time.perf_counter()
            baim(x, "faces", seed=SEED)
            seconds.append(time.perf_counter() - start)
    return min(seconds)


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(SEED)
    learners = [(f"edge{n}", "faces", VAELearner(spec)) for n, spec in enumerate(heterogeneous_specs())]
    x = torch.rand(BATCH, 3, RESOLUTION, RESOLUTION, generator=torch.Generator().manual_seed(SEED))
    print(f"N = {NUM_LEARNERS} learners in one squad, batch {BATCH}, {RESOLUTION}x{RESOLUTION}, CPU 1 thread")
    for _, _, learner in learners:
        print(f"  {learner.spec.widths} latent {learner.spec.latent_dim}: {count_params(learner)} params")

    settings = {
        "no connections": (),
        f"all candidate connections (h = {CONNECTION_HEIGHT})": None,
        f"{1 - PRUNED_FRACTION:.0%} of the connections left by pruning": pruned_connections(learners),
    }
    for label, connections in settings.items():
        rows = []
        for top_k in (1, 2, NUM_LEARNERS):
            baim = build(learners, top_k, connections)
            with torch.no_grad():
                flops = count_flops(baim, x, "faces", seed=SEED)
            rows.append((top_k, flops, fastest_seconds(baim, x), len(baim.connections.specs)))
        all_flops, all_seconds = rows[-1][1], rows[-1][2]
        print(f"\n{label}: {rows[-1][3]} connections")
        print(f"  {'K':>5}  {'forward GFLOPs':>14}  {'FLOPs / all':>11}  {'ms':>8}  {'time / all':>10}")
        for top_k, flops, seconds, _ in rows:
            name = "all" if top_k == NUM_LEARNERS else str(top_k)
            print(
                f"  {name:>5}  {flops / 1e9:14.3f}  {flops / all_flops:11.3f}  {seconds * 1e3:8.1f}  "
                f"{seconds / all_seconds:10.3f}"
            )


if __name__ == "__main__":
    main()
