"""Registry over pyarrow.fs: round trips, idempotence, every corruption kind, names, concurrency."""

from __future__ import annotations

import dataclasses
import io
import os
import pickle
import threading
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import torch
from safetensors.torch import save as safetensors_save

from baim.config import LearnerSpec
from baim.learners import VAELearner
from baim.model import BAIM
from orchestrator.core.artifacts import (
    ArtifactPayload,
    canonical_json,
    compute_sha256,
    pack_module,
    pack_state,
    unpack_payload,
)
from orchestrator.core.errors import ArtifactRejected
from orchestrator.core.names import MAX_MODEL_BYTES
from orchestrator.core.registry import ArtifactNotFound, ArtifactRef, Registry

SPEC = {"kind": "learner", "latent_dim": 4}


def make_payload(seed: int = 0, spec: dict | None = None) -> ArtifactPayload:
    generator = torch.Generator().manual_seed(seed)
    state = {
        "enc.weight": torch.randn(8, 3, generator=generator),
        "enc.bias": torch.randn(8, generator=generator),
    }
    return pack_state(state, spec or SPEC)


def hostile(weights: bytes, spec_json: str | None = None) -> ArtifactPayload:
    """Bytes with a matching sha256, so only the content checks can catch them."""
    spec_json = canonical_json(SPEC).decode() if spec_json is None else spec_json
    return ArtifactPayload(weights=weights, spec_json=spec_json, sha256=compute_sha256(spec_json, weights))


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    return Registry(str(tmp_path / "registry"))


def version_dir(tmp_path: Path, owner: str, version: str) -> Path:
    return tmp_path / "registry" / "artifacts" / owner / version


def assert_still_usable(registry: Registry) -> None:
    payload = make_payload(seed=99)
    registry.put("edge/healthy", "v000001", payload)
    assert registry.get("edge/healthy", "v000001") == payload


# ---- round trips ------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["plain", "file", "mock"])
def test_round_trip_on_each_filesystem(tmp_path: Path, scheme: str):
    # Prepare: mock:// is pyarrow's in-memory filesystem; it proves the store uses only pyarrow.fs calls.
    uri = {"plain": str(tmp_path / "r"), "file": f"file://{tmp_path}/r", "mock": "mock:///store/r"}[scheme]
    registry = Registry(uri)
    payload = make_payload()
    # Execute
    ref = registry.put("edge/edge-3", "v000001", payload)
    loaded = registry.get("edge/edge-3", "v000001")
    # Assert
    assert loaded == payload
    assert ref == ArtifactRef("edge/edge-3", "v000001", payload.sha256, payload.nbytes, ref.uri)
    assert ref.uri.endswith("/artifacts/edge/edge-3/v000001")
    if scheme != "plain":
        assert ref.uri.startswith(f"{scheme}://")
    spec, tensors = unpack_payload(loaded, artifact_id="x", max_bytes=1 << 20)
    assert spec == SPEC
    assert set(tensors) == {"enc.weight", "enc.bias"}
    assert registry.ref("edge/edge-3", "v000001") == ref
    assert registry.versions("edge/edge-3") == ["v000001"]
    assert registry.owners("edge/") == ["edge/edge-3"]
    registry.put_json("coordinator", {"round": 3})
    assert registry.get_json("coordinator") == {"round": 3}


def test_layout_on_disk(tmp_path: Path, registry: Registry):
    payload = make_payload()
    registry.put("task/smiling", "v000002", payload)
    folder = version_dir(tmp_path, "task/smiling", "v000002")
    assert sorted(os.listdir(folder)) == ["sha256", "spec.json", "weights.safetensors"]
    assert (folder / "sha256").read_text() == payload.sha256
    assert (folder / "spec.json").read_text() == payload.spec_json
    assert (folder / "weights.safetensors").read_bytes() == payload.weights


