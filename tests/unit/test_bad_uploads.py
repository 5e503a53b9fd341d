"""Hostile and broken uploads against the real CloudCoordinator (a plain class here; once through a Ray
actor in tests/integration/test_bad_uploads.py).

Every case must come back as a receipt with `accepted=False` and a short reason code, be counted in the
coordinator's ledger, leave nothing in the registry, and leave the coordinator serving: a valid upload
right after it is accepted. The pickle cases also prove that nothing was unpickled: unpickling the payload
would create a marker file, and the test asserts the file does not exist.
"""

from __future__ import annotations

import asyncio
import io
import json
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save as safetensors_save

from actors.coordinator import STATE_KEY, CloudCoordinator
from actors.edge import EdgeNode, poison_state, upload_spec
from baim.config import LearnerSpec
from baim.learners import VAELearner
from orchestrator.cloud.local import local_training_round
from orchestrator.core.artifacts import ArtifactPayload, canonical_json, compute_sha256, pack_state
from orchestrator.core.registry import Registry
from orchestrator.core.scenario import Scenario, load_scenario
from orchestrator.data.partitions import make_partitions
from orchestrator.data.sources import resolve_source

REPO = Path(__file__).resolve().parents[2]
NEVER_TRAIN = {"min_new_models": 100, "max_wait_seconds": 100_000}  # no training round during these tests


# ---- helpers shared with tests/integration/test_bad_uploads.py ---------------------------------------------


def tiny_scenario(tmp_path: Path, **cloud_changes: Any) -> Scenario:
    """scenarios/tiny.yaml on procedural faces (no files), no training rounds, cloud settings overridden."""
    document = load_scenario(REPO / "scenarios" / "tiny.yaml").model_dump(mode="json")
    document["data"]["root"] = str(tmp_path / "no-celeba-here")
    document["data"]["procedural"] = {"num_images": 1500, "native_size": 32}
    document["cloud"]["fusion"] = NEVER_TRAIN
    document["cloud"].update(cloud_changes)
    return Scenario.model_validate(document)


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


def upload_kwargs(edge_id: str, payload: ArtifactPayload, version: int = 1) -> dict[str, Any]:
    return {
        "edge_id": edge_id,
        "version": version,
        "weights": payload.weights,
        "spec_json": payload.spec_json,
        "sha256": payload.sha256,
    }


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


def make_coordinator(scenario: Scenario, registry_dir: Path) -> CloudCoordinator:
    source = resolve_source(scenario.data)
    partitions = make_partitions(source, scenario)
    return CloudCoordinator(
        scenario, str(registry_dir), source, partitions, round_runner=local_training_round
    )


def send(coordinator: CloudCoordinator, edge_id: str, payload: ArtifactPayload, version: int = 1) -> Any:
    return asyncio.run(coordinator.upload(**upload_kwargs(edge_id, payload, version)))


def assert_rejected_counted_and_still_serving(
    coordinator: CloudCoordinator, receipt: dict[str, Any], reason: str, registry_dir: Path
) -> None:
    assert receipt["accepted"] is False
    assert receipt["reason"] == reason, receipt["detail"]
    assert coordinator.ledger.upload_counts() == {"accepted": 0, "rejected": {reason: 1}}
    assert Registry(str(registry_dir)).versions("edge/edge-0") == []
    after = send(coordinator, "edge-1", valid_payload(coordinator.scenario, "edge-1"))
    assert after["accepted"] is True, after
    assert asyncio.run(coordinator.status())["learners"] == ["edge-1"]


@pytest.mark.parametrize("case", BAD_UPLOADS, ids=[case.name for case in BAD_UPLOADS])
def test_bad_upload_is_rejected_counted_and_the_coordinator_keeps_serving(
    tmp_path: Path, case: BadUpload
) -> None:
    # Prepare
    scenario = tiny_scenario(tmp_path)
    coordinator = make_coordinator(scenario, tmp_path / "registry")
    marker = tmp_path / "unpickled.marker"
    payload = case.build(scenario, marker)

    # Execute
    receipt = send(coordinator, "edge-0", payload, case.version)

    # Assert
    assert case.detail_part in receipt["detail"], receipt["detail"]
    assert_rejected_counted_and_still_serving(coordinator, receipt, case.reason, tmp_path / "registry")
    assert not marker.exists(), "the coordinator unpickled an uploaded payload"


