"""serve.metrics: the sum of several processes' Prometheus metrics, as GET /metrics shows it."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from serve.metrics import MetricsAggregate, merge, render, snapshot


def replica_registry(requests: int, seconds: list[float]) -> CollectorRegistry:
    """One process's registry: a labelled counter and a histogram, as serve.guard defines them."""
    registry = CollectorRegistry()
    counter = Counter("requests", "Requests.", ["route"], registry=registry)
    histogram = Histogram("latency_seconds", "Latency.", buckets=(0.1, 1.0), registry=registry)
    counter.labels(route="/generate").inc(requests)
    for value in seconds:
        histogram.observe(value)
    return registry


def values(families: list[dict], name: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    family = next(f for f in families if f["name"] == name)
    return {(sample, tuple(sorted(labels.items()))): value for sample, labels, value in family["samples"]}


def test_one_snapshot_renders_exactly_what_the_registry_renders() -> None:
    registry = replica_registry(3, [0.05, 0.5, 2.0])
    assert render(merge([snapshot(registry)])) == generate_latest(registry)


def test_counters_and_buckets_add_up_and_created_takes_the_earliest() -> None:
    # Prepare: two replicas
    first = snapshot(replica_registry(3, [0.05, 0.5]))
    second = snapshot(replica_registry(4, [2.0]))

    # Execute
    summed = merge([first, second])

    # Assert: hand-computed sums
    requests = values(summed, "requests")
    assert requests[("requests_total", (("route", "/generate"),))] == 7.0
    created = [
        values(s, "requests")[("requests_created", (("route", "/generate"),))] for s in (first, second)
    ]
    assert requests[("requests_created", (("route", "/generate"),))] == min(created)
    latency = values(summed, "latency_seconds")
    assert latency[("latency_seconds_bucket", (("le", "0.1"),))] == 1.0  # 0.05
    assert latency[("latency_seconds_bucket", (("le", "1.0"),))] == 2.0  # 0.05, 0.5
    assert latency[("latency_seconds_bucket", (("le", "+Inf"),))] == 3.0
    assert latency[("latency_seconds_count", ())] == 3.0
    assert latency[("latency_seconds_sum", ())] == pytest.approx(2.55)


def test_the_aggregate_keeps_each_sources_latest_snapshot() -> None:
    aggregate = MetricsAggregate()
    aggregate.push("replica-a", snapshot(replica_registry(1, [])))
    aggregate.push("replica-b", snapshot(replica_registry(2, [])))
    aggregate.push("replica-a", snapshot(replica_registry(5, [])))  # a later snapshot replaces the earlier

    summed = values(aggregate.families(), "requests")
    own = values(aggregate.families("replica-b"), "requests")

    assert aggregate.sources() == ["replica-a", "replica-b"]
    assert summed[("requests_total", (("route", "/generate"),))] == 7.0
    assert own[("requests_total", (("route", "/generate"),))] == 2.0
    assert b'requests_total{route="/generate"} 7.0' in aggregate.render()
    with pytest.raises(ValueError, match="source"):
        aggregate.push("", [])
