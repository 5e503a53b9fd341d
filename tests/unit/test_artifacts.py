"""Artifacts: packing, the sha256 contract, every rejection reason of unpack_payload / check_shapes, and
load_module (the verified loader)."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import pickle

import pytest
import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save
from torch import nn

from baim.config import LearnerSpec
from baim.learners import VAELearner
from baim.model import BAIM
from orchestrator.core.artifacts import (
    ArtifactPayload,
    canonical_json,
    check_shapes,
    compute_sha256,
    declared_safetensors_size,
    load_module,
    pack_module,
    pack_state,
    unpack_payload,
)
from orchestrator.core.errors import ArtifactRejected

MAX_BYTES = 1 << 20
SPEC = {"kind": "learner", "widths": [4, 8], "latent_dim": 3}


def make_state() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "enc.weight": torch.randn(4, 3, generator=generator),
        "enc.bias": torch.zeros(4),
        "half": torch.ones(2, 2, dtype=torch.float16),
    }


def with_weights(weights: bytes, spec_json: str | None = None) -> ArtifactPayload:
    """A payload with a correct sha256 over arbitrary (hostile) bytes, so later checks are reached."""
    spec_json = canonical_json(SPEC).decode() if spec_json is None else spec_json
    return ArtifactPayload(weights=weights, spec_json=spec_json, sha256=compute_sha256(spec_json, weights))


def rejection(payload: ArtifactPayload, **kwargs) -> str:
    with pytest.raises(ArtifactRejected) as info:
        unpack_payload(
            payload, artifact_id="edge/e1@v000001", max_bytes=kwargs.pop("max_bytes", MAX_BYTES), **kwargs
        )
    assert info.value.artifact_id == "edge/e1@v000001"
    assert str(info.value).startswith("artifact edge/e1@v000001 rejected: ")
    return info.value.reason


def test_round_trip_preserves_spec_tensors_and_dtypes():
    # Prepare
    state = make_state()
    # Execute
    payload = pack_state(state, SPEC)
    spec, tensors = unpack_payload(payload, artifact_id="a", max_bytes=MAX_BYTES)
    # Assert
    assert spec == SPEC
    assert set(tensors) == set(state)
    for name, tensor in state.items():
        assert tensors[name].dtype == tensor.dtype
        assert torch.equal(tensors[name], tensor)


def test_sha256_follows_the_documented_formula():
    payload = pack_state(make_state(), SPEC)
    expected = hashlib.sha256(canonical_json(SPEC) + b"\n" + payload.weights).hexdigest()
    assert payload.sha256 == expected
    assert payload.spec_json == '{"kind":"learner","latent_dim":3,"widths":[4,8]}'


def test_nbytes_is_weights_plus_utf8_spec():
    payload = ArtifactPayload(weights=b"12345", spec_json='{"kind":"é"}', sha256="0" * 64)
    assert payload.nbytes == 5 + 13  # "é" is two UTF-8 bytes


def test_canonical_json_is_ascii():
    assert canonical_json({"kind": "é", "a": 1}) == b'{"a":1,"kind":"\\u00e9"}'


def test_pack_is_deterministic():
    assert pack_state(make_state(), SPEC) == pack_state(make_state(), SPEC)


def test_pack_module_handles_tied_and_non_contiguous_tensors():
    # Prepare: two parameters sharing one storage, one of them a transposed (non-contiguous) view.
    module = torch.nn.Module()
    base = torch.arange(6.0).reshape(2, 3)
    module.register_buffer("a", base)
    module.register_buffer("b", base.t())
    # Execute
    _, tensors = unpack_payload(pack_module(module, SPEC), artifact_id="a", max_bytes=MAX_BYTES)
    # Assert
    assert torch.equal(tensors["b"], base.t())


@pytest.mark.parametrize(
    ("state", "spec", "message"),
    [
        ({"w": torch.ones(2)}, {"no_kind": 1}, "spec['kind']"),
        ({"w": torch.ones(2)}, {"kind": ""}, "spec['kind']"),
        ({"w": torch.ones(2)}, ["kind"], "expected a JSON object"),
        (
            {"w": torch.arange(3)},
            SPEC,
            "expected a floating-point tensor, received dtype torch.int64",
        ),
        ({}, SPEC, "at least one tensor"),
    ],
)
def test_pack_rejects_bad_input_with_value_error(state, spec, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        pack_state(state, spec)


def test_pack_allows_non_finite_values_so_the_receiver_decides():
    payload = pack_state({"w": torch.tensor([float("nan")])}, SPEC)
    assert "NaN or Inf" in rejection(payload)


def test_oversized_is_rejected_before_hashing():
    payload = pack_state(make_state(), SPEC)
    broken = dataclasses.replace(payload, sha256="0" * 64)  # would fail the sha check if it ran first
    reason = rejection(broken, max_bytes=payload.nbytes - 1)
    assert reason == f"oversized: {payload.nbytes} bytes, limit is {payload.nbytes - 1} bytes"


def test_exactly_max_bytes_is_accepted():
    payload = pack_state(make_state(), SPEC)
    unpack_payload(payload, artifact_id="a", max_bytes=payload.nbytes)


def test_sha_mismatch_names_both_hashes():
    payload = pack_state(make_state(), SPEC)
    flipped = bytearray(payload.weights)
    flipped[-1] ^= 0x01
    reason = rejection(dataclasses.replace(payload, weights=bytes(flipped)))
    assert reason.startswith(f"sha256 mismatch: declared {payload.sha256}, computed ")


def test_malformed_sha_string_rejected():
    payload = pack_state(make_state(), SPEC)
    assert "64 lowercase hex" in rejection(dataclasses.replace(payload, sha256=payload.sha256.upper()))


def test_wrong_python_types_rejected():
    payload = pack_state(make_state(), SPEC)
    assert "weights: expected bytes, received bytearray" in rejection(
        dataclasses.replace(payload, weights=bytearray(payload.weights))
    )


@pytest.mark.parametrize(
    ("spec_json", "message"),
    [
        ("{not json", "spec is not valid JSON"),
        ("[1,2]", "expected a JSON object (dict), received list"),
        ('{"widths":[4]}', "spec['kind']: expected a non-empty string, received None"),
        ('{"kind":3}', "spec['kind']: expected a non-empty string, received 3"),
        ('{"kind": "learner"}', "not canonical JSON"),
    ],
)
def test_bad_spec_rejected(spec_json, message):
    payload = with_weights(safetensors_save({"w": torch.ones(2)}), spec_json)
    assert message in rejection(payload)


def test_allowed_kinds_filter():
    payload = pack_state(make_state(), SPEC)
    assert "expected one of ['task_model'], received 'learner'" in rejection(
        payload, allowed_kinds=("task_model",)
    )


def test_pickle_payload_rejected_without_unpickling():
    # A pickle whose loading would run code: it must be refused by the safetensors header check.
    class Exploit:
        def __reduce__(self):
            return (exec, ("raise SystemExit('unpickled!')",))

    reason = rejection(with_weights(pickle.dumps(Exploit())))
    assert reason.startswith("weights are not a valid safetensors blob")


def test_torch_save_file_rejected():
    buffer = io.BytesIO()
    torch.save({"w": torch.ones(2)}, buffer)
    assert rejection(with_weights(buffer.getvalue())).startswith("weights are not a valid safetensors blob")


@pytest.mark.parametrize("weights", [b"", b"\x00" * 3, b"garbage that is not safetensors at all"])
def test_garbage_rejected(weights):
    assert rejection(with_weights(weights)).startswith("weights are not a valid safetensors blob")


def test_truncated_weights_named_as_truncated():
    weights = safetensors_save({"w": torch.ones(10)})
    reason = rejection(with_weights(weights[:-7]))
    assert (
        reason
        == f"weights truncated: safetensors header declares {len(weights)} bytes, received {len(weights) - 7}"
    )


def test_trailing_bytes_rejected():
    weights = safetensors_save({"w": torch.ones(10)}) + b"extra"
    assert rejection(with_weights(weights)).startswith("weights are not a valid safetensors blob")


def test_empty_tensor_set_rejected():
    assert rejection(with_weights(safetensors_save({}))) == "weights hold no tensors"


@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8, torch.float64, torch.bool])
def test_wrong_dtype_rejected_and_named(dtype):
    weights = safetensors_save({"ok": torch.ones(2), "bad": torch.zeros(2, dtype=dtype)})
    reason = rejection(with_weights(weights))
    assert reason.startswith(f"tensor 'bad': dtype {dtype} not allowed")


def test_custom_allowed_dtypes():
    weights = safetensors_save({"w": torch.ones(2, dtype=torch.float64)})
    _, tensors = unpack_payload(
        with_weights(weights), artifact_id="a", max_bytes=MAX_BYTES, allowed_dtypes=(torch.float64,)
    )
    assert tensors["w"].dtype == torch.float64


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_non_finite_values_rejected_and_named(value, dtype):
    poisoned = torch.ones(3, 4, dtype=dtype)
    poisoned[1, 2] = value
    payload = pack_state({"clean": torch.ones(2), "dec.weight": poisoned}, SPEC)
    assert rejection(payload) == "tensor 'dec.weight': 1 of 12 values are NaN or Inf"


def test_declared_size_of_valid_and_unreadable_blobs():
    weights = safetensors_save({"w": torch.ones(10), "b": torch.ones(3, dtype=torch.float16)})
    assert declared_safetensors_size(weights) == len(weights)
    assert declared_safetensors_size(b"short") is None
    assert declared_safetensors_size(pickle.dumps([1, 2])) is None


def test_check_shapes_accepts_matching_shapes():
    state = make_state()
    check_shapes(state, {name: tuple(t.shape) for name, t in state.items()}, artifact_id="a")


def test_check_shapes_names_every_problem():
    # Prepare
    tensors = {"a": torch.ones(2, 3), "b": torch.ones(4), "extra": torch.ones(1)}
    expected = {"a": (3, 2), "b": (4,), "missing": (5,)}
    # Execute
    with pytest.raises(ArtifactRejected) as info:
        check_shapes(tensors, expected, artifact_id="edge/e2@v000003")
    # Assert
    assert info.value.artifact_id == "edge/e2@v000003"
    assert info.value.reason == (
        "missing tensors ['missing']; unexpected tensors ['extra']; "
        "tensor 'a': expected shape (3, 2), received (2, 3)"
    )


def test_check_shapes_accepts_torch_size_and_lists():
    check_shapes({"a": torch.ones(2, 3)}, {"a": torch.Size([2, 3])})
    check_shapes({"a": torch.ones(2, 3)}, {"a": [2, 3]})  # type: ignore[dict-item]


def test_rejection_messages_are_json_safe_strings():
    payload = with_weights(b"\xff\xfe binary junk")
    json.dumps({"reason": rejection(payload)})


# ---- reason codes ------------------------------------------------------------------------------------


def rejection_code(payload: ArtifactPayload, **kwargs) -> str:
    with pytest.raises(ArtifactRejected) as info:
        unpack_payload(
            payload, artifact_id="edge/e1@v000001", max_bytes=kwargs.pop("max_bytes", MAX_BYTES), **kwargs
        )
    return info.value.code


def _good() -> ArtifactPayload:
    return pack_state(make_state(), SPEC)


@pytest.mark.parametrize(
    ("make_bad", "kwargs", "code"),
    [
        (lambda: _good(), {"max_bytes": 10}, "oversized"),
        (lambda: dataclasses.replace(_good(), sha256="0" * 64), {}, "sha256_mismatch"),
        (lambda: dataclasses.replace(_good(), sha256="not hex"), {}, "sha256_mismatch"),
        (lambda: dataclasses.replace(_good(), weights=bytearray(b"x")), {}, "bad_weights"),
        (lambda: dataclasses.replace(_good(), spec_json=b"{}"), {}, "bad_spec"),
        (lambda: with_weights(_good().weights, "{oops"), {}, "bad_spec"),
        (lambda: with_weights(_good().weights, '{"kind": "learner"}'), {}, "bad_spec"),
        (lambda: _good(), {"allowed_kinds": ("baim",)}, "bad_spec"),
        (lambda: with_weights(_good().weights[:-7]), {}, "bad_weights"),
        (lambda: with_weights(pickle.dumps({"w": 1})), {}, "bad_weights"),
        (lambda: with_weights(safetensors_save({})), {}, "bad_weights"),
        (lambda: with_weights(safetensors_save({"w": torch.arange(3)})), {}, "bad_dtype"),
        (lambda: with_weights(safetensors_save({"w": torch.tensor([float("nan")])})), {}, "non_finite"),
        (lambda: "not a payload", {}, "invalid"),
    ],
    ids=[
        "oversized", "sha-mismatch", "sha-not-hex", "weights-type", "spec-type", "spec-json",
        "spec-not-canonical", "kind", "truncated", "pickle", "no-tensors", "dtype", "nan", "not-a-payload",
    ],
)  # fmt: skip
def test_every_rejection_carries_its_code(make_bad, kwargs, code):
    assert rejection_code(make_bad(), **kwargs) == code


def test_check_shapes_code_is_wrong_shapes():
    with pytest.raises(ArtifactRejected) as info:
        check_shapes({"w": torch.zeros(2)}, {"w": (3,)}, artifact_id="a")
    assert (info.value.code, info.value.reason) == (
        "wrong_shapes",
        "tensor 'w': expected shape (3,), received (2,)",
    )


def test_rejection_code_survives_pickling_and_unknown_codes_are_refused():
    """Ray ships exceptions between processes by pickling them (our own objects, never an edge's)."""
    original = ArtifactRejected("edge/e1@v000001", "sha256 mismatch: ...", code="sha256_mismatch")
    copy = pickle.loads(pickle.dumps(original))
    assert (copy.artifact_id, copy.reason, copy.code, str(copy)) == (
        original.artifact_id, original.reason, original.code, str(original),
    )  # fmt: skip
    assert ArtifactRejected("a", "r").code == "invalid"
    with pytest.raises(ValueError, match="code: expected one of"):
        ArtifactRejected("a", "r", code="sha_mismatch")


# ---- load_module: the one way from a payload to a module ----------------------------------------------


def _learner_payload(dtype: torch.dtype = torch.float32) -> tuple[VAELearner, ArtifactPayload]:
    torch.manual_seed(0)
    learner = VAELearner(LearnerSpec((4,), 3, 16))
    upload_spec = {"kind": "learner", "edge_id": "e1", "task": "male", "learner": learner.spec.to_dict()}
    state = {name: tensor.to(dtype) for name, tensor in learner.state_dict().items()}
    return learner, pack_state(state, upload_spec)


def test_load_module_rebuilds_an_edge_upload_exactly():
    learner, payload = _learner_payload()

    loaded = load_module(payload, VAELearner, artifact_id="edge/e1@v000001")

    assert loaded.spec == learner.spec
    for name, tensor in learner.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_load_module_casts_other_allowed_float_dtypes_to_the_modules():
    learner, payload = _learner_payload(torch.float16)

    loaded = load_module(payload, nn.Module, artifact_id="a")

    assert all(t.dtype == torch.float32 for t in loaded.state_dict().values())
    expected = {name: t.half().float() for name, t in learner.state_dict().items()}
    assert all(torch.equal(loaded.state_dict()[name], t) for name, t in expected.items())


def test_load_module_refuses_kinds_of_another_type_and_specs_that_do_not_build():
    _, payload = _learner_payload()
    broken_spec = {"kind": "learner", "edge_id": "e1", "task": "male", "learner": {"widths": [4]}}
    broken = pack_state(safetensors_load_state(payload), broken_spec)

    with pytest.raises(ArtifactRejected, match=r"spec kind: expected one of \['baim'\], received 'learner'"):
        load_module(payload, BAIM, artifact_id="a")
    with pytest.raises(
        ArtifactRejected, match="spec does not build a model: LearnerSpec: missing keys"
    ) as info:
        load_module(broken, nn.Module, artifact_id="a")
    assert info.value.code == "bad_spec"


def test_load_module_names_wrong_shapes_and_runs_check_spec_before_building():
    _, payload = _learner_payload()
    state = safetensors_load_state(payload)
    state["extra.weight"] = torch.zeros(2)
    seen: list[dict] = []

    with pytest.raises(ArtifactRejected, match=r"unexpected tensors \['extra.weight'\]") as info:
        load_module(pack_state(state, json.loads(payload.spec_json)), nn.Module, artifact_id="a")
    with pytest.raises(RuntimeError, match="refused"):
        load_module(payload, nn.Module, artifact_id="a", check_spec=lambda spec: _refuse(seen, spec))

    assert info.value.code == "wrong_shapes"
    assert seen == [json.loads(payload.spec_json)]


def safetensors_load_state(payload: ArtifactPayload) -> dict[str, torch.Tensor]:
    return dict(safetensors_load(payload.weights))


def _refuse(seen: list[dict], spec: dict) -> None:
    seen.append(spec)
    raise RuntimeError("refused")
