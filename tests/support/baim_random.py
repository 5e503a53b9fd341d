"""Random small BAIMs for the property tests of baim/ (16x16 images, tiny widths, CPU)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hypothesis import strategies as st

from baim.config import LearnerSpec
from baim.learners import VAELearner
from baim.model import BAIM
from baim.pruning import prune_connections

RESOLUTION = 16


@dataclass(frozen=True)
class BAIMRecipe:
    specs: tuple[LearnerSpec, ...]
    tasks_of: tuple[int, ...]  # task index of each learner, arrival order
    num_tasks: int
    top_k: int
    height: int
    scope: str
    prune_ratio: float
    seed: int

    def build(self, connection_scale: float = 0.3) -> BAIM:
        """The BAIM with random learners, random (non-zero) connections, then pruned by prune_ratio."""
        torch.manual_seed(self.seed)
        tasks = [f"t{m}" for m in range(self.num_tasks)]
        learners = [
            (f"e{n}", tasks[task], VAELearner(spec))
            for n, (spec, task) in enumerate(zip(self.specs, self.tasks_of, strict=True))
        ]
        baim = BAIM.from_learners(
            tasks,
            learners,
            top_k=self.top_k,
            connection_height=self.height,
            connection_scope=self.scope,
            seed=self.seed,
        )
        randomise_connections(baim, self.seed, connection_scale)
        prune_connections(baim, self.prune_ratio)
        return baim


def randomise_connections(baim: BAIM, seed: int, scale: float = 0.3) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in baim.connection_parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * scale)


@st.composite
def learner_specs(draw: st.DrawFn) -> LearnerSpec:
    depth = draw(st.integers(1, 3))
    widths = tuple(draw(st.sampled_from([2, 3, 4])) for _ in range(depth))
    return LearnerSpec(widths=widths, latent_dim=draw(st.integers(2, 4)), resolution=RESOLUTION)


@st.composite
def baim_recipes(draw: st.DrawFn, min_tasks: int = 2, max_learners: int = 5) -> BAIMRecipe:
    num_learners = draw(st.integers(min_tasks, max_learners))
    num_tasks = draw(st.integers(min_tasks, min(3, num_learners)))
    # Every task gets at least one learner; the rest are spread at random, in random arrival order.
    tasks_of = list(range(num_tasks)) + [
        draw(st.integers(0, num_tasks - 1)) for _ in range(num_learners - num_tasks)
    ]
    tasks_of = draw(st.permutations(tasks_of))
    return BAIMRecipe(
        specs=tuple(draw(learner_specs()) for _ in range(num_learners)),
        tasks_of=tuple(tasks_of),
        num_tasks=num_tasks,
        top_k=draw(st.integers(1, 3)),
        height=draw(st.integers(0, 3)),
        scope=draw(st.sampled_from(["all", "squad"])),
        prune_ratio=draw(st.sampled_from([0.0, 0.3, 0.6, 0.9])),
        seed=draw(st.integers(0, 2**16)),
    )


def images(batch: int, seed: int) -> torch.Tensor:
    return torch.rand(batch, 3, RESOLUTION, RESOLUTION, generator=torch.Generator().manual_seed(seed))