def test_relative_path_is_resolved(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    registry = Registry("relative-store")
    registry.put("baim", "v000001", make_payload())
    assert (tmp_path / "relative-store" / "artifacts" / "baim" / "v000001" / "sha256").is_file()


def test_a_second_registry_on_the_same_root_sees_the_artifacts(tmp_path: Path, registry: Registry):
    payload = make_payload()
    registry.put("baim", "v000001", payload)
    assert Registry(str(tmp_path / "registry")).get("baim", "v000001") == payload


# ---- idempotence and conflicts ----------------------------------------------------------------------


def test_re_put_of_same_content_returns_existing_ref(tmp_path: Path, registry: Registry):
    payload = make_payload()
    first = registry.put("edge/e1", "v000001", payload)
    mtime = (version_dir(tmp_path, "edge/e1", "v000001") / "sha256").stat().st_mtime_ns
    second = registry.put("edge/e1", "v000001", payload)
    assert first == second
    assert (version_dir(tmp_path, "edge/e1", "v000001") / "sha256").stat().st_mtime_ns == mtime


def test_conflicting_re_put_is_rejected_and_keeps_the_original(registry: Registry):
    original = make_payload(seed=0)
    registry.put("edge/e1", "v000001", original)
    with pytest.raises(ArtifactRejected) as info:
        registry.put("edge/e1", "v000001", make_payload(seed=1))
    assert info.value.artifact_id == "edge/e1@v000001"
    assert info.value.reason.startswith(f"version already committed with sha256 {original.sha256}, received ")
    assert info.value.code == "version_conflict"
    assert registry.get("edge/e1", "v000001") == original


# ---- rejected uploads (put) -------------------------------------------------------------------------


def torch_save_bytes() -> bytes:
    buffer = io.BytesIO()
    torch.save({"w": torch.ones(2)}, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("make_bad", "reason_start", "code"),
    [
        (lambda p: dataclasses.replace(p, sha256="f" * 64), "sha256 mismatch", "sha256_mismatch"),
        (lambda p: hostile(p.weights[:-4]), "weights truncated", "bad_weights"),
        (
            lambda p: hostile(pickle.dumps({"w": [1.0]})),
            "weights are not a valid safetensors blob",
            "bad_weights",
        ),
        (lambda p: hostile(torch_save_bytes()), "weights are not a valid safetensors blob", "bad_weights"),
        (
            lambda p: hostile(safetensors_save({"w": torch.tensor([1.0, float("nan")])})),
            "tensor 'w': 1 of 2",
            "non_finite",
        ),
        (
            lambda p: hostile(safetensors_save({"w": torch.tensor([float("inf")])})),
            "tensor 'w': 1 of 1",
            "non_finite",
        ),
        (
            lambda p: hostile(safetensors_save({"w": torch.arange(4)})),
            "tensor 'w': dtype torch.int64",
            "bad_dtype",
        ),
        (lambda p: hostile(p.weights, "{oops"), "spec is not valid JSON", "bad_spec"),
        (lambda p: hostile(p.weights, '{"latent_dim":4}'), "spec['kind']", "bad_spec"),
    ],
    ids=["sha", "truncated", "pickle", "torch-save", "nan", "inf", "int64", "spec-not-json", "spec-no-kind"],
)
def test_bad_upload_rejected_nothing_written_registry_still_usable(
    tmp_path: Path, registry: Registry, make_bad, reason_start, code
):
    # Execute
    with pytest.raises(ArtifactRejected) as info:
        registry.put("edge/bad", "v000001", make_bad(make_payload()))
    # Assert
    assert info.value.reason.startswith(reason_start)
    assert info.value.code == code
    assert not version_dir(tmp_path, "edge/bad", "v000001").exists()
    assert registry.versions("edge/bad") == []
    assert_still_usable(registry)


def test_oversized_upload_rejected(tmp_path: Path):
    payload = make_payload()
    registry = Registry(str(tmp_path / "registry"), max_artifact_bytes=payload.nbytes - 1)
    with pytest.raises(ArtifactRejected, match=f"oversized: {payload.nbytes} bytes, limit is"):
        registry.put("edge/big", "v000001", payload)
    assert registry.owners() == []


# ---- corrupted store (get) --------------------------------------------------------------------------


def corrupt_truncate(folder: Path) -> None:
    weights = folder / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])


def corrupt_flip_byte(folder: Path) -> None:
    weights = folder / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))


def corrupt_spec(folder: Path) -> None:
    (folder / "spec.json").write_text('{"kind":"baim"}')


