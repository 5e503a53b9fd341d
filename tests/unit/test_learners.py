"""LearnerSpec validation and VAELearner stage geometry, noise and loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from baim.config import LearnerSpec
from baim.learners import VAELearner, noise_for, vae_loss, vae_loss_per_sample

SPECS = [
    LearnerSpec(widths=(8,), latent_dim=4, resolution=16),
    LearnerSpec(widths=(4, 12), latent_dim=5, resolution=16),
    LearnerSpec(widths=(8, 16, 32), latent_dim=16, resolution=32),
    LearnerSpec(widths=(6, 10, 12, 20), latent_dim=7, resolution=64, in_channels=1),
    LearnerSpec(widths=(3, 5, 7, 9), latent_dim=2, resolution=16),  # bottleneck 1x1, odd widths
]


def make_learner(spec: LearnerSpec, seed: int = 0) -> VAELearner:
    torch.manual_seed(seed)
    return VAELearner(spec)


def images(spec: LearnerSpec, batch: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, spec.in_channels, spec.resolution, spec.resolution, generator=generator)


def run_stage_chain(learner: VAELearner, x: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Forward pass through the public stage API, checking every boundary shape on the way."""
    S = len(learner.spec.widths)
    h = x
    mu = logvar = torch.empty(0)
    for k in range(learner.num_stages):
        if k == S:
            mu, logvar = learner.encode_to_latent(h)
            h = learner.latent_to_decoder(mu + eps * torch.exp(0.5 * logvar))
        assert tuple(h.shape[1:]) == learner.stage_input_shape(k)
        h = learner.run_stage(k, h)
        assert tuple(h.shape[1:]) == learner.stage_output_shape(k)
    return h, mu, logvar


# ---- LearnerSpec ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", SPECS)
def test_spec_round_trips_through_dict(spec: LearnerSpec) -> None:
    assert LearnerSpec.from_dict(spec.to_dict()) == spec
    assert spec.num_stages == 2 * len(spec.widths)


def test_spec_from_json_list_is_a_tuple() -> None:
    spec = LearnerSpec.from_dict({"widths": [8, 16], "latent_dim": 4, "resolution": 16})
    assert spec.widths == (8, 16)
    assert spec.in_channels == 3


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"widths": (), "latent_dim": 4, "resolution": 16}, "widths"),
        ({"widths": (8, 0), "latent_dim": 4, "resolution": 16}, r"widths\[1\]"),
        ({"widths": (8, -2), "latent_dim": 4, "resolution": 16}, r"widths\[1\]"),
        ({"widths": (8,), "latent_dim": 0, "resolution": 16}, "latent_dim"),
        ({"widths": (8,), "latent_dim": 4, "resolution": 0}, "resolution"),
        ({"widths": (8, 8, 8), "latent_dim": 4, "resolution": 12}, "resolution"),
        ({"widths": (8, 8, 8, 8, 8), "latent_dim": 4, "resolution": 16}, "resolution"),
        ({"widths": (8,), "latent_dim": 4, "resolution": 16, "in_channels": 0}, "in_channels"),
        ({"widths": (8,), "latent_dim": True, "resolution": 16}, "latent_dim"),
    ],
)
def test_invalid_spec_names_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        LearnerSpec(**kwargs)


def test_from_dict_rejects_unknown_and_missing_keys_by_name() -> None:
    with pytest.raises(ValueError, match="depth"):
        LearnerSpec.from_dict({"widths": [8], "latent_dim": 4, "resolution": 16, "depth": 2})
    with pytest.raises(ValueError, match="latent_dim"):
        LearnerSpec.from_dict({"widths": [8], "resolution": 16})


# ---- VAELearner ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", SPECS)
def test_stage_shapes_and_stage_chain_equal_forward(spec: LearnerSpec) -> None:
    # Prepare
    learner = make_learner(spec)
    x = images(spec, batch=3)
    eps = noise_for("learner", seed=0, batch=3, dim=spec.latent_dim)
    S = len(spec.widths)

    # Execute
    out = learner(x, eps=eps)
    chained, mu, logvar = run_stage_chain(learner, x, eps)

    # Assert
    assert learner.stage_input_shape(0) == (spec.in_channels, spec.resolution, spec.resolution)
    assert learner.stage_output_shape(S - 1) == learner.stage_input_shape(S)
    assert learner.stage_output_shape(2 * S - 1) == (spec.in_channels, spec.resolution, spec.resolution)
    for k in range(2 * S - 1):
        if k != S - 1:
            assert learner.stage_output_shape(k) == learner.stage_input_shape(k + 1)
    assert out.recon.shape == x.shape
    assert out.mu.shape == out.logvar.shape == out.z.shape == (3, spec.latent_dim)
    assert torch.equal(chained, out.recon)
    assert torch.equal(mu, out.mu)
    assert torch.equal(logvar, out.logvar)
    assert float(out.recon.detach().min()) >= 0.0
    assert float(out.recon.detach().max()) <= 1.0


def test_learner_has_no_batch_norm() -> None:
    learner = make_learner(SPECS[2])
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in learner.modules())
    assert len(learner.encoder_stages) == len(learner.decoder_stages) == 3


