"""Compact task models: parameter counts from configs, data-driven scores, budgets, the pruning schedule."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from baim.compaction import (
    PruningSchedule,
    budget_limits,
    config_params,
    connection_contributions,
    learner_params,
    prune_on_schedule,
    prune_to_targets,
    squad_params,
    step_targets,
    task_model_params,
)
from baim.config import LearnerSpec
from baim.costs import count_params
from baim.decompose import decompose
from baim.model import BAIM, compact_config
from baim.model_config import BAIMConfig, ConnectionSpec, LearnerEntry, SquadSpec
from baim.pruning import prune_connections
from tests.support.baim_random import (
    RESOLUTION,
    BAIMRecipe,
    baim_recipes,
    images,
    randomise_connections,
    three_learners,
)

PROPERTY = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TOLERANCE = 1e-5
SPEC = LearnerSpec((4, 4), 2, RESOLUTION)  # stages 0, 1 encode; 2, 3 decode


def mixed_batches(baim: BAIM, count: int, batch: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    tasks = len(baim.config.tasks)
    return [(images(batch, seed + b), torch.arange(batch) % tasks) for b in range(count)]


# ---- parameter counts ---------------------------------------------------------------------------------


@PROPERTY
@given(recipe=baim_recipes())
def test_config_params_count_the_baim_its_task_models_and_generation_models(recipe: BAIMRecipe):
    baim = recipe.build()

    assert config_params(baim.config) == count_params(baim)
    for task in baim.config.tasks:
        assert task_model_params(baim.config, task) == count_params(decompose(baim, task))
        generation = decompose(baim, task, kind="generation")
        assert config_params(generation.config) == count_params(generation)
        members = baim.config.squad(task).members
        assert squad_params(baim.config, task) == sum(count_params(baim.learner(m)) for m in members)


def test_learner_params_leave_the_global_rng_alone_and_split_the_learner_by_part():
    state = torch.random.get_rng_state()

    parts = learner_params(LearnerSpec((4, 8), 3, RESOLUTION))

    assert torch.equal(torch.random.get_rng_state(), state)
    # hand count for (4, 8), latent 3, 16x16: flat = 8 * 4 * 4 = 128
    assert parts.encoder_stages == (3 * 4 * 9 + 4 + 8, 4 * 8 * 9 + 8 + 16)
    assert parts.posterior == 2 * (128 * 3 + 3)
    assert parts.decoder_input == 3 * 128 + 128
    assert parts.decoder_stages == (8 * 4 * 9 + 4 + 8, (4 * 4 * 9 + 4 + 8) + (4 * 3 * 9 + 3))


# ---- scores ---------------------------------------------------------------------------------------------


def test_contribution_is_the_projected_rms_over_the_destination_input_rms():
    # Prepare: t0 = {a, c} with K = 2, so both run on every t0 sample; a:0 -> c:1 adds to c's stage-1 input
    conn = ConnectionSpec("a", 0, "c", 1)
    baim = three_learners([conn], top_k=2)
    x = images(5, 2)

    # Execute
    scores = connection_contributions(baim, [(x, torch.zeros(5, dtype=torch.long))], seed=0)

    # Assert: by hand, from the learners' own stages
    with torch.no_grad():
        projected = baim.connections.project(conn, baim.learner("a").run_stage(0, x))
        stage_input = baim.learner("c").run_stage(0, x) + projected
    expected = math.sqrt(
        float(projected.double().square().sum()) / float(stage_input.double().square().sum())
    )
    assert scores[conn] == pytest.approx(expected, rel=1e-9)
    assert scores[conn] > 0
    assert baim.training  # the mode is restored


def test_a_connection_into_a_learner_that_never_runs_scores_zero():
    into_b = ConnectionSpec("a", 0, "b", 1)
    baim = three_learners([into_b, ConnectionSpec("a", 0, "c", 1)], top_k=2)

    scores = connection_contributions(baim, [(images(4, 3), torch.zeros(4, dtype=torch.long))])  # t0 only

    assert scores[into_b] == 0.0
    assert scores[ConnectionSpec("a", 0, "c", 1)] > 0


def test_ratio_pruning_by_data_removes_the_lowest_contributions():
    # Prepare: a big weight on a connection whose destination never runs; raw weight norm would keep it
    never_runs = ConnectionSpec("a", 0, "b", 1)
    baim = three_learners(
        [never_runs, ConnectionSpec("a", 0, "c", 1), ConnectionSpec("c", 2, "a", 3)], top_k=2
    )
    with torch.no_grad():
        baim.connections.projection(never_runs).conv.weight.mul_(100.0)
    batches = [(images(4, 5), torch.zeros(4, dtype=torch.long))]
    scores = connection_contributions(baim, batches)
    assert max(baim.connections.importance(), key=baim.connections.importance().__getitem__) == never_runs

    # Execute
    removed = prune_connections(baim, 1 / 3, scores)

    # Assert
    assert removed == [never_runs]


# ---- pruning to targets ---------------------------------------------------------------------------------


def feeder_baim() -> tuple[BAIM, ConnectionSpec, ConnectionSpec]:
    """t0 = {a}, t1 = {b}. a:2 -> b:3 pins a's encoder, bottleneck and stage 2 into t1's model; a:0 -> b:1
    pins a's stage 0 only."""
    deep, shallow = ConnectionSpec("a", 2, "b", 3), ConnectionSpec("a", 0, "b", 1)
    config = BAIMConfig(
        learners=(LearnerEntry("a", "t0", SPEC), LearnerEntry("b", "t1", SPEC)),
        squads=(SquadSpec("t0", ("a",)), SquadSpec("t1", ("b",))),
        top_k=1,
        connection_height=1,
        connections=(shallow, deep),
    )
    torch.manual_seed(0)
    baim = BAIM(config)
    randomise_connections(baim, seed=2)
    return baim, deep, shallow


