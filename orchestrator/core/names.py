"""Registry naming and size limits: the one definition of each, used by every layer above.

Owners name what a registry version holds: `edge/<edge_id>` (accepted uploads), `baim` (trained BAIMs),
`baim-fused` (a round's untrained input), `task/<task>` (decomposed task models: the full, exact ones),
`generation/<task>` (each task model's generation-only artifact, same version). Versions are `v000001`..
"""

from __future__ import annotations

from typing import Literal

EDGE_OWNER_PREFIX = "edge/"
TASK_OWNER_PREFIX = "task/"
GENERATION_OWNER_PREFIX = "generation/"
BAIM_OWNER = "baim"
FUSED_BAIM_OWNER = "baim-fused"

WEIGHTS_FILE = "weights.safetensors"
SPEC_FILE = "spec.json"
SHA256_FILE = "sha256"

# What an edge downloads for a task: "full" (task/<task>: reconstruction, personalisation) or "generation"
# (generation/<task>: generation only, no encoders).
DownloadKind = Literal["full", "generation"]
DOWNLOAD_KINDS: tuple[DownloadKind, ...] = ("full", "generation")

MAX_VERSION = 999_999  # version names are v000001 .. v999999

# Size limits. Uploads have their own, configurable limit (cloud.uploads.max_upload_bytes); these bound what
# the project itself wrote or serves, so absurd blobs are refused before they are hashed or parsed.
MAX_MODEL_BYTES = 1 << 30  # 1 GiB: any artifact the project writes (BAIMs, task models, FedAvg models)


def edge_owner(edge_id: str) -> str:
    return f"{EDGE_OWNER_PREFIX}{edge_id}"


def task_owner(task: str) -> str:
    return f"{TASK_OWNER_PREFIX}{task}"


def generation_owner(task: str) -> str:
    return f"{GENERATION_OWNER_PREFIX}{task}"


def version_name(version: int) -> str:
    return f"v{version:06d}"


def version_number(name: str) -> int:
    """`v000012` -> 12; ValueError names the malformed version."""
    digits = name.removeprefix("v")
    if not name.startswith("v") or not digits.isdigit():
        raise ValueError(f"version: expected 'v' followed by digits, received {name!r}")
    return int(digits)