def corrupt_spec_binary(folder: Path) -> None:
    (folder / "spec.json").write_bytes(b"\xff\xfe")


def delete_weights(folder: Path) -> None:
    (folder / "weights.safetensors").unlink()


@pytest.mark.parametrize(
    ("corrupt", "reason_start", "code"),
    [
        (corrupt_truncate, "stored weights truncated: safetensors header declares", "truncated"),
        (corrupt_flip_byte, "stored files do not match sha256", "sha256_mismatch"),
        (corrupt_spec, "stored files do not match sha256", "sha256_mismatch"),
        (corrupt_spec_binary, "stored spec.json is not UTF-8", "bad_spec"),
        (delete_weights, "stored file weights.safetensors is missing", "missing_file"),
    ],
)
def test_corrupted_store_rejected_on_get(tmp_path: Path, registry: Registry, corrupt, reason_start, code):
    registry.put("edge/e1", "v000001", make_payload())
    corrupt(version_dir(tmp_path, "edge/e1", "v000001"))
    with pytest.raises(ArtifactRejected) as info:
        registry.get("edge/e1", "v000001")
    assert info.value.artifact_id == "edge/e1@v000001"
    assert info.value.reason.startswith(reason_start)
    assert info.value.code == code
    assert_still_usable(registry)


def test_oversized_stored_file_rejected_without_reading(tmp_path: Path):
    Registry(str(tmp_path / "registry")).put("edge/e1", "v000001", make_payload())
    small = Registry(str(tmp_path / "registry"), max_artifact_bytes=10)
    with pytest.raises(ArtifactRejected, match=r"oversized: \d+ bytes stored, limit is 10 bytes"):
        small.get("edge/e1", "v000001")


def test_uncommitted_version_is_invisible(tmp_path: Path, registry: Registry):
    # A crash between the weights and the sha256 marker leaves an uncommitted folder.
    registry.put("edge/e1", "v000001", make_payload())
    (version_dir(tmp_path, "edge/e1", "v000001") / "sha256").unlink()
    assert registry.versions("edge/e1") == []
    assert registry.owners() == []
    with pytest.raises(ArtifactNotFound):
        registry.get("edge/e1", "v000001")
    # ... and the version can be written again.
    registry.put("edge/e1", "v000001", make_payload(seed=5))
    assert registry.versions("edge/e1") == ["v000001"]


def test_missing_artifact_raises_not_found(registry: Registry):
    with pytest.raises(ArtifactNotFound, match="no artifact edge/none@v000001"):
        registry.get("edge/none", "v000001")
    with pytest.raises(ArtifactNotFound):
        registry.ref("edge/none", "v000001")


def test_no_temporary_files_left_behind(tmp_path: Path, registry: Registry):
    registry.put("edge/e1", "v000001", make_payload())
    registry.put_json("coordinator", {"round": 1})
    leftovers = [p for p in (tmp_path / "registry").rglob("*") if ".tmp-" in p.name]
    assert leftovers == []


def test_failed_write_removes_its_temporary_file(tmp_path: Path, registry: Registry, monkeypatch):
    monkeypatch.setattr(registry, "_fs", _FailingMove(registry._fs))
    with pytest.raises(OSError, match="disk full"):
        registry.put("edge/e1", "v000001", make_payload())
    assert [p for p in (tmp_path / "registry").rglob("*") if ".tmp-" in p.name] == []
    assert registry.versions("edge/e1") == []


class _FailingMove:
    """The real local filesystem whose rename fails: a crash in the middle of a write."""

    def __init__(self, fs: pafs.FileSystem) -> None:
        self._fs = fs

    def move(self, src: str, dest: str) -> None:
        raise OSError("disk full")

    def __getattr__(self, name: str):
        return getattr(self._fs, name)


# ---- listing -------------------------------------------------------------------------------------------


def test_versions_latest_and_next_version(registry: Registry):
    assert registry.versions("edge/e1") == []
    assert registry.latest("edge/e1") is None
    assert registry.next_version("edge/e1") == "v000001"
    for version in ["v000002", "v000010", "v000001"]:
        registry.put("edge/e1", version, make_payload())
    assert registry.versions("edge/e1") == ["v000001", "v000002", "v000010"]
    assert registry.latest("edge/e1") == "v000010"
    assert registry.next_version("edge/e1") == "v000011"


