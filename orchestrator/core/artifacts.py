"""Artifacts: safetensors weights + a canonical JSON spec + a sha256 over both, and their verified loading.

An artifact crosses process boundaries as primitive types only (`ArtifactPayload`). Nothing here unpickles:
safetensors' header check rejects pickles, torch.save files, truncated blobs and garbage before any tensor
is built. `load_module` is the one way from a payload to a module: verify, rebuild from the spec, check
shapes, load strictly.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save
from torch import nn

from baim.serialization import build_from_spec, kinds_of
from baim.serialization import canonical_json as spec_to_json
from orchestrator.core.errors import ArtifactRejected
from orchestrator.core.names import MAX_MODEL_BYTES

logger = logging.getLogger(__name__)

DEFAULT_ALLOWED_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
# safetensors layout: 8-byte little-endian header length, JSON header, then the raw tensor bytes.
_HEADER_LENGTH_BYTES = 8
ModuleT = TypeVar("ModuleT", bound=nn.Module)


@dataclass(frozen=True)
class ArtifactPayload:
    """An artifact as it travels: safetensors bytes, canonical spec JSON, hex sha256 over both."""

    weights: bytes
    spec_json: str
    sha256: str

    @property
    def nbytes(self) -> int:
        """The bytes actually sent: weights plus the UTF-8 spec."""
        return len(self.weights) + len(self.spec_json.encode())


def canonical_json(obj: Any) -> bytes:
    """The one JSON encoding that the sha256 covers (baim's, so `baim.to_bytes` specs pass as canonical)."""
    return spec_to_json(obj).encode()


def compute_sha256(spec_json: str, weights: bytes) -> str:
    """Hex sha256 of `spec_json + b"\\n" + weights`; spec_json is canonical_json(spec) when packed."""
    digest = hashlib.sha256()
    digest.update(spec_json.encode())
    digest.update(b"\n")
    digest.update(weights)
    return digest.hexdigest()


def pack_state(state_dict: Mapping[str, torch.Tensor], spec: dict[str, Any]) -> ArtifactPayload:
    """Serialize float tensors and a spec into a payload. Raises ValueError on a bad spec or tensor.

    Finiteness is not checked here: the receiver decides (a poisoned edge must be able to send NaNs).
    """
    _check_spec_object(spec)
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(
                f"state_dict[{name!r}]: expected a torch.Tensor, received {type(tensor).__name__}"
            )
        if not tensor.is_floating_point():
            raise ValueError(
                f"state_dict[{name!r}]: expected a floating-point tensor, received dtype {tensor.dtype}"
            )
        # clone: safetensors refuses tensors that share storage (tied weights, views of one buffer).
        tensors[name] = tensor.detach().to("cpu").contiguous().clone()
    if not tensors:
        raise ValueError("state_dict: expected at least one tensor, received none")
    weights = safetensors_save(tensors)
    spec_json = canonical_json(spec).decode()
    return ArtifactPayload(weights=weights, spec_json=spec_json, sha256=compute_sha256(spec_json, weights))


def pack_module(module: torch.nn.Module, spec: dict[str, Any]) -> ArtifactPayload:
    """pack_state over a module's state_dict (parameters and buffers; all must be float)."""
    return pack_state(module.state_dict(), spec)


def unpack_payload(
    payload: ArtifactPayload,
    *,
    artifact_id: str,
    max_bytes: int,
    allowed_dtypes: tuple[torch.dtype, ...] = DEFAULT_ALLOWED_DTYPES,
    allowed_kinds: tuple[str, ...] | None = None,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Verify a payload completely and return (spec, tensors). Raises ArtifactRejected with the reason
    and its code (see orchestrator.core.errors.ArtifactRejected).

    Order: types and size (before reading anything), sha256 over the raw bytes, spec JSON, safetensors
    header and data, dtypes, finiteness.
    """

    def reject(code: str, reason: str) -> ArtifactRejected:
        logger.warning("artifact %s rejected (%s): %s", artifact_id, code, reason)
        return ArtifactRejected(artifact_id, reason, code=code)

    check_payload_integrity(payload, artifact_id=artifact_id, max_bytes=max_bytes)
    spec = _parse_spec(payload.spec_json, reject)
    if allowed_kinds is not None and spec["kind"] not in allowed_kinds:
        raise reject(
            "bad_spec", f"spec kind: expected one of {list(allowed_kinds)}, received {spec['kind']!r}"
        )

    tensors = _parse_weights(payload.weights, reject)
    for name, tensor in tensors.items():
        if tensor.dtype not in allowed_dtypes:
            allowed = ", ".join(str(d) for d in allowed_dtypes)
            raise reject(
                "bad_dtype", f"tensor {name!r}: dtype {tensor.dtype} not allowed (allowed: {allowed})"
            )
    for name, tensor in tensors.items():
        finite = torch.isfinite(tensor)
        if not bool(finite.all()):
            bad = int((~finite).sum())
            raise reject("non_finite", f"tensor {name!r}: {bad} of {tensor.numel()} values are NaN or Inf")
    return spec, tensors


def load_module(
    payload: ArtifactPayload,
    module_type: type[ModuleT],
    *,
    artifact_id: str,
    max_bytes: int = MAX_MODEL_BYTES,
    allowed_kinds: tuple[str, ...] | None = None,
    check_spec: Callable[[dict[str, Any]], None] | None = None,
) -> ModuleT:
    """Verify a payload (`unpack_payload`), rebuild its module from the spec and load the weights strictly.

    `module_type` restricts the spec kinds (BAIM: "baim"; nn.Module: every kind), `allowed_kinds` narrows
    them further; `check_spec(spec)` runs before anything is built (it raises to refuse the spec). Raises
    ArtifactRejected: the `unpack_payload` codes, bad_spec (the spec does not build) or wrong_shapes.
    Tensors of another allowed float dtype are cast to the module's.
    """
    kinds = kinds_of(module_type)
    if allowed_kinds is not None:
        kinds = tuple(kind for kind in kinds if kind in allowed_kinds)
    spec, tensors = unpack_payload(payload, artifact_id=artifact_id, max_bytes=max_bytes, allowed_kinds=kinds)
    if check_spec is not None:
        check_spec(spec)
    try:
        module = build_from_spec(spec)
    except (ValueError, TypeError) as err:
        logger.warning("artifact %s rejected (bad_spec): %s", artifact_id, err)
        raise ArtifactRejected(artifact_id, f"spec does not build a model: {err}", code="bad_spec") from None
    assert isinstance(module, module_type)  # kinds_of(module_type) admits only its kinds
    expected = {name: tuple(t.shape) for name, t in module.state_dict().items()}
    check_shapes(tensors, expected, artifact_id=artifact_id)
    module.load_state_dict(tensors, strict=True)
    return module


def check_payload_integrity(payload: ArtifactPayload, *, artifact_id: str, max_bytes: int) -> None:
    """The cheap part of `unpack_payload`: field types, the size limit and the sha256 over the raw bytes.

    Enough to store bytes that the caller has just verified completely (`Registry.put(..., verified=True)`):
    it proves that the bytes stored are the bytes verified, without parsing them again.
    """

    def reject(code: str, reason: str) -> ArtifactRejected:
        logger.warning("artifact %s rejected (%s): %s", artifact_id, code, reason)
        return ArtifactRejected(artifact_id, reason, code=code)

    if not isinstance(payload, ArtifactPayload):
        raise reject("invalid", f"expected an ArtifactPayload, received {type(payload).__name__}")
    if not isinstance(payload.weights, bytes):
        raise reject("bad_weights", f"weights: expected bytes, received {type(payload.weights).__name__}")
    if not isinstance(payload.spec_json, str):
        raise reject("bad_spec", f"spec_json: expected str, received {type(payload.spec_json).__name__}")
    if not isinstance(payload.sha256, str) or not _SHA256_HEX.fullmatch(payload.sha256):
        raise reject(
            "sha256_mismatch",
            f"sha256: expected 64 lowercase hex characters, received {payload.sha256!r:.80}",
        )
    if payload.nbytes > max_bytes:
        raise reject("oversized", f"oversized: {payload.nbytes} bytes, limit is {max_bytes} bytes")

    actual_sha = compute_sha256(payload.spec_json, payload.weights)
    if actual_sha != payload.sha256:
        raise reject("sha256_mismatch", f"sha256 mismatch: declared {payload.sha256}, computed {actual_sha}")


def check_shapes(
    tensors: Mapping[str, torch.Tensor],
    expected: Mapping[str, tuple[int, ...]],
    *,
    artifact_id: str = "unnamed",
) -> None:
    """Reject tensors whose names or shapes differ from `expected` (e.g. a rebuilt module's state_dict).

    Every problem is named in one reason: missing keys, unexpected keys, then shape mismatches.
    """
    problems: list[str] = []
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing:
        problems.append(f"missing tensors {missing}")
    if unexpected:
        problems.append(f"unexpected tensors {unexpected}")
    for name in sorted(set(expected) & set(tensors)):
        want = tuple(int(d) for d in expected[name])
        got = tuple(tensors[name].shape)
        if want != got:
            problems.append(f"tensor {name!r}: expected shape {want}, received {got}")
    if problems:
        reason = "; ".join(problems)
        logger.warning("artifact %s rejected (wrong_shapes): %s", artifact_id, reason)
        raise ArtifactRejected(artifact_id, reason, code="wrong_shapes")


def declared_safetensors_size(weights: bytes) -> int | None:
    """Total length a safetensors blob's own header declares, or None when the header is unreadable.

    Used only to turn "bytes do not match" into a precise "truncated" reason; safetensors does the parsing
    that matters.
    """
    if len(weights) < _HEADER_LENGTH_BYTES:
        return None
    (header_length,) = struct.unpack("<Q", weights[:_HEADER_LENGTH_BYTES])
    header_end = _HEADER_LENGTH_BYTES + header_length
    if header_end > len(weights):
        return None
    try:
        header = json.loads(weights[_HEADER_LENGTH_BYTES:header_end])
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(header, dict):
        return None
    data_end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            return None
        data_end = max(data_end, offsets[1])
    return header_end + data_end


def _check_spec_object(spec: Any) -> None:
    if not isinstance(spec, dict):
        raise ValueError(f"spec: expected a JSON object (dict), received {type(spec).__name__}")
    kind = spec.get("kind")
    if not isinstance(kind, str) or not kind:
        raise ValueError(f"spec['kind']: expected a non-empty string, received {kind!r}")


def _parse_spec(spec_json: str, reject: Callable[[str, str], ArtifactRejected]) -> dict[str, Any]:
    try:
        spec = json.loads(spec_json)
    except ValueError as err:
        raise reject("bad_spec", f"spec is not valid JSON: {err}") from None
    try:
        _check_spec_object(spec)
    except ValueError as err:
        raise reject("bad_spec", str(err)) from None
    # The sha256 contract is over canonical_json(spec): hold every sender to that one encoding.
    if canonical_json(spec).decode() != spec_json:
        raise reject(
            "bad_spec",
            "spec_json is not canonical JSON (expected orchestrator.core.artifacts.canonical_json(spec))",
        )
    return spec


def _parse_weights(weights: bytes, reject: Callable[[str, str], ArtifactRejected]) -> dict[str, torch.Tensor]:
    # A truncated upload is a kind of bad weights (code bad_weights; the reason says "truncated"). The code
    # "truncated" is kept for a stored file that lost its tail (Registry.get).
    declared = declared_safetensors_size(weights)
    if declared is not None and declared > len(weights):
        raise reject(
            "bad_weights",
            f"weights truncated: safetensors header declares {declared} bytes, received {len(weights)}",
        )
    try:
        tensors = safetensors_load(weights)
    except Exception as err:  # any parse failure of untrusted bytes is a rejection, never a crash
        raise reject("bad_weights", f"weights are not a valid safetensors blob: {err}") from None
    if not tensors:
        raise reject("bad_weights", "weights hold no tensors")
    return tensors
