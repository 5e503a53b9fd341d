"""A stand-in for the few Ray calls the edge fleet makes, so its bookkeeping is tested without Ray."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import ray


@dataclass(frozen=True)
class FakeRef:
    """What a fake actor method's `.remote(...)` returns: which edge and method were called, with what."""

    edge_id: str
    method: str
    args: tuple[Any, ...]


class _Method:
    def __init__(self, edge_id: str, name: str, calls: list[FakeRef]) -> None:
        self.edge_id, self.name, self.calls = edge_id, name, calls

    def remote(self, *args: Any) -> FakeRef:
        ref = FakeRef(self.edge_id, self.name, args)
        self.calls.append(ref)
        return ref


class FakeActor:
    def __init__(self, edge_id: str, calls: list[FakeRef]) -> None:
        self.edge_id, self.calls = edge_id, calls

    def __getattr__(self, name: str) -> _Method:
        return _Method(self.edge_id, name, self.calls)


@dataclass
class FakeRay:
    """Every reference is ready at once; `answer(ref)` returns a reference's value or raises its error."""

    answer: Callable[[FakeRef], Any]
    nodes: list[dict[str, Any]] = field(default_factory=list)
    calls: list[FakeRef] = field(default_factory=list)
    killed: list[str] = field(default_factory=list)

    def install(self, monkeypatch: pytest.MonkeyPatch) -> FakeRay:
        fake = self

        class ActorClass:
            def options(self, **options: Any) -> ActorClass:
                return self

            def remote(self, edge: Any, *args: Any, **kwargs: Any) -> FakeActor:
                return FakeActor(edge.id, fake.calls)

        monkeypatch.setattr(ray, "put", lambda value: object())
        monkeypatch.setattr(ray, "remote", lambda cls: ActorClass())
        monkeypatch.setattr(ray, "wait", lambda refs, num_returns=1, timeout=None: (list(refs), []))
        monkeypatch.setattr(ray, "get", lambda ref, timeout=None: fake.answer(ref))
        monkeypatch.setattr(ray, "kill", lambda actor, no_restart=True: fake.killed.append(actor.edge_id))
        monkeypatch.setattr(ray, "nodes", lambda: fake.nodes)
        return self
