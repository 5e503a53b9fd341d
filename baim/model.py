"""The bottom-up BAIM: N heterogeneous VAE learners in M task squads, a HierGate and projection connections.

Forward pass (reconstruction), for a batch x (B, C, R, R) with task ids (B,):
1. Gate. The gate encoder maps x to a gate code c (sampled, with a KL towards N(0, I)); the TSGate sends each
   sample to its task's LSGate, which selects min(K, squad size) members and weights them (baim.gates).
2. What must run, per sample (the paper's Fig. 4 dark modules). need[n][b] = the deepest stage of learner n
   that sample b needs: the last stage if n is selected for b, else the deepest source stage of a surviving
   connection into a stage of another learner that b needs, else -1. It is propagated in one pass over the
   (stage, learner) nodes in reverse topological order (connections only go forward in (stage, arrival index)
   order, see baim.model_config), so a feeder runs only up to the stage its consumers read.
3. Dispatch. Nodes (learner n, stage k) run in topological order, each once, on exactly the rows with
   need[n] >= k: stage 0 reads x, stage S reads latent_to_decoder(z) with z = mu + eps * std from the
   learner's own bottleneck, the other stages read the learner's previous stage; every surviving connection
   into (n, k) adds its projection of the source's output (gathered for these rows). Learners use per-sample
   normalisation, so running on a subset of rows gives each sample the result it would get alone. Compute
   therefore grows with K (and the connections into the selected learners), not with N. `stage_counter` counts
   the rows each (learner, stage) processed.
4. Mixture (`config.mixture`, see docs/model.md). "sample", the default: the squad is a true mixture and the
   loss is the expected loss over the evaluated learners, recon_loss = batch mean of sum_n w_n * mse_n and
   kld = batch mean of sum_n w_n * KLD_n (PyTorch-VAE's KLD per learner), with softmax weights w over the
   learners the LSGate selects: the top K at inference, the top max(K, 2) in training (baim.gates), so that
   the gate learns at K = 1 too. `recon` is the mixture's mean image sum_n w_n * recon_n. "blend", the legacy
   behaviour: recon = sum_n w_n * recon_n and recon_loss = mse(recon, x), with the top K in training too.
   Both: loss = recon_loss + kld_weight * (kld + gate code KLD), the gate code KLD being the batch mean of
   KL(q(c|x) || N(0, I)). Unselected feeders add nothing to the loss.

Generation (`generate(task, n, seed)`): the gate code comes from the prior and the LSGate selects the top K.
"sample": one learner per sample is drawn from the gate weights (`baim.gates.pick_members`, with a uniform
hashed from that sample's gate code) and its own decoded latent is the image: ancestral sampling of the
mixture the loss trains. "blend": every selected learner decodes its own latent and the images are averaged
with the gate weights. Each learner that must run (the drawn or selected ones and their feeders) draws
z ~ N(0, I), and only decoder stages run (encoder-phase connections cannot apply: no encoder runs; the
connection rule forbids connections across the bottleneck, so nothing else is lost).

Noise. Every random draw is keyed by a name: learner n's eps by its name, the gate code's by "@gate" (the
learner draw of generation is a hash of the gate code, `baim.gates.pick_uniforms`). Pass
`seed` to draw `noise_for(name, seed, B, dim)` (so a decomposed task model draws the same noise for the same
learner), `eps={name: (B, dim)}` to give it explicitly, or neither for fresh torch.randn noise (training).

Fusion (`add_learner`) is cheap and function-preserving: the new learner's weights are copied, its new
connections (every valid pair touching it) start at zero, and a new member of an existing squad gets a gate
logit offset of -1e4 until admitted (baim.gates), so every existing output stays bit-identical.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from typing import Any, NamedTuple, cast

import torch
import torch.nn.functional as F
from torch import nn

from baim.connections import ConnectionEnergy, ConnectionGraph, Shape
from baim.gates import GATE_NOISE_KEY, GateOutput, HierGate, pick_members, pick_uniforms
from baim.learners import VAELearner, noise_for
from baim.model_config import (
    BAIMConfig,
    ConnectionSpec,
    LearnerEntry,
    SquadSpec,
    candidate_connections,
    is_encoder_stage,
)

logger = logging.getLogger(__name__)

Noise = dict[str, torch.Tensor]
# outputs[(learner name, stage)] = (position of each batch row in `out`, -1 where it did not run; out)
StageOutputs = dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]]


class BAIMOutput(NamedTuple):
    recon: torch.Tensor  # (B, C, R, R) gate-weighted mixture of the selected learners, in [0, 1]
    loss: torch.Tensor  # recon_loss + kld_weight * (kld + gate_kld)
    recon_loss: torch.Tensor  # "sample": batch mean of sum_n w_n * mse_n; "blend": mse(recon, x)
    kld: torch.Tensor  # batch mean of the gate-weighted KLD of the selected learners
    gate_kld: torch.Tensor  # batch mean of the gate code's KLD
    gate_weights: torch.Tensor  # (B, N) HierGate output, columns in arrival order
    selected: torch.Tensor  # (B, N) bool, the top-K mask


class StageCounter:
    """Rows (samples) each (learner name, stage) processed: the hook that shows sparse dispatch."""

    def __init__(self) -> None:
        self.rows: Counter[tuple[str, int]] = Counter()

    def record(self, name: str, stage: int, rows: int) -> None:
        self.rows[(name, stage)] += rows

    def reset(self) -> None:
        self.rows.clear()

    def learner_rows(self, name: str) -> int:
        """Rows processed by any stage of learner `name` since the last reset."""
        return sum(count for (learner, _), count in self.rows.items() if learner == name)


def truncate_learner(learner: VAELearner, depth: int) -> None:
    """Drop (in place) every part of `learner` after stage `depth`; state_dict keys of the rest are unchanged.

    Relies on VAELearner's layout: encoder_stages, fc_mu / fc_logvar / decoder_input (the bottleneck) and
    decoder_stages.
    """
    S = len(learner.spec.widths)
    if not 0 <= depth < 2 * S:
        raise ValueError(f"depth: expected an int in [0, {2 * S - 1}], received {depth}")
    if depth < S:
        del learner.encoder_stages[depth + 1 :]
        learner.fc_mu = None  # type: ignore[assignment]
        learner.fc_logvar = None  # type: ignore[assignment]
        learner.decoder_input = None  # type: ignore[assignment]
        learner.decoder_stages = nn.ModuleList()
    else:
        del learner.decoder_stages[depth - S + 1 :]


def strip_encoder(learner: VAELearner) -> None:
    """Drop (in place) what only reconstruction uses: the encoder stages, fc_mu and fc_logvar."""
    learner.encoder_stages = nn.ModuleList()
    learner.fc_mu = None  # type: ignore[assignment]
    learner.fc_logvar = None  # type: ignore[assignment]


def required_depths(
    config: BAIMConfig, squads: Sequence[SquadSpec], generation: bool = False
) -> dict[str, int]:
    """Deepest stage of each learner needed to compute `squads` for some input (-1: not needed at all).

    Squad members need every stage; a connection into a needed stage makes its source stage needed (with
    `generation`, only decoder-phase connections: no encoder runs in generation). One pass over destinations
    in descending (stage, arrival index) order is enough (see the module docstring).
    """
    index = {entry.name: n for n, entry in enumerate(config.learners)}
    depth = {entry.name: -1 for entry in config.learners}
    for squad in squads:
        for member in squad.members:
            depth[member] = config.learner(member).last_stage
    connections = _phase_connections(config, generation)
    for conn in sorted(connections, key=lambda c: (c.dst_stage, index[c.dst]), reverse=True):
        if depth[conn.dst] >= conn.dst_stage:
            depth[conn.src] = max(depth[conn.src], conn.src_stage)
    return depth


def _phase_connections(config: BAIMConfig, generation: bool) -> list[ConnectionSpec]:
    """config's connections; with `generation`, only the decoder-phase ones."""
    connections = list(config.connections or ())
    if not generation:
        return connections
    specs = {entry.name: entry.spec for entry in config.learners}
    return [c for c in connections if not is_encoder_stage(specs[c.dst], c.dst_stage)]


