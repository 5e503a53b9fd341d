"""`FaceDataset`: a list of image indices as float images (3, H, W) in [0, 1], read lazily."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from orchestrator.data.sources import DataSource

if TYPE_CHECKING:
    pass

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------------
# Dataset


def to_square_tensor(image: Image.Image, resolution: int) -> torch.Tensor:
    """Centre-crop to a square, resize (antialiased) to resolution x resolution; float (3, H, W) in [0, 1]."""
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    square = image.crop((left, top, left + side, top + side))
    if side != resolution:
        # PIL's bicubic filter widens its support when downscaling, which is what antialiasing means here.
        square = square.resize((resolution, resolution), Image.Resampling.BICUBIC)
    array = np.asarray(square.convert("RGB"), dtype=np.uint8)  # (H, W, 3)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)


class FaceDataset(Dataset):
    """Images of `source` at `indices`, as float (3, resolution, resolution) in [0, 1].

    Items are read when asked for (one file open per item, no cache), so the process that iterates the
    dataset is the only one that touches the files. With `task_id`, items are `(image, task_id)`.
    """

    def __init__(self, source: DataSource, indices: list[int], resolution: int, task_id: int | None = None):
        if resolution < 1:
            raise ValueError(f"resolution must be >= 1, received {resolution}")
        bad = [i for i in indices if not 0 <= i < source.num_images]
        if bad:
            raise ValueError(
                f"indices out of range for a data source of {source.num_images} images, e.g. {bad[:3]}"
            )
        self.source = source
        self.indices = list(indices)
        self.resolution = resolution
        self.task_id = task_id

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: int) -> torch.Tensor | tuple[torch.Tensor, int]:
        image = to_square_tensor(self.source.load_image(self.indices[item]), self.resolution)
        if self.task_id is None:
            return image
        return image, self.task_id
