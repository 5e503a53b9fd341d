"""One local Ray instance per test session, with fixed small resources (see STACK.md)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import ray


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """A local embedded Ray instance shared by the integration tests; shut down at the end."""
    if ray.is_initialized():
        ray.shutdown()
    # address="local": always a fresh instance, never an existing cluster that another process started.
    ray.init(
        address="local", num_cpus=4, include_dashboard=False, configure_logging=False, log_to_driver=False
    )
    yield
    try:
        from ray import serve

        serve.shutdown()
    finally:
        ray.shutdown()
