"""The coordinator's append-only receipt log (registry logs/coordinator/receipts): one JSON line per phase
transition of an upload, group-committed, replayed on resume.

- `received`: the upload's bytes are durable (in a blob under blobs/inbox/, written before the line);
- `decided`: its final receipt (accepted or rejected) and the admissions it changed (a learner it displaced);
- `pruned`: accepted uploads whose learners model-level pruning removed.

Nothing in it is unpickled: lines are JSON, checked against these models; the bytes of a received upload are
read back as the same (weights, spec_json, sha256) the edge sent and validated like any upload.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass, field
from typing import Annotated, Literal

from pydantic import Field, TypeAdapter, ValidationError

from orchestrator.core.artifacts import ArtifactPayload
from orchestrator.core.receipts import Admission, UploadReceipt
from orchestrator.core.registry import Registry
from orchestrator.core.scenario import StrictModel

logger = logging.getLogger(__name__)

RECEIPT_LOG_KEY = "coordinator/receipts"
INBOX = "inbox"  # blobs/inbox/<batch>: the bytes of received uploads, one blob per group commit


class ReceivedRecord(StrictModel):
    """An upload whose bytes are durable; it is decided later (again after a restart, until it is)."""

    kind: Literal["received"] = Field(description="Record type.")
    key: str = Field(description="The upload's key, edge_id@version#sha256.")
    edge_id: str = Field(description="The edge (a scenario edge: checked before receiving).")
    version: int = Field(ge=1, description="The version it named.")
    sha256: str = Field(description="Its sha256 (checked against the bytes before receiving).")
    received_at: float = Field(description="Unix seconds when the bytes were durable.")
    blob: str = Field(description="The inbox blob holding its bytes (registry blobs/<blob>).")
    offset: int = Field(ge=0, description="Where its weights start in the blob; the spec JSON follows them.")
    weights_bytes: int = Field(ge=0, description="Length of the weights.")
    spec_bytes: int = Field(ge=0, description="Length of the spec JSON (UTF-8).")


class AdmissionChange(StrictModel):
    """A later change to an accepted upload's admission."""

    key: str = Field(description="The accepted upload's key.")
    admission: Admission = Field(description="Its new admission.")
    detail: str = Field(description="Why (its new admission_detail).")


class DecidedRecord(StrictModel):
    """An upload's final receipt, with what its admission did to earlier ones."""

    kind: Literal["decided"] = Field(description="Record type.")
    receipt: UploadReceipt = Field(description="The final receipt (status accepted or rejected).")
    changes: list[AdmissionChange] = Field(
        default_factory=list, description="Earlier accepted uploads it displaced from the BAIM."
    )


class PrunedRecord(StrictModel):
    """Accepted uploads whose learner model-level pruning removed after the last round."""

    kind: Literal["pruned"] = Field(description="Record type.")
    changes: list[AdmissionChange] = Field(description="One per pruned upload (admission pruned).")


LogRecord = Annotated[ReceivedRecord | DecidedRecord | PrunedRecord, Field(discriminator="kind")]
_RECORD = TypeAdapter(LogRecord)


class ReceiptLogCorrupt(ValueError):  # noqa: N818 (reads as the state it reports)
    """A complete line of the receipt log is not a record (not a torn tail: the log was altered)."""


@dataclass
class _Pending:
    record: ReceivedRecord | DecidedRecord | PrunedRecord
    payload: ArtifactPayload | None
    done: asyncio.Future[ReceivedRecord | DecidedRecord | PrunedRecord] = field(repr=False)


