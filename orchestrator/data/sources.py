"""Which images a run uses: CelebA in torchvision's layout, or the procedural face set (`resolve_source`)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
from PIL import Image

from orchestrator.core.errors import ScenarioError
from orchestrator.core.scenario import (
    CELEBA_ATTRIBUTES,
    DATA_ROOT_ENV,
    And,
    Attr,
    Not,
    Or,
    TaskExpr,
    parse_task_expression,
)
from orchestrator.data.procedural import draw_procedural_face, procedural_attributes

if TYPE_CHECKING:
    from orchestrator.core.scenario import DataConfig

logger = logging.getLogger(__name__)

IMAGE_DIR = "img_align_celeba"
ATTR_FILE = "list_attr_celeba.txt"
PARTITION_FILE = "list_eval_partition.txt"
PARTITION_CODES = {"train": 0, "valid": 1, "test": 2}


# --------------------------------------------------------------------------------------------------------
# Task expressions over an attribute matrix


def evaluate_expression(expression: TaskExpr, attrs: np.ndarray, attr_names: tuple[str, ...]) -> np.ndarray:
    """Boolean mask (num_images,) of the rows of `attrs` (num_images, num_attributes) that match."""
    if isinstance(expression, Attr):
        return attrs[:, attr_names.index(expression.name)]
    if isinstance(expression, Not):
        return ~evaluate_expression(expression.operand, attrs, attr_names)
    left = evaluate_expression(expression.left, attrs, attr_names)
    right = evaluate_expression(expression.right, attrs, attr_names)
    if isinstance(expression, And):
        return left & right
    assert isinstance(expression, Or)
    return left | right


# --------------------------------------------------------------------------------------------------------
# The data source


@dataclass(frozen=True, eq=False)
class DataSource:
    """Which images a run uses. Small enough to ship to every actor (no pixels inside).

    kind: "celeba" (files under `root`) or "procedural" (drawn on demand; `root` is where CelebA was looked
    for). attrs: (num_images, num_attributes) bool. partition: (num_images,) int8, 0 train / 1 valid / 2 test.
    test_split_drawn: the partition file offered no test images, so the test split is drawn (seeded) from the
    training pool.
    """

    kind: Literal["celeba", "procedural"]
    root: Path
    attr_names: tuple[str, ...]
    attrs: np.ndarray
    partition: np.ndarray
    test_split_drawn: bool
    filenames: tuple[str, ...] = ()
    procedural_seed: int = 0
    procedural_size: int = 128

    @property
    def num_images(self) -> int:
        return int(self.attrs.shape[0])

    def matching(self, expression: str) -> np.ndarray:
        """Boolean mask of the images matching a task expression; ValueError lists the valid names."""
        return evaluate_expression(
            parse_task_expression(expression, self.attr_names), self.attrs, self.attr_names
        )

    def load_image(self, index: int) -> Image.Image:
        """The image at `index` as RGB, at its stored size."""
        if not 0 <= index < self.num_images:
            raise IndexError(
                f"image index {index} out of range: the data source has {self.num_images} images"
            )
        if self.kind == "procedural":
            return draw_procedural_face(
                self.procedural_seed, index, self.attr_row(index), self.procedural_size
            )
        path = self.root / IMAGE_DIR / self.filenames[index]
        try:
            with Image.open(path) as image:
                return image.convert("RGB")
        except OSError as exc:
            raise OSError(f"cannot read image {path}: {exc}") from exc

    def attr_row(self, index: int) -> dict[str, bool]:
        return {name: bool(value) for name, value in zip(self.attr_names, self.attrs[index], strict=True)}

    def describe(self) -> dict[str, object]:
        """JSON-able summary for logs and reports."""
        return {
            "kind": self.kind,
            "root": str(self.root),
            "num_images": self.num_images,
            "test_split_drawn": self.test_split_drawn,
            "partition_counts": {
                name: int((self.partition == code).sum()) for name, code in PARTITION_CODES.items()
            },
        }


def celeba_present(root: Path) -> bool:
    """A folder holds CelebA in torchvision's layout when it has the attribute file and the image folder."""
    return (root / ATTR_FILE).is_file() and (root / IMAGE_DIR).is_dir()


def _read_lines(path: Path) -> list[str]:
    # splitlines handles LF and CRLF alike; blank trailing lines are dropped.
    return [line for line in path.read_bytes().decode("utf-8").splitlines() if line.strip()]


