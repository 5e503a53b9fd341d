"""Ray Train overhead: one worker's epoch time vs a plain PyTorch loop, and 2 workers vs 1.

Same BAIM, same images (the shared CelebA subset when present, else procedural faces), same global batch
size, same optimiser; one thread per process. Epoch times are the training phase only (no evaluation), and
the first epoch is left out (it reads the images). Prints numbers; asserts nothing.

    .venv/bin/python benchmarks/bench_train.py [--images-per-task 256] [--epochs 4]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import ray
import torch
from torch.utils.data import DataLoader

from baim.config import LearnerSpec
from baim.learners import VAELearner
from baim.model import BAIM
from orchestrator.cloud.data import CachedFaces
from orchestrator.cloud.ray_train import TrainRoundConfig, run_training_round
from orchestrator.core.artifacts import pack_module
from orchestrator.core.registry import Registry
from orchestrator.core.scenario import DataConfig
from orchestrator.data.sources import resolve_source

TASKS = {"male": "Male", "female": "not Male"}


def build_baim(resolution: int) -> BAIM:
    torch.manual_seed(0)
    specs = [(16, 32), (8, 16, 32), (16, 32), (12, 24)]
    learners = [
        (f"e{i}", list(TASKS)[i % 2], VAELearner(LearnerSpec(widths=w, latent_dim=16, resolution=resolution)))
        for i, w in enumerate(specs)
    ]
    return BAIM.from_learners(list(TASKS), learners, top_k=1, connection_height=1)


def plain_epoch_seconds(cfg: TrainRoundConfig, baim: BAIM, epochs: int) -> list[float]:
    """The loop a PyTorch user would write: DataLoader(shuffle), Adam, forward/backward/step."""
    source = resolve_source(cfg.data)
    dataset = CachedFaces(source, cfg.cloud_indices, list(baim.config.tasks), cfg.data.resolution)
    loader = DataLoader(
        dataset, batch_size=cfg.batch_size, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    optimizer = torch.optim.Adam([p for p in baim.parameters() if p.requires_grad], lr=cfg.lr)
    baim.train()
    seconds = []
    for _ in range(epochs):
        started = time.perf_counter()
        for images, task_ids in loader:
            out = baim(images, task_ids)
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            optimizer.step()
        seconds.append(time.perf_counter() - started)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images-per-task", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    work = Path(tempfile.mkdtemp(prefix="bench_train_"))
    data = DataConfig(resolution=args.resolution)
    source = resolve_source(data)
    cloud = {
        task: np.flatnonzero(source.matching(expr))[: args.images_per_task].tolist()
        for task, expr in TASKS.items()
    }
    baim = build_baim(args.resolution)
    registry = Registry(str(work / "registry"))
    registry.put("baim", "v000001", pack_module(baim, baim.spec()))
    cfg = TrainRoundConfig(
        round_id=1,
        registry_uri=registry.uri,
        baim_version="v000001",
        strategy="finetune",
        epochs=args.epochs,
        lr=0.005,
        batch_size=args.batch_size,
        kld_weight=baim.config.kld_weight,
        prune_interval=args.epochs,
        prune_ratio=0.0,
        seed=0,
        data=data.model_copy(update={"root": str(data.resolved_root())}),
        cloud_indices=cloud,
        test_indices={task: [] for task in TASKS},
    )
    print(f"data: {source.kind}, {sum(map(len, cloud.values()))} images at {args.resolution}px, "
          f"batch {args.batch_size}, {args.epochs} epochs (first left out)")  # fmt: skip

    # The plain loop runs before and after the Ray runs; min over epochs is the least disturbed by other load
    # on a shared machine (the medians are printed too).
    load_before = os.getloadavg()[0]
    plain = plain_epoch_seconds(cfg, build_baim(args.resolution), args.epochs)[1:]
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    try:
        runs = {}
        for workers in (1, 2):
            run_cfg = cfg.model_copy(update={"round_id": workers})
            runs[workers] = run_training_round(
                run_cfg, num_workers=workers, cpus_per_worker=1.0, max_failures=0
            )
    finally:
        ray.shutdown()
    plain += plain_epoch_seconds(cfg, build_baim(args.resolution), args.epochs)[1:]
    one = [e.train_seconds for e in runs[1].epochs][1:]
    two = [e.train_seconds for e in runs[2].epochs][1:]
    print(f"load average: {load_before:.1f} before, {os.getloadavg()[0]:.1f} after (2 cores)")
    print("s/epoch              :     min  median")
    for name, seconds in (
        ("plain PyTorch loop", plain),
        ("Ray Train, 1 worker", one),
        ("Ray Train, 2 workers", two),
    ):
        print(f"{name:21s}: {min(seconds):7.3f} {statistics.median(seconds):7.3f}")
    print(
        f"1 worker / plain     : {min(one) / min(plain):.3f} (min), "
        f"{statistics.median(one) / statistics.median(plain):.3f} (median)  goal <= 1.10"
    )
    print(
        f"2 workers / 1 worker : {min(two) / min(one):.3f} (min), "
        f"{statistics.median(two) / statistics.median(one):.3f} (median)"
    )
    print(f"fit() wall seconds   : 1 worker {runs[1].wall_seconds:.1f}, 2 workers {runs[2].wall_seconds:.1f}")
    print(
        f"cloud FLOPs / epoch  : {runs[1].epochs[-1].flops:.3e} (1 worker), "
        f"{runs[2].epochs[-1].flops:.3e} (2 workers)"
    )


if __name__ == "__main__":
    main()
