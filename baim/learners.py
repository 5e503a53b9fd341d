"""Heterogeneous convolutional VAE learners: the experts the BAIM is built from.

A learner is PyTorch-VAE's VanillaVAE, built from a `LearnerSpec`, cut into stages so that linear projection
connections can attach between learners.

Stage indexing, with S = len(spec.widths), R = spec.resolution and b = R / 2**S:

- Stages 0..S-1 are encoder stages. Stage s maps (C_in, r, r) -> (widths[s], r/2, r/2) with a 3x3 conv of
  stride 2, GroupNorm and LeakyReLU; C_in is in_channels for stage 0, else widths[s-1].
- Between stage S-1 and stage S sits the bottleneck: flatten -> fc_mu, fc_logvar -> z = mu + eps * std ->
  decoder_input (linear) -> reshape to (widths[-1], b, b). `encode_to_latent` is its first half (input: the
  output of stage S-1), `latent_to_decoder` its second half (output: the input of stage S).
- Stages S..2S-1 are decoder stages, each upsampling x2 with a 3x3 transposed conv of stride 2, GroupNorm and
  LeakyReLU, mirroring the widths: decoder stage S+t maps (widths[S-1-t], r, r) -> (widths[S-2-t], 2r, 2r).
  The last decoder stage (2S-1) maps (widths[0], R/2, R/2) -> (in_channels, R, R): its transposed conv keeps
  widths[0] channels, then a 3x3 conv and a sigmoid give the image in [0, 1].

Normalisation is GroupNorm (per sample), never BatchNorm: the BAIM runs each learner only on the samples
routed to it, a decomposed task model must equal the BAIM exactly, and DDP ranks must stay bit-identical;
batch statistics would break all three. So the output for sample i never depends on the rest of its batch.

Noise: `forward(x)` samples z = mu + eps * std with eps ~ N(0, I) in train and eval mode alike (a VAE's
reconstruction is stochastic); pass `eps` for a deterministic result. `noise_for(name, seed, ...)` draws
reproducible eps keyed by a learner name, so the BAIM and a decomposed task model can feed the same learner
the same noise.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from baim.config import LearnerSpec
from baim.seeding import derive_seed

logger = logging.getLogger(__name__)

LEAKY_RELU_SLOPE = 0.01  # nn.LeakyReLU's default, as in VanillaVAE
MAX_NORM_GROUPS = 8


class VAEOutput(NamedTuple):
    recon: torch.Tensor  # (B, C, R, R) in [0, 1]
    mu: torch.Tensor  # (B, latent_dim)
    logvar: torch.Tensor  # (B, latent_dim)
    z: torch.Tensor  # (B, latent_dim), mu + eps * std


class LossOutput(NamedTuple):
    loss: torch.Tensor  # recon_loss + kld_weight * kld
    recon_loss: torch.Tensor
    kld: torch.Tensor


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with the largest number of groups <= 8 that divides `channels` (any width works)."""
    num_groups = max(g for g in range(1, MAX_NORM_GROUPS + 1) if channels % g == 0)
    return nn.GroupNorm(num_groups, channels)