def test_a_cross_task_connection_is_charged_for_the_feeder_it_pins():
    # Prepare: the deep connection scores higher, but keeping it costs far more of t1's budget
    baim, deep, shallow = feeder_baim()
    sizes = {task: task_model_params(baim.config, task) for task in baim.config.tasks}
    parts = learner_params(SPEC)
    pinned_by_deep = parts.encoder_stages[1] + parts.posterior + parts.decoder_input + parts.decoder_stages[0]
    target = {"t1": sizes["t1"] - pinned_by_deep // 2}
    scores = {deep: 1.0, shallow: 0.5}

    # Execute
    removed = prune_to_targets(baim, scores, target)

    # Assert: exactly the deep connection goes, the model shrinks by what it pinned plus its own weights
    assert removed == [deep]
    assert baim.connections.specs == [shallow]
    model = decompose(baim, "t1")
    assert count_params(model) == sizes["t1"] - pinned_by_deep - 16  # 16: its 4 x 4 projection
    assert count_params(model) <= target["t1"]
    assert [(e.name, e.depth) for e in model.config.learners] == [("a", 0), ("b", None)]


def test_connections_that_pin_a_feeder_together_are_removed_together():
    # Prepare: two weak connections hold a at stage 2 (each alone saves only its projection), one stronger
    # connection holds it at stage 0; the target needs a cut below stage 2
    pair = [ConnectionSpec("a", 2, "b", 2), ConnectionSpec("a", 2, "b", 3)]
    shallow = ConnectionSpec("a", 0, "b", 1)
    config = BAIMConfig(
        learners=(LearnerEntry("a", "t0", SPEC), LearnerEntry("b", "t1", SPEC)),
        squads=(SquadSpec("t0", ("a",)), SquadSpec("t1", ("b",))),
        top_k=1,
        connection_height=1,
        connections=(shallow, *pair),
    )
    baim = BAIM(config)
    before = task_model_params(baim.config, "t1")
    scores = {pair[0]: 0.2, pair[1]: 0.2, shallow: 0.3}

    removed = prune_to_targets(baim, scores, {"t1": before - 100})

    assert sorted(removed) == sorted(pair)
    assert baim.connections.specs == [shallow]


@PROPERTY
@given(recipe=baim_recipes(), budget=st.sampled_from([1.1, 1.5, 3.0]), score_seed=st.integers(0, 100))
def test_pruning_to_budget_limits_keeps_every_task_model_within_them_and_exact(
    recipe: BAIMRecipe, budget: float, score_seed: int
):
    # Prepare: gate_code_dim 1 keeps the gate small beside these tiny learners, so most limits are reachable
    baim = recipe.build()
    baim = BAIM(baim.config.with_changes(gate_code_dim=1))
    randomise_connections(baim, recipe.seed)
    generator = torch.Generator().manual_seed(score_seed)
    scores = {c: float(torch.rand(1, generator=generator)) for c in baim.connections.specs}
    limits = budget_limits(baim.config, budget)
    x = images(4, recipe.seed)

    # Execute
    prune_to_targets(baim, scores, limits)

    # Assert: within the limit, or (unreachable) nothing of that task model is removable any more
    for task_id, task in enumerate(baim.config.tasks):
        model = decompose(baim, task)
        size = count_params(model)
        floor = task_model_params(baim.config.with_changes(connections=()), task)
        assert size <= max(limits[task], floor)
        if size > limits[task]:
            assert size == floor
        assert (model(x, seed=1).recon - baim(x, task_id, seed=1).recon).abs().max() <= TOLERANCE
        assert torch.equal(
            model.generate(3, seed=2), decompose(baim, task, kind="generation").generate(3, seed=2)
        )


def test_prune_to_targets_rejects_unknown_tasks_and_missing_scores():
    baim, deep, shallow = feeder_baim()
    with pytest.raises(ValueError, match="targets: unknown tasks"):
        prune_to_targets(baim, {deep: 1.0, shallow: 1.0}, {"zz": 1})
    with pytest.raises(ValueError, match="scores: expected a score for every connection"):
        prune_to_targets(baim, {deep: 1.0}, {"t1": 1})
    with pytest.raises(ValueError, match="budget: expected a float > 1"):
        budget_limits(baim.config, 1.0)


# ---- the schedule ---------------------------------------------------------------------------------------


def test_pruning_epochs_stop_before_the_recovery_epochs_and_a_budget_needs_one():
    assert PruningSchedule(interval=10, ratio=0.1).pruning_epochs(50) == [10, 20, 30, 40, 50]
    assert PruningSchedule(interval=10, ratio=0.1, recovery_epochs=5).pruning_epochs(50) == [10, 20, 30, 40]
    assert PruningSchedule(interval=2, ratio=0.1, recovery_epochs=3).pruning_epochs(4) == []
    with pytest.raises(ValueError, match="budget: needs at least one pruning epoch"):
        PruningSchedule(interval=2, ratio=0.1, budget=1.5, recovery_epochs=3).pruning_epochs(4)
    with pytest.raises(ValueError, match="interval: expected an int >= 1"):
        PruningSchedule(interval=0, ratio=0.1)
    with pytest.raises(ValueError, match="budget: expected a float > 1"):
        PruningSchedule(interval=1, ratio=0.1, budget=0.5)


def test_step_targets_shrink_size_over_limit_geometrically_and_end_at_the_limit():
    sizes, limits = {"t": 1600, "u": 90}, {"t": 100, "u": 100}

    assert step_targets(sizes, limits, 1) == {"t": 100, "u": 90}
    assert step_targets(sizes, limits, 2) == {"t": 400, "u": 90}  # 100 * 16 ** (1/2)
    assert step_targets(sizes, limits, 4) == {"t": 800, "u": 90}  # 100 * 16 ** (3/4)


def test_cubic_step_targets_follow_the_cubic_excess_and_end_at_the_limit():
    sizes, limits = {"t": 1100, "u": 90}, {"t": 100, "u": 100}

    # excess 1000 over 4 prunings: E * (3/4)^3 = 421.875 left after the first; E * (1/2)^3 from 2 left
    assert step_targets(sizes, limits, 4, "cubic") == {"t": 521, "u": 90}
    assert step_targets(sizes, limits, 2, "cubic") == {"t": 225, "u": 90}
    assert step_targets(sizes, limits, 1, "cubic") == {"t": 100, "u": 90}
    # from any step, following the targets exactly lands on E0 * (1 - j / n)^3 and on the limit at the end
    size = {"t": 1100}
    for left in (4, 3, 2, 1):
        size = step_targets(size, {"t": 100}, left, "cubic")
        done = 4 - left + 1
        assert size["t"] == pytest.approx(100 + 1000 * (1 - done / 4) ** 3, abs=1)
    assert size == {"t": 100}
    with pytest.raises(ValueError, match="shape: expected one of"):
        step_targets(sizes, limits, 1, "linear")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="shape: expected one of"):
        PruningSchedule(interval=1, ratio=0.1, shape="linear")  # type: ignore[arg-type]


