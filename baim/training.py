"""Training strategies (finetune / freeze / scratch), the optimiser, and one training step / epoch.

A loss function has the signature `loss_fn(model, batch) -> scalar tensor`: it unpacks the batch, moves it
to the model's device if needed, calls the model's forward (so DDP wrappers see the call) and returns the
loss. `vae_batch_loss(kld_weight)` builds one for a lone VAELearner. Edges train with `train_epoch`; the
cloud's epochs run in `baim.loop.train_strategy`, over the same `train_steps`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from typing import Any, Literal, NamedTuple, get_args

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from baim.learners import vae_loss

logger = logging.getLogger(__name__)

Strategy = Literal["finetune", "freeze", "scratch"]
STRATEGIES: tuple[str, ...] = get_args(Strategy)

LossFn = Callable[[nn.Module, Any], torch.Tensor]
# FLOPs of the training steps: every step counted exactly (FlopCounterMode's dispatch costs ~40 ms a step on
# a CPU), or the first step of the epoch counted and scaled by the samples of the others (exact when a step's
# cost does not depend on the route), or none.
FlopCounting = Literal["every_batch", "first_batch", "none"]


def apply_strategy(
    model: nn.Module,
    strategy: Strategy,
    learner_modules: Iterable[nn.Module],
    seed: int,
    *,
    reinitialise: bool = True,
) -> None:
    """Prepare `model` in place for cloud training with one of the paper's three strategies.

    - "finetune": every parameter trainable, learners start from their current (uploaded) weights.
    - "freeze": every parameter of `learner_modules` gets requires_grad=False (and its .grad cleared, so an
      optimiser holding it skips it); everything else (gates, connections) stays trainable.
    - "scratch": same architecture, random init: every submodule of the whole model that defines
      `reset_parameters()` is re-initialised (learners, gates and connections alike), deterministically from
      `seed`, and everything is trainable. A module owning parameters directly must define
      `reset_parameters()`; otherwise ValueError names the parameters that could not be re-initialised.
      The seed drives the CPU and CUDA RNGs inside a forked RNG state, so the caller's RNG is untouched;
      the same seed on the same device kind gives the same weights.

    `seed` is ignored except by "scratch". reinitialise=False skips scratch's re-initialisation (a run
    resumed from a checkpoint, whose weights win): only requires_grad is set.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy: expected one of {list(STRATEGIES)}, received {strategy!r}")
    learner_modules = list(learner_modules)
    learner_params = {id(p) for m in learner_modules for p in m.parameters()}
    model_params = {id(p) for p in model.parameters()}
    outside = learner_params - model_params
    if outside:
        raise ValueError(
            f"learner_modules: expected modules inside the model, received {len(outside)} "
            "parameters that the model does not hold"
        )

    if strategy == "scratch" and reinitialise:
        _reinitialise(model, seed)

    for p in model.parameters():
        trainable = not (strategy == "freeze" and id(p) in learner_params)
        p.requires_grad_(trainable)
        if not trainable:
            p.grad = None
    n_frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    n_total = sum(p.numel() for p in model.parameters())
    logger.info("strategy %s: %d of %d parameters frozen", strategy, n_frozen, n_total)


def _reinitialise(model: nn.Module, seed: int) -> None:
    covered: set[int] = set()
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)  # seeds the CPU and every CUDA generator
        with torch.no_grad():
            for module in model.modules():
                reset = getattr(module, "reset_parameters", None)
                if callable(reset):
                    reset()
                    covered.update(id(p) for p in module.parameters(recurse=False))
    missed = [name for name, p in model.named_parameters() if id(p) not in covered]
    if missed:
        raise ValueError(
            f"scratch: expected every parameter to belong to a module with reset_parameters(), "
            f"received parameters without one: {missed}"
        )


def vae_batch_loss(kld_weight: float) -> LossFn:
    """loss_fn for a lone VAELearner; a batch is an image tensor or a (images, ...) tuple/list."""

    def loss_fn(model: nn.Module, batch: Any) -> torch.Tensor:
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        device = next(model.parameters()).device
        images = images.to(device)
        out = model(images)
        return vae_loss(out.recon, images, out.mu, out.logvar, kld_weight).loss

    return loss_fn


