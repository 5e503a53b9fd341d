"""The BAIM's architecture as plain, validated, JSON-able dataclasses.

`BAIMConfig` is everything needed to rebuild a BAIM (or a decomposed task model, which is a BAIM with one
squad) before its weights are loaded: the learners in arrival order, the squads, the gate and connection
hyper-parameters and the list of surviving connections. `to_dict()` / `from_dict()` round-trip exactly.

Decisions recorded here (the rules the rest of `baim/` relies on):

- Names. Learner and task names match `[A-Za-z0-9_-]+`: they become `nn.ModuleDict` keys and safetensors key
  parts, and the `noise_for` key "@gate" (the gate code's noise) can never collide with a learner's name.
- Learner index n is the arrival order (position in `learners`). It orders same-stage connections.
- Squads. One `SquadSpec(task, members)` per task, in task order. A squad's members are learner names; usually
  the learners uploaded for that task, but a few-shot task's squad is made of existing learners of other
  tasks, so a learner may sit in several squads. Only full learners (depth None) can be members.
- Feeders. A learner in no squad is kept only because a surviving connection needs its features; it holds
  only the stages up to `depth` (the deepest stage any connection reads). Model-level pruning and
  decomposition produce such truncated learners.
- Connection rule. A connection projects learner a's stage-i output onto learner b's stage-j input with
  a != b and 0 <= j - i <= h (stage indices as in `baim.learners`, 0..2S-1). Two extra rules:
  1. Same stage (j == i) only from a lower to a higher arrival index (a < b). Together with j >= i this makes
     the graph a DAG: every edge, connection or a learner's own stage k -> k+1, strictly increases
     (stage, learner index) in lexicographic order.
  2. Source and destination are in the same phase (both encoder stages or both decoder stages): nothing
     crosses the bottleneck. An encoder-to-decoder connection would be a U-Net skip that lets the
     reconstruction bypass the latent (training it would teach the decoders to rely on features that do
     not exist when generating from the prior, where no encoder runs). With this rule generation uses
     exactly the decoder-phase subgraph that reconstruction trains, and encoder-phase connections simply
     do not run in generation.
- `connection_scope`: "all" makes every valid pair a candidate (within and across squads, as in the paper);
  "squad" keeps only pairs that share a squad.
- `mixture` (see docs/model.md): "sample" (default) trains the squad as a true mixture, the expected loss over
  the evaluated learners, and generates by drawing one learner from the gate weights; "blend", the earlier
  behaviour, trains and generates the gate-weighted average of the selected learners' images. A spec without
  the key was written before the key existed, by a BAIM that blended: it loads as "blend", so an old artifact
  keeps computing what it computed.
- `generation_only`: a model without any encoder (no encoder stages, fc_mu, fc_logvar or gate encoder) that
  can only generate: `baim.decompose.generation_model`. Its learners are members or decoder-phase feeders
  (depth >= S) and every connection is a decoder-phase one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from baim.config import LearnerSpec

NAME_PATTERN = re.compile(r"^[A-Za-z0-9_-]+$")
CONNECTION_SCOPES = ("all", "squad")
MIXTURES = ("sample", "blend")
LEGACY_MIXTURE = "blend"  # what a spec written before `mixture` existed did


def _check_name(what: str, name: object) -> None:
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise ValueError(f"{what}: expected a name matching [A-Za-z0-9_-]+, received {name!r}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_keys(what: str, d: object, required: set[str], optional: set[str]) -> dict[str, Any]:
    if not isinstance(d, dict):
        raise ValueError(f"{what}: expected a dict, received {type(d).__name__}")
    unknown = sorted(set(d) - required - optional)
    if unknown:
        raise ValueError(f"{what}: unknown keys {unknown}; expected only {sorted(required | optional)}")
    missing = sorted(required - set(d))
    if missing:
        raise ValueError(f"{what}: missing keys {missing}")
    return d


def is_encoder_stage(spec: LearnerSpec, stage: int) -> bool:
    """Stages 0..S-1 encode, S..2S-1 decode."""
    return stage < len(spec.widths)


@dataclass(frozen=True)
class LearnerEntry:
    """One learner of the BAIM: an edge upload (full) or a truncated feeder."""

    name: str  # unique; the learner's ModuleDict key and its noise_for key
    task: str  # the task it was uploaded for (its home squad); informational for feeders
    spec: LearnerSpec  # architecture of the (full) learner
    depth: int | None = None  # deepest stage kept; None = the full learner (all 2S stages)

    def __post_init__(self) -> None:
        _check_name("learner name", self.name)
        _check_name(f"learner {self.name!r} task", self.task)
        if not isinstance(self.spec, LearnerSpec):
            raise ValueError(f"learner {self.name!r} spec: expected a LearnerSpec, received {self.spec!r}")
        last = self.spec.num_stages - 1
        if self.depth is not None and (not _is_int(self.depth) or not 0 <= self.depth < last):
            raise ValueError(
                f"learner {self.name!r} depth: expected None (full) or an int in [0, {last - 1}], "
                f"received {self.depth!r}"
            )

    @property
    def last_stage(self) -> int:
        """Deepest stage this entry holds."""
        return self.spec.num_stages - 1 if self.depth is None else self.depth

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "task": self.task, "spec": self.spec.to_dict(), "depth": self.depth}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LearnerEntry:
        _check_keys("learner entry", d, {"name", "task", "spec"}, {"depth"})
        return cls(
            name=d["name"], task=d["task"], spec=LearnerSpec.from_dict(d["spec"]), depth=d.get("depth")
        )


@dataclass(frozen=True)
class SquadSpec:
    """The learners one task's LSGate chooses from, in the order of the gate's logits."""

    task: str
    members: tuple[str, ...]

    def __post_init__(self) -> None:
        _check_name("squad task", self.task)
        if isinstance(self.members, list):
            object.__setattr__(self, "members", tuple(self.members))
        if not isinstance(self.members, tuple) or len(self.members) == 0:
            raise ValueError(
                f"squad {self.task!r} members: expected a non-empty list, received {self.members!r}"
            )
        for name in self.members:
            _check_name(f"squad {self.task!r} member", name)
        if len(set(self.members)) != len(self.members):
            raise ValueError(f"squad {self.task!r} members: duplicates in {list(self.members)}")

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.task, "members": list(self.members)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SquadSpec:
        _check_keys("squad", d, {"task", "members"}, set())
        if not isinstance(d["members"], (list, tuple)):
            raise ValueError(f"squad members: expected a list, received {type(d['members']).__name__}")
        return cls(task=d["task"], members=tuple(d["members"]))


@dataclass(frozen=True, order=True)
class ConnectionSpec:
    """A linear projection from learner src's stage-src_stage output to dst's stage-dst_stage input."""

    src: str
    src_stage: int
    dst: str
    dst_stage: int

    def __post_init__(self) -> None:
        _check_name("connection src", self.src)
        _check_name("connection dst", self.dst)
        for what in ("src_stage", "dst_stage"):
            value = getattr(self, what)
            if not _is_int(value) or value < 0:
                raise ValueError(f"connection {what}: expected an int >= 0, received {value!r}")

    @property
    def key(self) -> str:
        """The connection's ModuleDict key (learner names never contain ':' or '>')."""
        return f"{self.src}:{self.src_stage}->{self.dst}:{self.dst_stage}"

    def to_dict(self) -> dict[str, Any]:
        return {"src": self.src, "src_stage": self.src_stage, "dst": self.dst, "dst_stage": self.dst_stage}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ConnectionSpec:
        _check_keys("connection", d, {"src", "src_stage", "dst", "dst_stage"}, set())
        return cls(src=d["src"], src_stage=d["src_stage"], dst=d["dst"], dst_stage=d["dst_stage"])


