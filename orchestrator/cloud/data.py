"""The cloud's training and test images: every task's indices as one dataset, each image decoded once."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from orchestrator.data.datasets import FaceDataset
from orchestrator.data.sources import DataSource


class CachedFaces(Dataset):
    """(image, task_id) items over several tasks' indices; each image is read once, then kept as uint8.

    The uint8 pixels are what `FaceDataset` decodes before dividing by 255, so returning cached / 255 gives
    the same float tensor bit for bit.
    """

    def __init__(self, source: DataSource, indices: dict[str, list[int]], tasks: list[str], resolution: int):
        self.faces = {
            task: FaceDataset(source, indices[task], resolution) for task in tasks if indices.get(task)
        }
        self.items = [
            (task, tasks.index(task), i) for task in self.faces for i in range(len(self.faces[task]))
        ]
        self._cache: dict[tuple[str, int], torch.Tensor] = {}

    def positions(self) -> dict[str, list[int]]:
        """The dataset positions of each task's items, in order."""
        found: dict[str, list[int]] = {task: [] for task in self.faces}
        for position, (task, _, _) in enumerate(self.items):
            found[task].append(position)
        return found

    def __len__(self) -> int:
        return len(self.items)

    def preload(self) -> None:
        """Decode every image now (e.g. as part of a round's start-up rather than its first epoch)."""
        for task, _, i in self.items:
            self.image(task, i)

    def image(self, task: str, i: int) -> torch.Tensor:
        key = (task, i)
        cached = self._cache.get(key)
        if cached is None:
            pixels = self.faces[task][i]
            assert isinstance(pixels, torch.Tensor)
            cached = (pixels * 255.0).round().to(torch.uint8)
            self._cache[key] = cached
        return cached.float().div_(255.0)

    def __getitem__(self, item: int) -> tuple[torch.Tensor, int]:
        task, task_id, i = self.items[item]
        return self.image(task, i), task_id
