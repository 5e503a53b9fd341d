"""Random small BAIMs for the property tests of baim/ (16x16 images, tiny widths, CPU)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hypothesis import strategies as st

from baim.config import LearnerSpec
from baim.learners import VAELearner
from baim.model import BAIM
from baim.model_config import BAIMConfig, ConnectionSpec, LearnerEntry, SquadSpec
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


def three_learners(connections: list[ConnectionSpec], height: int = 1, top_k: int = 1) -> BAIM:
    """a (task t0), b (task t1), c (task t0), each (4, 4) with latent 2; only the given connections,
    randomised."""
    spec = LearnerSpec((4, 4), 2, RESOLUTION)
    config = BAIMConfig(
        learners=(
            LearnerEntry("a", "t0", spec),
            LearnerEntry("b", "t1", spec),
            LearnerEntry("c", "t0", spec),
        ),
        squads=(SquadSpec("t0", ("a", "c")), SquadSpec("t1", ("b",))),
        top_k=top_k,
        connection_height=height,
        connections=tuple(connections),
    )
    torch.manual_seed(0)
    baim = BAIM(config)
    randomise_connections(baim, seed=1)
    return baim


def budget_pruned(recipe: BAIMRecipe, budget: float) -> BAIM:
    """recipe's BAIM (random, non-zero connections) pruned to `budget` by data-driven scores
    (`baim.compaction`), on mixed batches of random images."""
    from baim.compaction import budget_limits, connection_contributions, prune_to_targets

    baim = recipe.build()
    tasks = len(baim.config.tasks)
    batches = [(images(6, recipe.seed + b), torch.arange(6) % tasks) for b in range(2)]
    scores = connection_contributions(baim, batches, seed=recipe.seed)
    prune_to_targets(baim, scores, budget_limits(baim.config, budget))
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
