"""Data: the CelebA loader (tiny folder written here, and the shared subset), procedural faces, partitions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from orchestrator.core.errors import ScenarioError
from orchestrator.core.scenario import (
    CELEBA_ATTRIBUTES,
    DataConfig,
    Scenario,
    load_scenario,
    parse_task_expression,
)
from orchestrator.data.datasets import FaceDataset, to_square_tensor
from orchestrator.data.partitions import Partitions, make_partitions
from orchestrator.data.procedural import draw_procedural_face, procedural_attributes
from orchestrator.data.sources import DataSource, evaluate_expression, load_celeba, resolve_source

REPO_ROOT = Path(__file__).resolve().parents[2]

# The tiny CelebA-layout folder: 3 attributes, 24 images of 40x50 pixels (width x height).
TINY_ATTRIBUTES = ("Eyeglasses", "Male", "Smiling")
TINY_SIZE = (40, 50)


def tiny_attribute_rows() -> list[tuple[str, tuple[int, int, int]]]:
    rows = []
    for i in range(24):
        eyeglasses = 1 if i % 6 == 0 else -1
        male = 1 if i % 2 == 0 else -1
        smiling = 1 if i % 3 == 0 else -1
        rows.append((f"{i + 1:06d}.jpg", (eyeglasses, male, smiling)))
    return rows


def write_tiny_celeba(root: Path, *, test_images: bool = True, newline: str = "\r\n") -> Path:
    """A CelebA folder in torchvision's layout: CRLF attribute file, images of another size (40x50)."""
    (root / "img_align_celeba").mkdir(parents=True)
    rows = tiny_attribute_rows()
    lines = [str(len(rows)), " ".join(TINY_ATTRIBUTES)]
    lines += [f"{name} " + " ".join(f"{v:2d}" for v in values) for name, values in rows]
    (root / "list_attr_celeba.txt").write_bytes((newline.join(lines) + newline).encode())
    partition_lines = [f"{name} {2 if test_images and i >= 18 else 0}" for i, (name, _) in enumerate(rows)]
    (root / "list_eval_partition.txt").write_bytes((newline.join(partition_lines) + newline).encode())
    for i, (name, _) in enumerate(rows):
        # Green centre, red top and blue bottom bands of 5 rows: a centre crop to 40x40 removes both bands.
        pixels = np.zeros((TINY_SIZE[1], TINY_SIZE[0], 3), dtype=np.uint8)
        pixels[:, :, 1] = 100 + 5 * i
        pixels[:5] = (255, 0, 0)
        pixels[-5:] = (0, 0, 255)
        Image.fromarray(pixels).save(root / "img_align_celeba" / name, quality=95)
    return root


def scenario_for(root: Path | str, **changes: Any) -> Scenario:
    model = {"widths": [8], "latent_dim": 4}
    document: dict[str, Any] = {
        "seed": 5,
        "data": {
            "root": str(root),
            "resolution": 8,
            "test_per_task": 2,
            "cloud_per_task": 2,
            "holdout_per_task": 1,
        },
        "tasks": [
            {"name": "men", "expression": "Male"},
            {"name": "women", "expression": "not Male"},
        ],
        "edges": [
            {"id": "m0", "task": "men", "shard_size": 3, "model": model},
            {"id": "w0", "task": "women", "shard_size": 3, "model": model},
        ],
        "cloud": {"top_k": 1},
    }
    for key, value in changes.items():
        document[key] = value
    return Scenario.model_validate(document)


# ----- expressions over attributes


def test_evaluate_expression_on_hand_written_attributes():
    # Prepare: rows = (Male, Smiling) for four images.
    attrs = np.array([[True, True], [True, False], [False, True], [False, False]])
    names = ("Male", "Smiling")
    # Execute
    mask = evaluate_expression(
        parse_task_expression("not Male and Smiling or Male and not Smiling"), attrs, names
    )
    # Assert
    assert mask.tolist() == [False, True, True, False]


# ----- the CelebA loader on a folder written by the test


def test_loader_reads_tiny_celeba_folder_with_crlf_and_other_image_size(tmp_path: Path):
    # Prepare
    root = write_tiny_celeba(tmp_path / "celeba")
    # Execute
    source = resolve_source(DataConfig(root=str(root)))
    # Assert
    assert source.kind == "celeba"
    assert source.attr_names == TINY_ATTRIBUTES
    assert source.num_images == 24
    expected = np.array([values for _, values in tiny_attribute_rows()]) > 0
    assert np.array_equal(source.attrs, expected)
    assert source.partition.tolist() == [0] * 18 + [2] * 6
    assert source.test_split_drawn is False
    assert source.load_image(0).size == TINY_SIZE


