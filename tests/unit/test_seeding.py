"""The seed recipes: the values the replaced helpers produced (pinned), and the recipes' own properties."""

from __future__ import annotations

import hashlib

import pytest
import torch

from baim.learners import noise_for
from baim.seeding import derive_seed, epoch_seed, eval_seed, noise_seed, offset_seed


def test_named_streams_keep_the_values_of_the_helpers_they_replaced() -> None:
    # Values printed by the old helpers (coordinator.noise_seed, fedavg.fedavg_seed, edge.edge_seed) at the
    # commit before they moved here; report.json numbers depend on them.
    assert noise_seed(7, "round 1 train") == 228493960824807
    assert noise_seed(0, "test") == 21683838004812
    assert derive_seed("fedavg", 7, "init") == 7215014867072497114
    assert derive_seed("edge", 7, "phone-0") == 6344584166298076151


def test_numbered_streams_keep_the_values_of_the_helpers_they_replaced() -> None:
    # orchestrator.cloud.train.epoch_seed / eval_seed before the move; the last one wraps modulo 2**63.
    assert epoch_seed(7, 3, 1) == 7063024217 == ((7 * 1_000_003 + 3) * 1_009 + 1)
    assert eval_seed(7, 1, 5) == 7010033 == 7 * 1_000_003 + 10_007 + 5
    assert epoch_seed(2**40, 10**6, 3) == 2605916226117180995
    assert epoch_seed(2**40, 10**6, 3) == ((2**40 * 1_000_003 + 10**6) * 1_009 + 3) % 2**63


def test_derive_seed_is_sha256_of_the_nul_joined_key() -> None:
    digest = hashlib.sha256(b"edge-0\x00123").digest()
    expected = int.from_bytes(digest[:8], "little") & (2**63 - 1)

    assert derive_seed("edge-0", 123) == expected == 5615760818613837498
    # Fewer bits keep the low bits: noise_seed's 48-bit seeds are the first 6 digest bytes.
    assert derive_seed("edge-0", 123, bits=48) == int.from_bytes(digest[:6], "little")


def test_noise_for_draws_from_the_derived_seed() -> None:
    expected = torch.randn(2, 3, generator=torch.Generator().manual_seed(derive_seed("edge-0", 123)))

    assert torch.equal(noise_for("edge-0", 123, 2, 3), expected)


def test_offset_seed_wraps_into_a_non_negative_int64() -> None:
    assert offset_seed(0, 5) == 5
    assert offset_seed(1, 0) == 1_000_003
    assert offset_seed(2**62, 0) == (2**62 * 1_000_003) % 2**63
    assert offset_seed(-1, 0) == 2**63 - 1_000_003  # Python's modulo is non-negative


def test_derive_seed_rejects_a_bit_count_outside_a_seed() -> None:
    with pytest.raises(ValueError, match=r"bits: expected 1\.\.64, received 0"):
        derive_seed("x", bits=0)