@pytest.mark.parametrize("spec", SPECS[:3])
def test_sample_output_does_not_depend_on_the_rest_of_the_batch(spec: LearnerSpec) -> None:
    learner = make_learner(spec)
    x = images(spec, batch=4)
    eps = noise_for("learner", seed=3, batch=4, dim=spec.latent_dim)
    other = images(spec, batch=4, seed=9)
    mixed = torch.cat([x[:1], other[1:]])

    full = learner(x, eps=eps)
    alone = learner(x[:1], eps=eps[:1])
    with_others = learner(mixed, eps=eps)

    torch.testing.assert_close(alone.recon, full.recon[:1], rtol=0, atol=1e-6)
    torch.testing.assert_close(with_others.recon[:1], full.recon[:1], rtol=0, atol=1e-6)
    torch.testing.assert_close(with_others.mu[:1], full.mu[:1], rtol=0, atol=1e-6)


def test_forward_samples_in_eval_mode_unless_eps_given() -> None:
    spec = SPECS[1]
    learner = make_learner(spec).eval()
    x = images(spec, batch=2)
    first, second = learner(x), learner(x)
    assert not torch.equal(first.z, second.z)
    eps = torch.zeros(2, spec.latent_dim)
    assert torch.equal(learner(x, eps=eps).recon, learner(x, eps=eps).recon)
    assert torch.equal(learner(x, eps=eps).z, learner(x, eps=eps).mu)


def test_generate_is_deterministic_per_generator() -> None:
    spec = SPECS[2]
    learner = make_learner(spec)
    a = learner.generate(5, generator=torch.Generator().manual_seed(7))
    b = learner.generate(5, generator=torch.Generator().manual_seed(7))
    c = learner.generate(5, generator=torch.Generator().manual_seed(8))
    assert a.shape == (5, 3, 32, 32)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    eps = torch.randn(5, spec.latent_dim, generator=torch.Generator().manual_seed(7))
    assert torch.equal(learner.generate(5, eps=eps), a)
    assert torch.equal(learner.decode(eps), a)


def test_same_seed_builds_same_weights() -> None:
    a, b = make_learner(SPECS[2], seed=5), make_learner(SPECS[2], seed=5)
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(pa, pb), name


def test_wrong_shapes_raise_clear_errors() -> None:
    spec = SPECS[1]
    learner = make_learner(spec)
    with pytest.raises(ValueError, match="images: expected shape"):
        learner(torch.rand(2, 3, 32, 32))
    with pytest.raises(ValueError, match="stage 1 input"):
        learner.run_stage(1, torch.rand(2, 3, 16, 16))
    with pytest.raises(ValueError, match="stage: expected an int in"):
        learner.run_stage(4, torch.rand(2, 3, 16, 16))
    with pytest.raises(ValueError, match="eps: expected shape"):
        learner(torch.rand(2, 3, 16, 16), eps=torch.zeros(2, spec.latent_dim + 1))
    with pytest.raises(ValueError, match="n: expected a positive int"):
        learner.generate(0)


# ---- noise and loss ------------------------------------------------------------------------------------


def test_noise_for_is_keyed_by_name_and_seed() -> None:
    a = noise_for("edge-3", seed=11, batch=4, dim=6)
    assert a.shape == (4, 6)
    assert torch.equal(a, noise_for("edge-3", seed=11, batch=4, dim=6))
    assert not torch.equal(a, noise_for("edge-4", seed=11, batch=4, dim=6))
    assert not torch.equal(a, noise_for("edge-3", seed=12, batch=4, dim=6))
    # Independent of the global RNG state.
    torch.manual_seed(123)
    assert torch.equal(a, noise_for("edge-3", seed=11, batch=4, dim=6))


def test_vae_loss_matches_hand_computation() -> None:
    # Prepare: two samples, two latent dims, 1x1x2 "images".
    x = torch.tensor([[[[0.0, 1.0]]], [[[0.5, 0.5]]]])
    recon = torch.tensor([[[[0.5, 1.0]]], [[[0.5, 0.0]]]])
    mu = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    logvar = torch.tensor([[0.0, 0.0], [0.0, 0.0]])

    # Execute
    out = vae_loss(recon, x, mu, logvar, kld_weight=0.5)
    per_sample = vae_loss_per_sample(recon, x, mu, logvar, kld_weight=0.5)

    # Assert: squared errors 0.25, 0, 0, 0.25 -> mean 0.125; kld per sample = 0.5 * sum(mu^2) = 0.5, 2.0.
    torch.testing.assert_close(out.recon_loss, torch.tensor(0.125))
    torch.testing.assert_close(out.kld, torch.tensor(1.25))
    torch.testing.assert_close(out.loss, torch.tensor(0.125 + 0.5 * 1.25))
    torch.testing.assert_close(per_sample.recon_loss, torch.tensor([0.125, 0.125]))
    torch.testing.assert_close(per_sample.kld, torch.tensor([0.5, 2.0]))
    torch.testing.assert_close(per_sample.loss.mean(), out.loss)


def test_learner_loss_is_vanilla_vae_loss() -> None:
    spec = SPECS[1]
    learner = make_learner(spec)
    x = images(spec, batch=3)
    eps = noise_for("learner", seed=1, batch=3, dim=spec.latent_dim)
    out = learner(x, eps=eps)
    loss = learner.loss(x, kld_weight=0.00025, eps=eps)
    kld = torch.mean(-0.5 * torch.sum(1 + out.logvar - out.mu**2 - out.logvar.exp(), dim=1))
    torch.testing.assert_close(loss.recon_loss, F.mse_loss(out.recon, x))
    torch.testing.assert_close(loss.kld, kld)
    torch.testing.assert_close(loss.loss, F.mse_loss(out.recon, x) + 0.00025 * kld)