def test_loader_accepts_lf_files_too(tmp_path: Path):
    root = write_tiny_celeba(tmp_path / "celeba", newline="\n")
    assert load_celeba(root).num_images == 24


def test_dataset_centre_crops_and_resizes_to_float_images(tmp_path: Path):
    # Prepare
    source = load_celeba(write_tiny_celeba(tmp_path / "celeba"))
    dataset = FaceDataset(source, [0, 3], resolution=8, task_id=1)
    # Execute
    image, task_id = dataset[1]
    # Assert: the red and blue bands were cropped away, only the green centre remains.
    assert len(dataset) == 2 and task_id == 1
    assert image.shape == (3, 8, 8) and image.dtype == torch.float32
    assert image.min() >= 0.0 and image.max() <= 1.0
    assert image[0].max() < 0.1 and image[2].max() < 0.1
    assert image[1].mean() == pytest.approx((100 + 5 * 3) / 255, abs=0.03)


def test_to_square_tensor_crops_the_centre_of_a_wide_image():
    pixels = np.zeros((10, 30, 3), dtype=np.uint8)
    pixels[:, 10:20] = 255  # a white centre square between black sides
    tensor = to_square_tensor(Image.fromarray(pixels), 10)
    assert tensor.shape == (3, 10, 10)
    assert torch.all(tensor == 1.0)


def test_dataset_without_task_id_returns_images_and_rejects_bad_indices(tmp_path: Path):
    source = load_celeba(write_tiny_celeba(tmp_path / "celeba"))
    assert FaceDataset(source, [2], 16)[0].shape == (3, 16, 16)
    with pytest.raises(ValueError, match="indices out of range for a data source of 24 images"):
        FaceDataset(source, [24], 16)


def test_partition_uses_the_official_test_split_when_present(tmp_path: Path):
    # Prepare
    root = write_tiny_celeba(tmp_path / "celeba")
    source = resolve_source(DataConfig(root=str(root)))
    # Execute
    partitions = make_partitions(source, scenario_for(root))
    # Assert: test images come from partition 2 (indices 18..23), everything else from the training pool.
    assert partitions.test_split_drawn is False
    assert all(i >= 18 for indices in partitions.test.values() for i in indices)
    for group in (partitions.cloud, partitions.holdout, partitions.edges):
        assert all(i < 18 for indices in group.values() for i in indices)
    partitions.check_disjoint()


def test_test_size_all_takes_every_official_test_image_of_the_task(tmp_path: Path):
    root = write_tiny_celeba(tmp_path / "celeba")
    scenario = scenario_for(root)
    scenario = scenario.model_copy(update={"data": scenario.data.model_copy(update={"test_per_task": "all"})})
    partitions = make_partitions(resolve_source(scenario.data), scenario)
    assert partitions.test == {"men": [18, 20, 22], "women": [19, 21, 23]}


def test_without_test_partition_a_seeded_test_split_is_drawn_and_recorded(tmp_path: Path):
    root = write_tiny_celeba(tmp_path / "celeba", test_images=False)
    source = resolve_source(DataConfig(root=str(root)))
    partitions = make_partitions(source, scenario_for(root))
    assert source.test_split_drawn is True and partitions.test_split_drawn is True
    assert sum(len(v) for v in partitions.test.values()) == 4
    with pytest.raises(ScenarioError, match="test size 'all' needs an official test partition"):
        scenario = scenario_for(root)
        data = scenario.data.model_copy(update={"test_per_task": "all"})
        make_partitions(source, scenario.model_copy(update={"data": data}))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda root: (root / "list_attr_celeba.txt").write_text("3\nMale\nx.jpg 1\n"), "declares 3 images"),
        (
            lambda root: (root / "list_attr_celeba.txt").write_text("1\nMale Smiling\nx.jpg 1\n"),
            r":3: expected a file",
        ),
        (
            lambda root: (root / "list_attr_celeba.txt").write_text("1\nMale\n000001.jpg 7\n"),
            "must be 1 or -1",
        ),
        (lambda root: (root / "img_align_celeba" / "000005.jpg").unlink(), "1 of 24 images .* are missing"),
        (
            lambda root: (root / "list_eval_partition.txt").write_text("000001.jpg 0\n"),
            "23 images .* no partition",
        ),
        (
            lambda root: (root / "list_eval_partition.txt").write_text("000001.jpg 9\n"),
            r":1: expected `<file> <0\|1\|2>`",
        ),
    ],
    ids=["count", "fields", "values", "missing image", "partition rows", "partition code"],
)
def test_malformed_celeba_folders_raise_clear_errors(tmp_path: Path, damage, message: str):
    root = write_tiny_celeba(tmp_path / "celeba")
    damage(root)
    with pytest.raises(ScenarioError, match=message):
        load_celeba(root)


