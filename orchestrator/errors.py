"""Errors the orchestrator raises for bad input. Messages name the thing that is wrong."""


class ArtifactRejected(Exception):  # noqa: N818 (name fixed by docs/ARCHITECTURE.md)
    """An uploaded or stored artifact failed validation; `reason` says what was wrong."""

    def __init__(self, artifact_id: str, reason: str) -> None:
        self.artifact_id = artifact_id
        self.reason = reason
        super().__init__(f"artifact {artifact_id} rejected: {reason}")
