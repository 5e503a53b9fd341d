"""Distillation from the pre-pruning BAIM: the target, the teacher's isolation, and that it is learnt."""

from __future__ import annotations

import pytest
import torch

from baim.compaction import PruningSchedule, budget_limits, prune_on_schedule
from baim.costs import count_params
from baim.decompose import decompose
from baim.distill import Distillation
from tests.support.baim_random import images
from tests.unit.test_compaction import TOLERANCE, budgeted_baim, mixed_batches


def test_target_is_the_weighted_mix_of_the_images_and_the_teachers_reconstruction():
    baim = budgeted_baim()
    distillation = Distillation.snapshot(baim, 0.25)
    x, task_ids = images(4, 1), torch.tensor([0, 1, 1, 0])

    torch.manual_seed(0)
    target = distillation.target(x, task_ids)
    torch.manual_seed(0)
    recon = distillation.teacher(x, task_ids).recon

    assert torch.allclose(target, 0.75 * x + 0.25 * recon, atol=1e-6)
    assert not distillation.teacher.training
    assert not any(p.requires_grad for p in distillation.teacher.parameters())
    with pytest.raises(ValueError, match=r"weight: expected a float in \(0, 1\)"):
        Distillation(baim, 1.0)
    with pytest.raises(ValueError, match=r"weight: expected a float in \(0, 1\)"):
        Distillation(baim, 0.0)


def test_forward_with_the_images_as_target_is_the_plain_forward_and_a_wrong_shape_is_refused():
    baim = budgeted_baim()
    x, task_ids = images(4, 2), torch.tensor([0, 1, 0, 1])

    plain = baim(x, task_ids, seed=4)
    explicit = baim(x, task_ids, seed=4, target=x.clone())

    assert torch.equal(plain.loss, explicit.loss)
    assert torch.equal(plain.recon, explicit.recon)
    with pytest.raises(ValueError, match="target: expected the images' shape"):
        baim(x, task_ids, seed=4, target=x[:2])


def test_the_teacher_is_a_frozen_snapshot_and_distilling_after_pruning_lowers_the_distillation_loss():
    # Prepare: the teacher is the BAIM before pruning to a budget; the student is pruned to it
    student = budgeted_baim()
    distillation = Distillation.snapshot(student, 0.5)
    teacher_state = {k: v.clone() for k, v in distillation.teacher.state_dict().items()}
    batches = mixed_batches(student, 2, 6, seed=4)
    prune_on_schedule(student, 1, 1, PruningSchedule(1, 0.1, budget=1.3), batches, seed=5)
    x, task_ids = images(12, 7), torch.arange(12) % 2
    optimizer = torch.optim.Adam(student.parameters(), lr=0.01)

    def gap() -> float:  # the student's reconstruction vs the distillation target, the same noise
        with torch.no_grad():
            student.eval()
            target = torch.lerp(x, distillation.teacher(x, task_ids, seed=9).recon, 0.5)
            difference = student(x, task_ids, seed=9).recon - target
            student.train()
            return float((difference**2).mean())

    # Execute: train only on the distillation target at weight 0.5
    before = gap()
    for step in range(40):
        torch.manual_seed(step)
        target = distillation.target(x, task_ids)
        optimizer.zero_grad()
        student(x, task_ids, target=target).loss.backward()
        optimizer.step()

    # Assert: the student got closer to the distillation target; the teacher did not move; the student's
    # task models are still within the budget and exact
    assert gap() < 0.95 * before
    for key, value in distillation.teacher.state_dict().items():
        assert torch.equal(value, teacher_state[key])
    limits = budget_limits(student.config, 1.3)
    student.eval()
    for task_id, task in enumerate(student.config.tasks):
        model = decompose(student, task).eval()
        assert count_params(model) <= limits[task]
        rows = task_ids == task_id
        expected = student(x[rows], task_id, seed=3).recon
        assert (model(x[rows], seed=3).recon - expected).abs().max() <= TOLERANCE