def test_unknown_attribute_for_this_data_names_the_task(tmp_path: Path):
    root = write_tiny_celeba(tmp_path / "celeba")
    tasks = [{"name": "men", "expression": "Male"}, {"name": "women", "expression": "Young and not Male"}]
    scenario = scenario_for(root, tasks=tasks)
    with pytest.raises(ScenarioError, match=r"task 'women': attribute\(s\) Young not in the celeba data"):
        make_partitions(resolve_source(scenario.data), scenario)


# ----- the shared real subset


def test_loader_reads_the_shared_subset(shared_celeba: Path):
    source = resolve_source(DataConfig(root=str(shared_celeba)))
    assert source.kind == "celeba"
    assert source.num_images == 10_000
    assert source.attr_names == CELEBA_ATTRIBUTES
    assert source.test_split_drawn is True  # every image is in the official training partition
    assert int(source.matching("Male").sum()) == 4217
    assert int(source.matching("Eyeglasses").sum()) == 674
    image = FaceDataset(source, [0], 64)[0]
    assert image.shape == (3, 64, 64) and 0.0 <= image.min() < image.max() <= 1.0


def test_quickstart_partitions_on_the_shared_subset_follow_the_tasks(shared_celeba: Path):
    scenario = load_scenario(REPO_ROOT / "scenarios" / "quickstart.yaml")
    source = resolve_source(DataConfig(root=str(shared_celeba)))
    partitions = make_partitions(source, scenario)
    partitions.check_disjoint()
    for edge in scenario.all_edges():
        mask = source.matching(scenario.task(edge.task).expression)
        assert len(partitions.edges[edge.id]) == edge.shard_size
        assert mask[partitions.edges[edge.id]].all()


# ----- procedural faces


def test_procedural_fallback_when_no_celeba(tmp_path: Path):
    source = resolve_source(
        DataConfig(root=str(tmp_path / "absent"), procedural={"num_images": 500, "seed": 3})
    )
    assert source.kind == "procedural"
    assert source.num_images == 500 and source.attr_names == CELEBA_ATTRIBUTES
    assert source.test_split_drawn is True
    assert FaceDataset(source, [7], 32)[0].shape == (3, 32, 32)


def test_require_real_fails_without_celeba(tmp_path: Path):
    with pytest.raises(ScenarioError, match=r"data\.require_real: no CelebA found at"):
        resolve_source(DataConfig(root=str(tmp_path / "absent"), require_real=True))


def test_procedural_images_are_deterministic_per_index(tmp_path: Path):
    config = DataConfig(root=str(tmp_path / "absent"), procedural={"num_images": 50, "seed": 9})
    first, second = resolve_source(config), resolve_source(config)
    assert torch.equal(FaceDataset(first, [4], 32)[0], FaceDataset(second, [4], 32)[0])
    assert not torch.equal(FaceDataset(first, [4], 32)[0], FaceDataset(first, [5], 32)[0])
    # Attributes of an index do not depend on how many images the set has.
    assert np.array_equal(procedural_attributes(9, 50), procedural_attributes(9, 400)[:50])
    assert not np.array_equal(procedural_attributes(9, 50), procedural_attributes(10, 50))


def test_procedural_attributes_are_consistent_and_realistic():
    attrs = procedural_attributes(0, 5000)
    column = {name: attrs[:, i] for i, name in enumerate(CELEBA_ATTRIBUTES)}
    hair = np.stack([column[n] for n in ("Black_Hair", "Blond_Hair", "Brown_Hair", "Gray_Hair")])
    assert hair.sum(axis=0).max() <= 1  # at most one hair colour
    assert not (column["Bald"] & hair.any(axis=0)).any()
    for beard in ("Goatee", "Mustache", "5_o_Clock_Shadow", "Bald"):
        assert not (column[beard] & ~column["Male"]).any(), beard
    assert not (column["Goatee"] & column["No_Beard"]).any()
    assert not (column["Wearing_Lipstick"] & column["Male"]).any()
    assert 0.38 < column["Male"].mean() < 0.46
    assert 0.04 < column["Eyeglasses"].mean() < 0.09


@pytest.mark.parametrize("attribute", ["Smiling", "Eyeglasses", "Wearing_Hat", "Male", "Blond_Hair", "Young"])
def test_rendered_attributes_change_the_picture(attribute: str):
    # Prepare: one face (seed 1, index 2) drawn with and without the attribute.
    base = dict.fromkeys(CELEBA_ATTRIBUTES, False) | {"No_Beard": True, "Young": True, "Brown_Hair": True}
    with_attr = base | {attribute: True}
    without_attr = base | {attribute: False}
    if attribute == "Blond_Hair":
        with_attr["Brown_Hair"] = False
    # Execute
    on = np.asarray(draw_procedural_face(1, 2, with_attr, 64), dtype=np.int16)
    off = np.asarray(draw_procedural_face(1, 2, without_attr, 64), dtype=np.int16)
    # Assert: a visible change (well beyond the +-6 sensor noise, which is identical for the same index).
    changed = (np.abs(on - off).max(axis=2) > 30).mean()
    assert changed > 0.005, f"{attribute}: {changed:.4f} of pixels changed"


