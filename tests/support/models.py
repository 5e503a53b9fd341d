"""Small BAIMs for the serving and toolbox tests."""

from __future__ import annotations

import torch

from baim.config import LearnerSpec
from baim.learners import VAELearner
from baim.model import BAIM

TINY_BAIM_RESOLUTION = 16


def tiny_baim(seed: int = 0) -> BAIM:
    """Three learners in two squads (smiling: e0, e1; male: e2), connections drawn away from zero."""
    torch.manual_seed(seed)
    resolution = TINY_BAIM_RESOLUTION
    learners = [
        ("e0", "smiling", VAELearner(LearnerSpec(widths=(8, 16), latent_dim=8, resolution=resolution))),
        ("e1", "smiling", VAELearner(LearnerSpec(widths=(8,), latent_dim=4, resolution=resolution))),
        ("e2", "male", VAELearner(LearnerSpec(widths=(8, 8), latent_dim=8, resolution=resolution))),
    ]
    baim = BAIM.from_learners(["smiling", "male"], learners, top_k=1, connection_height=1)
    with torch.no_grad():  # fused connections start at zero; make them matter
        for p in baim.connection_parameters():
            p.normal_(0.0, 0.05)
    return baim
