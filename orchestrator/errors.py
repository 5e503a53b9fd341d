"""Errors the orchestrator raises for bad input. Messages name the thing that is wrong."""


class ScenarioError(Exception):
    """A scenario cannot be loaded or cannot be carried out (missing file, YAML syntax, data too small).

    Field-level schema problems are pydantic `ValidationError`s instead; `orchestrator.cli` prints both
    one problem per line.
    """


class ArtifactRejected(Exception):  # noqa: N818 (name fixed by docs/ARCHITECTURE.md)
    """An uploaded or stored artifact failed validation; `reason` says what was wrong."""

    def __init__(self, artifact_id: str, reason: str) -> None:
        self.artifact_id = artifact_id
        self.reason = reason
        super().__init__(f"artifact {artifact_id} rejected: {reason}")


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
