"""Seeded, disjoint test / cloud / holdout / edge shards of a data source (`make_partitions`)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np

from orchestrator.core.errors import ScenarioError
from orchestrator.core.scenario import (
    DirichletPartition,
    expression_attributes,
)
from orchestrator.data.sources import PARTITION_CODES, DataSource

if TYPE_CHECKING:
    from orchestrator.core.scenario import Scenario

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------------
# Partitions


@dataclass
class Partitions:
    """Disjoint index lists into a DataSource. Every list is sorted; no index appears twice anywhere."""

    seed: int
    data_kind: str
    num_images: int
    test_split_drawn: bool
    test: dict[str, list[int]] = field(default_factory=dict)
    cloud: dict[str, list[int]] = field(default_factory=dict)
    holdout: dict[str, list[int]] = field(default_factory=dict)
    edges: dict[str, list[int]] = field(default_factory=dict)

    def groups(self) -> dict[str, dict[str, list[int]]]:
        return {"test": self.test, "cloud": self.cloud, "holdout": self.holdout, "edges": self.edges}

    def check_disjoint(self) -> None:
        """Raise ValueError naming the first index used by two shards."""
        owner: dict[int, str] = {}
        for group, shards in self.groups().items():
            for key, indices in shards.items():
                for index in indices:
                    if index in owner:
                        raise ValueError(f"index {index} is in both {owner[index]} and {group}[{key}]")
                    if not 0 <= index < self.num_images:
                        raise ValueError(f"{group}[{key}]: index {index} outside 0..{self.num_images - 1}")
                    owner[index] = f"{group}[{key}]"

    def to_json(self) -> str:
        document = {
            "seed": self.seed,
            "data_kind": self.data_kind,
            "num_images": self.num_images,
            "test_split_drawn": self.test_split_drawn,
            **self.groups(),
        }
        return json.dumps(document, indent=1)

    @classmethod
    def from_json(cls, text: str) -> Partitions:
        """Rebuild from `to_json` output; ValueError names the first malformed entry."""
        document = json.loads(text)
        if not isinstance(document, dict):
            raise ValueError(f"partitions JSON must be an object, received {type(document).__name__}")
        for key, kind in (("seed", int), ("data_kind", str), ("num_images", int), ("test_split_drawn", bool)):
            if not isinstance(document.get(key), kind):
                raise ValueError(
                    f"partitions JSON: {key!r} must be {kind.__name__}, received {document.get(key)!r}"
                )
        groups: dict[str, dict[str, list[int]]] = {}
        for group in ("test", "cloud", "holdout", "edges"):
            shards = document.get(group)
            if not isinstance(shards, dict):
                raise ValueError(f"partitions JSON: {group!r} must be an object of index lists")
            for key, indices in shards.items():
                if not isinstance(indices, list) or not all(
                    isinstance(i, int) and not isinstance(i, bool) for i in indices
                ):
                    raise ValueError(f"partitions JSON: {group}[{key}] must be a list of integers")
            groups[group] = shards
        partitions = cls(
            seed=document["seed"],
            data_kind=document["data_kind"],
            num_images=document["num_images"],
            test_split_drawn=document["test_split_drawn"],
            **groups,
        )
        partitions.check_disjoint()
        return partitions


DIRICHLET_STREAM = 0xD1D1  # second entropy word of the Dirichlet skew's random stream


def attribute_cells(source: DataSource, attributes: list[str]) -> np.ndarray:
    """Per image, the index (0 .. 2**len(attributes) - 1) of its combination of the attributes' values."""
    columns = [source.attrs[:, source.attr_names.index(name)].astype(np.int64) for name in attributes]
    cells = np.zeros(source.num_images, dtype=np.int64)
    for bit, column in enumerate(columns):
        cells |= column << bit
    return cells


def dirichlet_draw(
    what: str, cells: np.ndarray, candidates: np.ndarray, size: int, alpha: float, rng: np.random.Generator
) -> np.ndarray:
    """`size` of `candidates` (image indices, `cells` their attribute combinations), skewed: the shares of
    the combinations are drawn from Dirichlet(alpha * their shares among the candidates), so a large alpha
    approaches a uniform draw and a small one concentrates the shard on few combinations.

    Counts come from a multinomial draw; what a combination cannot supply goes to the others, in the order
    of their drawn shares. Raises ScenarioError when the candidates are fewer than `size`.
    """
    if size > len(candidates):
        raise ScenarioError(f"{what}: requested {size} images, {len(candidates)} are left")
    present, available = np.unique(cells, return_counts=True)
    prior = available / available.sum()
    shares = rng.dirichlet(np.maximum(alpha * prior, 1e-12))
    shares = np.nan_to_num(shares, nan=0.0)
    shares = shares / shares.sum() if shares.sum() > 0 else prior
    counts = np.minimum(rng.multinomial(size, shares), available)
    for cell in np.argsort(-shares, kind="stable"):  # the shortfall, to the most favoured cells first
        short = size - int(counts.sum())
        if short == 0:
            break
        counts[cell] += min(short, int(available[cell] - counts[cell]))
    chosen = [
        rng.permutation(candidates[cells == cell])[:count]
        for cell, count in zip(present, counts, strict=True)
    ]
    return np.concatenate(chosen) if chosen else np.zeros(0, dtype=np.int64)