def test_eyeglasses_add_dark_frame_pixels():
    base = dict.fromkeys(CELEBA_ATTRIBUTES, False) | {"No_Beard": True, "Young": True, "Blond_Hair": True}
    dark = [
        (np.asarray(draw_procedural_face(0, 1, base | {"Eyeglasses": glasses}, 64)).max(axis=2) < 40).sum()
        for glasses in (False, True)
    ]
    assert dark[1] > dark[0] + 20


# ----- partitions


def _sizes(partitions: Partitions) -> dict[str, dict[str, int]]:
    return {group: {k: len(v) for k, v in shards.items()} for group, shards in partitions.groups().items()}


@pytest.fixture(scope="module")
def procedural_source() -> DataSource:
    return resolve_source(DataConfig(root="/nonexistent/celeba", procedural={"num_images": 10_000}))


def test_partitions_disjoint_sized_and_include_late_joiners(procedural_source: DataSource):
    # Prepare: churn declares an edge with start: false and one defined by a join event.
    scenario = load_scenario(REPO_ROOT / "scenarios" / "churn.yaml")
    # Execute
    partitions = make_partitions(procedural_source, scenario)
    # Assert
    partitions.check_disjoint()
    assert _sizes(partitions)["edges"] == {edge.id: edge.shard_size for edge in scenario.all_edges()}
    assert {"late-smile", "late-male"} <= set(partitions.edges)
    for task in scenario.tasks:
        assert len(partitions.test[task.name]) == scenario.test_size(task)
        assert len(partitions.cloud[task.name]) == scenario.cloud_size(task)
        assert len(partitions.holdout[task.name]) == scenario.holdout_size(task)
        mask = procedural_source.matching(task.expression)
        for group in (partitions.test, partitions.cloud, partitions.holdout):
            assert mask[group[task.name]].all()


def test_partitions_same_seed_identical_other_seed_different(procedural_source: DataSource):
    scenario = load_scenario(REPO_ROOT / "scenarios" / "tiny.yaml")
    first = make_partitions(procedural_source, scenario)
    again = make_partitions(procedural_source, scenario)
    other = make_partitions(procedural_source, scenario.model_copy(update={"seed": scenario.seed + 1}))
    assert first == again
    assert first.edges != other.edges and first.test != other.test
    assert _sizes(first) == _sizes(other)


def test_partitions_round_trip_through_json(procedural_source: DataSource):
    partitions = make_partitions(procedural_source, load_scenario(REPO_ROOT / "scenarios" / "tiny.yaml"))
    assert Partitions.from_json(partitions.to_json()) == partitions


def test_partitions_json_rejects_overlap_and_bad_types(procedural_source: DataSource):
    partitions = make_partitions(procedural_source, load_scenario(REPO_ROOT / "scenarios" / "tiny.yaml"))
    partitions.edges["edge-0"] = [*partitions.edges["edge-0"], partitions.test["male"][0]]
    with pytest.raises(ValueError, match="is in both test\\[male\\] and edges\\[edge-0\\]"):
        Partitions.from_json(partitions.to_json())
    with pytest.raises(ValueError, match="edges\\[x\\] must be a list of integers"):
        Partitions.from_json(partitions.to_json().replace('"edges": {', '"edges": {"x": ["1"], ', 1))


def test_impossible_sizes_name_the_edge_with_requested_and_available(procedural_source: DataSource):
    scenario = load_scenario(REPO_ROOT / "scenarios" / "tiny.yaml")
    edges = [
        edge.model_copy(update={"shard_size": 9000}) if edge.id == "edge-2" else edge
        for edge in scenario.edges
    ]
    with pytest.raises(ScenarioError, match=r"edge 'edge-2' shard .*requested 9000 images, .* has \d+ left"):
        make_partitions(procedural_source, scenario.model_copy(update={"edges": edges}))


def test_impossible_test_size_names_the_task(procedural_source: DataSource):
    scenario = load_scenario(REPO_ROOT / "scenarios" / "tiny.yaml")
    data = scenario.data.model_copy(update={"test_per_task": 9999})
    with pytest.raises(ScenarioError, match=r"task 'male' test split \(Male\): requested 9999 images"):
        make_partitions(procedural_source, scenario.model_copy(update={"data": data}))