def read_celeba_attributes(path: Path) -> tuple[tuple[str, ...], list[str], np.ndarray]:
    """Parse list_attr_celeba.txt: a count line, a line of attribute names, then `file v1 .. vA` rows (±1)."""
    lines = _read_lines(path)
    if len(lines) < 2:
        raise ScenarioError(
            f"{path}: expected a count line and a line of attribute names, found {len(lines)} lines"
        )
    try:
        declared_count = int(lines[0].split()[0])
    except (ValueError, IndexError):
        raise ScenarioError(f"{path}:1: expected the image count, received {lines[0][:60]!r}") from None
    names = tuple(lines[1].split())
    rows = lines[2:]
    if declared_count != len(rows):
        raise ScenarioError(
            f"{path}: the first line declares {declared_count} images, the file has {len(rows)} rows"
        )
    filenames = []
    values = np.empty((len(rows), len(names)), dtype=np.int8)
    for row_number, line in enumerate(rows):
        parts = line.split()
        if len(parts) != len(names) + 1:
            raise ScenarioError(
                f"{path}:{row_number + 3}: expected a file name and {len(names)} values, "
                f"received {len(parts)} fields"
            )
        filenames.append(parts[0])
        try:
            values[row_number] = [int(v) for v in parts[1:]]
        except ValueError:
            raise ScenarioError(f"{path}:{row_number + 3}: attribute values must be 1 or -1") from None
    if not np.isin(values, (-1, 1)).all():
        raise ScenarioError(f"{path}: attribute values must be 1 or -1")
    if len(set(filenames)) != len(filenames):
        raise ScenarioError(f"{path}: a file name appears on more than one row")
    return names, filenames, values > 0


def read_celeba_partition(path: Path, filenames: list[str]) -> np.ndarray:
    """Parse list_eval_partition.txt (`file p`, p = 0 train / 1 valid / 2 test) into an array aligned with
    `filenames`. A missing file makes every image a training image."""
    if not path.is_file():
        logger.warning("%s not found: every image counts as training data", path)
        return np.zeros(len(filenames), dtype=np.int8)
    by_name: dict[str, int] = {}
    for line_number, line in enumerate(_read_lines(path), start=1):
        parts = line.split()
        if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
            raise ScenarioError(f"{path}:{line_number}: expected `<file> <0|1|2>`, received {line[:60]!r}")
        by_name[parts[0]] = int(parts[1])
    missing = [name for name in filenames if name not in by_name]
    if missing:
        raise ScenarioError(
            f"{path}: {len(missing)} images of {ATTR_FILE} have no partition, e.g. {', '.join(missing[:3])}"
        )
    return np.array([by_name[name] for name in filenames], dtype=np.int8)


def load_celeba(root: Path) -> DataSource:
    """Read CelebA's annotation files under `root` and check that every listed image exists."""
    attr_names, filenames, attrs = read_celeba_attributes(root / ATTR_FILE)
    present = set(os.listdir(root / IMAGE_DIR))
    missing = [name for name in filenames if name not in present]
    if missing:
        raise ScenarioError(
            f"{root / IMAGE_DIR}: {len(missing)} of {len(filenames)} images listed in {ATTR_FILE} are "
            "missing, "
            f"e.g. {', '.join(missing[:3])}"
        )
    partition = read_celeba_partition(root / PARTITION_FILE, filenames)
    return DataSource(
        kind="celeba",
        root=root,
        attr_names=attr_names,
        attrs=attrs,
        partition=partition,
        test_split_drawn=not bool((partition == PARTITION_CODES["test"]).any()),
        filenames=tuple(filenames),
    )


def resolve_source(data_cfg: DataConfig) -> DataSource:
    """CelebA when the configured root holds it, else the procedural face set (unless `require_real`)."""
    root = data_cfg.resolved_root()
    if celeba_present(root):
        source = load_celeba(root)
        logger.info(
            "data: CelebA at %s (%d images, %s)",
            root,
            source.num_images,
            "test split drawn from the training pool"
            if source.test_split_drawn
            else "official test partition",
        )
        return source
    if data_cfg.require_real:
        raise ScenarioError(
            f"data.require_real: no CelebA found at {root} (expected {IMAGE_DIR}/ and {ATTR_FILE}); "
            f"point data.root (or ${DATA_ROOT_ENV} when data.root is unset) at a CelebA copy in "
            "torchvision's layout"
        )
    procedural = data_cfg.procedural
    logger.warning(
        "data: no CelebA at %s; using %d procedural faces (seed %d)",
        root,
        procedural.num_images,
        procedural.seed,
    )
    return DataSource(
        kind="procedural",
        root=root,
        attr_names=CELEBA_ATTRIBUTES,
        attrs=procedural_attributes(procedural.seed, procedural.num_images),
        partition=np.zeros(procedural.num_images, dtype=np.int8),
        test_split_drawn=True,
        procedural_seed=procedural.seed,
        procedural_size=procedural.native_size,
    )