def batch_size(batch: Any) -> int:
    """Number of samples in a batch: the tensor's length, or that of a tuple/list/dict's first element."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    if isinstance(batch, (tuple, list)) and batch:
        return batch_size(batch[0])
    if isinstance(batch, dict) and batch:
        return batch_size(next(iter(batch.values())))
    raise ValueError(
        f"batch: expected a tensor or a non-empty tuple/list/dict, received {type(batch).__name__}"
    )


def make_optimizer(
    model: nn.Module, lr: float, previous: torch.optim.Optimizer | None = None
) -> torch.optim.Adam:
    """Adam over the trainable parameters; parameters that are still the same tensors keep their state
    from `previous`.

    Why: pruning restructures the model, so the optimizer must be rebuilt over the new parameter set
    without resetting the moments of what survived unchanged (learners, kept connections). Modules that
    restructuring rebuilds (the gate's projection rows, `baim.gates`) start with fresh moments.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    if previous is not None:
        for p in params:
            if p in previous.state:
                optimizer.state[p] = previous.state[p]
    return optimizer


class StepTotals(NamedTuple):
    """What a pass of training steps adds up to."""

    loss_sum: float  # sum over samples of each step's (pre-step) mean loss
    samples: int
    flops: int  # 0 with flop_counting="none"


def training_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, batch: Any, loss_fn: LossFn
) -> torch.Tensor:
    """One optimiser step on `batch`; returns the (pre-step) loss, detached. A non-finite loss raises."""
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn(model, batch)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"loss: expected a finite value, received {loss.item()} (diverged?)")
    loss.backward()
    optimizer.step()
    return loss.detach()


def train_steps(
    model: nn.Module,
    batches: Iterable[Any],
    optimizer: torch.optim.Optimizer,
    loss_fn: LossFn,
    flop_counting: FlopCounting = "none",
) -> StepTotals:
    """One optimiser step per batch, in train mode; FLOPs counted as `flop_counting` says."""
    model.train()
    loss_sum, samples, flops = 0.0, 0, 0
    per_sample_flops = 0.0
    for step, batch in enumerate(batches):
        n = batch_size(batch)
        if flop_counting == "every_batch" or (flop_counting == "first_batch" and step == 0):
            with FlopCounterMode(display=False) as counter:
                loss = training_step(model, optimizer, batch, loss_fn)
            counted = int(counter.get_total_flops())
            flops += counted
            per_sample_flops = counted / n
        else:
            loss = training_step(model, optimizer, batch, loss_fn)
            if flop_counting == "first_batch":
                flops += round(per_sample_flops * n)
        loss_sum += loss.item() * n
        samples += n
    if samples == 0:
        raise ValueError("loader: expected at least one batch, received none")
    return StepTotals(loss_sum, samples, flops)


def train_epoch(
    model: nn.Module, loader: Iterable[Any], optimizer: torch.optim.Optimizer, loss_fn: LossFn
) -> float:
    """One pass over `loader` with one optimiser step per batch; returns the sample-weighted mean loss."""
    totals = train_steps(model, loader, optimizer, loss_fn)
    return totals.loss_sum / totals.samples


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable[Any], loss_fn: LossFn, seed: int | None = 0) -> float:
    """Sample-weighted mean loss over `loader`, in eval mode, without gradients.

    VAE losses are stochastic (z is sampled); with `seed` (default 0) the RNG is seeded inside a forked RNG
    state, so the same model gives the same number every call and epochs are comparable. seed=None uses the
    caller's RNG. The model's train/eval mode is restored afterwards.
    """
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    try:
        with torch.random.fork_rng(devices=devices, enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            for batch in loader:
                n = batch_size(batch)
                total += loss_fn(model, batch).item() * n
                count += n
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("loader: expected at least one batch, received none")
    mean = total / count
    if not math.isfinite(mean):
        logger.warning("evaluation loss is not finite: %s", mean)
    return mean
