"""Errors the orchestrator raises for bad input. Messages name the thing that is wrong."""

from __future__ import annotations

# ArtifactRejected.code values: short, stable labels (see ArtifactRejected).
REJECTION_CODES = (
    "oversized",
    "sha256_mismatch",
    "bad_spec",
    "bad_weights",
    "bad_dtype",
    "non_finite",
    "wrong_shapes",
    "truncated",
    "version_conflict",
    "missing_file",
    "invalid",
)


class ScenarioError(Exception):
    """A scenario cannot be loaded or cannot be carried out (missing file, YAML syntax, data too small).

    Field-level schema problems are pydantic `ValidationError`s instead; `orchestrator.cli.main` prints both
    one problem per line.
    """


class ArtifactRejected(Exception):  # noqa: N818 (name fixed by docs/ARCHITECTURE.md)
    """An uploaded or stored artifact failed validation.

    `reason` is the human-readable detail (expected vs received); `code` is a short, stable label set where
    the check fails, for receipts, reports and Prometheus (`orchestrator.core.metrics.Ledger.record_upload`).
    Codes in use (`REJECTION_CODES`): oversized, sha256_mismatch, bad_spec, bad_weights, bad_dtype,
    non_finite, wrong_shapes, truncated (a stored file shorter than its header declares), version_conflict
    (a version already committed with another sha256), missing_file (a committed version lacks a file),
    and invalid (anything else).
    """

    def __init__(self, artifact_id: str, reason: str, code: str = "invalid") -> None:
        if code not in REJECTION_CODES:
            raise ValueError(f"code: expected one of {list(REJECTION_CODES)}, received {code!r}")
        self.artifact_id = artifact_id
        self.reason = reason
        self.code = code
        super().__init__(f"artifact {artifact_id} rejected: {reason}")

    def __reduce__(self) -> tuple[type[ArtifactRejected], tuple[str, str, str]]:
        # Exception pickling replays `args` (the message alone); Ray ships errors between processes.
        return (type(self), (self.artifact_id, self.reason, self.code))


class UnknownTask(KeyError):  # noqa: N818 (name fixed by docs/ARCHITECTURE.md)
    """A task name that the scenario or the registry does not know. `known` lists the valid names."""

    def __init__(self, task: str, known: list[str] | tuple[str, ...] = ()) -> None:
        self.task = task
        self.known = tuple(known)
        message = f"unknown task {task!r}"
        if self.known:
            message += f" (known tasks: {', '.join(self.known)})"
        super().__init__(message)

    def __str__(self) -> str:
        # KeyError's own __str__ wraps the message in quotes; show it plainly.
        return str(self.args[0])
