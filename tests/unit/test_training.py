"""Training strategies and the plain training loop, on synthetic and real faces."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchvision import transforms

from baim.config import LearnerSpec
from baim.learners import VAELearner, noise_for, vae_loss
from baim.training import apply_strategy, batch_size, evaluate, train_epoch, vae_batch_loss

SPEC_A = LearnerSpec(widths=(4, 8), latent_dim=4, resolution=16)
SPEC_B = LearnerSpec(widths=(6,), latent_dim=3, resolution=16)
KLD_WEIGHT = 0.00025


class TwoLearners(nn.Module):
    """Stand-in for the BAIM: two learners mixed by a linear "gate" reading the flattened image."""

    def __init__(self) -> None:
        super().__init__()
        self.learners = nn.ModuleList([VAELearner(SPEC_A), VAELearner(SPEC_B)])
        self.gate = nn.Linear(3 * 16 * 16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = torch.softmax(self.gate(x.flatten(1)), dim=1)  # (B, 2)
        losses = []
        for i, learner in enumerate(self.learners):
            eps = noise_for(f"learner-{i}", 0, x.shape[0], learner.spec.latent_dim)
            out = learner(x, eps=eps)
            losses.append(vae_loss(out.recon, x, out.mu, out.logvar, KLD_WEIGHT).loss)
        return (weights.mean(0) * torch.stack(losses)).sum()


def two_learner_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    return model(batch)


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def synthetic_faces(n: int, seed: int) -> torch.Tensor:
    """16x16 "faces": a disk of one random colour on a background of another (6 numbers per image)."""
    generator = torch.Generator().manual_seed(seed)
    background = torch.rand(n, 3, 1, 1, generator=generator)
    foreground = torch.rand(n, 3, 1, 1, generator=generator)
    coords = torch.arange(16, dtype=torch.float32) - 7.5
    disk = ((coords.view(1, -1) ** 2 + coords.view(-1, 1) ** 2) <= 25.0).float()  # (16, 16), radius 5
    return background + (foreground - background) * disk


def load_real_faces(root: Path, count: int, resolution: int) -> torch.Tensor:
    """The first `count` aligned faces, centre-cropped to the face and resized: (count, 3, r, r) in [0, 1]."""
    to_tensor = transforms.Compose(
        [transforms.CenterCrop(78), transforms.Resize(resolution, antialias=True), transforms.ToTensor()]
    )
    files = sorted((root / "img_align_celeba").glob("*.jpg"))[:count]
    if len(files) < count:
        pytest.skip(f"expected {count} images under {root}, found {len(files)}")
    tensors = []
    for path in files:
        with Image.open(path) as image:
            tensors.append(to_tensor(image.convert("RGB")))
    return torch.stack(tensors)


# ---- strategies ----------------------------------------------------------------------------------------


def test_freeze_leaves_learner_weights_bit_identical_after_a_step() -> None:
    # Prepare
    torch.manual_seed(0)
    model = TwoLearners()
    x = synthetic_faces(8, seed=1)
    # A previous step left gradients on the learners: freeze must stop the optimiser from using them.
    two_learner_loss(model, x).backward()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    apply_strategy(model, "freeze", model.learners, seed=0)
    learners_before, gate_before = snapshot(model.learners), snapshot(model.gate)

    # Execute
    train_epoch(model, [x, x], optimizer, two_learner_loss)

    # Assert
    for name, value in snapshot(model.learners).items():
        assert torch.equal(value, learners_before[name]), name
    assert not torch.equal(model.gate.weight, gate_before["weight"])
    assert all(not p.requires_grad for p in model.learners.parameters())
    assert all(p.requires_grad for p in model.gate.parameters())


def test_finetune_trains_everything_from_current_weights() -> None:
    torch.manual_seed(0)
    model = TwoLearners()
    apply_strategy(model, "freeze", model.learners, seed=0)
    before = snapshot(model)

    apply_strategy(model, "finetune", model.learners, seed=0)

    assert all(p.requires_grad for p in model.parameters())
    for name, value in snapshot(model).items():
        assert torch.equal(value, before[name]), name
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    train_epoch(model, [synthetic_faces(4, seed=2)], optimizer, two_learner_loss)
    assert not torch.equal(model.learners[0].fc_mu.weight, before["learners.0.fc_mu.weight"])


def test_scratch_reinitialises_everything_deterministically() -> None:
    # Prepare: "uploaded" weights, then a copy we can compare against.
    torch.manual_seed(0)
    model = TwoLearners()
    uploaded = snapshot(model)
    apply_strategy(model, "freeze", model.learners, seed=0)

    # Execute
    apply_strategy(model, "scratch", model.learners, seed=42)
    first = snapshot(model)
    torch.manual_seed(999)  # the caller's RNG state must not matter
    apply_strategy(model, "scratch", model.learners, seed=42)
    second = snapshot(model)
    apply_strategy(model, "scratch", model.learners, seed=43)
    other_seed = snapshot(model)

    # Assert: every weight and bias differs from the upload (GroupNorm's ones/zeros reset to ones/zeros).
    for name, value in first.items():
        assert torch.equal(value, second[name]), name
        if ("weight" in name and value.dim() > 1) or name.endswith(("fc_mu.bias", "gate.bias")):
            assert not torch.equal(value, uploaded[name]), name
            assert not torch.equal(value, other_seed[name]), name
    assert all(p.requires_grad for p in model.parameters())


def test_scratch_rejects_parameters_it_cannot_reinitialise() -> None:
    model = TwoLearners()
    model.task_query = nn.Parameter(torch.zeros(4))
    with pytest.raises(ValueError, match="task_query"):
        apply_strategy(model, "scratch", model.learners, seed=0)


def test_invalid_strategy_and_foreign_modules_are_rejected() -> None:
    model = TwoLearners()
    with pytest.raises(ValueError, match="strategy: expected one of"):
        apply_strategy(model, "distill", model.learners, seed=0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="learner_modules"):
        apply_strategy(model, "freeze", [VAELearner(SPEC_B)], seed=0)


# ---- loop ----------------------------------------------------------------------------------------------


def test_batch_size_of_common_batch_shapes() -> None:
    x = torch.zeros(5, 3)
    assert batch_size(x) == 5
    assert batch_size((x, torch.zeros(5))) == 5
    assert batch_size([x]) == 5
    assert batch_size({"images": x}) == 5
    with pytest.raises(ValueError, match="batch"):
        batch_size(())


def test_evaluate_is_repeatable_and_restores_mode() -> None:
    torch.manual_seed(0)
    learner = VAELearner(SPEC_A)
    loader = DataLoader(TensorDataset(synthetic_faces(12, seed=3)), batch_size=5)
    loss_fn = vae_batch_loss(KLD_WEIGHT)
    rng_before = torch.get_rng_state()

    first = evaluate(learner, loader, loss_fn)
    second = evaluate(learner, loader, loss_fn)

    assert first == second
    assert learner.training
    assert torch.equal(torch.get_rng_state(), rng_before)


def test_evaluate_weights_uneven_batches_by_size() -> None:
    # Prepare: noise-free loss (eps = 0), so batching is the only difference.
    torch.manual_seed(0)
    learner = VAELearner(SPEC_A)
    images = synthetic_faces(12, seed=3)

    def mean_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        out = model(batch, eps=torch.zeros(batch.shape[0], SPEC_A.latent_dim))
        return vae_loss(out.recon, batch, out.mu, out.logvar, KLD_WEIGHT).loss

    # Execute: batches of 5, 5, 2 against the whole set at once.
    batched = evaluate(learner, [images[:5], images[5:10], images[10:]], mean_loss)
    whole = evaluate(learner, [images], mean_loss)

    # Assert
    assert batched == pytest.approx(whole, rel=1e-5)


def test_train_epoch_rejects_empty_loader() -> None:
    learner = VAELearner(SPEC_B)
    with pytest.raises(ValueError, match="at least one batch"):
        train_epoch(learner, [], torch.optim.SGD(learner.parameters(), lr=0.1), vae_batch_loss(KLD_WEIGHT))


def train_and_evaluate(
    train: torch.Tensor, test: torch.Tensor, spec: LearnerSpec, epochs: int, batch: int
) -> list[float]:
    """Test loss before training and after each epoch."""
    torch.manual_seed(0)
    learner = VAELearner(spec)
    loss_fn = vae_batch_loss(KLD_WEIGHT)
    train_loader = DataLoader(TensorDataset(train), batch_size=batch, shuffle=True)
    test_loader = DataLoader(TensorDataset(test), batch_size=64)
    optimizer = torch.optim.Adam(learner.parameters(), lr=0.005)  # the paper's learning rate
    test_losses = [evaluate(learner, test_loader, loss_fn)]
    for _ in range(epochs):
        train_epoch(learner, train_loader, optimizer, loss_fn)
        test_losses.append(evaluate(learner, test_loader, loss_fn))
    return test_losses


def test_short_training_lowers_test_loss_on_synthetic_images() -> None:
    images = synthetic_faces(320, seed=4)
    losses = train_and_evaluate(images[:256], images[256:], SPEC_A, epochs=6, batch=16)
    assert losses[-1] < 0.8 * losses[0], losses


def test_short_training_lowers_test_loss_on_real_faces(shared_celeba: Path) -> None:
    # Prepare: 256 training and 64 held-out real faces at 16x16.
    faces = load_real_faces(shared_celeba, count=320, resolution=16)
    spec = LearnerSpec(widths=(16, 32), latent_dim=16, resolution=16)

    # Execute
    losses = train_and_evaluate(faces[:256], faces[256:], spec, epochs=5, batch=32)

    # Assert: untrained, the sigmoid outputs sit near 0.5; a few epochs learn the face colours and layout.
    assert losses[-1] < 0.6 * losses[0], losses
    assert min(losses[1:]) < losses[0]
