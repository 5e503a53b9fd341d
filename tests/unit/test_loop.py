"""The one cloud training loop (baim/loop.py) and the training steps under it: order of the hooks, the
pruning schedule, the optimiser kept across a pruning, resuming at an epoch, exact FLOP counts."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import pytest
import torch
from torch import nn

from baim.compaction import Batch, PruningSchedule, budget_limits, task_model_params
from baim.config import LearnerSpec
from baim.learners import VAELearner
from baim.loop import EpochOutcome, Evaluation, LoopSchedule, start_strategy, train_strategy
from baim.model import BAIM
from baim.model_config import ConnectionSpec
from baim.training import make_optimizer, train_steps

RESOLUTION = 16


def two_task_baim() -> BAIM:
    """2 tasks x 2 learners, top-1, connection height 1 (12 candidate connections)."""
    torch.manual_seed(0)
    tasks = ["a", "b"]
    learners = [(f"e{i}", tasks[i % 2], VAELearner(LearnerSpec((4, 8), 4, RESOLUTION))) for i in range(4)]
    return BAIM.from_learners(tasks, learners, top_k=1, connection_height=1)


def batches(count: int, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [
        (torch.rand(size, 3, RESOLUTION, RESOLUTION, generator=generator), torch.tensor([0, 1] * (size // 2)))
        for _ in range(count)
    ]


class RecordingHooks:
    """TrainingHooks that record every call; the test loss is a fixed number per epoch."""

    def __init__(self, baim: BAIM, data: list[tuple[torch.Tensor, torch.Tensor]], skip: set[int]) -> None:
        self.baim = baim
        self.data = data
        self.skip = skip
        self.calls: list[tuple[str, int]] = []
        self.outcomes: list[EpochOutcome] = []
        self.optimizers: list[torch.optim.Optimizer] = []

    def batches(self, epoch: int) -> Iterable[Any]:
        self.calls.append(("batches", epoch))
        return self.data

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        images, task_ids = batch
        return model(images, task_ids, seed=0).loss

    def score_batches(self) -> Sequence[Batch]:
        self.calls.append(("score_batches", 0))
        return self.data

    def pruned(self, epoch: int, removed: list[ConnectionSpec]) -> nn.Module:
        self.calls.append(("pruned", epoch))
        return self.baim

    def evaluate(self, epoch: int) -> Evaluation | None:
        self.calls.append(("evaluate", epoch))
        return None if epoch in self.skip else Evaluation(float(epoch), {"a": float(epoch)})

    def epoch_done(self, outcome: EpochOutcome, optimizer: torch.optim.Optimizer) -> None:
        self.calls.append(("epoch_done", outcome.epoch))
        self.outcomes.append(outcome)
        self.optimizers.append(optimizer)


def test_each_epoch_trains_prunes_on_the_schedule_evaluates_then_hands_over() -> None:
    # Prepare: 3 epochs, pruning half the connections after epoch 2 only; epoch 3 skips its evaluation.
    baim = two_task_baim()
    start_strategy(baim, "finetune", seed=0)
    hooks = RecordingHooks(baim, batches(count=2, size=4), skip={3})
    initial = len(baim.connections.specs)

    # Execute
    train_strategy(
        baim, baim, make_optimizer(baim, 0.01), hooks, LoopSchedule(3, 0.01, PruningSchedule(2, 0.5))
    )

    # Assert
    assert hooks.calls == [
        ("batches", 1), ("evaluate", 1), ("epoch_done", 1),
        ("batches", 2), ("score_batches", 0), ("pruned", 2), ("evaluate", 2), ("epoch_done", 2),
        ("batches", 3), ("evaluate", 3), ("epoch_done", 3),
    ]  # fmt: skip
    first, second, third = hooks.outcomes
    assert [len(o.pruned) for o in hooks.outcomes] == [0, initial // 2, 0]
    assert len(baim.connections.specs) == initial - initial // 2
    assert [o.samples for o in hooks.outcomes] == [8, 8, 8]
    assert first.evaluation == Evaluation(1.0, {"a": 1.0}) and third.evaluation is None
    assert all(o.flops > 0 and o.seconds >= o.train_seconds > 0 for o in hooks.outcomes)
    assert second.train_loss == second.loss_sum / 8


def test_the_optimiser_rebuilt_after_pruning_keeps_the_survivors_adam_state() -> None:
    baim = two_task_baim()
    start_strategy(baim, "finetune", seed=0)
    hooks = RecordingHooks(baim, batches(count=1, size=4), skip=set())

    last = train_strategy(
        baim, baim, make_optimizer(baim, 0.01), hooks, LoopSchedule(2, 0.01, PruningSchedule(1, 0.5))
    )

    before, after = hooks.optimizers
    assert after is last and after is not before  # rebuilt after each pruning
    trainable = [p for p in baim.parameters() if p.requires_grad]
    assert {id(p) for group in after.param_groups for p in group["params"]} == {id(p) for p in trainable}
    learner_weight = baim.learner("e0").encoder_stages[0][0].weight  # type: ignore[index]
    assert after.state[learner_weight]["step"] == 2  # one step in each epoch, carried over


def test_training_resumes_at_the_first_epoch_given() -> None:
    baim = two_task_baim()
    start_strategy(baim, "finetune", seed=0)
    hooks = RecordingHooks(baim, batches(count=1, size=2), skip=set())

    train_strategy(
        baim,
        baim,
        make_optimizer(baim, 0.01),
        hooks,
        LoopSchedule(4, 0.01, PruningSchedule(2, 0.0)),
        first_epoch=4,
    )

    assert [o.epoch for o in hooks.outcomes] == [4]
    assert ("pruned", 4) not in hooks.calls  # prune_ratio 0 without a budget: nothing removed


def test_a_budget_is_reached_at_the_last_pruning_epoch_then_recovery_epochs_train_without_pruning() -> None:
    # 5 epochs, pruning every epoch up to 5 - 2 recovery epochs: the budget is met after epoch 3.
    baim = two_task_baim()
    start_strategy(baim, "finetune", seed=0)
    hooks = RecordingHooks(baim, batches(count=2, size=4), skip=set())
    budget = 2.0  # these learners are tiny: the gate encoder alone is 0.58x a squad
    limits = budget_limits(baim.config, budget)
    assert any(task_model_params(baim.config, t) > limits[t] for t in baim.config.tasks)  # over at the start

    pruning = PruningSchedule(1, 0.1, budget=budget, recovery_epochs=2)
    train_strategy(baim, baim, make_optimizer(baim, 0.01), hooks, LoopSchedule(5, 0.01, pruning))

    assert all(task_model_params(baim.config, t) <= limits[t] for t in baim.config.tasks)
    pruned_per_epoch = [len(o.pruned) for o in hooks.outcomes]
    assert sum(pruned_per_epoch[:3]) > 0 and pruned_per_epoch[3:] == [0, 0]
    assert ("pruned", 4) not in hooks.calls and ("pruned", 5) not in hooks.calls


def test_a_budget_without_a_pruning_epoch_is_refused_before_training() -> None:
    baim = two_task_baim()
    hooks = RecordingHooks(baim, batches(count=1, size=2), skip=set())
    pruning = PruningSchedule(3, 0.1, budget=1.2, recovery_epochs=1)

    with pytest.raises(ValueError, match="needs at least one pruning epoch"):
        train_strategy(baim, baim, make_optimizer(baim, 0.01), hooks, LoopSchedule(3, 0.01, pruning))
    assert hooks.calls == []


def test_start_strategy_admits_pending_learners_then_applies_the_strategy() -> None:
    baim = two_task_baim()
    baim.add_learner("late", "a", VAELearner(LearnerSpec((4,), 4, RESOLUTION)))
    assert baim.pending_learners() == ["late"]

    start_strategy(baim, "freeze", seed=0)

    assert baim.pending_learners() == []
    assert not any(p.requires_grad for p in baim.learner("late").parameters())
    assert all(p.requires_grad for p in baim.gate_parameters())


def test_after_change_counts_the_first_step_and_the_first_after_each_pruning(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare: equal learners, so a step's FLOPs depend on the connections only, not on the route; 3 epochs,
    # half the connections pruned after epoch 2. Each FlopCounterMode that training opens is recorded.
    import baim.training

    opened: list[int] = []

    class RecordedCounter(baim.training.FlopCounterMode):  # type: ignore[misc, name-defined]
        def __enter__(self) -> Any:
            opened.append(len(opened))
            return super().__enter__()

    def run(counting: str) -> list[int]:
        model = two_task_baim()
        start_strategy(model, "finetune", seed=0)
        hooks = RecordingHooks(model, batches(count=2, size=4), skip=set())
        schedule = LoopSchedule(3, 0.01, PruningSchedule(2, 0.5), counting)  # type: ignore[arg-type]
        train_strategy(model, model, make_optimizer(model, 0.01), hooks, schedule)
        return [o.flops for o in hooks.outcomes]

    monkeypatch.setattr(baim.training, "FlopCounterMode", RecordedCounter)
    # Execute
    per_epoch = run("first_batch")
    counted_per_epoch = len(opened)
    opened.clear()
    after_change = run("after_change")
    # Assert: the same FLOPs as counting every epoch's first step, from two counted steps instead of three
    # (epoch 2 reuses epoch 1's; the pruning after epoch 2 makes epoch 3 count again, and it costs less).
    assert after_change == per_epoch
    assert after_change[1] == after_change[0] > after_change[2] > 0
    assert (counted_per_epoch, len(opened)) == (3, 2)


# ---- the training steps: FLOPs counted exactly by hand -------------------------------------------------


def linear_batches(sizes: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [(torch.rand(n, 4, generator=generator), torch.rand(n, 3, generator=generator)) for n in sizes]


def mse(model: nn.Module, batch: Any) -> torch.Tensor:
    inputs, targets = batch
    return ((model(inputs) - targets) ** 2).mean()


@pytest.mark.parametrize("counting", ["every_batch", "first_batch"])
def test_train_steps_count_the_flops_of_every_step(counting: str) -> None:
    # A Linear(4 -> 3) step on n samples: forward addmm 2*n*4*3, backward weight-gradient mm 2*n*4*3 (the
    # inputs need no gradient): 48 n. Linear in n, so scaling the first step is exact too.
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    totals = train_steps(model, linear_batches([5, 5, 2]), optimizer, mse, counting)  # type: ignore[arg-type]

    assert totals.samples == 12
    assert totals.flops == 48 * 12


def test_train_steps_without_counting_report_no_flops_and_the_sample_weighted_loss() -> None:
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    data = linear_batches([3, 1])
    with torch.no_grad():  # lr 0: the model does not change, so each step's loss is known beforehand
        expected = float(mse(model, data[0])) * 3 + float(mse(model, data[1])) * 1

    totals = train_steps(model, data, torch.optim.SGD(model.parameters(), lr=0.0), mse)

    assert totals.flops == 0
    assert totals.loss_sum == pytest.approx(expected, rel=1e-6)


def test_a_non_finite_loss_stops_training() -> None:
    model = nn.Linear(4, 3)
    inputs, targets = linear_batches([2])[0]
    bad = [(inputs, targets * float("nan"))]

    with pytest.raises(FloatingPointError, match="loss: expected a finite value"):
        train_steps(model, bad, torch.optim.SGD(model.parameters(), lr=0.1), mse)
