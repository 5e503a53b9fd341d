"""`baim compare` end to end on the tiny scenario: every method, comparison.json, report.md, report.html."""

from __future__ import annotations

import base64
import itertools
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from baim.learners import VAELearner
from orchestrator.baselines.fedavg import global_spec, homogeneous_spec
from orchestrator.core.artifacts import pack_state
from orchestrator.core.comparison import Comparison
from orchestrator.core.registry import Registry
from orchestrator.core.reports import RunReport
from orchestrator.core.scenario import CompareConfig, EarlyStoppingConfig, Scenario
from orchestrator.evaluation.compare import CompareOptions, run_compare
from orchestrator.evaluation.quality import PixelGradientExtractor
from orchestrator.report.comparison import PLOT_NAMES, write_comparison_report
from tests.support.scenarios import tiny_scenario

FEDAVG_ROUNDS = 3


def compare_scenario(tmp_path: Path) -> Scenario:
    """tiny with edges that stop early, and the smallest budgets that still make every curve."""
    scenario = tiny_scenario(tmp_path)
    stopping = EarlyStoppingConfig(patience=1, validation_fraction=0.25)
    edges = [
        edge.model_copy(update={"local_epochs": 3, "early_stopping": stopping}) for edge in scenario.edges
    ]
    compare = CompareConfig(
        baim_epochs=[1, 2],
        fedavg_rounds=FEDAVG_ROUNDS,
        fedavg_plateau_patience=None,  # exactly the cap: the expected bytes below count every round
        finetune_epochs=1,
        centralised_epochs=1,
        fid_samples=8,
        grid_samples=4,
    )
    return scenario.model_copy(update={"edges": edges, "compare": compare, "time_scale": 0.0})


@pytest.fixture(scope="module")
def compared(
    tmp_path_factory: pytest.TempPathFactory, ray_session: None
) -> tuple[Scenario, Path, Comparison]:
    tmp_path = tmp_path_factory.mktemp("compare")
    scenario = compare_scenario(tmp_path)
    out = tmp_path / "out"
    options = CompareOptions(cloud_trainer="local", extractor=PixelGradientExtractor(4), kid_subsets=5)
    comparison = run_compare(scenario, out, options)
    write_comparison_report(out, comparison)
    return scenario, out, comparison


def test_comparison_json_validates_and_holds_every_method(
    compared: tuple[Scenario, Path, Comparison],
) -> None:
    scenario, out, comparison = compared
    again = Comparison.model_validate_json((out / "comparison.json").read_text())
    assert again == comparison
    names = {curve.name for curve in comparison.methods}
    edges = {f"edge:{edge.id}" for edge in scenario.edges}
    assert (
        names
        == {"baim:finetune", "baim:freeze", "cloud_only", "fedavg", "fedavg_finetune", "centralised"} | edges
    )
    for name in ("baim:finetune", "baim:freeze", "cloud_only"):
        assert [p.step for p in comparison.method(name).points] == [1, 2]
        cloud = [p.cloud_flops for p in comparison.method(name).points]
        assert 0 < cloud[0] < cloud[1]  # cloud FLOPs grow along the sweep ...
    sweep = comparison.method("baim:finetune").points
    assert sweep[0].per_edge == sweep[1].per_edge  # ... edge costs stay constant
    fedavg = comparison.method("fedavg")
    assert [p.step for p in fedavg.points] == list(range(FEDAVG_ROUNDS + 1))
    assert fedavg.stop_reason == "round_cap"
    assert comparison.method("centralised").privacy_violating
    assert comparison.time_to_quality is not None
    assert {row.method for row in comparison.time_to_quality.rows} == names
    best_baim = min(
        p.test_loss for c in comparison.methods if c.family == "baim" for p in c.points if p.test_loss
    )
    assert comparison.time_to_quality.target_loss == pytest.approx(best_baim)
    assert comparison.goal is not None
    assert comparison.image_quality.enabled and comparison.image_quality.extractor == "pixel-gradient-4x4"
    assert comparison.method("fedavg").points[-1].quality  # FID of the final models


