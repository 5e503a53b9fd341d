"""Split generation: a task model cut after a decoder stage; one node runs the head, another the tail.

Cuts. Generation runs decoder nodes (learner, stage k) in topological order, sorted by the absolute stage
index k (a connection goes from a stage to the same or a deeper one, see baim.model_config). Cutting after
stage c splits them into a head (k <= c) and a tail (k > c); every connection goes head -> head, head -> tail
or tail -> tail, so one message from head to tail is enough. `split_points(model)` lists the decoder stage
indices of the model's learners; after the last one the tail only mixes the selected learners' images.

The head runs `BAIM.generation_gate` and `BAIM.generation_stages` on stages <= c; the tail runs
`generation_stages` on stages > c on top of what crossed, then `generation_images`: the model's own
generation code in two halves, on the same rows, so split generation equals `generate` for the same seed.

What crosses (`generate_head` returns a flat dict of tensors, ready for safetensors):
- "gate/weights" (B, N), "gate/selected" (B, N) bool, "gate/code" (B, d): the gate's output (its KL is zero
  in generation and does not travel);
- "seed" (0-d int64), when a seed was given: the tail draws from it the noise of the learners whose first
  decoder stage is in the tail (noise is keyed by learner name, so it is the draw `generate` makes);
- "stage/{learner}/{k}" (r, C, H, W): the output of head node (learner, k) on the r batch rows (ascending)
  that the tail reads: the learner's next stage, a connection into a tail stage, or the mixture (the learner's
  last stage, on the rows that selected it).
Which rows cross is a function of gate/selected and the cut (`crossing_rows`), so the receiver derives the
expected shapes itself and `check_split_state` rejects anything else: unknown or missing keys, wrong dtypes
or shapes, non-finite values, a selection outside the squad or weights outside [0, 1].
"""

from __future__ import annotations

import logging

import safetensors.torch
import torch

from baim.decompose import OneTaskModel
from baim.gates import GateOutput
from baim.model import BAIM, StageOutputs, _positions
from baim.model_config import LearnerEntry
from baim.serialization import parse_safetensors

logger = logging.getLogger(__name__)

SplitState = dict[str, torch.Tensor]

GATE_WEIGHTS_KEY = "gate/weights"
GATE_SELECTED_KEY = "gate/selected"
GATE_CODE_KEY = "gate/code"
SEED_KEY = "seed"
MAX_SEED = 2**63 - 1  # a seed travels as an int64
MAX_PROBLEMS_SHOWN = 10


def stage_key(name: str, stage: int) -> str:
    return f"stage/{name}/{stage}"


def decoder_stages(entry: LearnerEntry) -> range:
    """Decoder stages a learner of the model runs in generation (empty for a feeder cut in its encoder)."""
    return range(len(entry.spec.widths), entry.last_stage + 1)


def split_points(model: OneTaskModel) -> list[int]:
    """The stages after which `model`'s generation can be cut, ascending."""
    return sorted({k for entry in model.config.learners for k in decoder_stages(entry)})


def check_cut(model: OneTaskModel, cut: object) -> int:
    points = split_points(model)
    if isinstance(cut, bool) or not isinstance(cut, int) or cut not in points:
        raise ValueError(f"cut: expected one of the stages {points}, received {cut!r}")
    return cut


def crossing_rows(
    model: OneTaskModel, selected: torch.Tensor, cut: int
) -> dict[tuple[str, int], torch.Tensor]:
    """{(learner, stage) of the head: the batch rows (ascending) whose output there the tail reads}."""
    baim = model.baim
    need = baim._needed_stages(selected, generation=True)
    read: dict[tuple[str, int], torch.Tensor] = {}

    def reads(node: tuple[str, int], rows: torch.Tensor) -> None:
        read[node] = read[node] | rows if node in read else rows

    for n, entry in enumerate(baim.config.learners):
        stages = decoder_stages(entry)
        for k in stages:
            if k <= cut:
                continue
            runs = need[entry.name] >= k
            if k - 1 in stages and k - 1 <= cut:
                reads((entry.name, k - 1), runs)
            for conn in baim.connections.into(entry.name, k):
                if conn.src_stage <= cut:
                    reads((conn.src, conn.src_stage), runs)
        if stages and entry.last_stage <= cut:
            reads((entry.name, entry.last_stage), selected[:, n])
    order = {node: position for position, node in enumerate(baim._node_order())}
    nodes = sorted(read, key=lambda node: order[(node[1], baim.config.learner_names.index(node[0]))])
    return {node: torch.nonzero(read[node]).flatten() for node in nodes if bool(read[node].any())}


