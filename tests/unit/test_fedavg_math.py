"""weighted_average, in the style of flower's aggregate_test.py: hand-computed tensors, exact expectations."""

from __future__ import annotations

import pytest
import torch

from orchestrator.baselines.fedavg_math import (
    coordinate_median,
    krum,
    krum_scores,
    trimmed_mean,
    weighted_average,
)


def test_identical_models_average_to_the_same_model():
    # Prepare
    generator = torch.Generator().manual_seed(0)
    state = {"w": torch.randn(4, 3, generator=generator), "b": torch.randn(4, generator=generator)}
    # Execute
    result = weighted_average([state, {k: v.clone() for k, v in state.items()}, state], [10, 3, 7])
    # Assert
    assert set(result) == {"w", "b"}
    for name, tensor in state.items():
        torch.testing.assert_close(result[name], tensor, rtol=0, atol=1e-7)


def test_two_clients_hand_computed():
    # Prepare: (1 * 1 + 3 * 5) / 4 = 4,  (1 * 2 + 3 * 6) / 4 = 5
    first = {"w": torch.tensor([[1.0, 2.0]])}
    second = {"w": torch.tensor([[5.0, 6.0]])}
    # Execute
    result = weighted_average([first, second], [1, 3])
    # Assert
    assert torch.equal(result["w"], torch.tensor([[4.0, 5.0]]))


def test_three_clients_hand_computed():
    # Prepare: weights 2, 1, 1 -> (2 * [0, 4] + [4, 0] + [8, 8]) / 4 = [3, 4];  bias (2*1 + 2 + 6) / 4 = 2.5
    states = [
        {"w": torch.tensor([0.0, 4.0]), "b": torch.tensor(1.0)},
        {"w": torch.tensor([4.0, 0.0]), "b": torch.tensor(2.0)},
        {"w": torch.tensor([8.0, 8.0]), "b": torch.tensor(6.0)},
    ]
    # Execute
    result = weighted_average(states, [2.0, 1.0, 1.0])
    # Assert
    assert torch.equal(result["w"], torch.tensor([3.0, 4.0]))
    assert torch.equal(result["b"], torch.tensor(2.5))


def test_zero_weight_client_is_ignored():
    result = weighted_average([{"w": torch.tensor([2.0])}, {"w": torch.tensor([100.0])}], [5, 0])
    assert torch.equal(result["w"], torch.tensor([2.0]))


def test_dtype_of_first_state_is_kept():
    result = weighted_average(
        [{"w": torch.ones(2, dtype=torch.float16)}, {"w": torch.zeros(2, dtype=torch.float16)}], [1, 1]
    )
    assert result["w"].dtype == torch.float16
    assert torch.equal(result["w"], torch.full((2,), 0.5, dtype=torch.float16))


def test_inputs_are_not_modified():
    first, second = {"w": torch.tensor([1.0])}, {"w": torch.tensor([3.0])}
    weighted_average([first, second], [1, 1])
    assert torch.equal(first["w"], torch.tensor([1.0]))
    assert torch.equal(second["w"], torch.tensor([3.0]))


@pytest.mark.parametrize(
    ("states", "weights", "message"),
    [
        ([], [], "states: expected at least one client state"),
        ([{"w": torch.ones(1)}], [1, 2], "weights: expected 1 values"),
        (
            [{"w": torch.ones(1)}, {"w": torch.ones(1)}],
            [0, 0],
            "weights: expected a positive total, received 0.0",
        ),
        ([{"w": torch.ones(1)}], [-1.0], r"weights\[0\]: expected a finite value >= 0, received -1.0"),
        ([{"w": torch.ones(1)}], [float("nan")], r"weights\[0\]: expected a finite value >= 0, received nan"),
        (
            [{"w": torch.ones(1)}, {"v": torch.ones(1)}],
            [1, 1],
            r"states\[1\]: keys differ from states\[0\] \(missing \['w'\], unexpected \['v'\]\)",
        ),
        (
            [{"w": torch.ones(2, 3)}, {"w": torch.ones(3, 2)}],
            [1, 1],
            r"states\[1\]\['w'\]: expected shape \(2, 3\), received \(3, 2\)",
        ),
        (
            [{"n": torch.ones(2, dtype=torch.int64)}],
            [1],
            r"expected a floating-point tensor, received torch.int64",
        ),
    ],
)
def test_broken_preconditions_raise_value_error(states, weights, message):
    with pytest.raises(ValueError, match=message):
        weighted_average(states, weights)


# ---- robust aggregation (Flower's aggregate_median / aggregate_trimmed_avg / aggregate_krum) -------------


def test_median_of_an_odd_count_is_the_middle_value():
    # Prepare: per coordinate the middle of {1, 9, 5} = 5 and of {-2, 0, 7} = 0
    states = [
        {"w": torch.tensor([1.0, -2.0])},
        {"w": torch.tensor([9.0, 0.0])},
        {"w": torch.tensor([5.0, 7.0])},
    ]
    # Execute
    result = coordinate_median(states)
    # Assert
    assert torch.equal(result["w"], torch.tensor([5.0, 0.0]))


