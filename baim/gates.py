"""HierGate: a task-selecting gate (TSGate) over M learner-selecting gates (LSGates).

Per input the HierGate yields an N-vector (one entry per learner, columns in arrival order) whose only
non-zeros are min(K, squad size) entries on the members of the input's task squad: the paper's "N-dimensional
vector segmented into M sections with only K non-zero dimensions". A squad's section is the set of its
members' columns (not necessarily contiguous, since columns follow arrival order).

Decisions:
- TSGate routes by the given task id: the sample's task label in training, the request's task when serving.
  It has no parameters; a learned task classifier is not built (the task is always known in this system).
- What an LSGate reads: a small "gate code" c in R^d (d = gate_code_dim), the same for every squad.
  Reconstruction: c comes from a tiny gate encoder (the image average-pooled to at most 8x8, then one linear
  layer to (mu_c, logvar_c)), sampled as c = mu_c + eps * std_c and pulled towards N(0, I) by a KL term in the
  loss. Generation has no image: c ~ N(0, I), drawn from the prior with `noise_for("@gate", seed, ...)`.
  Because training sees samples of q(c|x), which the KL keeps close to the prior, generation routes the way
  training did. A learned per-task query would give every generated sample the same route; the gate code keeps
  routing input dependent in both modes, at the cost of d extra latent dimensions.
- LSGate: logits = W c + b + admission_offset; top-k by logit; weights = softmax over the k selected logits
  (zeros elsewhere). `admission_offset` is a buffer: 0 for admitted learners, PENDING_OFFSET (-1e4) for a
  learner fused into an existing squad and not yet trained. Such a learner's logit is 10^4 below the others,
  so it is never in the top-k of a squad of >= K admitted members, and when the squad is smaller (all run)
  its softmax weight is exp(-1e4) == 0.0 exactly in float32: fusion leaves outputs bit-identical. Because a
  zero weight also means a zero gradient, the trainer admits pending learners (`baim.continual.admit`) when
  it starts training the fused BAIM; from then on the new learner competes with logit W c + b (its row of W
  starts at zero).
- How many learners a squad evaluates: K at inference (reconstruction in eval mode, generation). A BAIM with
  the "sample" mixture evaluates min(max(K, 2), squad size) in training (`min_k=2`): at K = 1 the
  renormalised top-1 weight is always 1.0 and carries no gradient, while over two learners the expected loss
  sum_n w_n L_n gives logit n the gradient w_n (L_n - sum_m w_m L_m): the lower-loss learner gains weight.
  Rationale and measurements: docs/model.md.
- Sampling a learner (generation with the "sample" mixture): `pick_members` draws one selected member per
  row from its weights, by inverse CDF over the squad's member order, with a uniform u per row that is a
  32-bit integer hash of the bits of that row's prior gate code (`pick_uniforms`). Why a hash and not a
  noise key of its own: every caller that passes noise explicitly (Serve batches requests by concatenating
  each request's `noise_for` draws) already passes the gate code, so the draw needs nothing new, and a
  row's draw depends only on its own (seed, row) noise, in a batch or alone. The hash mixes every bit of
  the code, so u is spread uniformly and is, for sampling purposes, independent of the weights w(c) (tested
  empirically). Deterministic per seed and identical in the BAIM and in every model decomposed from it (same
  member order, same weights, same gate code).
- Ties among equal logits are broken by torch.topk, deterministically for the same input.
"""

from __future__ import annotations

import logging
import zlib
from typing import NamedTuple, cast

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

GATE_NOISE_KEY = "@gate"  # noise_for key of the gate code; learner names cannot contain "@"
HASH_MULTIPLIER = 0x45D9F3B  # the 32-bit integer hash's multiplier (a known good one; < 2**31, no overflow)
HASH_START = 0x9E3779B9 & 0x7FFFFFFF  # hash state before the first code coordinate
UINT32 = 0xFFFFFFFF
GATE_POOL = 8  # the gate encoder sees the image average-pooled to at most GATE_POOL x GATE_POOL
PENDING_OFFSET = -1.0e4  # logit offset of a fused, not yet admitted learner (see module docstring)


def seeded_generator(seed: int, name: str) -> torch.Generator:
    """A CPU generator keyed by (seed, name), stable across processes (crc32, not hash())."""
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)


class GateCode(NamedTuple):
    code: torch.Tensor  # (B, d), what the LSGates read
    kld: torch.Tensor  # (B,), KL(q(c|x) || N(0, I)) per sample; zeros when c came from the prior


