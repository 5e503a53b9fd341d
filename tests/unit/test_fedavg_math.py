"""weighted_average, in the style of flower's aggregate_test.py: hand-computed tensors, exact expectations."""

from __future__ import annotations

import pytest
import torch

from orchestrator.baselines.fedavg_math import weighted_average


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