def connection_problem(
    conn: ConnectionSpec,
    learners: dict[str, LearnerEntry],
    index: dict[str, int],
    height: int,
) -> str | None:
    """Why `conn` breaks the connection rule (module docstring), or None when it is valid."""
    if conn.src not in learners:
        return f"unknown src learner {conn.src!r}"
    if conn.dst not in learners:
        return f"unknown dst learner {conn.dst!r}"
    if conn.src == conn.dst:
        return "src and dst are the same learner"
    src, dst = learners[conn.src], learners[conn.dst]
    if conn.src_stage > src.last_stage:
        return f"src_stage {conn.src_stage} is beyond {conn.src!r}'s last stage {src.last_stage}"
    if conn.dst_stage > dst.last_stage:
        return f"dst_stage {conn.dst_stage} is beyond {conn.dst!r}'s last stage {dst.last_stage}"
    gap = conn.dst_stage - conn.src_stage
    if not 0 <= gap <= height:
        return f"expected 0 <= dst_stage - src_stage <= connection_height {height}, received {gap}"
    if gap == 0 and index[conn.src] > index[conn.dst]:
        return "a same-stage connection must go from a lower to a higher arrival index"
    if is_encoder_stage(src.spec, conn.src_stage) != is_encoder_stage(dst.spec, conn.dst_stage):
        return (
            "src and dst stages are in different phases (encoder vs decoder): nothing crosses the bottleneck"
        )
    return None


