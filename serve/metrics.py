"""One `/metrics` for many replicas: each process's Prometheus samples, summed across processes.

Requests are counted where they are served, and with one hop per request that is in the task replicas (one
or more per task), not in the index that answers `GET /metrics`. So every replica sends a `snapshot` of its
metrics registry now and then, and a `MetricsAggregate` keeps the latest snapshot of each source and renders
their sum in Prometheus' text format. Counters and histograms add up across processes; `_created`
timestamps take the earliest. A source that stops sending (a replica that was replaced) keeps its last
counts, so the totals never go backwards. No Ray here: serve.app wraps this in a deployment.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric

from orchestrator.core.metrics import METRICS_REGISTRY

# A family: {"name", "documentation", "type", "unit", "samples": [[sample name, {label: value}, value]]}
FamilySnapshot = dict[str, Any]
CREATED_SUFFIX = "_created"


def snapshot(registry: CollectorRegistry = METRICS_REGISTRY) -> list[FamilySnapshot]:
    """Every family of `registry` with its current samples, as plain data, in the registry's order."""
    return [
        {
            "name": family.name,
            "documentation": family.documentation,
            "type": family.type,
            "unit": family.unit,
            "samples": [[sample.name, dict(sample.labels), float(sample.value)] for sample in family.samples],
        }
        for family in registry.collect()
    ]


def merge(snapshots: list[list[FamilySnapshot]]) -> list[FamilySnapshot]:
    """The sum of several snapshots, sample by sample (the earliest `_created`), in first-seen order."""
    headers: dict[str, FamilySnapshot] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for families in snapshots:
        for family in families:
            name = family["name"]
            headers.setdefault(name, {key: family[key] for key in ("name", "documentation", "type", "unit")})
            summed = values.setdefault(name, {})
            for sample_name, labels, value in family["samples"]:
                key = (sample_name, tuple(sorted(labels.items())))
                if key not in summed:
                    summed[key] = value
                elif sample_name.endswith(CREATED_SUFFIX):
                    summed[key] = min(summed[key], value)
                else:
                    summed[key] += value
    return [
        {
            **headers[name],
            "samples": [[sample, dict(labels), value] for (sample, labels), value in values[name].items()],
        }
        for name in headers
    ]


class _Families:
    """A prometheus_client collector yielding fixed families."""

    def __init__(self, families: list[FamilySnapshot]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        for family in self._families:
            metric = Metric(family["name"], family["documentation"], family["type"], family["unit"])
            for sample_name, labels, value in family["samples"]:
                metric.add_sample(sample_name, labels, value)
            yield metric


def render(families: list[FamilySnapshot]) -> bytes:
    """Prometheus text format of `families` (what `generate_latest` writes for a live registry)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(families))  # type: ignore[arg-type]
    return generate_latest(registry)


class MetricsAggregate:
    """The latest snapshot of every source (a replica), and their sum."""

    def __init__(self) -> None:
        self._sources: dict[str, list[FamilySnapshot]] = {}

    def push(self, source: str, families: list[FamilySnapshot]) -> None:
        if not isinstance(source, str) or not source:
            raise ValueError(f"source: expected a non-empty string, received {source!r}")
        self._sources[source] = families

    def sources(self) -> list[str]:
        return sorted(self._sources)

    def families(self, source: str | None = None) -> list[FamilySnapshot]:
        """The sum over every source, or one source's own snapshot (KeyError when unknown)."""
        if source is not None:
            return self._sources[source]
        return merge([self._sources[name] for name in sorted(self._sources)])

    def render(self, source: str | None = None) -> bytes:
        return render(self.families(source))