def test_the_pickle_markers_do_fire_when_unpickled(tmp_path: Path) -> None:
    """The proof above means something only if unpickling these payloads really creates the marker."""
    marker = tmp_path / "unpickled.marker"
    pickle.loads(pickle_bomb(marker))  # our own payload: proves the marker works
    assert marker.exists()
    marker.unlink()
    torch.load(io.BytesIO(torch_save_bomb(marker)), weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize(
    ("weights", "spec_json", "sha256", "detail_part"),
    [
        ("not bytes", None, None, "weights: expected bytes"),
        (None, b"{}", None, "spec_json: expected str"),
        (None, None, 12345, "sha256: expected 64"),
    ],
    ids=["weights_str", "spec_bytes", "sha256_int"],
)
def test_wrong_argument_types_are_rejected(
    tmp_path: Path, weights: Any, spec_json: Any, sha256: Any, detail_part: str
) -> None:
    """An actor call can carry any Python object; the receipt must still be a rejection with a reason."""
    scenario = tiny_scenario(tmp_path)
    coordinator = make_coordinator(scenario, tmp_path / "registry")
    good = valid_payload(scenario, "edge-0")
    kwargs = upload_kwargs("edge-0", good)
    for key, value in (("weights", weights), ("spec_json", spec_json), ("sha256", sha256)):
        if value is not None:
            kwargs[key] = value

    receipt = asyncio.run(coordinator.upload(**kwargs))

    assert detail_part in receipt["detail"], receipt["detail"]
    assert_rejected_counted_and_still_serving(coordinator, receipt, receipt["reason"], tmp_path / "registry")


def test_oversized_upload_is_rejected_before_it_is_parsed(tmp_path: Path) -> None:
    scenario = tiny_scenario(tmp_path, uploads={"max_upload_bytes": 40_000})
    coordinator = make_coordinator(scenario, tmp_path / "registry")
    good = valid_payload(scenario, "edge-0")
    # Garbage that is not even safetensors: the size check must answer before any parser runs.
    oversized = signed(good.weights + bytes(40_000), good.spec_json)

    receipt = send(coordinator, "edge-0", oversized)

    assert receipt["detail"].startswith("oversized"), receipt["detail"]
    assert_rejected_counted_and_still_serving(coordinator, receipt, "oversized", tmp_path / "registry")


def test_unknown_edge_is_rejected(tmp_path: Path) -> None:
    scenario = tiny_scenario(tmp_path)
    coordinator = make_coordinator(scenario, tmp_path / "registry")

    receipt = send(coordinator, "edge-404", valid_payload(scenario, "edge-0"))

    assert (receipt["accepted"], receipt["reason"]) == (False, "unknown_edge")
    assert coordinator.ledger.upload_counts() == {"accepted": 0, "rejected": {"unknown_edge": 1}}
    assert send(coordinator, "edge-0", valid_payload(scenario, "edge-0"))["accepted"] is True


# ---- a flood of distinct bad uploads: bounded memory and checkpoint --------------------------------------


def test_many_bad_uploads_keep_only_the_last_receipts_per_edge_and_count_them_all(tmp_path: Path) -> None:
    # Prepare: edge-1 is rejected once before edge-0 floods; strangers (ids not in the scenario) flood too.
    scenario = tiny_scenario(tmp_path)
    kept = scenario.cloud.uploads.rejected_receipts_per_edge
    coordinator = make_coordinator(scenario, tmp_path / "registry")
    bad = signed(valid_payload(scenario, "edge-0").weights, "not json")  # distinct per version: 50 keys
    edge_1_receipt = send(coordinator, "edge-1", bad)

    # Execute
    flood = [send(coordinator, "edge-0", bad, version) for version in range(1, 51)]
    strangers = [send(coordinator, f"stranger-{i}", bad) for i in range(kept + 5)]

    # Assert: every upload got its rejection and is counted; only the last `kept` per edge are stored.
    assert kept == 16 and len({r["key"] for r in flood}) == 50
    assert {(r["accepted"], r["reason"]) for r in flood} == {(False, "bad_spec")}
    assert {(r["accepted"], r["reason"]) for r in strangers} == {(False, "unknown_edge")}
    counts = {"bad_spec": 1 + 50, "unknown_edge": kept + 5}
    assert coordinator.ledger.upload_counts() == {"accepted": 0, "rejected": counts}
    stored = [receipt.model_dump() for receipt in coordinator.rejected.receipts()]
    assert [r for r in stored if r["edge_id"] == "edge-0"] == flood[-kept:]
    assert [r for r in stored if r["edge_id"].startswith("stranger-")] == strangers[-kept:]
    assert [r for r in stored if r["edge_id"] == "edge-1"] == [edge_1_receipt]  # not pushed out by edge-0
    state = Registry(str(tmp_path / "registry")).get_json(STATE_KEY)
    assert state["rejected"] == stored
    # A re-sent upload whose receipt is kept gets it back uncounted; one whose receipt was dropped is
    # validated again (the same outcome) and counted again.
    assert send(coordinator, "edge-0", bad, 50) == flood[-1]
    assert send(coordinator, "edge-0", bad, 1) == flood[0]
    assert coordinator.ledger.upload_counts()["rejected"] == {**counts, "bad_spec": 1 + 50 + 1}
    # Still serving: a valid upload from the flooding edge is accepted.
    assert send(coordinator, "edge-0", valid_payload(scenario, "edge-0"), 51)["accepted"] is True


def test_a_restarted_coordinator_applies_the_bound_to_the_receipts_it_reloads(tmp_path: Path) -> None:
    # Prepare: a checkpoint with 10 rejected receipts of edge-0, written under the default bound (16).
    scenario = tiny_scenario(tmp_path)
    first = make_coordinator(scenario, tmp_path / "registry")
    bad = signed(valid_payload(scenario, "edge-0").weights, "not json")
    receipts = [send(first, "edge-0", bad, version) for version in range(1, 11)]
    assert len(first.rejected.receipts()) == 10

    # Execute: restarted with a smaller bound.
    second = make_coordinator(
        tiny_scenario(tmp_path, uploads={"rejected_receipts_per_edge": 4}), tmp_path / "registry"
    )

    # Assert
    assert [r.model_dump() for r in second.rejected.receipts()] == receipts[-4:]
    assert second.ledger.upload_counts() == {"accepted": 0, "rejected": {"bad_spec": 10}}
    newest = send(second, "edge-0", bad, 11)
    assert newest["reason"] == "bad_spec"
    assert [r.model_dump() for r in second.rejected.receipts()] == [*receipts[-3:], newest]


# ---- poisoned models: the plausibility gate ------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_edge_2(tmp_path_factory: pytest.TempPathFactory) -> tuple[Scenario, dict[str, torch.Tensor]]:
    """edge-2 trained for a few local epochs by the real EdgeNode, so that poisoning degrades a real model."""
    tmp_path = tmp_path_factory.mktemp("trained")
    scenario = tiny_scenario(tmp_path)
    source = resolve_source(scenario.data)
    partitions = make_partitions(source, scenario)
    edge = scenario.edge("edge-2").model_copy(update={"local_epochs": 4})
    node = EdgeNode(
        edge,
        source,
        partitions.edges["edge-2"],
        resolution=scenario.data.resolution,
        scenario_seed=scenario.seed,
        kld_weight=scenario.cloud.kld_weight,
        time_scale=0.0,
    )
    node._train()  # the training step of run(), without an upload
    return scenario, {name: t.detach().clone() for name, t in node.model.state_dict().items()}


def poisoned_payload(
    scenario: Scenario, state: dict[str, torch.Tensor], mode: Any, scale: float
) -> ArtifactPayload:
    edge = scenario.edge("edge-2")
    spec = upload_spec(edge, declared_spec(scenario, "edge-2"))
    return pack_state(poison_state(state, mode, scale, seed=1), spec)


def test_trained_model_passes_the_plausibility_gate(tmp_path: Path, trained_edge_2: Any) -> None:
    scenario, state = trained_edge_2
    coordinator = make_coordinator(scenario, tmp_path / "registry")

    receipt = send(
        coordinator,
        "edge-2",
        pack_state(state, upload_spec(scenario.edge("edge-2"), declared_spec(scenario, "edge-2"))),
    )

    assert receipt["accepted"] is True, receipt


def test_weights_scaled_by_1000_are_rejected_as_implausible(tmp_path: Path, trained_edge_2: Any) -> None:
    scenario, state = trained_edge_2
    coordinator = make_coordinator(scenario, tmp_path / "registry")

    receipt = send(coordinator, "edge-2", poisoned_payload(scenario, state, "scale", 1e3))

    assert (receipt["accepted"], receipt["reason"]) == (False, "implausible_loss"), receipt
    assert coordinator.ledger.upload_counts() == {"accepted": 0, "rejected": {"implausible_loss": 1}}
    assert send(coordinator, "edge-1", valid_payload(scenario, "edge-1"))["accepted"] is True


INSEPARABLE_HERE = pytest.mark.xfail(
    strict=True,
    reason="LIMIT (actors/uploads.py plausibility gate): edge-2 trained 4 epochs on procedural faces "
    "learns nothing input-dependent (ratio 1.49 x the holdout pixel variance); this poisoned copy (1.77 x "
    "noise 1 std, 2.11 x sign flip) is no worse than the untrained learners the suite uploads as valid "
    "(up to 2.14 x), and its weight norm (1.32 x) is within honest training's drift (up to 1.29 x "
    "total); cloud.uploads.max_loss_ratio (default 2.5) catches a sign flip on CelebA (2.8-3.2 x), not here",
)


@pytest.mark.parametrize(
    ("mode", "scale"),
    [
        pytest.param("sign_flip", 1.0, marks=INSEPARABLE_HERE),
        pytest.param("noise", 1.0, marks=INSEPARABLE_HERE),
        ("noise", 3.0),
    ],
    ids=["sign_flip", "gaussian_noise_1std", "gaussian_noise_3std"],
)
def test_poisoned_model_is_rejected_as_implausible(
    tmp_path: Path, trained_edge_2: Any, mode: str, scale: float
) -> None:
    scenario, state = trained_edge_2
    coordinator = make_coordinator(scenario, tmp_path / "registry")

    receipt = send(coordinator, "edge-2", poisoned_payload(scenario, state, mode, scale))

    assert (receipt["accepted"], receipt["reason"]) == (False, "implausible_loss"), receipt