@torch.no_grad()
def generate_head(
    model: OneTaskModel, n: int, cut: int, seed: int | None = None, eps: dict[str, torch.Tensor] | None = None
) -> SplitState:
    """Run the gate and every decoder stage <= cut; returns what the tail needs (see module docstring)."""
    cut = check_cut(model, cut)
    if seed is not None and (
        isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED
    ):
        raise ValueError(f"seed: expected an int in [0, {MAX_SEED}] or None, received {seed!r}")
    baim = model.baim
    gate = baim.generation_gate(0, n, seed=seed, eps=eps)
    outputs = baim.generation_stages(gate, seed=seed, eps=eps, stages=range(cut + 1))
    state: SplitState = {
        GATE_WEIGHTS_KEY: gate.weights,
        GATE_SELECTED_KEY: gate.selected,
        GATE_CODE_KEY: gate.code,
    }
    if seed is not None:
        state[SEED_KEY] = torch.tensor(seed, dtype=torch.int64)
    for (name, k), rows in crossing_rows(model, gate.selected, cut).items():
        positions, out = outputs[(name, k)]
        state[stage_key(name, k)] = out[positions[rows]]
    return {key: tensor.contiguous() for key, tensor in state.items()}


@torch.no_grad()
def generate_tail(
    model: OneTaskModel,
    state: SplitState,
    cut: int,
    eps: dict[str, torch.Tensor] | None = None,
    max_batch: int | None = None,
) -> torch.Tensor:
    """Finish generation from a head's state: images (B, C, R, R) in [0, 1]. The state is checked first
    (`check_split_state`, with `max_batch`).

    Pass the head's `eps` when it was given one instead of a seed.
    """
    check_split_state(model, state, cut, max_batch)
    baim = model.baim
    device, _ = baim._device_dtype()
    state = {key: tensor.to(device) for key, tensor in state.items()}
    selected = state[GATE_SELECTED_KEY]
    batch = selected.shape[0]
    gate = GateOutput(
        weights=state[GATE_WEIGHTS_KEY],
        selected=selected,
        code=state[GATE_CODE_KEY],
        kld=state[GATE_WEIGHTS_KEY].new_zeros(batch),  # the gate code came from the prior
    )
    seed = int(state[SEED_KEY]) if SEED_KEY in state else None
    outputs: StageOutputs = {
        node: (_positions(rows, batch), state[stage_key(*node)])
        for node, rows in crossing_rows(model, selected, cut).items()
    }
    last = max(split_points(model))
    ran = baim.generation_stages(gate, seed=seed, eps=eps, stages=range(cut + 1, last + 1), outputs=outputs)
    return baim.generation_images(ran, gate)


def expected_shapes(model: OneTaskModel, selected: torch.Tensor, cut: int) -> dict[str, tuple[int, ...]]:
    """Shape of every tensor a state for this selection and cut must hold ("seed" aside)."""
    baim = model.baim
    batch, learners = selected.shape
    shapes: dict[str, tuple[int, ...]] = {
        GATE_WEIGHTS_KEY: (batch, learners),
        GATE_SELECTED_KEY: (batch, learners),
        GATE_CODE_KEY: (batch, baim.config.gate_code_dim),
    }
    for (name, k), rows in crossing_rows(model, selected, cut).items():
        shapes[stage_key(name, k)] = (rows.numel(), *baim.learner(name).stage_output_shape(k))
    return shapes