class GateEncoder(nn.Module):
    """Images (B, C, R, R) -> gate code posterior (mu_c, logvar_c), each (B, d)."""

    def __init__(self, in_channels: int, resolution: int, code_dim: int, generator: torch.Generator) -> None:
        super().__init__()
        self.pool = min(GATE_POOL, resolution)
        self.code_dim = code_dim
        self.fc = nn.Linear(in_channels * self.pool * self.pool, 2 * code_dim)
        with torch.no_grad():
            nn.init.normal_(self.fc.weight, 0.0, self.fc.in_features**-0.5, generator=generator)
            nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor, eps: torch.Tensor) -> GateCode:
        flat = torch.flatten(F.adaptive_avg_pool2d(x, self.pool), start_dim=1)
        mu, logvar = self.fc(flat).chunk(2, dim=1)
        code = mu + eps * torch.exp(0.5 * logvar)
        kld = -0.5 * torch.sum(1 + logvar - mu**2 - logvar.exp(), dim=1)
        return GateCode(code=code, kld=kld)


class LSGate(nn.Module):
    """One squad's learner-selecting gate: gate code (B, d) -> weights and selection over its members."""

    admission_offset: torch.Tensor  # (num_members,) buffer: 0 admitted, PENDING_OFFSET pending

    def __init__(self, code_dim: int, num_members: int, top_k: int, generator: torch.Generator) -> None:
        super().__init__()
        if num_members < 1:
            raise ValueError(f"num_members: expected >= 1, received {num_members}")
        self.top_k = top_k
        self.proj = nn.Linear(code_dim, num_members)
        with torch.no_grad():
            nn.init.normal_(self.proj.weight, 0.0, code_dim**-0.5, generator=generator)
            nn.init.zeros_(self.proj.bias)
        self.register_buffer("admission_offset", torch.zeros(num_members))

    @property
    def num_members(self) -> int:
        return self.proj.out_features

    def logits(self, code: torch.Tensor) -> torch.Tensor:
        return self.proj(code) + self.admission_offset

    def forward(self, code: torch.Tensor, min_k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights, selected), each (B, num_members): softmax over the top-k logits, and the top-k mask.

        k = min(max(top_k, min_k), num_members): `min_k=2` is the training-time widening (module docstring).
        """
        logits = self.logits(code)
        k = min(max(self.top_k, min_k), self.num_members)
        top_values, top_index = logits.topk(k, dim=1)
        weights = torch.zeros_like(logits).scatter(1, top_index, F.softmax(top_values, dim=1))
        selected = torch.zeros_like(logits, dtype=torch.bool).scatter(1, top_index, True)
        return weights, selected

    @torch.no_grad()
    def add_member(self, pending: bool) -> None:
        """Append a member with a zero row (its logit is b = 0 plus the admission offset)."""
        old = self.proj
        self.proj = nn.Linear(old.in_features, old.out_features + 1).to(old.weight.device, old.weight.dtype)
        self.proj.weight.zero_()
        self.proj.bias.zero_()
        self.proj.weight[:-1] = old.weight
        self.proj.bias[:-1] = old.bias
        offset = torch.tensor([PENDING_OFFSET if pending else 0.0], device=old.weight.device)
        self.admission_offset = torch.cat([self.admission_offset, offset.to(self.admission_offset.dtype)])

    @torch.no_grad()
    def keep_members(self, positions: list[int]) -> None:
        """Keep only the members at `positions` (in that order), dropping the others' rows."""
        if not positions or len(set(positions)) != len(positions):
            raise ValueError(f"positions: expected distinct member positions, received {positions}")
        old = self.proj
        index = torch.tensor(positions, device=old.weight.device)
        self.proj = nn.Linear(old.in_features, len(positions)).to(old.weight.device, old.weight.dtype)
        self.proj.weight.copy_(old.weight[index])
        self.proj.bias.copy_(old.bias[index])
        self.admission_offset = self.admission_offset[index].clone()