def compact_config(config: BAIMConfig, squads: Sequence[SquadSpec], generation: bool = False) -> BAIMConfig:
    """The smallest config that computes `squads` exactly: unneeded learners and connections dropped,
    feeders cut after the deepest stage they feed.

    With `generation`, the smallest that generates `squads` exactly: a generation-only config (no encoders,
    no encoder-phase connections, feeders of decoder stages only).
    """
    depth = required_depths(config, squads, generation)
    learners = []
    for entry in config.learners:
        d = depth[entry.name]
        if d < 0:
            continue
        learners.append(
            LearnerEntry(entry.name, entry.task, entry.spec, None if d == entry.spec.num_stages - 1 else d)
        )
    connections = tuple(c for c in _phase_connections(config, generation) if depth[c.dst] >= c.dst_stage)
    return config.with_changes(
        learners=tuple(learners),
        squads=tuple(squads),
        connections=connections,
        generation_only=config.generation_only or generation,
    )


class BAIM(nn.Module):
    """The cloud's big model. Build with `BAIM(config)` (random weights) or `BAIM.from_learners(...)`."""

    def __init__(self, config: BAIMConfig) -> None:
        super().__init__()
        if not isinstance(config, BAIMConfig):
            raise TypeError(f"config: expected a BAIMConfig, received {type(config).__name__}")
        if config.connections is None:
            config = config.with_changes(connections=tuple(candidate_connections(config)))
        self.config = config
        self.learners = nn.ModuleDict()
        for entry in config.learners:
            self.learners[entry.name] = self._make_learner(entry)
        first = config.learners[0].spec
        self.gate = HierGate(
            tasks=list(config.tasks),
            squad_sizes=[len(squad.members) for squad in config.squads],
            in_channels=first.in_channels,
            resolution=first.resolution,
            code_dim=config.gate_code_dim,
            top_k=config.top_k,
            seed=config.seed,
            with_encoder=not config.generation_only,
        )
        self.connections = ConnectionGraph(list(config.connections or ()), self._shapes())
        self.stage_counter = StageCounter()

    @classmethod
    def from_learners(
        cls,
        tasks: Sequence[str],
        learners: Sequence[tuple[str, str, VAELearner]],
        top_k: int = 2,
        connection_height: int = 3,
        kld_weight: float = 0.00025,
        **options: Any,
    ) -> BAIM:
        """Fuse uploaded learners [(name, task, learner)] (arrival order) into a BAIM with one squad per task.

        `options` are the other BAIMConfig fields (gate_code_dim, connection_scope, seed, connections).
        """
        tasks = list(tasks)
        unknown = sorted({task for _, task, _ in learners if task not in tasks})
        if unknown:
            raise ValueError(f"learners: tasks {unknown} are not in tasks {tasks}")
        squads = []
        for task in tasks:
            members = tuple(name for name, learner_task, _ in learners if learner_task == task)
            if not members:
                raise ValueError(f"tasks: task {task!r} has no learner; every squad needs at least one")
            squads.append(SquadSpec(task, members))
        config = BAIMConfig(
            learners=tuple(LearnerEntry(name, task, learner.spec) for name, task, learner in learners),
            squads=tuple(squads),
            top_k=top_k,
            connection_height=connection_height,
            kld_weight=kld_weight,
            **options,
        )
        baim = cls(config)
        for name, _, learner in learners:
            baim.learners[name].load_state_dict(learner.state_dict())
        return baim

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> BAIM:
        if not isinstance(spec, dict) or spec.get("kind") != "baim":
            raise ValueError(f"spec: expected a dict with kind 'baim', received kind {_kind(spec)!r}")
        return cls(BAIMConfig.from_dict({k: v for k, v in spec.items() if k != "kind"}))

    def spec(self) -> dict[str, Any]:
        """JSON-able architecture; `BAIM.from_spec(spec)` rebuilds it (then load the state_dict)."""
        return {"kind": "baim", **self.config.to_dict()}

    # ---- structure ------------------------------------------------------------------------------------

    def _make_learner(self, entry: LearnerEntry) -> VAELearner:
        learner = VAELearner(entry.spec)
        if entry.depth is not None:
            truncate_learner(learner, entry.depth)
        if self.config.generation_only:
            strip_encoder(learner)
        return learner

    def _shapes(self, names: set[str] | None = None) -> dict[str, tuple[list[Shape], list[Shape]]]:
        """Stage input and output shapes of the learners `names` (all when None)."""
        # Shapes come from the spec, so they are known for truncated learners' dropped stages too.
        shapes = {}
        for name in self.learners if names is None else names:
            learner = self.learner(name)
            stages = range(learner.spec.num_stages)
            shapes[name] = (
                [learner.stage_input_shape(k) for k in stages],
                [learner.stage_output_shape(k) for k in stages],
            )
        return shapes

    def learner(self, name: str) -> VAELearner:
        return cast(VAELearner, self.learners[name])

    def _device_dtype(self) -> tuple[torch.device, torch.dtype]:
        """Where the BAIM's parameters live and their dtype (the first parameter's; all share them)."""
        first = next(self.parameters())
        return first.device, first.dtype

    @property
    def num_learners(self) -> int:
        return len(self.config.learners)

    def selection_min_k(self) -> int:
        """`min_k` of the LSGates in forward now: 2 in training with the "sample" mixture, else 1 (top K)."""
        return 2 if self.training and self.config.mixture == "sample" else 1

    def squad_columns(self, task: str) -> list[int]:
        """Gate-output columns (arrival indices) of task's squad members, in the LSGate's order."""
        index = {name: n for n, name in enumerate(self.config.learner_names)}
        return [index[name] for name in self.config.squad(task).members]

    def learner_modules(self) -> list[nn.Module]:
        """The learners (for baim.training.apply_strategy)."""
        return list(self.learners.values())

    def gate_parameters(self) -> list[nn.Parameter]:
        return list(self.gate.parameters())

    def connection_parameters(self) -> list[nn.Parameter]:
        return list(self.connections.parameters())

    def pending_learners(self) -> list[str]:
        """Members fused into an existing squad whose gate logit is still offset (not yet admitted)."""
        pending = []
        for squad in self.config.squads:
            offsets = self.gate.squad_gate(squad.task).admission_offset
            pending += [m for m, off in zip(squad.members, offsets.tolist(), strict=True) if off != 0.0]
        return sorted(set(pending), key=self.config.learner_names.index)

    def add_learner(self, name: str, task: str, learner: VAELearner) -> list[ConnectionSpec]:
        """Fuse an uploaded learner (function-preserving). Returns the new, zero-initialised connections.

        Joins task's squad (pending: its gate logit is offset until `baim.continual.admit`) or founds a new
        squad for a new task (admitted at once: no existing output depends on that squad).

        The cost is that of the new learner's connections: only the new modules are built and moved to the
        BAIM's device and dtype, and only what is new is validated in depth (see `_config_with_learner`).
        """
        if not isinstance(learner, VAELearner):
            raise TypeError(f"learner: expected a VAELearner, received {type(learner).__name__}")
        if name in self.learners:
            raise ValueError(f"name: learner {name!r} is already in the BAIM")
        config, new_connections = _config_with_learner(self.config, LearnerEntry(name, task, learner.spec))

        device, dtype = self._device_dtype()
        module = VAELearner(learner.spec)
        module.load_state_dict(learner.state_dict())  # strict: the weights must fit the spec's architecture
        # only the new modules move, never the whole BAIM
        self.learners[name] = module.to(device=device, dtype=dtype)
        if task in self.gate.squad_gates:
            self.gate.squad_gate(task).add_member(pending=True)
        else:
            self.gate.add_squad(task, 1)
        self.config = config
        touched = {name} | {c.src for c in new_connections} | {c.dst for c in new_connections}
        # The BAIM's device and dtype, not the graph's: a graph without connections has neither.
        self.connections.add(new_connections, self._shapes(touched), device=device, dtype=dtype)
        logger.info(
            "fused learner %s into squad %s with %d new connections", name, task, len(new_connections)
        )
        return new_connections

    @torch.no_grad()
    def restructure(self, config: BAIMConfig) -> None:
        """Shrink in place to `config`: a sub-structure of the current one (fewer learners, stages, members,
        squads or connections; nothing new). Kept parameters keep their values."""
        old = self.config
        for entry in old.learners:
            if entry.name not in config.learner_names:
                del self.learners[entry.name]
                continue
            new_entry = config.learner(entry.name)
            if new_entry.spec != entry.spec or new_entry.last_stage > entry.last_stage:
                raise ValueError(f"restructure: learner {entry.name!r} would grow or change its spec")
            if new_entry.last_stage < entry.last_stage:
                truncate_learner(self.learner(entry.name), new_entry.last_stage)
        for squad in old.squads:
            if squad.task not in config.tasks:
                self.gate.remove_squad(squad.task)
                continue
            members = config.squad(squad.task).members
            unknown = [m for m in members if m not in squad.members]
            if unknown:
                raise ValueError(f"restructure: squad {squad.task!r} would gain members {unknown}")
            self.gate.squad_gate(squad.task).keep_members([squad.members.index(m) for m in members])
        if list(config.tasks) != list(self.gate.squad_gates.keys()):
            raise ValueError(f"restructure: expected the task order {list(self.gate.squad_gates.keys())}")
        kept = set(config.connections or ())
        unknown_connections = kept - set(self.connections.specs)
        if unknown_connections:
            raise ValueError(f"restructure: unknown connections {sorted(c.key for c in unknown_connections)}")
        self.connections.remove([c for c in self.connections.specs if c not in kept])
        self.config = config

    # ---- forward --------------------------------------------------------------------------------------

    def _task_tensor(
        self, task_ids: torch.Tensor | int | str, batch: int, device: torch.device
    ) -> torch.Tensor:
        if isinstance(task_ids, str):
            if task_ids not in self.config.tasks:
                raise ValueError(f"task: expected one of {list(self.config.tasks)}, received {task_ids!r}")
            task_ids = self.config.tasks.index(task_ids)
        if isinstance(task_ids, int):
            return torch.full((batch,), task_ids, dtype=torch.long, device=device)
        if not isinstance(task_ids, torch.Tensor) or task_ids.shape != (batch,):
            shape = tuple(task_ids.shape) if isinstance(task_ids, torch.Tensor) else type(task_ids).__name__
            raise ValueError(f"task_ids: expected a tensor of shape ({batch},), received {shape}")
        return task_ids.to(device=device, dtype=torch.long)

    @staticmethod
    def _noise(
        name: str, batch: int, dim: int, eps: Noise | None, seed: int | None, like: torch.Tensor
    ) -> torch.Tensor:
        if eps is not None:
            if name not in eps:
                raise ValueError(f"eps: expected a tensor for {name!r}, received keys {sorted(eps)}")
            if tuple(eps[name].shape) != (batch, dim):
                raise ValueError(
                    f"eps[{name!r}]: expected shape ({batch}, {dim}), received {tuple(eps[name].shape)}"
                )
            return eps[name].to(device=like.device, dtype=like.dtype)
        if seed is not None:
            return noise_for(name, seed, batch, dim, device=like.device).to(like.dtype)
        return torch.randn(batch, dim, device=like.device, dtype=like.dtype)

    def _check_images(self, x: torch.Tensor) -> None:
        spec = self.config.learners[0].spec
        expected = (spec.in_channels, spec.resolution, spec.resolution)
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or tuple(x.shape[1:]) != expected:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"images: expected shape (B, {expected}), received {shape}")

    def route(
        self,
        x: torch.Tensor,
        task_ids: torch.Tensor | int | str,
        eps: Noise | None = None,
        seed: int | None = None,
        min_k: int | None = None,
    ) -> GateOutput:
        """Run only the HierGate on images: weights and selection mask (B, N), gate code and its KLD.

        `min_k` as in `baim.gates.LSGate.forward`; None: what forward uses now (`selection_min_k`).
        """
        if self.gate.encoder is None:
            raise ValueError(
                "images: this is a generation-only model (no encoders); reconstruct with the full task model"
            )
        self._check_images(x)
        batch = x.shape[0]
        tasks = self._task_tensor(task_ids, batch, x.device)
        gate_eps = self._noise(GATE_NOISE_KEY, batch, self.config.gate_code_dim, eps, seed, x)
        code = self.gate.encoder(x, gate_eps)
        min_k = self.selection_min_k() if min_k is None else min_k
        weights, selected = self.gate(code.code, tasks, self._columns(), self.num_learners, min_k)
        return GateOutput(weights=weights, selected=selected, code=code.code, kld=code.kld)

    def _route_code(self, code: torch.Tensor, task_id: int) -> GateOutput:
        tasks = torch.full((code.shape[0],), task_id, dtype=torch.long, device=code.device)
        weights, selected = self.gate(code, tasks, self._columns(), self.num_learners)
        return GateOutput(weights=weights, selected=selected, code=code, kld=code.new_zeros(code.shape[0]))

    def _columns(self) -> list[list[int]]:
        return [self.squad_columns(task) for task in self.config.tasks]

    def forward(
        self,
        x: torch.Tensor,
        task_ids: torch.Tensor | int | str,
        eps: Noise | None = None,
        seed: int | None = None,
        probe: ConnectionEnergy | None = None,
        target: torch.Tensor | None = None,
    ) -> BAIMOutput:
        """Reconstruct x (B, C, R, R) in [0, 1]; task_ids (B,) task indices (or one task name / index).

        `probe` accumulates each connection's signal energy (for `baim.compaction`'s scores). `target`: what
        the reconstruction loss compares with, x's shape (default x itself; distillation passes a mix of x
        and a teacher's reconstruction, `baim.distill`).
        """
        if target is None:
            target = x
        elif target.shape != x.shape:
            raise ValueError(
                f"target: expected the images' shape {tuple(x.shape)}, received {tuple(target.shape)}"
            )
        gate = self.route(x, task_ids, eps, seed)
        need = self._needed_stages(gate.selected, generation=False)
        outputs, latents = self._run(x, x.shape[0], need, eps, seed, generation=False, probe=probe)
        recon = self._combine_images(outputs, gate.weights, gate.selected)
        error, kld = self._weighted_losses(outputs, latents, gate, target)
        # blend: the legacy loss of the blended image; sample: the expected loss over the mixture
        recon_loss = F.mse_loss(recon, target) if self.config.mixture == "blend" else error.mean()
        kld_mean = kld.mean()
        gate_kld = gate.kld.mean()
        loss = recon_loss + self.config.kld_weight * (kld_mean + gate_kld)
        return BAIMOutput(recon, loss, recon_loss, kld_mean, gate_kld, gate.weights, gate.selected)

    @torch.no_grad()
    def generate(
        self, task: str | int, n: int, seed: int | None = None, eps: Noise | None = None
    ) -> torch.Tensor:
        """n images (n, C, R, R) in [0, 1] for `task`, from the prior (gate code and every learner's z).

        Three steps, each a method, so that split generation (baim.split) runs exactly this code in two
        halves: `generation_gate`, `generation_stages`, `generation_images`.
        """
        gate = self.generation_gate(task, n, seed=seed, eps=eps)
        outputs = self.generation_stages(gate, seed=seed, eps=eps)
        return self.generation_images(outputs, gate)

    def generation_gate(
        self, task: str | int, n: int, seed: int | None = None, eps: Noise | None = None
    ) -> GateOutput:
        """Generation, step 1: the gate code drawn from the prior, routed to `task`'s squad."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n: expected a positive int, received {n!r}")
        if isinstance(task, str):
            if task not in self.config.tasks:
                raise ValueError(f"task: expected one of {list(self.config.tasks)}, received {task!r}")
            task = self.config.tasks.index(task)
        if isinstance(task, bool) or not isinstance(task, int) or not 0 <= task < len(self.config.tasks):
            raise ValueError(
                f"task: expected a task name or an index in [0, {len(self.config.tasks) - 1}], "
                f"received {task!r}"
            )
        like = next(self.parameters())
        code = self._noise(GATE_NOISE_KEY, n, self.config.gate_code_dim, eps, seed, like)
        gate = self._route_code(code, task)
        if self.config.mixture != "sample":
            return gate
        # "sample": each generated sample is the image of one learner drawn from the gate weights (its draw
        # is a hash of the sample's gate code, so no new noise key); weight 1.0: that learner's image exactly.
        columns = self.squad_columns(self.config.tasks[task])
        picked = pick_members(gate.weights[:, columns], gate.selected[:, columns], pick_uniforms(code))
        column = torch.tensor(columns, device=like.device)[picked]
        selected = F.one_hot(column, self.num_learners).bool()
        return gate._replace(weights=selected.to(like.dtype), selected=selected)

    def generation_stages(
        self,
        gate: GateOutput,
        seed: int | None = None,
        eps: Noise | None = None,
        *,
        stages: range | None = None,
        outputs: StageOutputs | None = None,
    ) -> StageOutputs:
        """Generation, step 2: run the decoder nodes `gate`'s selection needs whose stage is in `stages` (all
        when None), on top of `outputs` (what earlier stages computed, when generation is split)."""
        need = self._needed_stages(gate.selected, generation=True)
        ran, _ = self._run(
            None, gate.selected.shape[0], need, eps, seed, generation=True, stages=stages, outputs=outputs
        )
        return ran

    def generation_images(self, outputs: StageOutputs, gate: GateOutput) -> torch.Tensor:
        """Generation, step 3: the gate-weighted images of the selected learners, in [0, 1]."""
        return self._combine_images(outputs, gate.weights, gate.selected).clamp(0.0, 1.0)

    def _node_order(self) -> list[tuple[int, int]]:
        """All (stage, arrival index) nodes in topological order."""
        return sorted(
            (k, n) for n, entry in enumerate(self.config.learners) for k in range(entry.last_stage + 1)
        )

    def _needed_stages(self, selected: torch.Tensor, generation: bool) -> dict[str, torch.Tensor]:
        """need[name] (B,): deepest stage of that learner each sample needs, -1 for none."""
        need = {}
        for n, entry in enumerate(self.config.learners):
            need[entry.name] = torch.where(selected[:, n], entry.last_stage, -1)
        for k, n in reversed(self._node_order()):
            entry = self.config.learners[n]
            if generation and is_encoder_stage(entry.spec, k):
                continue
            for conn in self.connections.into(entry.name, k):
                reach = torch.where(need[entry.name] >= k, conn.src_stage, -1)
                need[conn.src] = torch.maximum(need[conn.src], reach)
        return need

    def _run(
        self,
        x: torch.Tensor | None,
        batch: int,
        need: dict[str, torch.Tensor],
        eps: Noise | None,
        seed: int | None,
        generation: bool,
        *,
        stages: range | None = None,
        outputs: StageOutputs | None = None,
        probe: ConnectionEnergy | None = None,
    ) -> tuple[StageOutputs, dict[str, tuple[torch.Tensor, ...]]]:
        """Run every needed (learner, stage) on its rows. Returns outputs[(name, k)] = (position of each batch
        row in out or -1, out) and latents[name] = (position, mu, logvar).

        `stages` limits the run to those stages (all when None); `outputs` holds what earlier stages already
        computed (split generation); it is copied, not changed. `probe` sees every stage input that
        connections add to, with their projections."""
        like = next(self.parameters())
        outputs = {} if outputs is None else dict(outputs)
        latents: dict[str, tuple[torch.Tensor, ...]] = {}
        for k, n in self._node_order():
            entry = self.config.learners[n]
            S = len(entry.spec.widths)
            if (generation and k < S) or (stages is not None and k not in stages):
                continue
            rows = torch.nonzero(need[entry.name] >= k).flatten()
            if rows.numel() == 0:
                continue
            learner = self.learner(entry.name)
            if k == 0:
                assert x is not None
                h = x[rows]
            elif k == S:
                z_eps = self._noise(entry.name, batch, entry.spec.latent_dim, eps, seed, like)[rows]
                if generation:
                    z = z_eps
                else:
                    enc_pos, enc_out = outputs[(entry.name, S - 1)]
                    mu, logvar = learner.encode_to_latent(enc_out[enc_pos[rows]])
                    z = learner.reparameterize(mu, logvar, z_eps)
                    latents[entry.name] = (_positions(rows, batch), mu, logvar)
                h = learner.latent_to_decoder(z)
            else:
                prev_pos, prev_out = outputs[(entry.name, k - 1)]
                h = prev_out[prev_pos[rows]]
            projected = []
            for conn in self.connections.into(entry.name, k):
                src_pos, src_out = outputs[(conn.src, conn.src_stage)]
                projected.append((conn, self.connections.project(conn, src_out[src_pos[rows]])))
                h = h + projected[-1][1]
            if probe is not None and projected:
                probe.record(h, projected)
            outputs[(entry.name, k)] = (_positions(rows, batch), learner.run_stage(k, h))
            self.stage_counter.record(entry.name, k, rows.numel())
        return outputs, latents

    def _combine_images(
        self,
        outputs: StageOutputs,
        weights: torch.Tensor,
        selected: torch.Tensor,
    ) -> torch.Tensor:
        """sum over selected n of weights[:, n] * learner n's image, (B, C, R, R)."""
        spec = self.config.learners[0].spec
        batch = weights.shape[0]
        images = weights.new_zeros(batch, spec.in_channels, spec.resolution, spec.resolution)
        for n, entry in enumerate(self.config.learners):
            rows = torch.nonzero(selected[:, n]).flatten()
            if rows.numel() == 0:
                continue
            pos, image = outputs[(entry.name, entry.last_stage)]
            images = images.index_add(0, rows, weights[rows, n].view(-1, 1, 1, 1) * image[pos[rows]])
        return images

    def _weighted_losses(
        self,
        outputs: StageOutputs,
        latents: dict[str, tuple[torch.Tensor, ...]],
        gate: GateOutput,
        x: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per sample (B,): sum_n w_n * mse_n and sum_n w_n * KLD_n over the selected learners."""
        batch = gate.weights.shape[0]
        error = gate.weights.new_zeros(batch)
        kld = gate.weights.new_zeros(batch)
        for n, entry in enumerate(self.config.learners):
            rows = torch.nonzero(gate.selected[:, n]).flatten()
            if rows.numel() == 0:
                continue
            weight = gate.weights[rows, n]
            pos, image = outputs[(entry.name, entry.last_stage)]
            if self.config.mixture == "sample":
                squared = (image[pos[rows]] - x[rows]) ** 2
                error = error.index_add(0, rows, weight * squared.flatten(start_dim=1).mean(dim=1))
            lat_pos, mu, logvar = latents[entry.name]
            mu, logvar = mu[lat_pos[rows]], logvar[lat_pos[rows]]
            learner_kld = -0.5 * torch.sum(1 + logvar - mu**2 - logvar.exp(), dim=1)
            kld = kld.index_add(0, rows, weight * learner_kld)
        return error, kld


def _positions(rows: torch.Tensor, batch: int) -> torch.Tensor:
    """(batch,) map from batch row to its position in `rows`, -1 where absent."""
    positions = torch.full((batch,), -1, dtype=torch.long, device=rows.device)
    positions[rows] = torch.arange(rows.numel(), device=rows.device)
    return positions


def _config_with_learner(config: BAIMConfig, entry: LearnerEntry) -> tuple[BAIMConfig, list[ConnectionSpec]]:
    """`config` with `entry` appended (to its task's squad, or a new squad) and every candidate connection
    touching it; returns (new config, new connections), validated incrementally.

    `BAIMConfig.with_changes` re-validates every connection, O(N^2) for N learners. Appending a learner
    cannot invalidate an existing connection: its endpoints, their arrival indices and the height are
    unchanged. So the learners and squads are validated in full (cheap), the new connections are
    valid by construction (`candidate_connections` keeps only valid ones), and they cannot repeat an old
    one (each touches the new learner). The connections are then set on the fresh, unshared config.
    """
    if entry.task in config.tasks:
        squads = tuple(
            SquadSpec(s.task, (*s.members, entry.name)) if s.task == entry.task else s for s in config.squads
        )
    else:
        squads = (*config.squads, SquadSpec(entry.task, (entry.name,)))
    extended = config.with_changes(learners=(*config.learners, entry), squads=squads, connections=None)
    new_connections = candidate_connections(extended, among={entry.name})
    # The config is frozen; this one was created above and nothing else holds it yet.
    object.__setattr__(extended, "connections", (*(config.connections or ()), *new_connections))
    return extended, new_connections


def _kind(spec: object) -> object:
    return spec.get("kind") if isinstance(spec, dict) else type(spec).__name__
