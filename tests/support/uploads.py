"""The catalogue of hostile and broken uploads, and honest ones to compare with (tests/unit and
tests/integration test_bad_uploads.py send them to the coordinator)."""

from __future__ import annotations

import io
import json
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as safetensors_save

from actors.edge import poison_state, upload_spec
from baim.config import LearnerSpec
from baim.learners import VAELearner
from orchestrator.core.artifacts import ArtifactPayload, canonical_json, compute_sha256, pack_state
from orchestrator.core.scenario import Scenario


def declared_spec(scenario: Scenario, edge_id: str) -> LearnerSpec:
    edge = scenario.edge(edge_id)
    return LearnerSpec(tuple(edge.model.widths), edge.model.latent_dim, scenario.data.resolution)


def fresh_state(scenario: Scenario, edge_id: str, seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return VAELearner(declared_spec(scenario, edge_id)).state_dict()


def valid_payload(scenario: Scenario, edge_id: str, seed: int = 0) -> ArtifactPayload:
    """What an honest edge sends (an untrained learner: the checks do not depend on training)."""
    edge = scenario.edge(edge_id)
    return pack_state(
        fresh_state(scenario, edge_id, seed), upload_spec(edge, declared_spec(scenario, edge_id))
    )


def signed(weights: bytes, spec_json: str) -> ArtifactPayload:
    """A payload with a correct sha256, as an attacker who knows the format would send it."""
    return ArtifactPayload(weights, spec_json, compute_sha256(spec_json, weights))


def with_spec(payload: ArtifactPayload, spec: Any) -> ArtifactPayload:
    return signed(payload.weights, canonical_json(spec).decode())


class TouchOnUnpickle:
    """Unpickling this object creates `path` (harmless, and visible from any process on this machine)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (Path(self.path),))


def pickle_bomb(marker: Path) -> bytes:
    return pickle.dumps({"encoder.0.weight": TouchOnUnpickle(marker)})


def torch_save_bomb(marker: Path) -> bytes:
    """A torch.save file (zip + pickle); torch.load without weights_only would create `marker`."""
    buffer = io.BytesIO()
    torch.save({"encoder.0.weight": TouchOnUnpickle(marker)}, buffer)
    return buffer.getvalue()


# ---- the cases ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BadUpload:
    """One hostile upload from edge-0: how to build it, and the reason code and detail it must get."""

    name: str
    build: Callable[[Scenario, Path], ArtifactPayload]
    reason: str
    detail_part: str
    version: int = 1


def _truncated_half(s: Scenario, _: Path) -> ArtifactPayload:
    good = valid_payload(s, "edge-0")
    return signed(good.weights[: len(good.weights) // 2], good.spec_json)


def _truncated_tail(s: Scenario, _: Path) -> ArtifactPayload:
    good = valid_payload(s, "edge-0")
    return signed(good.weights[:-1], good.spec_json)


def _truncated_header(s: Scenario, _: Path) -> ArtifactPayload:
    good = valid_payload(s, "edge-0")
    return signed(good.weights[:5], good.spec_json)


def _cast(dtype: torch.dtype) -> Callable[[Scenario, Path], ArtifactPayload]:
    def build(s: Scenario, _: Path) -> ArtifactPayload:
        good = valid_payload(s, "edge-0")
        state = {k: v.to(dtype) for k, v in fresh_state(s, "edge-0").items()}
        return signed(safetensors_save(state), good.spec_json)  # pack_state itself refuses non-float tensors

    return build


def _poke(value: float) -> Callable[[Scenario, Path], ArtifactPayload]:
    def build(s: Scenario, _: Path) -> ArtifactPayload:
        good = valid_payload(s, "edge-0")
        state = fresh_state(s, "edge-0")
        name = sorted(state)[-1]
        state[name].view(-1)[0] = value  # one bad value among thousands is enough to reject
        return signed(safetensors_save(state), good.spec_json)

    return build


def _other_architecture(s: Scenario, _: Path) -> ArtifactPayload:
    """The spec claims edge-0's declared learner; the weights are edge-3's (another architecture)."""
    good = valid_payload(s, "edge-0")
    return signed(safetensors_save(fresh_state(s, "edge-3")), good.spec_json)


def _one_shape_off(s: Scenario, _: Path) -> ArtifactPayload:
    good = valid_payload(s, "edge-0")
    return signed(
        safetensors_save(poison_state(fresh_state(s, "edge-0"), "wrong_shapes", 1.0, 0)), good.spec_json
    )


def _extra_tensor(s: Scenario, _: Path) -> ArtifactPayload:
    good = valid_payload(s, "edge-0")
    state = fresh_state(s, "edge-0") | {"backdoor.weight": torch.zeros(4)}
    return signed(safetensors_save(state), good.spec_json)


def _spec_claims_other_learner(s: Scenario, _: Path) -> ArtifactPayload:
    """A spec that lies about the architecture (edge-3's learner) with matching edge-3 weights."""
    spec = upload_spec(s.edge("edge-0"), declared_spec(s, "edge-3"))
    return pack_state(fresh_state(s, "edge-3"), spec)


def _gigantic_latent(s: Scenario, _: Path) -> ArtifactPayload:
    """Resource exhaustion: building this learner would allocate ~2**40 floats. It must never be built."""
    good = valid_payload(s, "edge-0")
    spec = json.loads(good.spec_json)
    spec["learner"]["latent_dim"] = 2**40
    return with_spec(good, spec)


def _gigantic_widths(s: Scenario, _: Path) -> ArtifactPayload:
    good = valid_payload(s, "edge-0")
    spec = json.loads(good.spec_json)
    spec["learner"]["widths"] = [2**20, 2**20]
    return with_spec(good, spec)


def _gigantic_tensor_header(s: Scenario, _: Path) -> ArtifactPayload:
    """A safetensors header declaring a 2**40-element tensor backed by 16 bytes."""
    good = valid_payload(s, "edge-0")
    header = json.dumps({"w": {"dtype": "F32", "shape": [2**20, 2**20], "data_offsets": [0, 16]}}).encode()
    weights = len(header).to_bytes(8, "little") + header + bytes(16)
    return signed(weights, good.spec_json)


def _sha_mismatch(s: Scenario, _: Path) -> ArtifactPayload:
    good = valid_payload(s, "edge-0")
    return ArtifactPayload(good.weights, good.spec_json, compute_sha256(good.spec_json, good.weights[:-1]))


def _sha_of_other_model(s: Scenario, _: Path) -> ArtifactPayload:
    """Weights swapped in transit: the sha256 is the honest model's, the weights are another's."""
    good = valid_payload(s, "edge-0")
    other = valid_payload(s, "edge-0", seed=1)
    return ArtifactPayload(other.weights, good.spec_json, good.sha256)


def _sha_not_hex(s: Scenario, _: Path) -> ArtifactPayload:
    good = valid_payload(s, "edge-0")
    return ArtifactPayload(good.weights, good.spec_json, "Z" * 64)


def _pickle_weights(s: Scenario, marker: Path) -> ArtifactPayload:
    return signed(pickle_bomb(marker), valid_payload(s, "edge-0").spec_json)


def _torch_save_weights(s: Scenario, marker: Path) -> ArtifactPayload:
    return signed(torch_save_bomb(marker), valid_payload(s, "edge-0").spec_json)


def _pickle_spec(s: Scenario, marker: Path) -> ArtifactPayload:
    return signed(valid_payload(s, "edge-0").weights, pickle_bomb(marker).decode("latin-1"))


def _spec_not_json(s: Scenario, _: Path) -> ArtifactPayload:
    return signed(valid_payload(s, "edge-0").weights, "{kind: learner, this is not json")


def _spec_not_object(s: Scenario, _: Path) -> ArtifactPayload:
    return signed(valid_payload(s, "edge-0").weights, "[1,2,3]")


def _spec_kind(kind: Any) -> Callable[[Scenario, Path], ArtifactPayload]:
    def build(s: Scenario, _: Path) -> ArtifactPayload:
        good = valid_payload(s, "edge-0")
        return with_spec(good, json.loads(good.spec_json) | {"kind": kind})

    return build


def _spec_extra_key(s: Scenario, _: Path) -> ArtifactPayload:
    good = valid_payload(s, "edge-0")
    return with_spec(good, json.loads(good.spec_json) | {"__class__": "os.system"})


def _spec_not_canonical(s: Scenario, _: Path) -> ArtifactPayload:
    good = valid_payload(s, "edge-0")
    return signed(good.weights, json.dumps(json.loads(good.spec_json), indent=2))


def _impersonation(s: Scenario, _: Path) -> ArtifactPayload:
    """edge-0 sends a model whose spec says it comes from edge-2 (same architecture, other task)."""
    return valid_payload(s, "edge-2")


def _empty_weights(s: Scenario, _: Path) -> ArtifactPayload:
    return signed(b"", valid_payload(s, "edge-0").spec_json)


def _deeply_nested_spec(s: Scenario, _: Path) -> ArtifactPayload:
    """100,000 nested JSON arrays: json.loads raises RecursionError, which is not a ValueError."""
    return signed(valid_payload(s, "edge-0").weights, "[" * 100_000 + "]" * 100_000)


def _lone_surrogate_spec(s: Scenario, _: Path) -> ArtifactPayload:
    """A str that UTF-8 cannot encode (Ray carries it): `.encode()` raises UnicodeEncodeError."""
    return ArtifactPayload(valid_payload(s, "edge-0").weights, '{"kind":"\ud800"}', "0" * 64)


def _valid(s: Scenario, _: Path) -> ArtifactPayload:
    return valid_payload(s, "edge-0")


BAD_UPLOADS = [
    BadUpload("truncated_half", _truncated_half, "bad_weights", "truncated"),
    BadUpload("truncated_last_byte", _truncated_tail, "bad_weights", "truncated"),
    BadUpload("truncated_inside_header", _truncated_header, "bad_weights", "not a valid safetensors"),
    BadUpload("empty_weights", _empty_weights, "bad_weights", "not a valid safetensors"),
    BadUpload("int64", _cast(torch.int64), "bad_dtype", "torch.int64"),
    BadUpload("int8", _cast(torch.int8), "bad_dtype", "torch.int8"),
    BadUpload("float64", _cast(torch.float64), "bad_dtype", "torch.float64"),
    BadUpload("one_nan", _poke(float("nan")), "non_finite", "1 of"),
    BadUpload("one_inf", _poke(float("inf")), "non_finite", "1 of"),
    BadUpload("one_minus_inf", _poke(float("-inf")), "non_finite", "1 of"),
    BadUpload("weights_of_other_architecture", _other_architecture, "wrong_shapes", "expected shape"),
    BadUpload("one_tensor_shape_off", _one_shape_off, "wrong_shapes", "expected shape"),
    BadUpload("extra_tensor", _extra_tensor, "wrong_shapes", "unexpected tensors ['backdoor.weight']"),
    BadUpload("spec_claims_other_learner", _spec_claims_other_learner, "bad_spec", "declared"),
    BadUpload("gigantic_latent_dim", _gigantic_latent, "bad_spec", "1099511627776"),
    BadUpload("gigantic_widths", _gigantic_widths, "bad_spec", "1048576"),
    BadUpload("gigantic_tensor_in_header", _gigantic_tensor_header, "bad_weights", "not a valid safetensors"),
    BadUpload("sha256_mismatch", _sha_mismatch, "sha256_mismatch", "declared"),
    BadUpload("sha256_of_other_weights", _sha_of_other_model, "sha256_mismatch", "declared"),
    BadUpload("sha256_not_hex", _sha_not_hex, "sha256_mismatch", "64 lowercase hex"),
    BadUpload("pickle_as_weights", _pickle_weights, "bad_weights", "not a valid safetensors"),
    BadUpload("torch_save_as_weights", _torch_save_weights, "bad_weights", "not a valid safetensors"),
    BadUpload("pickle_as_spec", _pickle_spec, "bad_spec", "not valid JSON"),
    BadUpload("spec_not_json", _spec_not_json, "bad_spec", "not valid JSON"),
    BadUpload("spec_not_an_object", _spec_not_object, "bad_spec", "expected a JSON object"),
    BadUpload("spec_kind_unknown", _spec_kind("exploit"), "bad_spec", "'exploit'"),
    BadUpload("spec_kind_baim", _spec_kind("baim"), "bad_spec", "'baim'"),
    BadUpload("spec_kind_not_a_string", _spec_kind(7), "bad_spec", "non-empty string"),
    BadUpload("spec_extra_key", _spec_extra_key, "bad_spec", "__class__"),
    BadUpload("spec_not_canonical", _spec_not_canonical, "bad_spec", "canonical"),
    BadUpload("impersonates_another_edge", _impersonation, "bad_spec", "spec edge_id"),
    BadUpload("version_zero", _valid, "bad_version", "int >= 1", version=0),
    # These three used to escape upload() as exceptions (not a receipt, not counted); fixed in 6b9e85d.
    BadUpload("deeply_nested_spec", _deeply_nested_spec, "bad_spec", "nests too deeply"),
    BadUpload("lone_surrogate_in_spec", _lone_surrogate_spec, "bad_spec", "not encodable UTF-8"),
    BadUpload("version_with_300_digits", _valid, "bad_version", "<= 999999", version=10**300),
]
PICKLE_CASES = {"pickle_as_weights", "torch_save_as_weights", "pickle_as_spec"}