@pytest.mark.parametrize("shape", ["geometric", "cubic"])
def test_each_shape_meets_its_step_targets_ends_within_the_budget_and_stays_exact(shape: str):
    baim = budgeted_baim()
    schedule = PruningSchedule(interval=2, ratio=0.1, budget=1.3, recovery_epochs=2, shape=shape)  # type: ignore[arg-type]
    batches = mixed_batches(baim, 2, 6, seed=4)
    limits = budget_limits(baim.config, 1.3)

    # 8 epochs: prunings after 2, 4, 6 (3, 2, 1 left); 7 and 8 recover
    for epoch in range(1, 9):
        before = {t: task_model_params(baim.config, t) for t in limits}
        removed = prune_on_schedule(baim, epoch, 8, schedule, batches, seed=5)
        after = {t: task_model_params(baim.config, t) for t in limits}
        if epoch in (2, 4, 6):
            targets = step_targets(before, limits, (8 - epoch) // 2, shape)  # type: ignore[arg-type]
            assert all(after[t] <= targets[t] for t in limits)
        else:
            assert removed == []

    x, task_ids = images(4, 9), torch.tensor([0, 1, 0, 1])
    baim.eval()
    for task_id, task in enumerate(baim.config.tasks):
        model = decompose(baim, task).eval()
        assert count_params(model) <= limits[task]
        rows = task_ids == task_id
        expected = baim(x[rows], task_id, seed=3).recon
        assert (model(x[rows], seed=3).recon - expected).abs().max() <= TOLERANCE


def budgeted_baim(seed: int = 3) -> BAIM:
    """Two tasks of two learners each, every candidate connection, randomised; a small gate code."""
    spec, other = LearnerSpec((4, 8), 4, RESOLUTION), LearnerSpec((4,), 3, RESOLUTION)
    learners = [
        LearnerEntry("a0", "t0", spec),
        LearnerEntry("b0", "t1", other),
        LearnerEntry("a1", "t0", other),
        LearnerEntry("b1", "t1", spec),
    ]
    config = BAIMConfig(
        learners=tuple(learners),
        squads=(SquadSpec("t0", ("a0", "a1")), SquadSpec("t1", ("b0", "b1"))),
        top_k=1,
        connection_height=2,
        gate_code_dim=2,
        seed=seed,
    )
    torch.manual_seed(seed)
    baim = BAIM(config)
    randomise_connections(baim, seed)
    return baim


def test_a_budget_is_approached_on_the_pruning_epochs_and_reached_by_the_last():
    # Prepare
    baim = budgeted_baim()
    schedule = PruningSchedule(interval=2, ratio=0.1, budget=1.3, recovery_epochs=2)
    batches = mixed_batches(baim, 2, 6, seed=4)
    limits = budget_limits(baim.config, 1.3)
    initial = {t: task_model_params(baim.config, t) for t in baim.config.tasks}
    assert all(initial[t] > limits[t] for t in baim.config.tasks)

    # Execute: 8 epochs; prunings after epochs 2, 4, 6; 7 and 8 recover
    removed_per_epoch = []
    sizes_per_epoch = []
    for epoch in range(1, 9):
        removed_per_epoch.append(len(prune_on_schedule(baim, epoch, 8, schedule, batches, seed=5)))
        sizes_per_epoch.append({t: count_params(decompose(baim, t)) for t in baim.config.tasks})

    # Assert: nothing removed outside pruning epochs; the first pruning meets its (geometric) step target
    # only, not yet the limit; from the last pruning on every task model is within its budget
    assert all(removed_per_epoch[e - 1] == 0 for e in (1, 3, 5, 7, 8))
    assert removed_per_epoch[1] > 0
    first_targets = step_targets(initial, limits, 3)
    for task in baim.config.tasks:
        assert limits[task] < sizes_per_epoch[1][task] <= first_targets[task]
        assert sizes_per_epoch[5][task] <= limits[task]
        assert count_params(decompose(baim, task)) <= 1.3 * squad_params(baim.config, task)


def test_prune_on_schedule_is_deterministic_and_without_a_budget_removes_the_ratio():
    first, second = budgeted_baim(), budgeted_baim()
    schedule = PruningSchedule(interval=1, ratio=0.25)
    batches = mixed_batches(first, 2, 4, seed=1)
    surviving = len(first.connections.specs)

    removed = prune_on_schedule(first, 1, 2, schedule, batches, seed=0)

    assert removed == prune_on_schedule(second, 1, 2, schedule, batches, seed=0)
    assert len(removed) == math.floor(0.25 * surviving)
    assert first.connections.specs == second.connections.specs
    with pytest.raises(ValueError, match="score_batches: expected at least one"):
        prune_on_schedule(first, 2, 2, schedule, [], seed=0)


def test_compact_config_of_a_budgeted_baim_keeps_what_decompose_keeps():
    baim = budgeted_baim()
    prune_on_schedule(baim, 1, 1, PruningSchedule(1, 0.1, budget=1.2), mixed_batches(baim, 1, 4, 0))
    for task in baim.config.tasks:
        assert decompose(baim, task).config == compact_config(baim.config, [baim.config.squad(task)])