def test_versions_sort_naturally_without_padding(registry: Registry):
    for version in ["v9", "v10", "v2"]:
        registry.put("baim", version, make_payload())
    assert registry.versions("baim") == ["v2", "v9", "v10"]
    assert registry.next_version("baim") == "v000011"


def test_owners_with_prefix(registry: Registry):
    for owner in ["edge/edge-1", "edge/edge-2", "task/smiling", "baim"]:
        registry.put(owner, "v000001", make_payload())
    assert registry.owners() == ["baim", "edge/edge-1", "edge/edge-2", "task/smiling"]
    assert registry.owners("edge/") == ["edge/edge-1", "edge/edge-2"]
    assert registry.owners("task/") == ["task/smiling"]
    assert registry.owners("nothing") == []


def test_owner_and_child_owner_coexist(registry: Registry):
    registry.put("edge", "v000001", make_payload())
    registry.put("edge/edge-1", "v000001", make_payload())
    assert registry.versions("edge") == ["v000001"]
    assert registry.owners() == ["edge", "edge/edge-1"]


def test_owner_cannot_nest_inside_a_version(registry: Registry):
    registry.put("edge", "v000001", make_payload())
    with pytest.raises(ValueError, match="already a committed version"):
        registry.put("edge/v000001", "v000001", make_payload())


def test_version_cannot_be_an_owner_folder(registry: Registry):
    registry.put("edge/edge-1", "v000001", make_payload())
    with pytest.raises(ValueError, match="already holds other owners' folders"):
        registry.put("edge", "edge-1", make_payload())


# ---- names ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "owner",
    [
        "",
        "/abs",
        "../up",
        "edge/../x",
        "edge//e1",
        "edge/",
        ".hidden",
        "edge/.e1",
        "sp ace",
        "a\\b",
        "é",
        "a\x00b",
    ],
)
def test_bad_owner_rejected(registry: Registry, owner: str):
    with pytest.raises(ValueError, match="owner"):
        registry.put(owner, "v000001", make_payload())
    with pytest.raises(ValueError, match="owner"):
        registry.versions(owner)


@pytest.mark.parametrize("version", ["", "v1/v2", "..", ".v1", "v 1"])
def test_bad_version_rejected(registry: Registry, version: str):
    with pytest.raises(ValueError, match="version"):
        registry.put("edge/e1", version, make_payload())
    with pytest.raises(ValueError, match="version"):
        registry.get("edge/e1", version)


def test_non_string_and_too_long_names_rejected(registry: Registry):
    with pytest.raises(ValueError, match="owner: expected a string, received int"):
        registry.put(3, "v1", make_payload())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"owner: expected 1\.\.256 characters, received 300"):
        registry.versions("a" * 300)


# ---- JSON documents ------------------------------------------------------------------------------------


def test_json_round_trip_overwrite_and_default(tmp_path: Path, registry: Registry):
    assert registry.get_json("coordinator/state") is None
    assert registry.get_json("coordinator/state", default={}) == {}
    registry.put_json("coordinator/state", {"round": 1, "fused": ["edge-1"]})
    registry.put_json("coordinator/state", {"round": 2, "fused": ["edge-1", "edge-2"], "loss": 0.5})
    assert registry.get_json("coordinator/state") == {"round": 2, "fused": ["edge-1", "edge-2"], "loss": 0.5}
    assert (tmp_path / "registry" / "state" / "coordinator" / "state.json").is_file()


def test_corrupt_json_document_named(tmp_path: Path, registry: Registry):
    registry.put_json("ckpt", {"a": 1})
    (tmp_path / "registry" / "state" / "ckpt.json").write_text('{"a": ')
    with pytest.raises(ValueError, match="state document 'ckpt'"):
        registry.get_json("ckpt")


@pytest.mark.parametrize("key", ["../escape", "/abs", "a/../../b", ""])
def test_bad_json_key_rejected(registry: Registry, key: str):
    with pytest.raises(ValueError, match="key"):
        registry.put_json(key, {})


# ---- concurrency ---------------------------------------------------------------------------------------


