"""The relay round (baim.relay): fold_own, distillation and the guarded update."""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from baim.adapters import LoRAConfig, apply_lora, lora_parameters, lora_weight_deltas, merge_lora
from baim.decompose import decompose
from baim.model import BAIM
from baim.relay import (
    RelayedAdapter,
    RelaySettings,
    distil,
    guarded_update,
    mean_distillation_loss,
    relay_round,
    teacher_targets,
)
from baim.training import evaluate
from tests.support.models import TINY_BAIM_RESOLUTION, tiny_baim


def param_hashes(module: nn.Module) -> dict[str, str]:
    return {
        key: hashlib.sha256(p.detach().contiguous().numpy().tobytes()).hexdigest()
        for key, p in module.named_parameters()
    }


def personalised(baim: BAIM, task: str, seed: int) -> tuple[dict[str, torch.Tensor], nn.Module]:
    """A task model with random (non-zero) rank-2 adapters on every layer: (BAIM-keyed deltas, teacher)."""
    model = decompose(baim, task)
    apply_lora(model, LoRAConfig(rank=2, alpha=2.0, seed=seed))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    deltas = {key.removeprefix("baim."): d for key, d in lora_weight_deltas(model).items()}
    merge_lora(model)
    return deltas, model.eval()


def cloud_batches(baim: BAIM, n_batches: int = 2, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    shape = (8, 3, TINY_BAIM_RESOLUTION, TINY_BAIM_RESOLUTION)
    tasks = len(baim.config.tasks)
    return [(torch.rand(shape, generator=generator), torch.arange(8) % tasks) for _ in range(n_batches)]


def test_fold_own_changes_only_the_relaying_edges_own_learner() -> None:
    # Prepare: e0 personalised the smiling model; its adapter covers e1, the gate and connections too
    baim = tiny_baim()
    deltas, teacher = personalised(baim, "smiling", seed=3)
    assert any(not key.startswith("learners.e0.") for key in deltas)
    before = param_hashes(baim)

    # Execute
    settings = RelaySettings(method="fold_own", gate_epochs=0)
    relay_round(baim, [RelayedAdapter("e0", "smiling", deltas, teacher)], settings, lambda n: [])

    # Assert: every parameter outside learners.e0 has its old bytes; e0's adapted weights moved
    after = param_hashes(baim)
    changed = {key for key in before if before[key] != after[key]}
    assert changed and all(key.startswith("learners.e0.") for key in changed)
    assert changed == {key for key in deltas if key.startswith("learners.e0.")}


def test_average_moves_parameters_outside_the_edges_own_learner() -> None:
    # the contrast that shows the fold_own test can fail: the same adapter, averaged in
    baim = tiny_baim()
    deltas, teacher = personalised(baim, "smiling", seed=3)
    before = param_hashes(baim)
    settings = RelaySettings(method="average", gate_epochs=0)
    relay_round(baim, [RelayedAdapter("e0", "smiling", deltas, teacher)], settings, lambda n: [])
    after = param_hashes(baim)
    assert any(before[key] != after[key] for key in before if not key.startswith("learners.e0."))


def test_distil_lowers_the_students_distillation_loss_in_a_short_run() -> None:
    # Prepare: the teacher is e0's personalised smiling model; the student the BAIM it came from
    baim = tiny_baim()
    _, teacher = personalised(baim, "smiling", seed=3)
    batches = cloud_batches(baim)
    targets = teacher_targets({baim.config.tasks.index("smiling"): [teacher]}, batches, seed=0)
    loss_before = mean_distillation_loss(baim, batches, targets)

    # Execute: 20 steps on e0 and the gates, distillation term only weighted in
    params = [*baim.learner("e0").parameters(), *baim.gate_parameters()]
    distil(baim.train(), params, batches, targets, steps=20, lr=0.01, distil_weight=10.0)

    # Assert
    loss_after = mean_distillation_loss(baim, batches, targets)
    assert loss_after < loss_before


def held_out(baim: BAIM, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    losses = {}
    for index, task in enumerate(baim.config.tasks):
        model = decompose(baim, task)
        rows = [x[t == index] for x, t in batches]
        losses[task] = evaluate(model, rows, lambda module, x: module(x).loss)
    return losses


def test_guarded_update_never_returns_a_baim_with_a_higher_held_out_loss() -> None:
    baim = tiny_baim()
    holdout = cloud_batches(baim, seed=1)

    def measure(candidate: BAIM) -> dict[str, float]:
        return held_out(candidate, holdout)

    def ruin(candidate: BAIM) -> None:  # a poisoned round: every weight gets large noise
        with torch.no_grad():
            for p in candidate.parameters():
                p.add_(torch.randn_like(p))

    def improve(candidate: BAIM) -> None:  # a round that fits the held-out images themselves
        candidate.train()
        optimizer = torch.optim.Adam(candidate.parameters(), lr=0.01)
        for step in range(30):
            x, t = holdout[step % len(holdout)]
            optimizer.zero_grad()
            candidate(x, t, seed=step).loss.backward()
            optimizer.step()
        candidate.eval()

    start = measure(baim)
    bad = guarded_update(baim, ruin, measure)
    good = guarded_update(baim, improve, measure)

    # Rejected: the same object back, unchanged, with the candidate's worse losses reported
    assert not bad.accepted and bad.baim is baim and measure(bad.baim) == start
    assert any(bad.loss_after[task] > start[task] for task in start)
    # Accepted: a new BAIM, no task worse; the starting BAIM untouched by either
    assert good.accepted and good.baim is not baim and good.loss_before == start
    assert all(measure(good.baim)[task] <= start[task] for task in start)
    assert measure(baim) == start
