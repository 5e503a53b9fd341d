"""Small BAIMs for the serving, toolbox and split-generation tests."""

from __future__ import annotations

import torch

from baim.config import LearnerSpec
from baim.decompose import TaskModel
from baim.learners import VAELearner
from baim.model import BAIM
from baim.model_config import BAIMConfig, ConnectionSpec, LearnerEntry, SquadSpec
from tests.support.baim_random import RESOLUTION, randomise_connections

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


def two_learner_model(top_k: int) -> TaskModel:
    """Squad {a, c}: a has decoder stages 2, 3; c has decoder stage 1 (its image), which feeds a's stage 3."""
    config = BAIMConfig(
        learners=(
            LearnerEntry("a", "t0", LearnerSpec((4, 4), 2, RESOLUTION)),
            LearnerEntry("c", "t0", LearnerSpec((4,), 3, RESOLUTION)),
        ),
        squads=(SquadSpec("t0", ("a", "c")),),
        top_k=top_k,
        connection_height=2,
        connections=(ConnectionSpec("c", 1, "a", 3),),
    )
    torch.manual_seed(0)
    model = TaskModel(config)
    randomise_connections(model.baim, seed=1)
    return model