def test_bytes_per_edge_are_the_serialized_sizes_that_crossed(
    compared: tuple[Scenario, Path, Comparison],
) -> None:
    scenario, out, comparison = compared
    report = RunReport.model_validate_json((out / comparison.baim_run / "report.json").read_text())
    registry = Registry(report.registry)

    # BAIM: the upload each edge sent, the task model it downloads
    for name in ("baim:finetune", "baim:freeze"):
        for point in comparison.method(name).points:
            for edge_id, cost in point.per_edge.items():
                edge = scenario.edge(edge_id)
                assert cost.bytes_sent == registry.get(f"edge/{edge_id}", "v000001").nbytes
                owner, _, version = report.tasks[edge.task].artifact.rpartition("@")
                assert cost.bytes_received == registry.ref(owner, version).nbytes
            assert point.bytes_sent_per_edge == pytest.approx(
                sum(c.bytes_sent for c in point.per_edge.values()) / len(point.per_edge)
            )
    cloud_only = comparison.method("cloud_only").points[-1]
    assert all(cost.bytes_sent == 0 and cost.flops == 0 for cost in cloud_only.per_edge.values())

    # FedAvg: the global model every round down, the client's update up (the same packing as the run's)
    spec = homogeneous_spec(scenario)
    state = VAELearner(spec).state_dict()
    for point in comparison.method("fedavg").points:
        rounds = range(1, point.step + 1)
        for edge_id, cost in point.per_edge.items():
            down = sum(pack_state(state, global_spec(spec, r)).nbytes for r in rounds)
            up = sum(pack_state(state, {**global_spec(spec, r), "edge_id": edge_id}).nbytes for r in rounds)
            assert (cost.bytes_received, cost.bytes_sent) == (down, up), (edge_id, point.step)

    # The centralised reference: each edge's raw shard, uint8 pixels
    resolution = scenario.data.resolution
    for edge_id, cost in comparison.method("centralised").points[-1].per_edge.items():
        assert cost.bytes_sent == scenario.edge(edge_id).shard_size * 3 * resolution * resolution


def test_edges_stop_on_their_validation_loss_and_report_their_own_test_loss(
    compared: tuple[Scenario, Path, Comparison],
) -> None:
    scenario, out, comparison = compared
    report = RunReport.model_validate_json((out / comparison.baim_run / "report.json").read_text())
    for edge in scenario.edges:
        row = report.edges[edge.id]
        assert len(row.validation_loss) == row.epochs_done <= 3
        assert row.best_epoch is not None and row.validation_loss[row.best_epoch - 1] == min(
            row.validation_loss
        )
        alone = comparison.method(f"edge:{edge.id}")
        assert alone.tasks == [edge.task] and set(alone.points[0].test_loss_per_task) == {edge.task}
        assert alone.points[0].edge_flops_per_edge == row.flops


def test_report_html_inlines_every_plot_and_grid(compared: tuple[Scenario, Path, Comparison]) -> None:
    _, out, comparison = compared
    page = (out / "report.html").read_text()
    sources = re.findall(r'<img alt="[^"]*" src="([^"]+)"', page)
    assert sources and all(src.startswith("data:image/png;base64,") for src in sources)
    inlined = {base64.b64decode(src.split(",", 1)[1]) for src in sources}
    for name in PLOT_NAMES:
        assert (out / "plots" / f"{name}.png").read_bytes() in inlined, name
    # Every method has a grid but the BAIM strategies after the first: the in-process runner keeps only the
    # first strategy's trained BAIM (Ray Train rounds keep each strategy's checkpoint).
    without = {c.name for c in comparison.methods if c.samples is None}
    assert without == {"baim:freeze", "cloud_only"}
    grids = [c.samples for c in comparison.methods if c.samples]
    for grid in grids:
        assert (out / grid).read_bytes() in inlined, grid
    markdown = (out / "report.md").read_text()
    assert "Time to quality" in markdown and "plots/loss_vs_bytes.png" in markdown


def test_report_html_renders_in_headless_chromium_with_every_image_loaded(
    compared: tuple[Scenario, Path, Comparison], tmp_path: Path
) -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("Chromium is not installed (Debian package `chromium`): the page was not rendered")
    _, out, _ = compared
    # The page's own script cannot run (no JavaScript in it); --dump-dom after load serialises the DOM, and
    # an <img> that failed to decode has naturalWidth 0, which a script tag added here records.
    probe = tmp_path / "probe.html"
    checker = (
        "<script>window.addEventListener('load',()=>{const bad=[...document.images]"
        ".filter(i=>!i.complete||i.naturalWidth===0).length;document.body.setAttribute('data-images',"
        "document.images.length);document.body.setAttribute('data-broken',bad);});</script>"
    )
    probe.write_text((out / "report.html").read_text().replace("</body>", checker + "</body>"))
    result = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000", "--dump-dom",
         probe.as_uri()],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    images = re.search(r'data-images="(\d+)"', result.stdout)
    broken = re.search(r'data-broken="(\d+)"', result.stdout)
    assert images and broken, result.stdout[-2000:]
    assert int(images.group(1)) >= len(PLOT_NAMES) and int(broken.group(1)) == 0


def test_the_bytes_per_edge_are_not_a_function_of_the_loss(
    compared: tuple[Scenario, Path, Comparison],
) -> None:
    # A guard against a curve whose costs were filled from the wrong source: FedAvg's bytes grow by the
    # same amount each round, whatever the loss did.
    _, _, comparison = compared
    points = comparison.method("fedavg").points
    steps = [b.bytes_per_edge - a.bytes_per_edge for a, b in itertools.pairwise(points)]
    assert len({round(s) for s in steps}) <= 2 and all(s > 0 for s in steps)  # round digits in the spec
    assert torch.isfinite(torch.tensor([p.test_loss for p in points])).all()
