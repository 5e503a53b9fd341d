"""Seeds of the project's random streams, derived from a scenario seed: one recipe per kind of stream.

Two recipes, each stable across processes and Python runs (no `hash()`):
- `derive_seed(*key)`: named streams ("edge", "fedavg", a round's training noise, a learner's eps). The low
  `bits` bits of the first 8 bytes (little-endian) of sha256 over the key parts joined by NUL.
- `offset_seed(seed, offset)`: many cheap, numbered streams of one seed (per epoch and rank, per test batch),
  `(seed * 1_000_003 + offset) mod 2**63`.

Both reproduce, value for value, the helpers they replaced, so reports keep their numbers.
"""

from __future__ import annotations

import hashlib

SEED_BITS = 63  # torch.Generator.manual_seed takes a non-negative int64
STREAM_STRIDE = 1_000_003  # a prime: consecutive scenario seeds' numbered streams do not overlap early


def derive_seed(*key: str | int, bits: int = SEED_BITS) -> int:
    """The seed of the stream named by `key` (e.g. `derive_seed("edge", 7, "edge-3")`)."""
    if not 1 <= bits <= 64:
        raise ValueError(f"bits: expected 1..64, received {bits}")
    digest = hashlib.sha256("\0".join(str(part) for part in key).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << bits) - 1)


def offset_seed(seed: int, offset: int) -> int:
    """The seed of numbered stream `offset` of `seed`."""
    return (seed * STREAM_STRIDE + offset) % 2**SEED_BITS


def noise_seed(scenario_seed: int, purpose: str) -> int:
    """Base seed of one noise stream of the cloud (e.g. "round 1 train", "test"); 48 bits."""
    return derive_seed(purpose, scenario_seed, bits=48)


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """Seed of the global RNG for one (epoch, rank) of a Ray Train run; independent of restarts."""
    # = ((seed * 1_000_003 + epoch) * 1_009 + rank) mod 2**63, the recipe the runs have always used
    return offset_seed(seed * 1_009, epoch * 1_009 + rank)


def eval_seed(seed: int, task_index: int, batch_index: int) -> int:
    """Noise seed of one test batch of a Ray Train run (noise_for keys it by learner name too)."""
    return offset_seed(seed, task_index * 10_007 + batch_index)