@dataclass(frozen=True)
class BAIMConfig:
    """Everything a BAIM (or a task model) is built from, before weights."""

    learners: tuple[LearnerEntry, ...]  # arrival order: index n = position
    squads: tuple[SquadSpec, ...]  # one per task, in task-id order
    top_k: int = 2  # K learners the LSGate selects per input (all when the squad is smaller)
    connection_height: int = 3  # h: connections span 0 <= j - i <= h stages
    kld_weight: float = 0.00025  # weight of the gate-weighted KLD (and the gate code's KLD) in the loss
    gate_code_dim: int = 8  # size of the gate code c the LSGates read (see baim.gates)
    connection_scope: Literal["all", "squad"] = "all"  # which pairs are candidates when connections is None
    seed: int = 0  # seeds the initial gate weights (connections start at zero)
    connections: tuple[ConnectionSpec, ...] | None = field(default=None)  # surviving; None = all candidates
    mixture: Literal["sample", "blend"] = "sample"  # how the selected learners combine (module docstring)
    generation_only: bool = False  # no encoders: generate only (module docstring)

    def __post_init__(self) -> None:
        for what in ("learners", "squads", "connections"):
            value = getattr(self, what)
            if isinstance(value, list):
                object.__setattr__(self, what, tuple(value))
        if not isinstance(self.learners, tuple) or len(self.learners) == 0:
            raise ValueError(
                f"learners: expected a non-empty list of LearnerEntry, received {self.learners!r}"
            )
        if not isinstance(self.squads, tuple) or len(self.squads) == 0:
            raise ValueError(f"squads: expected a non-empty list of SquadSpec, received {self.squads!r}")
        if not _is_int(self.top_k) or self.top_k < 1:
            raise ValueError(f"top_k: expected an int >= 1, received {self.top_k!r}")
        if not _is_int(self.connection_height) or self.connection_height < 0:
            raise ValueError(f"connection_height: expected an int >= 0, received {self.connection_height!r}")
        if isinstance(self.kld_weight, bool) or not isinstance(self.kld_weight, (int, float)):
            raise ValueError(f"kld_weight: expected a float >= 0, received {self.kld_weight!r}")
        if not self.kld_weight >= 0:
            raise ValueError(f"kld_weight: expected a float >= 0, received {self.kld_weight!r}")
        if not _is_int(self.gate_code_dim) or self.gate_code_dim < 1:
            raise ValueError(f"gate_code_dim: expected an int >= 1, received {self.gate_code_dim!r}")
        if self.connection_scope not in CONNECTION_SCOPES:
            raise ValueError(
                f"connection_scope: expected one of {list(CONNECTION_SCOPES)}, "
                f"received {self.connection_scope!r}"
            )
        if not _is_int(self.seed):
            raise ValueError(f"seed: expected an int, received {self.seed!r}")
        if self.mixture not in MIXTURES:
            raise ValueError(f"mixture: expected one of {list(MIXTURES)}, received {self.mixture!r}")
        if not isinstance(self.generation_only, bool):
            raise ValueError(f"generation_only: expected a bool, received {self.generation_only!r}")

        names = [entry.name for entry in self.learners]
        for entry in self.learners:
            if not isinstance(entry, LearnerEntry):
                raise ValueError(f"learners: expected LearnerEntry items, received {entry!r}")
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"learners: duplicate names {duplicates}")
        first = self.learners[0].spec
        for entry in self.learners[1:]:
            if (entry.spec.resolution, entry.spec.in_channels) != (first.resolution, first.in_channels):
                raise ValueError(
                    f"learner {entry.name!r}: expected resolution {first.resolution} and in_channels "
                    f"{first.in_channels} like {self.learners[0].name!r}, received {entry.spec.resolution} "
                    f"and {entry.spec.in_channels}"
                )

        tasks = [squad.task for squad in self.squads]
        duplicates = sorted({task for task in tasks if tasks.count(task) > 1})
        if duplicates:
            raise ValueError(f"squads: more than one squad for tasks {duplicates}")
        by_name = {entry.name: entry for entry in self.learners}
        for squad in self.squads:
            for member in squad.members:
                if member not in by_name:
                    raise ValueError(f"squad {squad.task!r}: unknown member {member!r}; learners are {names}")
                if by_name[member].depth is not None:
                    raise ValueError(
                        f"squad {squad.task!r}: member {member!r} is a truncated feeder (depth "
                        f"{by_name[member].depth}); only full learners can be selected"
                    )

        if self.connections is not None:
            index = {name: n for n, name in enumerate(names)}
            seen: set[ConnectionSpec] = set()
            for conn in self.connections:
                if not isinstance(conn, ConnectionSpec):
                    raise ValueError(f"connections: expected ConnectionSpec items, received {conn!r}")
                if conn in seen:
                    raise ValueError(f"connection {conn.key}: listed twice")
                seen.add(conn)
                problem = connection_problem(conn, by_name, index, self.connection_height)
                if problem is not None:
                    raise ValueError(f"connection {conn.key}: {problem}")
        if self.generation_only:
            self._check_generation_only()

    def _check_generation_only(self) -> None:
        for entry in self.learners:
            if entry.last_stage < len(entry.spec.widths):
                raise ValueError(
                    f"learner {entry.name!r}: a generation-only model holds decoder stages only, received "
                    f"depth {entry.depth} (an encoder stage)"
                )
        if self.connections is None:
            raise ValueError("connections: a generation-only model lists its connections, received null")
        for conn in self.connections:
            if is_encoder_stage(self.learner(conn.dst).spec, conn.dst_stage):
                raise ValueError(
                    f"connection {conn.key}: a generation-only model has no encoder, received an "
                    "encoder-phase connection"
                )

    # ---- derived facts --------------------------------------------------------------------------------

    @property
    def tasks(self) -> tuple[str, ...]:
        """Task names in task-id order."""
        return tuple(squad.task for squad in self.squads)

    @property
    def learner_names(self) -> tuple[str, ...]:
        return tuple(entry.name for entry in self.learners)

    def learner(self, name: str) -> LearnerEntry:
        for entry in self.learners:
            if entry.name == name:
                return entry
        raise KeyError(f"unknown learner {name!r}; learners are {list(self.learner_names)}")

    def squad(self, task: str) -> SquadSpec:
        for squad in self.squads:
            if squad.task == task:
                return squad
        raise KeyError(f"unknown task {task!r}; tasks are {list(self.tasks)}")

    def with_changes(self, **changes: Any) -> BAIMConfig:
        """A validated copy with some fields replaced."""
        return replace(self, **changes)

    # ---- JSON -------------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "learners": [entry.to_dict() for entry in self.learners],
            "squads": [squad.to_dict() for squad in self.squads],
            "top_k": self.top_k,
            "connection_height": self.connection_height,
            "kld_weight": self.kld_weight,
            "gate_code_dim": self.gate_code_dim,
            "connection_scope": self.connection_scope,
            "seed": self.seed,
            "connections": None if self.connections is None else [c.to_dict() for c in self.connections],
            "mixture": self.mixture,
            "generation_only": self.generation_only,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BAIMConfig:
        optional = {
            "top_k",
            "connection_height",
            "kld_weight",
            "gate_code_dim",
            "connection_scope",
            "seed",
            "generation_only",
        }
        _check_keys("BAIM config", d, {"learners", "squads"}, optional | {"connections", "mixture"})
        for what in ("learners", "squads"):
            if not isinstance(d[what], (list, tuple)):
                raise ValueError(f"{what}: expected a list, received {type(d[what]).__name__}")
        connections = d.get("connections")
        if connections is not None and not isinstance(connections, (list, tuple)):
            raise ValueError(f"connections: expected a list or null, received {type(connections).__name__}")
        return cls(
            learners=tuple(LearnerEntry.from_dict(e) for e in d["learners"]),
            squads=tuple(SquadSpec.from_dict(s) for s in d["squads"]),
            connections=None
            if connections is None
            else tuple(ConnectionSpec.from_dict(c) for c in connections),
            mixture=d.get("mixture", LEGACY_MIXTURE),
            **{key: d[key] for key in optional if key in d},
        )


def candidate_connections(config: BAIMConfig, among: set[str] | None = None) -> list[ConnectionSpec]:
    """Every valid connection of `config` (ignoring config.connections), in a fixed order.

    Order: by source arrival index, source stage, destination arrival index, destination stage. With `among`,
    only connections that touch at least one of those learners (what `add_learner` creates).
    """
    by_name = {entry.name: entry for entry in config.learners}
    index = {entry.name: n for n, entry in enumerate(config.learners)}
    shared_squad: set[tuple[str, str]] = set()
    for squad in config.squads:
        shared_squad.update((a, b) for a in squad.members for b in squad.members)
    out = []
    for a in config.learners:
        for i in range(a.last_stage + 1):
            for b in config.learners:
                if a.name == b.name:
                    continue
                if among is not None and a.name not in among and b.name not in among:
                    continue
                if config.connection_scope == "squad" and (a.name, b.name) not in shared_squad:
                    continue
                for j in range(i, min(i + config.connection_height, b.last_stage) + 1):
                    conn = ConnectionSpec(a.name, i, b.name, j)
                    if connection_problem(conn, by_name, index, config.connection_height) is None:
                        out.append(conn)
    return out