def test_concurrent_puts_of_distinct_versions_all_land(registry: Registry):
    # Prepare
    payloads = {f"v{i:06d}": make_payload(seed=i) for i in range(1, 13)}
    errors: list[BaseException] = []

    def upload(version: str) -> None:
        try:
            owner = f"edge/e{int(version[1:]) % 3}"
            registry.put(owner, version, payloads[version])
        except BaseException as err:
            errors.append(err)

    # Execute
    threads = [threading.Thread(target=upload, args=(v,)) for v in payloads]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # Assert
    assert errors == []
    for version, payload in payloads.items():
        assert registry.get(f"edge/e{int(version[1:]) % 3}", version) == payload
    assert sum(len(registry.versions(owner)) for owner in registry.owners("edge/")) == 12


def test_concurrent_puts_of_one_version_commit_exactly_one(registry: Registry):
    candidates = [make_payload(seed=i) for i in range(6)]
    outcomes: list[str] = []

    def upload(payload: ArtifactPayload) -> None:
        try:
            registry.put("baim", "v000001", payload)
            outcomes.append("stored")
        except ArtifactRejected:
            outcomes.append("rejected")

    threads = [threading.Thread(target=upload, args=(p,)) for p in candidates]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["rejected"] * 5 + ["stored"]
    assert registry.get("baim", "v000001") in candidates


# ---- put(verified=True): the coordinator's acknowledgement path ----------------------------------------


def test_verified_put_stores_the_same_artifact_as_a_full_put(tmp_path: Path):
    payload = make_payload()
    full = Registry(str(tmp_path / "full"))
    fast = Registry(str(tmp_path / "fast"))

    full.put("edge/e1", "v000001", payload)
    fast.put("edge/e1", "v000001", payload, verified=True)

    assert fast.get("edge/e1", "v000001") == full.get("edge/e1", "v000001") == payload
    for name in ("weights.safetensors", "spec.json", "sha256"):
        fast_file = tmp_path / "fast" / "artifacts" / "edge" / "e1" / "v000001" / name
        full_file = tmp_path / "full" / "artifacts" / "edge" / "e1" / "v000001" / name
        assert fast_file.read_bytes() == full_file.read_bytes()


@pytest.mark.parametrize(
    ("make_bad", "code"),
    [
        (lambda p: dataclasses.replace(p, sha256="f" * 64), "sha256_mismatch"),
        (lambda p: dataclasses.replace(p, weights=p.weights[:-1]), "sha256_mismatch"),
        (lambda p: dataclasses.replace(p, sha256="F" * 64), "sha256_mismatch"),
        (lambda p: dataclasses.replace(p, weights="text"), "bad_weights"),
    ],
    ids=["other-sha", "bytes-changed-after-verification", "sha-not-lowercase-hex", "weights-not-bytes"],
)
def test_verified_put_still_checks_that_the_bytes_are_the_verified_ones(
    tmp_path: Path, registry: Registry, make_bad, code
):
    with pytest.raises(ArtifactRejected) as info:
        registry.put("edge/e1", "v000001", make_bad(make_payload()), verified=True)

    assert info.value.code == code
    assert not version_dir(tmp_path, "edge/e1", "v000001").exists()


def test_verified_put_enforces_the_size_limit(tmp_path: Path):
    payload = make_payload()
    registry = Registry(str(tmp_path / "registry"), max_artifact_bytes=payload.nbytes - 1)
    with pytest.raises(ArtifactRejected) as info:
        registry.put("edge/e1", "v000001", payload, verified=True)
    assert info.value.code == "oversized"


def test_verified_put_skips_the_content_checks_the_caller_already_ran(registry: Registry):
    """The contract: verified=True trusts the caller's unpack_payload, so a NaN is stored, not re-checked."""
    nan_payload = hostile(safetensors_save({"w": torch.tensor([float("nan")])}))
    with pytest.raises(ArtifactRejected):
        registry.put("edge/e1", "v000001", nan_payload)

    registry.put("edge/e1", "v000001", nan_payload, verified=True)

    assert registry.get("edge/e1", "v000001") == nan_payload


