"""The artifact registry: one store over pyarrow.fs (a local directory, file://, s3://, ...).

Layout under the root:

    artifacts/<owner>/<version>/weights.safetensors
    artifacts/<owner>/<version>/spec.json
    artifacts/<owner>/<version>/sha256      # written last: its presence commits the version
    state/<key>.json                        # small JSON documents (checkpoints, coordinator state)
    logs/<key>/<segment>.jsonl              # append-only logs of JSON lines (the coordinator's receipts)
    blobs/<key>                             # opaque byte blobs (uploads received, not yet decided)

Owners may contain '/' (`edge/edge-3`, `task/smiling`, `baim`). A version is committed by its sha256 file,
written last (to a temporary name, then renamed into place), so a reader never sees a half-written version
as committed. The weights and spec files of a version that is not committed yet are written in place: no
reader looks at them before the commit, and a retry overwrites them. Durability on a local disk: the two
data files are fsynced, then the folder (their entries), then the sha256 file and the folder again, so a
committed marker can never survive a crash without the files it commits (5 fsyncs per artifact). Only
pyarrow.fs calls touch the store, so the same code runs against S3 on a cluster (the one exception is the
fsync for local disks, which pyarrow does not expose; S3 objects are durable once written).

Logs: a Registry instance appends to one new segment per log (local disks: appended and fsynced in place;
stores without appends, such as S3: one new segment object per append). A crash mid-append can only leave a
torn last line at the end of a segment, which `read_log` reports and skips; appends after a restart go to a
fresh segment, so a torn tail is never followed by more records in its segment.

Concurrency: one process may call a Registry from several threads. Writers in different processes must
not write the same (owner, version); if they did, `get` would detect the mix by its sha256.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import uuid
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs

from orchestrator.core.artifacts import (
    ArtifactPayload,
    ModuleT,
    check_payload_integrity,
    compute_sha256,
    declared_safetensors_size,
    load_module,
    unpack_payload,
)
from orchestrator.core.errors import ArtifactRejected
from orchestrator.core.names import MAX_MODEL_BYTES, SHA256_FILE, SPEC_FILE, WEIGHTS_FILE, version_name

logger = logging.getLogger(__name__)

# A name segment: starts with a letter or digit (no hidden files, no '.' or '..'), then a safe set.
_SEGMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_MAX_NAME_LENGTH = 256
_VERSION_NUMBER = re.compile(r"v(\d+)")
_SEGMENT_NAME = re.compile(r"(\d{8})\.jsonl")


@dataclass(frozen=True)
class TornTail:
    """The bytes after the last newline of a log segment: a record whose append a crash cut short."""

    segment: str  # the segment's path in the store
    nbytes: int


@dataclass(frozen=True)
class LogContents:
    """Every complete line of a log, oldest first, and the torn tails that were skipped."""

    lines: list[bytes]
    torn: list[TornTail]


class ArtifactNotFound(LookupError):  # noqa: N818 (named like errors.ArtifactRejected)
    """No committed artifact exists at (owner, version)."""


@dataclass(frozen=True)
class ArtifactRef:
    """Where a committed artifact lives and what it is."""

    owner: str
    version: str
    sha256: str
    nbytes: int  # weights + spec bytes, the same count as ArtifactPayload.nbytes
    uri: str  # the version's folder, e.g. s3://bucket/root/artifacts/edge/edge-3/v000001


def validate_name(value: str, what: str, *, allow_slash: bool) -> str:
    """Return `value` when it is a safe store name; raise ValueError naming `what` otherwise."""
    if not isinstance(value, str):
        raise ValueError(f"{what}: expected a string, received {type(value).__name__}")
    if not value or len(value) > _MAX_NAME_LENGTH:
        raise ValueError(f"{what}: expected 1..{_MAX_NAME_LENGTH} characters, received {len(value)}")
    segments = value.split("/")
    if not allow_slash and len(segments) > 1:
        raise ValueError(f"{what}: expected a single name without '/', received {value!r}")
    for segment in segments:
        if not _SEGMENT.fullmatch(segment):
            raise ValueError(
                f"{what}: each '/'-separated part must start with a letter or digit and contain only "
                f"letters, digits, '.', '_' or '-' (no empty parts, no '..', no absolute path); "
                f"received {value!r}"
            )
    return value


def _version_sort_key(version: str) -> tuple[tuple[int, int | str], ...]:
    """Natural order: v9 < v10, and zero-padded versions sort as their numbers."""
    parts = re.split(r"(\d+)", version)
    return tuple((0, int(part)) if part.isdigit() else (1, part) for part in parts if part)


class Registry:
    """Artifacts and small JSON documents under one pyarrow.fs root (a local path or a URI)."""

    def __init__(self, uri: str, max_artifact_bytes: int = MAX_MODEL_BYTES) -> None:
        if not isinstance(uri, str) or not uri:
            raise ValueError(f"uri: expected a non-empty path or URI, received {uri!r}")
        if max_artifact_bytes <= 0:
            raise ValueError(f"max_artifact_bytes: expected > 0, received {max_artifact_bytes}")
        if "://" not in uri and not uri.startswith("/"):
            # pyarrow wants an absolute path or a URI; a relative local path is relative to the caller.
            uri = os.path.abspath(uri)
        self.uri = uri
        self.max_artifact_bytes = max_artifact_bytes
        self._fs, root = pafs.FileSystem.from_uri(uri)
        self._root = root.rstrip("/") or "/"
        self._scheme = uri.split("://", 1)[0] if "://" in uri else ""
        self._is_local = isinstance(self._fs, pafs.LocalFileSystem)
        self._write_lock = threading.Lock()
        self._log_segments: dict[str, str] = {}  # log key -> the segment this instance appends to (local)
        self._fs.create_dir(self._path("artifacts"), recursive=True)
        self._fs.create_dir(self._path("state"), recursive=True)
        logger.info("registry at %s (%s)", uri, type(self._fs).__name__)

    # ---- artifacts -------------------------------------------------------------------------------

    def put(
        self, owner: str, version: str, payload: ArtifactPayload, *, verified: bool = False
    ) -> ArtifactRef:
        """Verify and durably store an artifact; idempotent on (owner, version, sha256). Returns once the
        artifact is durable (fsynced on a local disk).

        verified=True is for a caller that has just run `unpack_payload` on this very payload (the
        coordinator's upload validation): only the cheap checks run again (field types, the size limit and
        the sha256 over the bytes, which proves the bytes stored are the bytes verified), not the
        safetensors parse, dtype and finiteness checks. `get` is the same either way.

        Raises ArtifactRejected when the payload fails verification or when (owner, version) already holds
        a different sha256 (code version_conflict); ValueError for unsafe names.
        """
        validate_name(owner, "owner", allow_slash=True)
        validate_name(version, "version", allow_slash=False)
        artifact_id = f"{owner}@{version}"
        if verified:
            check_payload_integrity(payload, artifact_id=artifact_id, max_bytes=self.max_artifact_bytes)
        else:
            unpack_payload(payload, artifact_id=artifact_id, max_bytes=self.max_artifact_bytes)
        folder = self._version_folder(owner, version)
        with self._write_lock:
            existing = self._read_committed_sha(folder)
            if existing is not None:
                if existing == payload.sha256:
                    logger.debug("put %s: already stored with the same sha256", artifact_id)
                    return self._ref(owner, version, existing, payload.nbytes)
                reason = f"version already committed with sha256 {existing}, received {payload.sha256}"
                logger.warning("artifact %s rejected: %s", artifact_id, reason)
                raise ArtifactRejected(artifact_id, reason, code="version_conflict")
            self._check_no_nesting(owner, version)
            self._fs.create_dir(folder, recursive=True)
            # Uncommitted until the sha256 file exists: the data files need no temporary name.
            self._write_durable(f"{folder}/{WEIGHTS_FILE}", payload.weights)
            self._write_durable(f"{folder}/{SPEC_FILE}", payload.spec_json.encode())
            if self._is_local:
                _fsync_local(folder)  # their folder entries are durable before the commit marker can be
            self._write_atomic(f"{folder}/{SHA256_FILE}", payload.sha256.encode())
        logger.info("stored artifact %s (%d bytes, sha256 %s)", artifact_id, payload.nbytes, payload.sha256)
        return self._ref(owner, version, payload.sha256, payload.nbytes)

    def get(self, owner: str, version: str) -> ArtifactPayload:
        """Read a committed artifact and check its files against the stored sha256.

        Raises ArtifactNotFound when absent, ArtifactRejected when the stored files are truncated,
        oversized or corrupted.
        """
        validate_name(owner, "owner", allow_slash=True)
        validate_name(version, "version", allow_slash=False)
        artifact_id = f"{owner}@{version}"
        folder = self._version_folder(owner, version)
        sha256 = self._read_committed_sha(folder)
        if sha256 is None:
            raise ArtifactNotFound(f"no artifact {artifact_id} in registry {self.uri}")

        def reject(code: str, reason: str) -> ArtifactRejected:
            logger.warning("stored artifact %s rejected (%s): %s", artifact_id, code, reason)
            return ArtifactRejected(artifact_id, reason, code=code)

        infos = self._fs.get_file_info([f"{folder}/{WEIGHTS_FILE}", f"{folder}/{SPEC_FILE}"])
        for info in infos:
            if info.type != pafs.FileType.File:
                raise reject("missing_file", f"stored file {info.base_name} is missing")
        total = sum(int(info.size or 0) for info in infos)
        if total > self.max_artifact_bytes:
            raise reject(
                "oversized", f"oversized: {total} bytes stored, limit is {self.max_artifact_bytes} bytes"
            )
        weights = self._read(f"{folder}/{WEIGHTS_FILE}")
        spec_bytes = self._read(f"{folder}/{SPEC_FILE}")
        try:
            spec_json = spec_bytes.decode()
        except UnicodeDecodeError:
            raise reject("bad_spec", "stored spec.json is not UTF-8 (corrupted)") from None
        actual = compute_sha256(spec_json, weights)
        if actual != sha256:
            declared = declared_safetensors_size(weights)
            if declared is not None and declared > len(weights):
                raise reject(
                    "truncated",
                    f"stored weights truncated: safetensors header declares {declared} bytes, "
                    f"found {len(weights)}",
                )
            raise reject(
                "sha256_mismatch", f"stored files do not match sha256: committed {sha256}, computed {actual}"
            )
        return ArtifactPayload(weights=weights, spec_json=spec_json, sha256=sha256)

    def load_module(self, owner: str, version: str, module_type: type[ModuleT]) -> ModuleT:
        """The committed artifact rebuilt as a `module_type` (verified: see `artifacts.load_module`)."""
        payload = self.get(owner, version)
        return load_module(
            payload, module_type, artifact_id=f"{owner}@{version}", max_bytes=self.max_artifact_bytes
        )

    def ref(self, owner: str, version: str) -> ArtifactRef:
        """The ArtifactRef of a committed version (no content check; `get` verifies)."""
        validate_name(owner, "owner", allow_slash=True)
        validate_name(version, "version", allow_slash=False)
        folder = self._version_folder(owner, version)
        sha256 = self._read_committed_sha(folder)
        if sha256 is None:
            raise ArtifactNotFound(f"no artifact {owner}@{version} in registry {self.uri}")
        infos = self._fs.get_file_info([f"{folder}/{WEIGHTS_FILE}", f"{folder}/{SPEC_FILE}"])
        return self._ref(owner, version, sha256, sum(int(info.size or 0) for info in infos))

    def versions(self, owner: str) -> list[str]:
        """Committed versions of `owner`, oldest first (natural order: v9 before v10)."""
        validate_name(owner, "owner", allow_slash=True)
        owner_folder = self._path("artifacts", owner)
        selector = pafs.FileSelector(owner_folder, allow_not_found=True, recursive=False)
        candidates = [
            info for info in self._fs.get_file_info(selector) if info.type == pafs.FileType.Directory
        ]
        if not candidates:
            return []
        markers = self._fs.get_file_info([f"{info.path}/{SHA256_FILE}" for info in candidates])
        found = [
            info.base_name
            for info, marker in zip(candidates, markers, strict=True)
            if marker.type == pafs.FileType.File
        ]
        return sorted(found, key=_version_sort_key)

    def latest(self, owner: str) -> str | None:
        """The newest committed version of `owner`, or None when it has none."""
        found = self.versions(owner)
        return found[-1] if found else None

    def next_version(self, owner: str) -> str:
        """The version after the highest committed `vNNNNNN` of `owner` (v000001 for a new owner).

        Not a reservation: two writers asking at once get the same answer (one coordinator assigns versions).
        """
        numbers = [int(m.group(1)) for v in self.versions(owner) if (m := _VERSION_NUMBER.fullmatch(v))]
        return version_name(max(numbers, default=0) + 1)

    def owners(self, prefix: str = "") -> list[str]:
        """Every owner with at least one committed version whose name starts with `prefix`, sorted."""
        artifacts_root = self._path("artifacts")
        selector = pafs.FileSelector(artifacts_root, allow_not_found=True, recursive=True)
        found: set[str] = set()
        for info in self._fs.get_file_info(selector):
            if info.type != pafs.FileType.File or info.base_name != SHA256_FILE:
                continue
            relative = info.path[len(artifacts_root) :].strip("/")
            parts = relative.split("/")
            if len(parts) < 3:  # <owner...>/<version>/sha256
                continue
            owner = "/".join(parts[:-2])
            if owner.startswith(prefix):
                found.add(owner)
        return sorted(found)

    # ---- small JSON documents ---------------------------------------------------------------------

    def put_json(self, key: str, obj: Any) -> None:
        """Atomically write a JSON document at state/<key>.json (overwrites)."""
        validate_name(key, "key", allow_slash=True)
        data = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
        path = self._path("state", key) + ".json"
        with self._write_lock:
            self._fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
            self._write_atomic(path, data)
        logger.debug("stored state document %s (%d bytes)", key, len(data))

    def get_json(self, key: str, default: Any = None) -> Any:
        """The JSON document at state/<key>.json, or `default` when there is none."""
        validate_name(key, "key", allow_slash=True)
        path = self._path("state", key) + ".json"
        if self._fs.get_file_info(path).type != pafs.FileType.File:
            return default
        data = self._read(path)
        try:
            return json.loads(data)
        except ValueError as err:
            raise ValueError(f"state document {key!r} at {path} is not valid JSON: {err}") from None

    # ---- append-only logs -------------------------------------------------------------------------

    def append_log(self, key: str, lines: list[bytes]) -> None:
        """Durably append `lines` (each without a newline) to the log at logs/<key>/; returns once they
        are durable. One call is one write: a crash can cut only its end (a torn last line)."""
        validate_name(key, "key", allow_slash=True)
        if any(b"\n" in line for line in lines):
            raise ValueError(f"log {key!r}: a line may not contain a newline")
        if not lines:
            return
        data = b"".join(line + b"\n" for line in lines)
        folder = self._path("logs", key)
        with self._write_lock:
            if not self._is_local:  # objects are written whole: one new segment per append
                self._fs.create_dir(folder, recursive=True)
                self._write_atomic(f"{folder}/{self._next_segment(folder)}", data)
                return
            segment = self._log_segments.get(key)
            if segment is None:  # a fresh segment per instance: a torn tail of a crash stays at an end
                self._fs.create_dir(folder, recursive=True)
                segment = f"{folder}/{self._next_segment(folder)}"
                self._log_segments[key] = segment
            with open(segment, "ab") as stream:  # pyarrow has no fsync; this branch is local only
                stream.write(data)
                stream.flush()
                os.fsync(stream.fileno())
            if os.path.getsize(segment) == len(data):  # created just now: its folder entry must persist
                _fsync_local(folder)
        logger.debug("appended %d lines to log %s", len(lines), key)

    def read_log(self, key: str) -> LogContents:
        """Every complete line of the log at logs/<key>/ (empty when there is none), segment by segment;
        bytes after a segment's last newline (a crash mid-append) are skipped and reported in `torn`."""
        validate_name(key, "key", allow_slash=True)
        lines: list[bytes] = []
        torn: list[TornTail] = []
        for path in self._segments(self._path("logs", key)):
            data = self._read(path)
            complete, _, tail = data.rpartition(b"\n")
            if tail:
                torn.append(TornTail(segment=path, nbytes=len(tail)))
            if complete or data.endswith(b"\n"):
                lines.extend(complete.split(b"\n"))
        return LogContents(lines=lines, torn=torn)

    def _segments(self, folder: str) -> list[str]:
        selector = pafs.FileSelector(folder, allow_not_found=True, recursive=False)
        found = [
            info.path
            for info in self._fs.get_file_info(selector)
            if info.type == pafs.FileType.File and _SEGMENT_NAME.fullmatch(info.base_name)
        ]
        return sorted(found)

    def _next_segment(self, folder: str) -> str:
        numbers = [int(path.rsplit("/", 1)[1][:8]) for path in self._segments(folder)]
        return f"{max(numbers, default=-1) + 1:08d}.jsonl"

    # ---- blobs ------------------------------------------------------------------------------------

    def put_blob(self, key: str, data: bytes) -> None:
        """Atomically and durably write the bytes `data` at blobs/<key> (overwrites)."""
        validate_name(key, "key", allow_slash=True)
        path = self._path("blobs", key)
        with self._write_lock:
            self._fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
            self._write_atomic(path, data)

    def read_blob(self, key: str, offset: int, length: int) -> bytes:
        """`length` bytes of blobs/<key> from `offset` (ArtifactNotFound: the blob is absent or shorter)."""
        validate_name(key, "key", allow_slash=True)
        path = self._path("blobs", key)
        info = self._fs.get_file_info(path)
        if info.type != pafs.FileType.File or int(info.size or 0) < offset + length:
            raise ArtifactNotFound(f"blob {key!r} in registry {self.uri} is missing or shorter than expected")
        with self._fs.open_input_file(path) as stream:
            return bytes(stream.read_at(length, offset))

    def blobs(self, prefix: str) -> list[str]:
        """The keys of the blobs under blobs/<prefix>/, sorted."""
        validate_name(prefix, "prefix", allow_slash=True)
        folder = self._path("blobs", prefix)
        selector = pafs.FileSelector(folder, allow_not_found=True, recursive=True)
        root = self._path("blobs")
        return sorted(
            info.path[len(root) :].strip("/")
            for info in self._fs.get_file_info(selector)
            if info.type == pafs.FileType.File and ".tmp-" not in info.base_name
        )

    def delete_blob(self, key: str) -> None:
        """Remove blobs/<key> (no error when it is already gone)."""
        validate_name(key, "key", allow_slash=True)
        path = self._path("blobs", key)
        with self._write_lock:
            if self._fs.get_file_info(path).type == pafs.FileType.File:
                self._fs.delete_file(path)

    # ---- internals --------------------------------------------------------------------------------

    def _path(self, *parts: str) -> str:
        base = "" if self._root == "/" else self._root
        return "/".join([base, *parts])

    def _version_folder(self, owner: str, version: str) -> str:
        return self._path("artifacts", owner, version)

    def _ref(self, owner: str, version: str, sha256: str, nbytes: int) -> ArtifactRef:
        folder = self._version_folder(owner, version)
        uri = f"{self._scheme}://{folder}" if self._scheme else folder
        return ArtifactRef(owner=owner, version=version, sha256=sha256, nbytes=nbytes, uri=uri)

    def _read(self, path: str) -> bytes:
        with self._fs.open_input_stream(path) as stream:
            return bytes(stream.read())

    def _read_committed_sha(self, folder: str) -> str | None:
        path = f"{folder}/{SHA256_FILE}"
        if self._fs.get_file_info(path).type != pafs.FileType.File:
            return None
        return self._read(path).decode("ascii", errors="replace").strip()

    def _write_durable(self, path: str, data: bytes) -> None:
        """Write `path` in place and fsync it (local disks); the caller makes its folder entry durable."""
        with self._fs.open_output_stream(path) as stream:
            stream.write(data)
            stream.flush()
        if self._is_local:
            _fsync_local(path)

    def _write_atomic(self, path: str, data: bytes) -> None:
        """Write to a temporary sibling, make it durable, then rename over `path`."""
        temporary = f"{path}.tmp-{uuid.uuid4().hex}"
        try:
            with self._fs.open_output_stream(temporary) as stream:
                stream.write(data)
                stream.flush()
            if self._is_local:
                _fsync_local(temporary)
            self._fs.move(temporary, path)
            if self._is_local:
                _fsync_local(path.rsplit("/", 1)[0])  # the rename itself lives in the folder's entry
        except BaseException:
            if self._fs.get_file_info(temporary).type == pafs.FileType.File:
                self._fs.delete_file(temporary)
            raise

    def _check_no_nesting(self, owner: str, version: str) -> None:
        """Owners and versions share one folder tree: refuse names that would make one the other."""
        parts = [*owner.split("/"), version]
        ancestors = [self._path("artifacts", *parts[:depth]) for depth in range(1, len(parts))]
        for ancestor, info in zip(
            ancestors, self._fs.get_file_info([f"{a}/{SHA256_FILE}" for a in ancestors]), strict=True
        ):
            if info.type == pafs.FileType.File:
                raise ValueError(
                    f"owner {owner!r}: {ancestor} is already a committed version; "
                    "an owner cannot nest inside it"
                )
        folder = self._version_folder(owner, version)
        selector = pafs.FileSelector(folder, allow_not_found=True, recursive=False)
        if any(info.type == pafs.FileType.Directory for info in self._fs.get_file_info(selector)):
            raise ValueError(
                f"version {version!r} of owner {owner!r}: {folder} already holds other owners' folders"
            )


def _fsync_local(path: str) -> None:
    """fsync a local file or folder; pyarrow has no fsync, and remote stores commit on close."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