def test_median_of_an_even_count_averages_the_two_middle_values():
    # Prepare: {1, 2, 10, 100} -> (2 + 10) / 2 = 6, as numpy's median (torch.median would give 2)
    states = [{"w": torch.tensor([v])} for v in (10.0, 1.0, 100.0, 2.0)]
    # Execute
    result = coordinate_median(states)
    # Assert
    assert torch.equal(result["w"], torch.tensor([6.0]))


def test_median_ignores_one_huge_outlier():
    # Prepare: an attacker scales its update by 1000
    states = [
        {"w": torch.tensor([1.0, 1.0])},
        {"w": torch.tensor([2.0, 2.0])},
        {"w": torch.tensor([1e3, -1e3])},
    ]
    # Execute
    result = coordinate_median(states)
    # Assert
    assert torch.equal(result["w"], torch.tensor([2.0, 1.0]))


def test_trimmed_mean_cuts_int_proportion_times_n_from_each_end():
    # Prepare: n = 5, proportion 0.2 -> cut 1 from each end: {0, 1, 2, 3, 100} -> mean(1, 2, 3) = 2
    states = [{"w": torch.tensor([v])} for v in (3.0, 100.0, 0.0, 2.0, 1.0)]
    # Execute
    result = trimmed_mean(states, 0.2)
    # Assert
    assert torch.equal(result["w"], torch.tensor([2.0]))


def test_trimmed_mean_with_nothing_cut_is_the_plain_mean():
    # Prepare: n = 4, proportion 0.2 -> int(0.8) = 0 cut: mean(1, 2, 3, 10) = 4
    states = [{"w": torch.tensor([v])} for v in (1.0, 2.0, 3.0, 10.0)]
    # Execute
    result = trimmed_mean(states, 0.2)
    # Assert
    assert torch.equal(result["w"], torch.tensor([4.0]))


def test_trimmed_mean_rejects_a_proportion_that_leaves_nothing():
    states = [{"w": torch.tensor([1.0])}, {"w": torch.tensor([2.0])}]
    with pytest.raises(ValueError, match="proportion_to_cut"):
        trimmed_mean(states, 0.5)


def test_krum_scores_hand_computed():
    # Prepare: points 0, 1, 3, 10 on a line; n = 4, f = 1 -> each scores its n - f - 2 = 1 nearest other
    # squared distance: 0 -> 1, 1 -> 1, 3 -> 4, 10 -> 49
    states = [{"w": torch.tensor([v])} for v in (0.0, 1.0, 3.0, 10.0)]
    # Execute
    scores = krum_scores(states, num_malicious=1)
    # Assert
    assert scores == [1.0, 1.0, 4.0, 49.0]


def test_krum_scores_sum_over_all_tensors_of_a_state():
    # Prepare: two tensors per state; n = 3, f = 0 -> max(1, 3 - 0 - 2) = 1 nearest
    # distances^2: s0-s1 = 1 + 4 = 5, s0-s2 = 9 + 0 = 9, s1-s2 = 4 + 4 = 8
    states = [
        {"a": torch.tensor([0.0]), "b": torch.tensor([0.0])},
        {"a": torch.tensor([1.0]), "b": torch.tensor([2.0])},
        {"a": torch.tensor([3.0]), "b": torch.tensor([0.0])},
    ]
    # Execute
    scores = krum_scores(states, num_malicious=0)
    # Assert
    assert scores == [5.0, 5.0, 8.0]


def test_krum_picks_the_lowest_score_and_ties_go_to_the_earlier_state():
    # Prepare: scores [1, 1, 4, 49] (above)
    states = [{"w": torch.tensor([v])} for v in (0.0, 1.0, 3.0, 10.0)]
    # Execute
    chosen_state, chosen = krum(states, [1, 1, 1, 1], num_malicious=1)
    # Assert
    assert chosen == [0]
    assert torch.equal(chosen_state["w"], torch.tensor([0.0]))


def test_multi_krum_averages_the_lowest_scoring_states_by_example_count():
    # Prepare: to_keep 3 -> states 0, 1, 2 (scores 1, 1, 4) weighted 1, 1, 2: (0 + 1 + 2 * 3) / 4 = 1.75
    states = [{"w": torch.tensor([v])} for v in (0.0, 1.0, 3.0, 10.0)]
    # Execute
    averaged, chosen = krum(states, [1, 1, 2, 5], num_malicious=1, to_keep=3)
    # Assert
    assert chosen == [0, 1, 2]
    assert torch.equal(averaged["w"], torch.tensor([1.75]))


def test_krum_needs_two_states():
    with pytest.raises(ValueError, match="at least 2"):
        krum_scores([{"w": torch.tensor([1.0])}], num_malicious=0)
