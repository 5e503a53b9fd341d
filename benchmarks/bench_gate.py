"""Which gate objective learns to route at K = 1: four candidates on a squad of two specialised learners.

Data: two image modes (16x16, light top half or light bottom half, plus pixel noise); learner a is fitted to
the top mode, b to the bottom one (40 Adam steps each), so routing sample x to its mode's learner is what a
gate should learn. Then gate and learners train together for `--steps` Adam steps (lr 0.01) on mixed
batches with one of four objectives, all at K = 1 at inference:

- blend: the renormalised top-1 weight (always 1.0) times the top-1 image; the legacy BAIM objective.
- switch: the top-1 image scaled by its un-renormalised softmax probability p (Switch Transformer), plus
  Switch's load-balancing loss (0.01 N sum_i f_i P_i). Inference outputs p times the image, as trained.
- noisy top-1 + load balancing (Shazeer et al. 2017): trainable noise on the logits, the renormalised top-1
  weight, plus their importance and load losses (weight 0.01 each).
- sample: the expected loss over the top max(K, 2) = 2 learners, sum_n w_n L_n (the BAIM's "sample"
  mixture); inference runs the top-1 learner alone.

Printed, per objective, mean and min over `--seeds` seeds: the LSGate's gradient norm from the
reconstruction term alone at the start, the routing accuracy after training (the gate's top-1 choice vs the
mode, 512 held-out images; chance is 0.5) and the held-out MSE of what inference outputs.

Then what the "sample" mixture costs: FLOPs (baim.costs, forward + backward) of one training step per image
of quickstart's fused BAIM (its edges' architectures, random weights, every candidate connection, K = 1,
batch 64 of random images), blend vs sample, and of one inference forward. Asserts nothing.

Run: .venv/bin/python benchmarks/bench_gate.py [--steps 40] [--seeds 5]
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from baim.config import LearnerSpec
from baim.costs import count_flops, forward_backward_flops
from baim.learners import VAELearner, noise_for
from baim.model import BAIM
from orchestrator.core.scenario import load_scenario

RESOLUTION = 16
KLD_WEIGHT = 0.00025
BALANCE_WEIGHT = 0.01


def light_half(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (n, 3, 16, 16), mode (n,)): mode 0 has a light top half, mode 1 a light bottom half."""
    generator = torch.Generator().manual_seed(seed)
    mode = torch.randint(0, 2, (n,), generator=generator)
    rows = torch.arange(RESOLUTION).view(1, 1, RESOLUTION, 1)
    light_top = (rows < RESOLUTION // 2).float()
    light = torch.where(mode.view(n, 1, 1, 1) == 0, light_top, 1 - light_top)
    image = 0.15 + 0.7 * light + 0.1 * torch.randn(n, 3, RESOLUTION, RESOLUTION, generator=generator)
    return image.clamp(0.0, 1.0), mode


def specialist(mode: int, seed: int) -> VAELearner:
    torch.manual_seed(seed)
    learner = VAELearner(LearnerSpec((4,), 2, RESOLUTION))
    optimizer = torch.optim.Adam(learner.parameters(), lr=0.02)
    for step in range(40):
        images, modes = light_half(64, 1000 * seed + step)
        optimizer.zero_grad()
        learner.loss(images[modes == mode], KLD_WEIGHT).loss.backward()
        optimizer.step()
    return learner


class Squad(nn.Module):
    """A fused one-squad BAIM without connections, and the per-learner pieces the objectives combine."""

    def __init__(self, seed: int, mixture: str) -> None:
        super().__init__()
        learners = [("a", "t", specialist(0, seed)), ("b", "t", specialist(1, seed + 1))]
        torch.manual_seed(seed)
        self.baim = BAIM.from_learners(["t"], learners, top_k=1, connections=(), seed=seed, mixture=mixture)
        self.noise = nn.Linear(self.baim.config.gate_code_dim, 2)  # Shazeer's W_noise (zero init)
        nn.init.zeros_(self.noise.weight)
        nn.init.zeros_(self.noise.bias)

    def pieces(self, x: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """(gate code, logits (B, 2), per-learner (recon, kld) losses as [(B, 2) mse, (B, 2) kld])."""
        assert self.baim.gate.encoder is not None
        code = self.baim.gate.encoder(
            x, noise_for("@gate", seed, len(x), self.baim.config.gate_code_dim)
        ).code
        logits = self.baim.gate.squad_gate("t").logits(code)
        recons, mses, klds = [], [], []
        for name in ("a", "b"):
            learner = self.baim.learner(name)
            out = learner(x, noise_for(name, seed, len(x), learner.spec.latent_dim))
            recons.append(out.recon)
            mses.append(((out.recon - x) ** 2).flatten(start_dim=1).mean(dim=1))
            klds.append(-0.5 * torch.sum(1 + out.logvar - out.mu**2 - out.logvar.exp(), dim=1))
        return code, logits, [torch.stack(recons, 1), torch.stack(mses, 1), torch.stack(klds, 1)]


Objective = Callable[[Squad, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]  # (loss, recon loss)


def blend_or_sample(squad: Squad, x: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    out = squad.baim(x, 0, seed=seed)
    return out.loss, out.recon_loss


def switch(squad: Squad, x: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    _, logits, (recons, _, klds) = squad.pieces(x, seed)
    probs = F.softmax(logits, dim=1)
    top = logits.argmax(dim=1, keepdim=True)
    p = probs.gather(1, top).view(-1, 1, 1, 1)
    recon_loss = F.mse_loss(p * recons[torch.arange(len(x)), top[:, 0]], x)
    fraction = F.one_hot(top[:, 0], 2).float().mean(dim=0)
    balance = BALANCE_WEIGHT * 2 * (fraction * probs.mean(dim=0)).sum()
    return recon_loss + KLD_WEIGHT * klds.gather(1, top).mean() + balance, recon_loss


def noisy_top1(squad: Squad, x: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    code, logits, (recons, _, klds) = squad.pieces(x, seed)
    noise_std = F.softplus(squad.noise(code)) + 1e-2
    noisy = logits + torch.randn_like(logits) * noise_std
    top = noisy.argmax(dim=1)
    gates = F.one_hot(top, 2).float()  # softmax over the top-1 logit: exactly 1.0
    recon_loss = F.mse_loss(recons[torch.arange(len(x)), top], x)
    importance = gates.sum(dim=0)
    # P(logit_i stays in the top 1 under fresh noise), Shazeer's smooth load estimator, for two members
    other = noisy.flip(dims=[1])
    load = torch.distributions.Normal(0.0, 1.0).cdf((logits - other) / noise_std).sum(dim=0)

    def cv_squared(values: torch.Tensor) -> torch.Tensor:
        return values.var() / (values.mean() ** 2 + 1e-10)

    balance = BALANCE_WEIGHT * (cv_squared(importance) + cv_squared(load))
    return recon_loss + KLD_WEIGHT * klds.gather(1, top.view(-1, 1)).mean() + balance, recon_loss


@torch.no_grad()
def evaluate(squad: Squad, name: str) -> tuple[float, float]:
    """(routing accuracy of the clean top-1 choice, MSE of the inference output) on held-out images."""
    x, modes = light_half(512, 7)
    _, logits, (recons, _, _) = squad.pieces(x, seed=3)
    top = logits.argmax(dim=1)
    output = recons[torch.arange(len(x)), top]
    if name == "switch":
        output = F.softmax(logits, dim=1).gather(1, top.view(-1, 1)).view(-1, 1, 1, 1) * output
    return float((top == modes).float().mean()), float(F.mse_loss(output, x))


def run(name: str, objective: Objective, mixture: str, seed: int, steps: int) -> tuple[float, float, float]:
    squad = Squad(seed, mixture)
    x, _ = light_half(32, 50 + seed)
    objective(squad, x, 0)[1].backward()
    lsgate = squad.baim.gate.squad_gate("t").proj.weight
    gradient = float(lsgate.grad.norm()) if lsgate.grad is not None else 0.0
    squad.zero_grad(set_to_none=True)
    optimizer = torch.optim.Adam(squad.parameters(), lr=0.01)
    squad.train()
    for step in range(steps):
        x, _ = light_half(32, 10_000 * seed + step)
        optimizer.zero_grad()
        objective(squad, x, step)[0].backward()
        optimizer.step()
    squad.eval()
    accuracy, mse = evaluate(squad, name)
    return gradient, accuracy, mse


def quickstart_flops() -> None:
    scenario = load_scenario("scenarios/quickstart.yaml")
    resolution, batch = scenario.data.resolution, 64
    torch.manual_seed(0)
    learners = [
        (e.id, e.task, VAELearner(LearnerSpec(tuple(e.model.widths), e.model.latent_dim, resolution)))
        for e in scenario.all_edges()
    ]
    x = torch.rand(batch, 3, resolution, resolution, generator=torch.Generator().manual_seed(1))
    task_ids = torch.arange(batch) % len(scenario.tasks)
    print(f"\nquickstart's fused BAIM, K = {scenario.cloud.top_k}, GFLOP per image (batch {batch})")
    print("| mixture | training step (forward + backward) | inference forward |")
    print("|---|---|---|")
    for mixture in ("blend", "sample"):
        baim = BAIM.from_learners(
            scenario.task_names(),
            learners,
            top_k=scenario.cloud.top_k,
            connection_height=scenario.cloud.connection_height,
            seed=scenario.seed,
            mixture=mixture,
        )
        flops = forward_backward_flops(baim.train(), (x, task_ids), lambda m, b: m(b[0], b[1], seed=0).loss)
        baim.eval()
        with torch.no_grad():
            inference = count_flops(baim, x, task_ids, seed=0)
        print(f"| {mixture} | {flops.total / batch / 1e9:.4f} | {inference / batch / 1e9:.4f} |")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    objectives: list[tuple[str, Objective, str]] = [
        ("blend", blend_or_sample, "blend"),
        ("switch", switch, "blend"),
        ("noisy top-1 + load balancing", noisy_top1, "blend"),
        ("sample", blend_or_sample, "sample"),
    ]
    print(f"K = 1, two specialised learners, {args.steps} steps, seeds 0..{args.seeds - 1} (mean / min)")
    print("| objective | LSGate grad norm from recon loss at start | routing accuracy | inference MSE |")
    print("|---|---|---|---|")
    for name, objective, mixture in objectives:
        results = [run(name, objective, mixture, seed, args.steps) for seed in range(args.seeds)]
        gradient, accuracy, mse = (list(column) for column in zip(*results, strict=True))
        print(
            f"| {name} | {statistics.mean(gradient):.2e} | {statistics.mean(accuracy):.3f} / "
            f"{min(accuracy):.3f} | {statistics.mean(mse):.5f} |",
            flush=True,
        )
    quickstart_flops()


if __name__ == "__main__":
    main()