def _hash32(h: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash of int64 values in [0, 2**32), elementwise (every product stays below 2**63)."""
    h = (h ^ (h >> 16)) * HASH_MULTIPLIER & UINT32
    h = (h ^ (h >> 16)) * HASH_MULTIPLIER & UINT32
    return h ^ (h >> 16)


def pick_uniforms(code: torch.Tensor) -> torch.Tensor:
    """One u in (0, 1) per row of a gate code (B, d): a hash of the row's float32 bits (module docstring)."""
    bits = code.detach().to(torch.float32).contiguous().view(torch.int32).to(torch.int64) & UINT32
    h = torch.full((code.shape[0],), HASH_START, dtype=torch.int64, device=code.device)
    for column in range(code.shape[1]):
        h = _hash32(h ^ bits[:, column])
    return (h.to(torch.float64) + 0.5) / 2.0**32


def pick_members(weights: torch.Tensor, selected: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """One member index per row (B,), drawn with probability weights[row] (B, members) by inverse CDF.

    `uniform` (B,) in [0, 1]. The pick is the first member whose cumulative weight exceeds u * total;
    rounding at u = 1 falls back to the last selected member, so the pick is always a selected member.
    """
    cumulative = weights.cumsum(dim=1)
    threshold = uniform.to(weights.dtype).unsqueeze(1) * cumulative[:, -1:]
    index = (cumulative <= threshold).sum(dim=1)
    positions = torch.arange(weights.shape[1], device=weights.device).expand_as(weights)
    last_selected = torch.where(selected, positions, -1).max(dim=1).values
    return torch.minimum(index, last_selected)


class TSGate(nn.Module):
    """Routes each input to its task's squad by the given task id (no parameters; see module docstring)."""

    def __init__(self, num_tasks: int) -> None:
        super().__init__()
        self.num_tasks = num_tasks

    def forward(self, task_ids: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
        """[(task id, row indices)] for every task present in the batch, in task order."""
        if task_ids.dim() != 1 or task_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"task_ids: expected a 1-D integer tensor, received {task_ids.dtype} of shape "
                f"{tuple(task_ids.shape)}"
            )
        if task_ids.numel() and (int(task_ids.min()) < 0 or int(task_ids.max()) >= self.num_tasks):
            raise ValueError(
                f"task_ids: expected ids in [0, {self.num_tasks - 1}], received "
                f"[{int(task_ids.min())}, {int(task_ids.max())}]"
            )
        return [
            (task, rows)
            for task in range(self.num_tasks)
            if (rows := torch.nonzero(task_ids == task).flatten()).numel()
        ]


class GateOutput(NamedTuple):
    weights: torch.Tensor  # (B, N): softmax weights of the selected learners, 0 elsewhere
    selected: torch.Tensor  # (B, N) bool: exactly min(K, squad size) True per row, in the task's section
    code: torch.Tensor  # (B, d) gate code read by the LSGates
    kld: torch.Tensor  # (B,) gate code KL (zeros in generation)


class HierGate(nn.Module):
    """Gate encoder + TSGate + one LSGate per task (ModuleDict keyed by task name)."""

    def __init__(
        self,
        tasks: list[str],
        squad_sizes: list[int],
        in_channels: int,
        resolution: int,
        code_dim: int,
        top_k: int,
        seed: int,
        with_encoder: bool = True,
    ) -> None:
        super().__init__()
        self.code_dim = code_dim
        self.top_k = top_k
        self.seed = seed
        # A generation-only model draws the gate code from the prior and holds no gate encoder.
        self.encoder: GateEncoder | None = (
            GateEncoder(in_channels, resolution, code_dim, seeded_generator(seed, GATE_NOISE_KEY))
            if with_encoder
            else None
        )
        self.tsgate = TSGate(len(tasks))
        self.squad_gates = nn.ModuleDict()
        for task, size in zip(tasks, squad_sizes, strict=True):
            self.add_squad(task, size)

    def add_squad(self, task: str, num_members: int) -> LSGate:
        if task in self.squad_gates:
            raise ValueError(f"task {task!r}: already has an LSGate")
        gate = LSGate(self.code_dim, num_members, self.top_k, seeded_generator(self.seed, task))
        for param in self.parameters():
            gate.to(param.device, param.dtype)
            break
        self.squad_gates[task] = gate
        self.tsgate.num_tasks = len(self.squad_gates)
        return gate

    def squad_gate(self, task: str) -> LSGate:
        return cast(LSGate, self.squad_gates[task])

    def remove_squad(self, task: str) -> None:
        del self.squad_gates[task]
        self.tsgate.num_tasks = len(self.squad_gates)

    def forward(
        self,
        code: torch.Tensor,
        task_ids: torch.Tensor,
        columns: list[list[int]],
        num_learners: int,
        min_k: int = 1,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights, selected), each (B, N). columns[m] lists the learner columns of task m's members;
        `min_k` as in `LSGate.forward`."""
        batch = code.shape[0]
        weights = code.new_zeros(batch, num_learners)
        selected = torch.zeros(batch, num_learners, dtype=torch.bool, device=code.device)
        tasks = list(self.squad_gates.keys())
        for task, rows in self.tsgate(task_ids):
            squad_weights, squad_selected = self.squad_gate(tasks[task])(code[rows], min_k)
            cols = torch.tensor(columns[task], device=code.device)
            weights[rows.unsqueeze(1), cols.unsqueeze(0)] = squad_weights
            selected[rows.unsqueeze(1), cols.unsqueeze(0)] = squad_selected
        return weights, selected
