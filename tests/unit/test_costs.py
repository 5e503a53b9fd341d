"""Parameter counts, serialized bytes and FLOPs against hand formulas."""

from __future__ import annotations

import struct

import pytest
import torch
from safetensors.torch import load as safetensors_load
from torch import nn

from baim.config import LearnerSpec
from baim.costs import count_flops, count_params, forward_backward_flops, serialized_bytes
from baim.learners import VAELearner, noise_for, vae_loss


def sum_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    return model(batch).sum()


def test_count_params_of_linear_and_shared_weights() -> None:
    linear = nn.Linear(5, 7)
    assert count_params(linear) == 5 * 7 + 7
    tied = nn.Sequential(linear, linear)
    assert count_params(tied) == 5 * 7 + 7


def test_serialized_bytes_is_header_plus_float32_data() -> None:
    # Prepare
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Conv2d(3, 4, kernel_size=3))
    n_params = 5 * 7 + 7 + 4 * 3 * 3 * 3 + 4

    # Execute
    size = serialized_bytes(model)

    # Assert: safetensors = 8-byte header length + JSON header + raw little-endian float32 data.
    from safetensors.torch import save

    blob = save({k: v.contiguous() for k, v in model.state_dict().items()})
    (header_len,) = struct.unpack("<Q", blob[:8])
    assert size == len(blob) == 8 + header_len + 4 * n_params
    assert count_params(model) == n_params
    loaded = safetensors_load(blob)
    assert torch.equal(loaded["0.weight"], model[0].weight.detach())


def test_serialized_bytes_handles_tied_weights() -> None:
    linear = nn.Linear(3, 3)
    tied = nn.Sequential(linear, linear)  # state_dict holds the same storage twice
    assert serialized_bytes(tied) > 2 * 4 * (3 * 3 + 3)


def test_linear_flops_equal_hand_formula() -> None:
    # Prepare
    B, fan_in, fan_out = 4, 5, 7
    linear = nn.Linear(fan_in, fan_out)
    x = torch.randn(B, fan_in)

    # Execute
    forward = count_flops(linear, x)
    counts = forward_backward_flops(linear, x, sum_loss)

    # Assert: one matmul of 2*B*in*out; the input needs no grad, so backward is only the weight gradient.
    assert forward == 2 * B * fan_in * fan_out
    assert counts.forward == 2 * B * fan_in * fan_out
    assert counts.backward == 2 * B * fan_in * fan_out
    assert counts.total == 4 * B * fan_in * fan_out


def test_conv_flops_equal_hand_formula() -> None:
    B, c_in, c_out, k, size = 2, 3, 4, 3, 8
    conv = nn.Conv2d(c_in, c_out, kernel_size=k, padding=1)
    x = torch.randn(B, c_in, size, size)
    assert count_flops(conv, x) == 2 * B * c_out * size * size * c_in * k * k


def test_backward_counts_input_gradient_of_second_layer() -> None:
    # Layer 2's input is layer 1's output, which needs grad: backward = grad input + grad weight there.
    B = 3
    model = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 2))
    counts = forward_backward_flops(model, torch.randn(B, 4), sum_loss)
    assert counts.forward == 2 * B * (4 * 6 + 6 * 2)
    assert counts.backward == 2 * B * 4 * 6 + 2 * (2 * B * 6 * 2)


def test_flops_are_deterministic_and_leave_grads_untouched() -> None:
    # Prepare
    spec = LearnerSpec(widths=(4, 8), latent_dim=3, resolution=16)
    torch.manual_seed(0)
    learner = VAELearner(spec)
    x = torch.rand(2, 3, 16, 16)

    def loss_fn(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        out = model(batch, eps=noise_for("a", 0, batch.shape[0], spec.latent_dim))
        return vae_loss(out.recon, batch, out.mu, out.logvar, 0.00025).loss

    learner.fc_mu.weight.grad = torch.ones_like(learner.fc_mu.weight)

    # Execute
    first = forward_backward_flops(learner, x, loss_fn)
    second = forward_backward_flops(learner, x, loss_fn)

    # Assert
    assert first == second
    assert first.forward > 0
    assert first.backward > first.forward  # backward ~ 2x forward, minus the image input's gradient
    assert torch.equal(learner.fc_mu.weight.grad, torch.ones_like(learner.fc_mu.weight))
    assert learner.fc_logvar.weight.grad is None
    assert count_flops(learner, x) == first.forward


def test_forward_backward_flops_rejects_non_scalar_loss() -> None:
    linear = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="scalar"):
        forward_backward_flops(linear, torch.randn(3, 2), lambda m, b: m(b))