class ReceiptLog:
    """Appends records (group commit: every record queued while a write runs goes in the next write) and
    replays them. A received record's bytes go in one inbox blob per write, made durable before its line."""

    def __init__(self, registry: Registry, key: str = RECEIPT_LOG_KEY) -> None:
        self.registry = registry
        self.key = key
        self._queue: list[_Pending] = []
        self._writer: asyncio.Task[None] | None = None
        self._open: dict[str, int] = {}  # inbox blob -> its received uploads not decided yet

    async def append(
        self, record: ReceivedRecord | DecidedRecord | PrunedRecord, payload: ArtifactPayload | None = None
    ) -> ReceivedRecord | DecidedRecord | PrunedRecord:
        """Queue `record` (a received one with its `payload`); returns it, as written, once it is durable."""
        if isinstance(record, ReceivedRecord) != (payload is not None):
            raise ValueError("a received record needs its payload, and only a received record has one")
        done: asyncio.Future[ReceivedRecord | DecidedRecord | PrunedRecord] = (
            asyncio.get_running_loop().create_future()
        )
        self._queue.append(_Pending(record, payload, done))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.ensure_future(self._write_queued())
        return await asyncio.shield(done)

    def write_now(self, records: list[DecidedRecord | PrunedRecord]) -> None:
        """Append records at once, without an event loop (a resuming coordinator's __init__)."""
        self.registry.append_log(self.key, [record.model_dump_json().encode() for record in records])

    async def _write_queued(self) -> None:
        while self._queue:
            batch, self._queue = self._queue, []
            try:
                written = await asyncio.to_thread(self._write, batch)
            except BaseException as err:  # every caller of the batch sees the failure
                for pending in batch:
                    if not pending.done.done():
                        pending.done.set_exception(err)
                if not isinstance(err, Exception):
                    raise
                continue
            for pending, record in zip(batch, written, strict=True):
                if isinstance(record, ReceivedRecord):
                    self._open[record.blob] = self._open.get(record.blob, 0) + 1
                if not pending.done.done():
                    pending.done.set_result(record)

    def _write(self, batch: list[_Pending]) -> list[ReceivedRecord | DecidedRecord | PrunedRecord]:
        records: list[ReceivedRecord | DecidedRecord | PrunedRecord] = []
        chunks: list[bytes] = []
        blob = f"{INBOX}/{uuid.uuid4().hex}"
        offset = 0
        for pending in batch:
            record = pending.record
            if isinstance(record, ReceivedRecord) and pending.payload is not None:
                spec = pending.payload.spec_json.encode()
                placed = {"blob": blob, "offset": offset, "weights_bytes": len(pending.payload.weights),
                          "spec_bytes": len(spec)}  # fmt: skip
                record = record.model_copy(update=placed)
                chunks += [pending.payload.weights, spec]
                offset += len(pending.payload.weights) + len(spec)
            records.append(record)
        if chunks:  # the bytes are durable before any line that points at them
            self.registry.put_blob(blob, b"".join(chunks))
        self.registry.append_log(self.key, [record.model_dump_json().encode() for record in records])
        return records

    def payload(self, record: ReceivedRecord) -> ArtifactPayload:
        """The bytes of a received upload, as the edge sent them (ArtifactNotFound: its blob is gone)."""
        data = self.registry.read_blob(record.blob, record.offset, record.weights_bytes + record.spec_bytes)
        weights, spec = data[: record.weights_bytes], data[record.weights_bytes :]
        return ArtifactPayload(weights=weights, spec_json=spec.decode(), sha256=record.sha256)

    def replay(self) -> list[ReceivedRecord | DecidedRecord | PrunedRecord]:
        """Every record, oldest first. A torn tail (a crash mid-append: never acknowledged) is skipped with
        a warning; a complete line that is not a record raises ReceiptLogCorrupt."""
        contents = self.registry.read_log(self.key)
        for tail in contents.torn:
            logger.warning(
                "receipt log %s: skipped a torn last line of %d bytes in %s (a crash during its append; "
                "it was never acknowledged, so its upload is received again when its edge resends it)",
                self.key, tail.nbytes, tail.segment,
            )  # fmt: skip
        records = []
        for number, line in enumerate(contents.lines, start=1):
            if not line.strip():
                continue
            try:
                records.append(_RECORD.validate_json(line))
            except ValidationError as err:
                raise ReceiptLogCorrupt(
                    f"receipt log {self.key} in {self.registry.uri}: line {number} is not a receipt record: "
                    f"{str(err)[:300]}"
                ) from None
        return records

    def track_open(self, undecided: list[ReceivedRecord]) -> None:
        """After a replay: the blobs these undecided uploads need stay; every other inbox blob is deleted."""
        self._open = {}
        for record in undecided:
            self._open[record.blob] = self._open.get(record.blob, 0) + 1
        for blob in self.registry.blobs(INBOX):
            if blob not in self._open:
                self.registry.delete_blob(blob)

    def close(self, record: ReceivedRecord) -> str | None:
        """`record` is decided (durably): the blob to delete when it was its last undecided upload."""
        left = self._open.get(record.blob, 0) - 1
        if left > 0:
            self._open[record.blob] = left
            return None
        self._open.pop(record.blob, None)
        return record.blob