def shard_skew(cells: np.ndarray, shards: list[list[int]], pool: np.ndarray) -> float:
    """Mean total-variation distance between each shard's attribute-combination mix and the pool's
    (0: every shard mixes like the pool; near 1: each holds combinations the pool rarely has)."""
    width = int(cells.max()) + 1
    reference = np.bincount(cells[pool], minlength=width) / max(1, int(pool.sum()))
    distances = []
    for shard in shards:
        mix = np.bincount(cells[np.asarray(shard, dtype=np.int64)], minlength=width) / max(1, len(shard))
        distances.append(0.5 * float(np.abs(mix - reference).sum()))
    return float(np.mean(distances)) if distances else 0.0


def make_partitions(source: DataSource, scenario: Scenario) -> Partitions:
    """Seeded, disjoint shards: per task test, holdout and cloud images, then one non-IID shard per edge
    (every edge of the run, including those that join later) drawn from the images of the edge's task.

    Draw order is fixed (test for each task, then holdout, then cloud, then edges in declaration order),
    so the same seed and data give the same partitions. Raises ScenarioError naming the task or edge when
    the data cannot supply a requested size.
    """
    masks: dict[str, np.ndarray] = {}
    for task in scenario.tasks:
        missing = sorted(expression_attributes(task.parsed()) - set(source.attr_names))
        if missing:
            raise ScenarioError(
                f"task {task.name!r}: attribute(s) {', '.join(missing)} not in the {source.kind} data at "
                f"{source.root}; valid names: {', '.join(source.attr_names)}"
            )
        masks[task.name] = source.matching(task.expression)

    training_codes = [PARTITION_CODES[name] for name in scenario.data.training_partitions]
    training_pool = np.isin(source.partition, training_codes)
    test_pool = training_pool if source.test_split_drawn else source.partition == PARTITION_CODES["test"]
    used = np.zeros(source.num_images, dtype=bool)
    rng = np.random.default_rng(scenario.seed)
    partitions = Partitions(
        seed=scenario.seed,
        data_kind=source.kind,
        num_images=source.num_images,
        test_split_drawn=source.test_split_drawn,
    )

    def draw(what: str, pool: np.ndarray, size: int | Literal["all"]) -> list[int]:
        candidates = np.flatnonzero(pool & ~used)
        if size == "all":
            chosen = candidates
        else:
            if size > len(candidates):
                raise ScenarioError(
                    f"{what}: requested {size} images, the {source.kind} data has {len(candidates)} left "
                    f"({source.num_images} images in all)"
                )
            chosen = rng.permutation(candidates)[:size]
        used[chosen] = True
        return sorted(int(i) for i in chosen)

    for task in scenario.tasks:
        test_size = scenario.test_size(task)
        if test_size == "all" and source.test_split_drawn:
            raise ScenarioError(
                f"task {task.name!r}: test size 'all' needs an official test partition, and the partition "
                f"file at {source.root} has no test images; give a number instead"
            )
        partitions.test[task.name] = draw(
            f"task {task.name!r} test split ({task.expression})", masks[task.name] & test_pool, test_size
        )
    for task in scenario.tasks:
        partitions.holdout[task.name] = draw(
            f"task {task.name!r} holdout ({task.expression})",
            masks[task.name] & training_pool,
            scenario.holdout_size(task),
        )
    for task in scenario.tasks:
        partitions.cloud[task.name] = draw(
            f"task {task.name!r} cloud shard ({task.expression})",
            masks[task.name] & training_pool,
            scenario.cloud_size(task),
        )
    skew = scenario.data.partition
    if isinstance(skew, DirichletPartition):
        missing = sorted(set(skew.attributes) - set(source.attr_names))
        if missing:
            raise ScenarioError(
                f"data.partition.attributes: {', '.join(missing)} not in the {source.kind} data"
            )
        cells = attribute_cells(source, skew.attributes)
        # A stream of its own: the uniform draws above stay those of a scenario without the skew.
        skew_rng = np.random.default_rng([scenario.seed, DIRICHLET_STREAM])
    for edge in scenario.all_edges():
        task = scenario.task(edge.task)
        what = f"edge {edge.id!r} shard (task {task.name!r}: {task.expression})"
        pool = masks[task.name] & training_pool
        if isinstance(skew, DirichletPartition):
            chosen = dirichlet_draw(what, cells[pool & ~used], np.flatnonzero(pool & ~used),
                                    edge.shard_size, skew.alpha, skew_rng)  # fmt: skip
            used[chosen] = True
            partitions.edges[edge.id] = sorted(int(i) for i in chosen)
        else:
            partitions.edges[edge.id] = draw(what, pool, edge.shard_size)
    # Tasks that appear later (`new_task` events) are drawn last, so that they change no other shard: their
    # test split, and the k shots the cloud holds of them (their cloud shard; no holdout, no edges).
    for event in scenario.new_tasks():
        new = event.task
        missing = sorted(expression_attributes(new.parsed()) - set(source.attr_names))
        if missing:
            raise ScenarioError(
                f"new task {new.name!r}: attribute(s) {', '.join(missing)} not in the {source.kind} data at "
                f"{source.root}; valid names: {', '.join(source.attr_names)}"
            )
        mask = source.matching(new.expression)
        partitions.test[new.name] = draw(
            f"new task {new.name!r} test split ({new.expression})", mask & test_pool, scenario.test_size(new)
        )
        partitions.cloud[new.name] = draw(
            f"new task {new.name!r} shots ({new.expression})", mask & training_pool, event.shots
        )
    logger.info(
        "partitions: %d test, %d holdout, %d cloud, %d edge images (seed %d)",
        *(sum(len(v) for v in shards.values()) for shards in partitions.groups().values()),
        scenario.seed,
    )
    return partitions