def test_put_makes_the_data_durable_before_the_commit_marker(tmp_path: Path, registry: Registry, monkeypatch):
    import orchestrator.core.registry as registry_module

    synced: list[str] = []
    real_fsync = registry_module._fsync_local
    monkeypatch.setattr(registry_module, "_fsync_local", lambda path: (synced.append(path), real_fsync(path)))
    folder = str(version_dir(tmp_path, "edge/e1", "v000001"))

    registry.put("edge/e1", "v000001", make_payload(), verified=True)

    names = [path.removeprefix(folder).lstrip("/") or "<folder>" for path in synced]
    assert names[:3] == ["weights.safetensors", "spec.json", "<folder>"]
    assert names[3].startswith("sha256.tmp-") and names[4:] == ["<folder>"]


def test_load_module_rebuilds_a_committed_model_and_refuses_another_kind(registry: Registry):
    # Prepare
    torch.manual_seed(0)
    learner = VAELearner(LearnerSpec((4,), 3, 16))
    registry.put("edge/e1", "v000001", pack_module(learner, {"kind": "learner", **learner.spec.to_dict()}))

    # Execute
    loaded = registry.load_module("edge/e1", "v000001", VAELearner)

    # Assert
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in learner.state_dict().items())
    with pytest.raises(
        ArtifactRejected, match=r"edge/e1@v000001 rejected: spec kind: expected one of \['baim'\]"
    ):
        registry.load_module("edge/e1", "v000001", BAIM)
    with pytest.raises(ArtifactNotFound):
        registry.load_module("edge/e1", "v000002", VAELearner)


def test_the_default_size_limit_is_the_projects_model_limit(registry: Registry):
    assert registry.max_artifact_bytes == MAX_MODEL_BYTES == 1 << 30


# ---- append-only logs and blobs ---------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["plain", "mock"])
def test_log_appends_are_read_back_in_order_on_each_filesystem(tmp_path: Path, scheme: str):
    uri = {"plain": str(tmp_path / "r"), "mock": "mock:///store/r"}[scheme]
    registry = Registry(uri)

    registry.append_log("coordinator/receipts", [b'{"n":1}', b'{"n":2}'])
    registry.append_log("coordinator/receipts", [b'{"n":3}'])
    registry.append_log("coordinator/receipts", [])

    contents = registry.read_log("coordinator/receipts")
    assert contents.lines == [b'{"n":1}', b'{"n":2}', b'{"n":3}'] and contents.torn == []
    assert registry.read_log("other").lines == []
    with pytest.raises(ValueError, match="may not contain a newline"):
        registry.append_log("coordinator/receipts", [b"a\nb"])


def test_a_torn_tail_is_reported_and_a_new_instance_appends_to_a_fresh_segment(tmp_path: Path):
    # Prepare: a crash cut an append short (no newline at the end of the segment).
    first = Registry(str(tmp_path / "r"))
    first.append_log("log", [b"one", b"two"])
    (segment,) = (tmp_path / "r" / "logs" / "log").iterdir()
    with segment.open("ab") as stream:
        stream.write(b'{"cut')

    # Execute: a restarted process appends.
    second = Registry(str(tmp_path / "r"))
    second.append_log("log", [b"three"])
    contents = second.read_log("log")

    # Assert
    assert contents.lines == [b"one", b"two", b"three"]
    assert [(t.segment, t.nbytes) for t in contents.torn] == [(str(segment), 5)]
    assert sorted(p.name for p in (tmp_path / "r" / "logs" / "log").iterdir()) == [
        "00000000.jsonl",
        "00000001.jsonl",
    ]


def test_blobs_round_trip_by_range_and_are_deleted(tmp_path: Path, registry: Registry):
    registry.put_blob("inbox/a", b"0123456789")
    registry.put_blob("inbox/b", b"xy")

    assert registry.read_blob("inbox/a", 3, 4) == b"3456"
    assert registry.blobs("inbox") == ["inbox/a", "inbox/b"]
    with pytest.raises(ArtifactNotFound, match="missing or shorter"):
        registry.read_blob("inbox/b", 1, 5)
    registry.delete_blob("inbox/a")
    registry.delete_blob("inbox/a")  # already gone: no error
    assert registry.blobs("inbox") == ["inbox/b"]
