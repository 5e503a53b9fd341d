"""FID/KID of generation: the legacy blend against the "sample" mixture, on quickstart.

quickstart (`scenarios/quickstart.yaml`, the shared CelebA subset): the edges are trained once; from the same
fused start the cloud trains the BAIM for the scenario's epochs and pruning schedule with each mixture
(`BAIMConfig.mixture`): "blend" (the loss of the gate-weighted average image; generation averages the
selected learners' images, each decoded from its own latent) and "sample" (the expected loss over the
evaluated learners, max(K, 2) in training; generation draws one learner from the gate weights and decodes its
own latent). Both at the scenario's K = 1 and at K = 2. At K = 1 the two generate the same way (one learner
is selected); what differs is training (the blend's gate gets no gradient). At K = 2 each trained BAIM is
also sampled the other way, which separates the sampling method from the training objective.

Per task: FID and KID (orchestrator.evaluation.quality: pytorch-fid's Inception pool3, offline), `--samples`
generated images (seed 0) against the first `--samples` real test images, the real-vs-real floor (the next
`--samples` test images against the first), the test loss (eval mode) and how often the gate picks each
learner in generation (sample: the share of samples it is drawn for; blend: its mean weight). The test loss is
given both ways for every model: the loss of the gate-weighted mean image (what blend trains) and the
expected loss over the mixture (what sample trains); at K = 1 they are equal. Asserts nothing.

Run: nice -n 10 .venv/bin/python benchmarks/bench_sampling.py [--samples 100]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import inprocess_baim as inprocess

from baim.gates import GATE_NOISE_KEY, pick_members, pick_uniforms
from baim.learners import noise_for
from baim.model import BAIM
from orchestrator.evaluation.quality import (
    InceptionExtractor,
    extract_features,
    frechet_distance_from_features,
    kid,
)

GENERATION_SEED = 0


def usage(baim: BAIM, task: str, n: int) -> dict[str, float]:
    """Fraction of generated samples (seed GENERATION_SEED) whose image each squad member contributes to."""
    gate = baim.gate.squad_gate(task)
    code = noise_for(GATE_NOISE_KEY, GENERATION_SEED, n, baim.config.gate_code_dim)
    weights, selected = gate(code)
    members = baim.config.squad(task).members
    if baim.config.mixture == "sample":
        picked = pick_members(weights, selected, pick_uniforms(code))
        return {m: float((picked == i).float().mean()) for i, m in enumerate(members)}
    return {m: float(weights[:, i].mean()) for i, m in enumerate(members)}


def quality(
    generated: torch.Tensor, real_features: np.ndarray, extractor: InceptionExtractor
) -> tuple[float, float]:
    features = extract_features(generated, extractor)
    return frechet_distance_from_features(features, real_features), kid(features, real_features)[0]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples", type=int, default=100, help="generated and real images per task")
    parser.add_argument("--epochs", type=int, default=None, help="cloud epochs (default: the scenario's)")
    args = parser.parse_args()
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    scenario = inprocess.quickstart()
    epochs = scenario.cloud.epochs if args.epochs is None else args.epochs
    started = time.perf_counter()
    data: inprocess.ScenarioData = inprocess.load_data(scenario)
    learners = inprocess.train_edges(data)
    print(f"data: {data.source_kind}; edges trained in {time.perf_counter() - started:.0f}s", flush=True)
    extractor = InceptionExtractor()
    n = args.samples
    real = {t: extract_features(data.test[t][:n], extractor) for t in data.tasks}
    for task in data.tasks:
        floor = extract_features(data.test[task][n : 2 * n], extractor)
        fid, kid_mean = frechet_distance_from_features(floor, real[task]), kid(floor, real[task])[0]
        print(f"floor {task}: real vs real ({len(floor)} vs {n}) FID {fid:.1f}, KID {kid_mean:.4f}")

    print(f"\n{extractor.name}, {n} generated vs {n} real test images per task, {epochs} cloud epochs")
    print(
        "| K | trained with | sampled with | task | FID | KID | test loss: mean image / expected | "
        "generation usage |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for top_k in (scenario.cloud.top_k, 2):
        for trained_with in ("blend", "sample"):
            baim = inprocess.fuse(data, learners, mixture=trained_with, top_k=top_k)
            inprocess.train_cloud(baim, data, inprocess.schedule_of(scenario), epochs)
            baim.eval()
            losses = {}
            for mixture in ("blend", "sample"):  # the loss of the mean image; the expected loss
                baim.config = baim.config.with_changes(mixture=mixture)
                losses[mixture] = {t: inprocess.test_loss(baim, data, t) for t in data.tasks}
            sampled = [trained_with] if top_k == 1 else ["blend", "sample"]
            for sampled_with in sampled:
                baim.config = baim.config.with_changes(mixture=sampled_with)
                for task in data.tasks:
                    fid, kid_mean = quality(
                        baim.generate(task, n, seed=GENERATION_SEED), real[task], extractor
                    )
                    shares = ", ".join(f"{m} {v:.2f}" for m, v in usage(baim, task, n).items())
                    print(
                        f"| {top_k} | {trained_with} | {sampled_with} | {task} | {fid:.1f} | "
                        f"{kid_mean:.4f} | {losses['blend'][task]:.5f} / {losses['sample'][task]:.5f} | "
                        f"{shares} |",
                        flush=True,
                    )
    print(f"total {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
