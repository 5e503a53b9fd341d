"""report.md and report.html of a comparison: every plot and grid written, inlined, and named in the page."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import torch

from orchestrator.core.comparison import Comparison
from orchestrator.data.datasets import FaceDataset
from orchestrator.data.partitions import make_partitions
from orchestrator.data.sources import resolve_source
from orchestrator.evaluation.compare import CachedImages, write_grid
from orchestrator.report.comparison import PLOT_NAMES, write_comparison_report
from tests.support.comparisons import hand_made_comparison
from tests.support.scenarios import tiny_scenario


def test_report_writes_every_plot_and_inlines_every_image(tmp_path: Path) -> None:
    # Prepare: comparison.json on disk and one method's sample grid
    comparison = hand_made_comparison()
    write_grid(tmp_path / "samples" / "fedavg.png", [torch.rand(4, 3, 8, 8), torch.rand(4, 3, 8, 8)])
    comparison.methods[0].samples = "samples/fedavg.png"
    (tmp_path / "comparison.json").write_text(comparison.model_dump_json())

    # Execute: from the file, as `baim compare` leaves it
    markdown_path, html_path = write_comparison_report(tmp_path)

    # Assert
    assert Comparison.model_validate_json((tmp_path / "comparison.json").read_text()) == comparison
    page = html_path.read_text()
    inlined = [
        base64.b64decode(src.split(",", 1)[1]) for src in re.findall(r'src="(data:image/png[^"]+)"', page)
    ]
    assert 'src="plots/' not in page and 'src="samples/' not in page  # one file: nothing linked
    for name in PLOT_NAMES:
        assert (tmp_path / "plots" / f"{name}.png").read_bytes() in inlined, name
    assert (tmp_path / "samples" / "fedavg.png").read_bytes() in inlined
    markdown = markdown_path.read_text()
    for name in PLOT_NAMES:
        assert f"plots/{name}.png" in markdown
    assert "Time to quality (headline)" in markdown and "privacy-violating" in markdown
    assert "75.0x fewer bytes per edge" in markdown  # the goal line, from the hand-made curves
    assert "not on this log axis" in markdown.lower()  # the edge alone sends 0 bytes


def test_cached_images_are_the_face_datasets_tensors(tmp_path: Path) -> None:
    scenario = tiny_scenario(tmp_path)
    source = resolve_source(scenario.data)
    faces = FaceDataset(source, make_partitions(source, scenario).cloud["male"][:5], scenario.data.resolution)
    cached = CachedImages(faces)
    for index in range(len(faces)):
        assert torch.equal(cached[index], faces[index])  # type: ignore[arg-type]
        assert torch.equal(cached[index], faces[index])  # type: ignore[arg-type]  (from the cache)