def check_split_state(model: OneTaskModel, state: object, cut: object, max_batch: int | None = None) -> None:
    """ValueError listing every way `state` is not what a head of `model` sends for `cut` (with at most
    `max_batch` images, when given)."""
    cut = check_cut(model, cut)
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ValueError("split state: expected a dict of named tensors")
    baim = model.baim
    _, dtype = baim._device_dtype()
    selected = _check_selection(baim, state.get(GATE_SELECTED_KEY))
    if max_batch is not None and selected.shape[0] > max_batch:
        raise ValueError(
            f"split state: {GATE_SELECTED_KEY!r}: expected at most {max_batch} images, received "
            f"{selected.shape[0]}"
        )
    expected = expected_shapes(model, selected, cut)
    problems = []
    unknown = sorted(set(state) - set(expected) - {SEED_KEY})
    missing = sorted(set(expected) - set(state))
    if unknown:
        problems.append(f"unknown keys {unknown[:5]} (for cut {cut})")
    if missing:
        problems.append(f"missing keys {missing[:5]} (for cut {cut})")
    well_formed = set()
    for key in sorted(set(expected) & set(state) - {GATE_SELECTED_KEY}):
        tensor, shape = state[key], expected[key]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            problems.append(
                f"{key!r}: expected {dtype} of shape {shape}, received {tensor.dtype} of shape "
                f"{tuple(tensor.shape)}"
            )
        elif not bool(torch.isfinite(tensor).all()):
            problems.append(f"{key!r}: non-finite values (NaN or inf)")
        else:
            well_formed.add(key)
    if GATE_WEIGHTS_KEY in well_formed:
        weights = state[GATE_WEIGHTS_KEY].cpu()
        if bool(((weights < 0) | (weights > 1) | ((weights != 0) & ~selected)).any()):
            problems.append(f"{GATE_WEIGHTS_KEY!r}: expected values in [0, 1], non-zero only where selected")
    if SEED_KEY in state:
        seed = state[SEED_KEY]
        if seed.dtype != torch.int64 or seed.dim() != 0 or int(seed) < 0:
            problems.append(
                f"{SEED_KEY!r}: expected a non-negative int64 scalar, received {seed.dtype} "
                f"of shape {tuple(seed.shape)}"
            )
    if problems:
        hidden = len(problems) - MAX_PROBLEMS_SHOWN
        more = f" (and {hidden} more)" if hidden > 0 else ""
        raise ValueError("split state: " + "; ".join(problems[:MAX_PROBLEMS_SHOWN]) + more)


def _check_selection(baim: BAIM, selected: object) -> torch.Tensor:
    """gate/selected must be (B >= 1, N) bool, each row selecting squad members only, at least one."""
    learners = baim.num_learners
    if not isinstance(selected, torch.Tensor):
        raise ValueError(f"split state: missing key {GATE_SELECTED_KEY!r}")
    if (
        selected.dtype != torch.bool
        or selected.dim() != 2
        or selected.shape[0] < 1
        or selected.shape[1] != learners
    ):
        raise ValueError(
            f"split state: {GATE_SELECTED_KEY!r}: expected torch.bool of shape (B >= 1, {learners}), "
            f"received {selected.dtype} of shape {tuple(selected.shape)}"
        )
    members = torch.zeros(learners, dtype=torch.bool)
    members[baim.squad_columns(baim.config.tasks[0])] = True
    selected = selected.cpu()
    if bool((selected & ~members).any()) or not bool(selected.any(dim=1).all()):
        raise ValueError(
            f"split state: {GATE_SELECTED_KEY!r}: expected every row to select squad members only, "
            "at least one"
        )
    return selected


def split_state_to_bytes(state: SplitState) -> bytes:
    """The state as safetensors bytes (CPU, contiguous): what the head's node sends."""
    return safetensors.torch.save({key: t.detach().cpu().contiguous() for key, t in state.items()})


def split_state_from_bytes(
    model: OneTaskModel, data: bytes, cut: int, max_batch: int | None = None
) -> SplitState:
    """Parse (nothing is unpickled) and check a received state; ValueError naming the problem."""
    state = parse_safetensors(data, "split state")
    check_split_state(model, state, cut, max_batch)
    return state
