"""Images for a scenario: CelebA in torchvision's layout, or a procedural face set, and their partitions.

`resolve_source(data_cfg)` finds the data (and says which it used), `make_partitions(source, scenario)`
splits image indices into disjoint, seeded test / cloud / holdout / edge shards, and `FaceDataset` turns a
list of indices into float images (3, H, W) in [0, 1], opening each file only when an item is read (so an
edge actor loads only its own shard, in its own process).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter
from torch.utils.data import Dataset

from orchestrator.errors import ScenarioError
from orchestrator.scenario import (
    CELEBA_ATTRIBUTES,
    DATA_ROOT_ENV,
    And,
    Attr,
    Not,
    Or,
    TaskExpr,
    expression_attributes,
    parse_task_expression,
)

if TYPE_CHECKING:
    from orchestrator.scenario import DataConfig, Scenario

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


# --------------------------------------------------------------------------------------------------------
# Procedural faces: attribute-labelled, deterministic per (seed, index), drawn in memory on demand.

# Attributes the drawing shows; the other CelebA names are drawn at CelebA's frequencies but not rendered.
RENDERED_ATTRIBUTES = (
    "Male", "Smiling", "Mouth_Slightly_Open", "Eyeglasses", "Wearing_Hat", "Black_Hair", "Blond_Hair",
    "Brown_Hair", "Gray_Hair", "Bald", "Bangs", "Young", "Pale_Skin", "Wearing_Lipstick", "Heavy_Makeup",
    "No_Beard", "Mustache", "Goatee", "5_o_Clock_Shadow", "Wearing_Earrings", "Wearing_Necktie",
    "Wearing_Necklace", "Rosy_Cheeks", "Narrow_Eyes", "Big_Nose", "Chubby", "Blurry", "Bushy_Eyebrows",
    "Arched_Eyebrows", "Bags_Under_Eyes",
)  # fmt: skip

# Frequencies in the shared 10,000-image CelebA subset, so procedural tasks have realistic sizes.
_FREQUENCY = dict(zip(CELEBA_ATTRIBUTES, (
    0.110, 0.266, 0.511, 0.206, 0.025, 0.148, 0.239, 0.240, 0.243, 0.145, 0.051, 0.203, 0.145, 0.059, 0.047,
    0.067, 0.064, 0.044, 0.382, 0.452, 0.422, 0.481, 0.037, 0.117, 0.834, 0.279, 0.044, 0.271, 0.077, 0.062,
    0.058, 0.482, 0.212, 0.318, 0.190, 0.048, 0.466, 0.123, 0.074, 0.777,
), strict=True))  # fmt: skip


def procedural_attributes(seed: int, num_images: int) -> np.ndarray:
    """(num_images, 40) bool attributes, a pure function of (seed, index) per row, with CelebA's frequencies
    and the obvious dependencies (one hair colour, beards and baldness on men, make-up mostly on women)."""
    rng = np.random.default_rng(seed)
    # One draw of 41 uniforms per row, row-major: row i does not depend on num_images.
    draws = rng.random((num_images, len(CELEBA_ATTRIBUTES) + 1))
    column = {name: i for i, name in enumerate(CELEBA_ATTRIBUTES)}
    attrs = draws[:, : len(CELEBA_ATTRIBUTES)] < np.array([_FREQUENCY[n] for n in CELEBA_ATTRIBUTES])

    def set_attr(name: str, values: np.ndarray) -> None:
        attrs[:, column[name]] = values

    def u(name: str) -> np.ndarray:
        return draws[:, column[name]]

    male = attrs[:, column["Male"]]
    young = attrs[:, column["Young"]]
    # Beards and baldness only on men (conditional frequencies = overall / P(male)).
    for name in ("Goatee", "Mustache", "5_o_Clock_Shadow", "Sideburns", "Bald"):
        set_attr(name, male & (u(name) < min(1.0, _FREQUENCY[name] / _FREQUENCY["Male"])))
    set_attr(
        "No_Beard",
        ~(attrs[:, column["Goatee"]] | attrs[:, column["Mustache"]] | (male & (u("No_Beard") < 0.2))),
    )
    for name in ("Wearing_Lipstick", "Heavy_Makeup", "Wearing_Earrings", "Wearing_Necklace"):
        set_attr(name, ~male & (u(name) < min(1.0, _FREQUENCY[name] / (1 - _FREQUENCY["Male"]))))
    set_attr(
        "Wearing_Necktie", male & (u("Wearing_Necktie") < _FREQUENCY["Wearing_Necktie"] / _FREQUENCY["Male"])
    )
    # Exactly one hair colour (or none of the four) from the extra uniform; grey mostly when not young.
    hair = draws[:, -1]
    bald = attrs[:, column["Bald"]]
    set_attr("Black_Hair", ~bald & (hair < 0.243))
    set_attr("Blond_Hair", ~bald & (hair >= 0.243) & (hair < 0.388))
    set_attr("Brown_Hair", ~bald & (hair >= 0.388) & (hair < 0.591))
    set_attr("Gray_Hair", ~bald & (hair >= 0.591) & (hair < 0.641) & ~young)
    return attrs


def _shade(colour: tuple[int, int, int], factor: float) -> tuple[int, int, int]:
    return (
        min(255, int(colour[0] * factor)),
        min(255, int(colour[1] * factor)),
        min(255, int(colour[2] * factor)),
    )


def draw_procedural_face(seed: int, index: int, attrs: dict[str, bool], size: int = 128) -> Image.Image:
    """A face-like RGB image showing the rendered attributes; geometry and colours vary with (seed, index)."""
    rng = np.random.default_rng([seed, index])
    S = size
    line = max(1, S // 48)

    def px(x: float) -> int:  # a fraction of the image side, in pixels
        return round(x * S)

    def box(x0: float, y0: float, x1: float, y1: float) -> tuple[int, int, int, int]:
        return (px(x0), px(y0), px(x1), px(y1))

    def colour(low: int, high: int) -> tuple[int, int, int]:
        r, g, b = rng.integers(low, high, size=3)
        return (int(r), int(g), int(b))

    image = Image.new("RGB", (S, S), colour(70, 210))
    draw = ImageDraw.Draw(image)
    male, young = attrs["Male"], attrs["Young"]

    cx = 0.5 + rng.uniform(-0.04, 0.04)
    cy = 0.50 + rng.uniform(-0.03, 0.03)
    fw = rng.uniform(0.34, 0.39) * (1.15 if attrs["Chubby"] else 1.0) * (1.06 if male else 1.0)  # face width
    fh = rng.uniform(0.46, 0.51)  # face height
    top, bottom, left, right = cy - fh / 2, cy + fh / 2, cx - fw / 2, cx + fw / 2

    skin_tones = [(255, 219, 172), (241, 194, 167), (224, 172, 105), (198, 134, 66), (141, 85, 36)]
    skin = (250, 228, 215) if attrs["Pale_Skin"] else skin_tones[int(rng.integers(0, len(skin_tones)))]
    skin = _shade(skin, rng.uniform(0.95, 1.05))
    if attrs["Black_Hair"]:
        hair = (25, 20, 20)
    elif attrs["Blond_Hair"]:
        hair = (230, 195, 110)
    elif attrs["Brown_Hair"]:
        hair = (115, 70, 40)
    elif attrs["Gray_Hair"]:
        hair = (175, 175, 175)
    else:
        hair = (150, 65, 30)  # auburn: none of the four named colours
    hair = _shade(hair, rng.uniform(0.9, 1.1))
    has_hair = not attrs["Bald"]

    # Shoulders, neck and what is worn there.
    draw.ellipse(box(cx - 0.40, 0.86, cx + 0.40, 1.35), fill=colour(20, 235))
    draw.rectangle(box(cx - fw * 0.2, bottom - 0.05, cx + fw * 0.2, 0.92), fill=_shade(skin, 0.92))
    if attrs["Wearing_Necktie"]:
        draw.polygon(
            [(px(cx), px(0.90)), (px(cx - 0.03), px(1.0)), (px(cx + 0.03), px(1.0))], fill=colour(90, 200)
        )
    if attrs["Wearing_Necklace"]:
        draw.arc(
            box(cx - fw * 0.25, 0.80, cx + fw * 0.25, 0.93), 20, 160, fill=(230, 200, 60), width=line * 2
        )

    # Hair behind the head: long for women, a short cap for men.
    if has_hair:
        if male:
            draw.ellipse(box(left - 0.02, top - 0.05, right + 0.02, cy + 0.02), fill=hair)
        else:
            draw.ellipse(box(left - 0.07, top - 0.06, right + 0.07, bottom + 0.02), fill=hair)
            draw.rectangle(box(left - 0.07, cy, right + 0.07, min(1.0, bottom + 0.14)), fill=hair)

    # Ears, face, earrings.
    for side in (-1, 1):
        ear_x = cx + side * fw / 2
        draw.ellipse(box(ear_x - 0.03, cy - 0.05, ear_x + 0.03, cy + 0.05), fill=_shade(skin, 0.95))
        if attrs["Wearing_Earrings"]:
            draw.ellipse(box(ear_x - 0.012, cy + 0.05, ear_x + 0.012, cy + 0.075), fill=(235, 205, 60))
    draw.ellipse(box(left, top, right, bottom), fill=skin)

    # Hair over the forehead; bangs come lower.
    if has_hair:
        hairline = top + fh * (0.30 if attrs["Bangs"] else 0.16)
        draw.chord(box(left, top - 0.01, right, 2 * hairline - top), 180, 360, fill=hair)

    # Beard, stubble, goatee, moustache (drawn under the mouth).
    mouth_y = cy + fh * 0.27
    beard = _shade(hair if has_hair else (60, 45, 35), 0.8)
    if male and not attrs["No_Beard"]:
        draw.chord(box(left, cy - fh * 0.05, right, bottom), 10, 170, fill=beard)
    if attrs["5_o_Clock_Shadow"]:
        for _ in range(S // 2):
            x, y = (
                rng.uniform(left + fw * 0.15, right - fw * 0.15),
                rng.uniform(mouth_y - 0.02, bottom - 0.02),
            )
            draw.point((px(x), px(y)), fill=_shade(skin, 0.6))
    if attrs["Goatee"]:
        draw.ellipse(box(cx - fw * 0.12, mouth_y + 0.03, cx + fw * 0.12, bottom + 0.005), fill=beard)

    # Eyes, make-up, eyebrows, glasses.
    eye_y = cy - fh * 0.06
    eye_dx, eye_w = fw * 0.22, fw * 0.12
    eye_h = eye_w * (0.35 if attrs["Narrow_Eyes"] else 0.6)
    iris = colour(20, 120)
    for side in (-1, 1):
        ex = cx + side * eye_dx
        if attrs["Heavy_Makeup"]:
            draw.ellipse(
                box(ex - eye_w * 1.2, eye_y - eye_h * 2.2, ex + eye_w * 1.2, eye_y), fill=(120, 70, 130)
            )
        draw.ellipse(box(ex - eye_w, eye_y - eye_h, ex + eye_w, eye_y + eye_h), fill=(245, 245, 245))
        draw.ellipse(
            box(ex - eye_h * 0.9, eye_y - eye_h * 0.9, ex + eye_h * 0.9, eye_y + eye_h * 0.9), fill=iris
        )
        if attrs["Bags_Under_Eyes"] or not young:
            draw.arc(
                box(ex - eye_w, eye_y, ex + eye_w, eye_y + eye_h * 3),
                20,
                160,
                fill=_shade(skin, 0.7),
                width=line,
            )
        brow_width = line * (3 if attrs["Bushy_Eyebrows"] else 2)
        brow_y = eye_y - eye_h - fh * 0.07
        brow_colour = _shade(hair if has_hair else (70, 50, 40), 0.7)
        if attrs["Arched_Eyebrows"]:
            draw.arc(
                box(ex - eye_w * 1.2, brow_y, ex + eye_w * 1.2, brow_y + fh * 0.1),
                200,
                340,
                fill=brow_colour,
                width=brow_width,
            )
        else:
            draw.line(
                (px(ex - eye_w * 1.2), px(brow_y + 0.02), px(ex + eye_w * 1.2), px(brow_y + 0.02)),
                fill=brow_colour,
                width=brow_width,
            )
        if attrs["Eyeglasses"]:
            frame = box(ex - eye_w * 1.5, eye_y - eye_w * 1.1, ex + eye_w * 1.5, eye_y + eye_w * 1.1)
            draw.rectangle(frame, outline=(15, 15, 15), width=line * 2)
            draw.line(
                (px(ex + side * eye_w * 1.5), px(eye_y), px(cx + side * fw / 2), px(eye_y - 0.01)),
                fill=(15, 15, 15),
                width=line,
            )
    if attrs["Eyeglasses"]:
        draw.line(
            (px(cx - eye_dx + eye_w * 1.5), px(eye_y), px(cx + eye_dx - eye_w * 1.5), px(eye_y)),
            fill=(15, 15, 15),
            width=line * 2,
        )

    # Wrinkles when not young; rosy cheeks.
    if not young:
        for k in range(3):
            y = top + fh * (0.22 + 0.04 * k)
            draw.line(
                (px(cx - fw * 0.2), px(y), px(cx + fw * 0.2), px(y)), fill=_shade(skin, 0.8), width=line
            )
    if attrs["Rosy_Cheeks"]:
        for side in (-1, 1):
            x = cx + side * fw * 0.27
            draw.ellipse(box(x - 0.03, cy + 0.03, x + 0.03, cy + 0.08), fill=(235, 120, 130))

    # Nose.
    nose = fw * (0.09 if attrs["Big_Nose"] else 0.05)
    nose_bottom = cy + fh * 0.13
    draw.line(
        (px(cx), px(eye_y + 0.01), px(cx - nose * 0.5), px(nose_bottom)), fill=_shade(skin, 0.75), width=line
    )
    draw.line(
        (px(cx - nose), px(nose_bottom), px(cx + nose), px(nose_bottom)), fill=_shade(skin, 0.75), width=line
    )

    # Mouth: the curve smiles when Smiling, opens when Mouth_Slightly_Open; lipstick colours it.
    lips = (200, 30, 60) if attrs["Wearing_Lipstick"] else _shade(skin, 0.65)
    mouth_w = fw * 0.22
    if attrs["Mustache"]:
        draw.rectangle(box(cx - mouth_w, mouth_y - 0.04, cx + mouth_w, mouth_y - 0.015), fill=beard)
    if attrs["Mouth_Slightly_Open"]:
        draw.ellipse(
            box(cx - mouth_w * 0.6, mouth_y - 0.01, cx + mouth_w * 0.6, mouth_y + 0.035), fill=(70, 20, 25)
        )
    if attrs["Smiling"]:
        draw.arc(
            box(cx - mouth_w, mouth_y - 0.05, cx + mouth_w, mouth_y + 0.04),
            15,
            165,
            fill=lips,
            width=line * 2,
        )
    else:
        draw.arc(
            box(cx - mouth_w, mouth_y, cx + mouth_w, mouth_y + 0.06), 200, 340, fill=lips, width=line * 2
        )

    # Hat: a crown over the top of the head and a brim.
    if attrs["Wearing_Hat"]:
        hat = colour(20, 230)
        draw.rectangle(box(left + 0.02, top - 0.12, right - 0.02, top + fh * 0.12), fill=hat)
        draw.ellipse(box(left - 0.08, top + fh * 0.08, right + 0.08, top + fh * 0.2), fill=_shade(hat, 0.8))

    if attrs["Blurry"]:
        image = image.filter(ImageFilter.GaussianBlur(radius=S / 50))
    # A little sensor noise so no two faces with equal attributes are flat copies.
    pixels = np.asarray(image, dtype=np.int16) + rng.integers(-6, 7, size=(S, S, 3), dtype=np.int16)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), mode="RGB")


# --------------------------------------------------------------------------------------------------------
# Partitions


@dataclass
class Partitions:
    """Disjoint index lists into a DataSource. Every list is sorted; no index appears twice anywhere."""

    seed: int
    data_kind: str
    num_images: int
    test_split_drawn: bool
    test: dict[str, list[int]] = field(default_factory=dict)
    cloud: dict[str, list[int]] = field(default_factory=dict)
    holdout: dict[str, list[int]] = field(default_factory=dict)
    edges: dict[str, list[int]] = field(default_factory=dict)

    def groups(self) -> dict[str, dict[str, list[int]]]:
        return {"test": self.test, "cloud": self.cloud, "holdout": self.holdout, "edges": self.edges}

    def check_disjoint(self) -> None:
        """Raise ValueError naming the first index used by two shards."""
        owner: dict[int, str] = {}
        for group, shards in self.groups().items():
            for key, indices in shards.items():
                for index in indices:
                    if index in owner:
                        raise ValueError(f"index {index} is in both {owner[index]} and {group}[{key}]")
                    if not 0 <= index < self.num_images:
                        raise ValueError(f"{group}[{key}]: index {index} outside 0..{self.num_images - 1}")
                    owner[index] = f"{group}[{key}]"

    def to_json(self) -> str:
        document = {
            "seed": self.seed,
            "data_kind": self.data_kind,
            "num_images": self.num_images,
            "test_split_drawn": self.test_split_drawn,
            **self.groups(),
        }
        return json.dumps(document, indent=1)

    @classmethod
    def from_json(cls, text: str) -> Partitions:
        """Rebuild from `to_json` output; ValueError names the first malformed entry."""
        document = json.loads(text)
        if not isinstance(document, dict):
            raise ValueError(f"partitions JSON must be an object, received {type(document).__name__}")
        for key, kind in (("seed", int), ("data_kind", str), ("num_images", int), ("test_split_drawn", bool)):
            if not isinstance(document.get(key), kind):
                raise ValueError(
                    f"partitions JSON: {key!r} must be {kind.__name__}, received {document.get(key)!r}"
                )
        groups: dict[str, dict[str, list[int]]] = {}
        for group in ("test", "cloud", "holdout", "edges"):
            shards = document.get(group)
            if not isinstance(shards, dict):
                raise ValueError(f"partitions JSON: {group!r} must be an object of index lists")
            for key, indices in shards.items():
                if not isinstance(indices, list) or not all(
                    isinstance(i, int) and not isinstance(i, bool) for i in indices
                ):
                    raise ValueError(f"partitions JSON: {group}[{key}] must be a list of integers")
            groups[group] = shards
        partitions = cls(
            seed=document["seed"],
            data_kind=document["data_kind"],
            num_images=document["num_images"],
            test_split_drawn=document["test_split_drawn"],
            **groups,
        )
        partitions.check_disjoint()
        return partitions


def make_partitions(source: DataSource, scenario: Scenario) -> Partitions:
    """Seeded, disjoint shards: per task test, holdout and cloud images, then one non-IID shard per edge
    (every edge of the run, including those that join later) drawn from the images of the edge's task.

    Draw order is fixed (test for each task, then holdout, then cloud, then edges in declaration order),
    so the same seed and data give the same partitions. Raises ScenarioError naming the task or edge when
    the data cannot supply a requested size.
    """
    masks: dict[str, np.ndarray] = {}
    for task in scenario.tasks:
        missing = sorted(expression_attributes(task.parsed()) - set(source.attr_names))
        if missing:
            raise ScenarioError(
                f"task {task.name!r}: attribute(s) {', '.join(missing)} not in the {source.kind} data at "
                f"{source.root}; valid names: {', '.join(source.attr_names)}"
            )
        masks[task.name] = source.matching(task.expression)

    training_codes = [PARTITION_CODES[name] for name in scenario.data.training_partitions]
    training_pool = np.isin(source.partition, training_codes)
    test_pool = training_pool if source.test_split_drawn else source.partition == PARTITION_CODES["test"]
    used = np.zeros(source.num_images, dtype=bool)
    rng = np.random.default_rng(scenario.seed)
    partitions = Partitions(
        seed=scenario.seed,
        data_kind=source.kind,
        num_images=source.num_images,
        test_split_drawn=source.test_split_drawn,
    )

    def draw(what: str, pool: np.ndarray, size: int | Literal["all"]) -> list[int]:
        candidates = np.flatnonzero(pool & ~used)
        if size == "all":
            chosen = candidates
        else:
            if size > len(candidates):
                raise ScenarioError(
                    f"{what}: requested {size} images, the {source.kind} data has {len(candidates)} left "
                    f"({source.num_images} images in all)"
                )
            chosen = rng.permutation(candidates)[:size]
        used[chosen] = True
        return sorted(int(i) for i in chosen)

    for task in scenario.tasks:
        test_size = scenario.test_size(task)
        if test_size == "all" and source.test_split_drawn:
            raise ScenarioError(
                f"task {task.name!r}: test size 'all' needs an official test partition, and the partition "
                f"file at {source.root} has no test images; give a number instead"
            )
        partitions.test[task.name] = draw(
            f"task {task.name!r} test split ({task.expression})", masks[task.name] & test_pool, test_size
        )
    for task in scenario.tasks:
        partitions.holdout[task.name] = draw(
            f"task {task.name!r} holdout ({task.expression})",
            masks[task.name] & training_pool,
            scenario.holdout_size(task),
        )
    for task in scenario.tasks:
        partitions.cloud[task.name] = draw(
            f"task {task.name!r} cloud shard ({task.expression})",
            masks[task.name] & training_pool,
            scenario.cloud_size(task),
        )
    for edge in scenario.all_edges():
        task = scenario.task(edge.task)
        partitions.edges[edge.id] = draw(
            f"edge {edge.id!r} shard (task {task.name!r}: {task.expression})",
            masks[task.name] & training_pool,
            edge.shard_size,
        )
    logger.info(
        "partitions: %d test, %d holdout, %d cloud, %d edge images (seed %d)",
        *(sum(len(v) for v in shards.values()) for shards in partitions.groups().values()),
        scenario.seed,
    )
    return partitions


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