def encoder_stage(in_channels: int, out_channels: int) -> nn.Sequential:
    """(in, r, r) -> (out, r/2, r/2)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=2, padding=1),
        group_norm(out_channels),
        nn.LeakyReLU(LEAKY_RELU_SLOPE),
    )


def decoder_stage(in_channels: int, out_channels: int) -> nn.Sequential:
    """(in, r, r) -> (out, 2r, 2r)."""
    return nn.Sequential(
        nn.ConvTranspose2d(in_channels, out_channels, kernel_size=3, stride=2, padding=1, output_padding=1),
        group_norm(out_channels),
        nn.LeakyReLU(LEAKY_RELU_SLOPE),
    )


def image_stage(in_channels: int, image_channels: int) -> nn.Sequential:
    """The last decoder stage: (in, r, r) -> (image_channels, 2r, 2r) in [0, 1] (VanillaVAE's final_layer)."""
    return nn.Sequential(
        decoder_stage(in_channels, in_channels),
        nn.Conv2d(in_channels, image_channels, kernel_size=3, padding=1),
        nn.Sigmoid(),
    )


class VAELearner(nn.Module):
    """A convolutional VAE of any width, depth and latent size, exposing its 2*S stages."""

    def __init__(self, spec: LearnerSpec) -> None:
        super().__init__()
        if not isinstance(spec, LearnerSpec):
            raise TypeError(f"spec: expected a LearnerSpec, received {type(spec).__name__}")
        self.spec = spec
        widths = spec.widths
        S = len(widths)
        b = spec.bottleneck_resolution
        flat_features = widths[-1] * b * b

        encoder_inputs = (spec.in_channels, *widths[:-1])
        self.encoder_stages = nn.ModuleList(
            encoder_stage(c_in, c_out) for c_in, c_out in zip(encoder_inputs, widths, strict=True)
        )
        self.fc_mu = nn.Linear(flat_features, spec.latent_dim)
        self.fc_logvar = nn.Linear(flat_features, spec.latent_dim)
        self.decoder_input = nn.Linear(spec.latent_dim, flat_features)

        reversed_widths = widths[::-1]
        decoder: list[nn.Module] = [
            decoder_stage(reversed_widths[t], reversed_widths[t + 1]) for t in range(S - 1)
        ]
        decoder.append(image_stage(widths[0], spec.in_channels))
        self.decoder_stages = nn.ModuleList(decoder)

    # ---- stage geometry -------------------------------------------------------------------------------

    @property
    def num_stages(self) -> int:
        return self.spec.num_stages

    def _check_stage(self, k: int) -> None:
        if not isinstance(k, int) or not 0 <= k < self.num_stages:
            raise ValueError(f"stage: expected an int in [0, {self.num_stages - 1}], received {k!r}")

    def stage_input_shape(self, k: int) -> tuple[int, int, int]:
        """(C, H, W) that stage k takes."""
        self._check_stage(k)
        spec, S = self.spec, len(self.spec.widths)
        if k < S:
            channels = spec.in_channels if k == 0 else spec.widths[k - 1]
            size = spec.resolution // 2**k
        else:
            t = k - S
            channels = spec.widths[S - 1 - t]
            size = spec.bottleneck_resolution * 2**t
        return (channels, size, size)

    def stage_output_shape(self, k: int) -> tuple[int, int, int]:
        """(C, H, W) that stage k returns: stage k+1's input, except across the bottleneck (k = S-1)."""
        self._check_stage(k)
        spec, S = self.spec, len(self.spec.widths)
        if k < S:
            size = spec.resolution // 2 ** (k + 1)
            return (spec.widths[k], size, size)
        t = k - S
        channels = spec.in_channels if t == S - 1 else spec.widths[S - 2 - t]
        size = spec.bottleneck_resolution * 2 ** (t + 1)
        return (channels, size, size)

    # ---- pieces the BAIM composes ---------------------------------------------------------------------

    def run_stage(self, k: int, h: torch.Tensor) -> torch.Tensor:
        """Run stage k alone on h of shape (B, *stage_input_shape(k))."""
        expected = self.stage_input_shape(k)
        if h.dim() != 4 or tuple(h.shape[1:]) != expected:
            raise ValueError(f"stage {k} input: expected shape (B, {expected}), received {tuple(h.shape)}")
        S = len(self.spec.widths)
        stage = self.encoder_stages[k] if k < S else self.decoder_stages[k - S]
        return stage(h)

    def encode_to_latent(self, h_enc_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Bottleneck, first half: output of stage S-1 -> (mu, logvar), each (B, latent_dim)."""
        flat = torch.flatten(h_enc_out, start_dim=1)
        return self.fc_mu(flat), self.fc_logvar(flat)

    def latent_to_decoder(self, z: torch.Tensor) -> torch.Tensor:
        """Bottleneck, second half: z (B, latent_dim) -> input of stage S, (B, widths[-1], b, b)."""
        b = self.spec.bottleneck_resolution
        h = self.decoder_input(z)
        return h.view(z.shape[0], self.spec.widths[-1], b, b)

    @staticmethod
    def reparameterize(mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor | None) -> torch.Tensor:
        """z = mu + eps * exp(logvar / 2); eps ~ N(0, I) is drawn when None."""
        if eps is None:
            eps = torch.randn_like(mu)
        elif eps.shape != mu.shape:
            raise ValueError(f"eps: expected shape {tuple(mu.shape)}, received {tuple(eps.shape)}")
        return mu + eps * torch.exp(0.5 * logvar)

    # ---- whole-model API ------------------------------------------------------------------------------

    def _check_images(self, x: torch.Tensor) -> None:
        spec = self.spec
        expected = (spec.in_channels, spec.resolution, spec.resolution)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"images: expected shape (B, {expected}), received {tuple(x.shape)}")

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (B, C, R, R) -> (mu, logvar)."""
        self._check_images(x)
        h = x
        for stage in self.encoder_stages:
            h = stage(h)
        return self.encode_to_latent(h)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, latent_dim) -> images (B, C, R, R) in [0, 1]."""
        if z.dim() != 2 or z.shape[1] != self.spec.latent_dim:
            raise ValueError(f"z: expected shape (B, {self.spec.latent_dim}), received {tuple(z.shape)}")
        h = self.latent_to_decoder(z)
        for stage in self.decoder_stages:
            h = stage(h)
        return h

    def forward(self, x: torch.Tensor, eps: torch.Tensor | None = None) -> VAEOutput:
        """Reconstruct x. Samples z even in eval mode unless eps (B, latent_dim) is given."""
        mu, logvar = self.encode(x)
        z = self.reparameterize(mu, logvar, eps)
        return VAEOutput(recon=self.decode(z), mu=mu, logvar=logvar, z=z)

    def loss(self, x: torch.Tensor, kld_weight: float, eps: torch.Tensor | None = None) -> LossOutput:
        out = self(x, eps)
        return vae_loss(out.recon, x, out.mu, out.logvar, kld_weight)

    @torch.no_grad()
    def generate(
        self, n: int, generator: torch.Generator | None = None, eps: torch.Tensor | None = None
    ) -> torch.Tensor:
        """n images (n, C, R, R) in [0, 1] decoded from z ~ N(0, I).

        z is drawn on the CPU from `generator` (the global RNG when None) and moved to the model's device, so
        a generator seeded the same way gives the same images on any device; or pass `eps` (n, latent_dim).
        """
        if eps is None:
            if not isinstance(n, int) or n < 1:
                raise ValueError(f"n: expected a positive int, received {n!r}")
            eps = torch.randn(n, self.spec.latent_dim, generator=generator)
        elif eps.shape != (n, self.spec.latent_dim):
            raise ValueError(
                f"eps: expected shape ({n}, {self.spec.latent_dim}), received {tuple(eps.shape)}"
            )
        device = self.decoder_input.weight.device
        return self.decode(eps.to(device))


def vae_loss_per_sample(
    recon: torch.Tensor, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, kld_weight: float
) -> LossOutput:
    """Per-sample VAE loss, each field of shape (B,); its batch mean is exactly `vae_loss`.

    recon_loss[i] = mean squared error of sample i; kld[i] = -0.5 * sum(1 + logvar - mu^2 - exp(logvar)).
    """
    if recon.shape != x.shape:
        raise ValueError(f"recon: expected the images' shape {tuple(x.shape)}, received {tuple(recon.shape)}")
    recon_loss = F.mse_loss(recon, x, reduction="none").flatten(start_dim=1).mean(dim=1)
    kld = -0.5 * torch.sum(1 + logvar - mu**2 - logvar.exp(), dim=1)
    return LossOutput(loss=recon_loss + kld_weight * kld, recon_loss=recon_loss, kld=kld)


def vae_loss(
    recon: torch.Tensor, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, kld_weight: float
) -> LossOutput:
    """PyTorch-VAE's VanillaVAE loss (where the paper's kld_weight 0.00025 comes from), scalars.

    recon_loss = F.mse_loss(recon, x) (mean over all elements); kld = batch mean of
    -0.5 * sum(1 + logvar - mu^2 - exp(logvar), dim=1); loss = recon_loss + kld_weight * kld.
    """
    if recon.shape != x.shape:
        raise ValueError(f"recon: expected the images' shape {tuple(x.shape)}, received {tuple(recon.shape)}")
    recon_loss = F.mse_loss(recon, x)
    kld = torch.mean(-0.5 * torch.sum(1 + logvar - mu**2 - logvar.exp(), dim=1), dim=0)
    return LossOutput(loss=recon_loss + kld_weight * kld, recon_loss=recon_loss, kld=kld)


def noise_for(
    name: str, seed: int, batch: int, dim: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """Reproducible standard-normal noise (batch, dim) keyed by (name, seed).

    The generator's seed is `baim.seeding.derive_seed(name, seed)` (stable across processes), so the BAIM and
    a decomposed task model give learner `name` the same eps for the same seed. Drawn on the CPU, then moved
    to `device`, so it is the same on every device.
    """
    if batch < 0 or dim < 1:
        raise ValueError(f"noise shape: expected batch >= 0 and dim >= 1, received ({batch}, {dim})")
    generator = torch.Generator().manual_seed(derive_seed(name, seed))
    noise = torch.randn(batch, dim, generator=generator)
    return noise if device is None else noise.to(device)
