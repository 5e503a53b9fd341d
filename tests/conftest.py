"""Fixtures shared by every test tier."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.support.loop import LoopThread

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_CELEBA = Path(os.environ.get("BAIM_DATA_ROOT", REPO_ROOT.parent / "shared" / "data" / "celeba"))

# Two shared cores: one intra-op thread per process keeps Ray workers and pytest from oversubscribing.
torch.set_num_threads(1)
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(scope="session")
def shared_celeba() -> Path:
    """The shared real CelebA subset; tests that need real faces skip (and say why) when it is absent."""
    if not (SHARED_CELEBA / "img_align_celeba").is_dir():
        pytest.skip(f"shared CelebA subset not found at {SHARED_CELEBA}")
    return SHARED_CELEBA


@pytest.fixture
def loop() -> Iterator[LoopThread]:
    """An event loop in a background thread for an async actor's coroutines; stopped after the test."""
    running = LoopThread()
    yield running
    running.stop()
