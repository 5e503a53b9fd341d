"""Dirichlet (non-IID) edge shards: seeded, deterministic, disjoint, skew growing as alpha falls."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from orchestrator.core.scenario import DataConfig, Scenario
from orchestrator.data.partitions import attribute_cells, make_partitions, shard_skew
from orchestrator.data.sources import DataSource, resolve_source

ATTRIBUTES = ["Smiling", "Young", "Eyeglasses"]
MODEL = {"widths": [4], "latent_dim": 2}


@pytest.fixture(scope="module")
def source() -> DataSource:
    return resolve_source(DataConfig(root="/nonexistent/celeba", procedural={"num_images": 6000}))


def scenario(partition: dict[str, Any] | None, seed: int = 3) -> Scenario:
    data: dict[str, Any] = {"root": "/nonexistent/celeba", "procedural": {"num_images": 6000},
                            "test_per_task": 16, "cloud_per_task": 16, "holdout_per_task": 8}  # fmt: skip
    if partition is not None:
        data["partition"] = partition
    return Scenario.model_validate({
        "seed": seed,
        "data": data,
        "tasks": [{"name": "male", "expression": "Male"}, {"name": "female", "expression": "not Male"}],
        "edge_groups": [
            {"prefix": "m", "count": 20, "task": "male", "shard_size": 40, "model": MODEL},
            {"prefix": "f", "count": 20, "task": "female", "shard_size": 40, "model": MODEL},
        ],
    })  # fmt: skip


def skew(source: DataSource, alpha: float, seed: int = 3) -> float:
    s = scenario({"kind": "dirichlet", "attributes": ATTRIBUTES, "alpha": alpha}, seed)
    partitions = make_partitions(source, s)
    partitions.check_disjoint()
    cells = attribute_cells(source, ATTRIBUTES)
    values = []
    for task in s.tasks:
        pool = source.matching(task.expression)
        shards = [partitions.edges[e] for e in s.squads()[task.name]]
        assert all(len(shard) == 40 for shard in shards)
        assert all(pool[shard].all() for shard in shards)  # still the task's images only
        values.append(shard_skew(cells, shards, pool))
    return float(np.mean(values))


def test_dirichlet_shards_are_deterministic_and_seeded(source: DataSource):
    dirichlet = {"kind": "dirichlet", "attributes": ATTRIBUTES, "alpha": 0.5}
    first = make_partitions(source, scenario(dirichlet))
    assert make_partitions(source, scenario(dirichlet)) == first
    other = make_partitions(source, scenario(dirichlet, seed=4))
    assert other.edges != first.edges


def test_dirichlet_leaves_test_cloud_and_holdout_as_the_uniform_draw(source: DataSource):
    uniform = make_partitions(source, scenario(None))
    skewed = make_partitions(source, scenario({"kind": "dirichlet", "attributes": ATTRIBUTES, "alpha": 0.1}))
    assert (skewed.test, skewed.cloud, skewed.holdout) == (uniform.test, uniform.cloud, uniform.holdout)
    assert skewed.edges != uniform.edges


def test_skew_grows_as_alpha_falls(source: DataSource):
    skews = [skew(source, alpha) for alpha in (1000.0, 10.0, 1.0, 0.1)]
    assert skews == sorted(skews), skews
    assert skews[0] < 0.2 < skews[-1]  # near-uniform mix at large alpha; strong skew at small
    uniform = make_partitions(source, scenario(None))
    cells = attribute_cells(source, ATTRIBUTES)
    pool = source.matching("Male")
    uniform_skew = shard_skew(cells, [uniform.edges[f"m-{i}"] for i in range(20)], pool)
    assert abs(uniform_skew - skews[0]) < 0.1  # alpha -> infinity approaches the uniform draw


def test_a_shard_larger_than_the_task_fails_naming_the_edge(source: DataSource):
    partition = {"kind": "dirichlet", "attributes": ["Smiling"], "alpha": 1.0}
    document = scenario(partition).model_dump(mode="json")
    document["edge_groups"][0]["shard_size"] = 5000
    with pytest.raises(Exception, match=r"edge 'm-\d+' shard"):
        make_partitions(source, Scenario.model_validate(document))


@pytest.mark.parametrize(
    ("partition", "message"),
    [
        ({"kind": "dirichlet", "attributes": ["Smilin"], "alpha": 1.0}, "unknown attribute"),
        ({"kind": "dirichlet", "attributes": ["Smiling"], "alpha": 0}, "greater than 0"),
        ({"kind": "dirichlet", "attributes": [], "alpha": 1.0}, "at least 1"),
        ({"kind": "zipf"}, "does not match any of the expected tags"),
    ],
)
def test_bad_partition_configs_are_named(partition: dict[str, Any], message: str):
    with pytest.raises(ValidationError, match=message):
        scenario(partition)
