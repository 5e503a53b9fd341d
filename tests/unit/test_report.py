"""report.md and plots from a small hand-written report.json; headline ratios by hand; missing sections."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from orchestrator.cli.main import main
from orchestrator.core.metrics import Ledger
from orchestrator.data.partitions import make_partitions
from orchestrator.data.sources import resolve_source
from orchestrator.evaluation.evaluate import save_samples
from orchestrator.report.build import build_report, summary_table
from orchestrator.report.markdown import NOT_MEASURED, headline, write_report_markdown
from tests.unit.test_coordinator import tiny_scenario


def full_report() -> dict[str, Any]:
    """Two edges of one task; numbers chosen so that every ratio is easy to compute by hand."""
    edge = {"task": "smile", "status": "accepted", "bytes_received": 0, "upload": {"outcome": "accepted"}}
    return {
        "scenario": {"name": "hand", "tasks": [{"name": "smile"}]},
        "seed": 3,
        "data": {"kind": "celeba", "root": "/data", "resolution": 8, "shards": {"test": {"smile": 10}}},
        "totals": {"wall_seconds": 12.0},
        "edges": {
            "e0": {**edge, "bytes_sent": 1_000, "flops": 100},
            "e1": {**edge, "bytes_sent": 3_000, "flops": 300},
        },
        "tasks": {
            "smile": {
                "params": 50,
                "baim_params": 90,
                "test_loss": 0.5,
                "test_images": 10,
                "decomposition_max_abs_diff": 0.0,
                "learners": ["e0", "e1"],
                "artifact": "task/smile@v1",
            }
        },
        "cloud": {
            "flops": {"finetune": 7_000, "scratch": 5_000},
            "seconds": {"finetune": 1.0, "scratch": 2.0},
            "rounds": [
                {
                    "round": 1,
                    "baim_version": "v1",
                    "strategies": {
                        "finetune": {"initial_test_loss": 0.9, "test_loss": [0.7, 0.5]},
                        "scratch": {"test_loss": [1.2, 0.8]},
                    },
                }
            ],
        },
        "downloads": {
            "task_models": {"smile": {"artifact": "task/smile@v1", "nbytes": 2_000}},
            "baim": {"artifact": "baim@v1", "nbytes": 6_000},
        },
        "baselines": {
            "fedavg": {
                "enabled": True,
                "model": {"kind": "learner", "widths": [4], "latent_dim": 2, "resolution": 8},
                "params": 40,
                "rounds_planned": 2,
                "local_epochs": 1,
                "client_fraction": 1.0,
                "weighting": "shard size",
                "initial_test_loss": 1.0,
                "final_test_loss": 0.6,
                "cloud_flops": 0,
                "rounds": [
                    {
                        "round": 1,
                        "selected": ["e0", "e1"],
                        "aggregated": ["e0", "e1"],
                        "failures": [],
                        "test_loss": 0.8,
                        "global_model_bytes": 10_000,
                        "seconds": 1.0,
                    },
                    {
                        "round": 2,
                        "selected": ["e0", "e1"],
                        "aggregated": ["e0"],
                        "failures": [{"edge": "e1", "reason": "crashed", "detail": ""}],
                        "test_loss": 0.6,
                        "global_model_bytes": 10_000,
                        "seconds": 1.0,
                    },
                ],
                "edges": {
                    "e0": {"bytes_sent": 20_000, "bytes_received": 20_000, "flops": 1_000},
                    "e1": {"bytes_sent": 10_000, "bytes_received": 30_000, "flops": 500},
                },
            }
        },
        "personalisation": {
            "enabled": True,
            "where": "driver process",
            "edges": {
                "e0": {
                    "task": "smile",
                    "model_version": "v1",
                    "bytes_received": 2_000,
                    "epochs": 1,
                    "test_loss_before": 0.5,
                    "test_loss_after": 0.4,
                    "flops": 50,
                },
                "e1": {
                    "task": "smile",
                    "model_version": "v1",
                    "bytes_received": 2_000,
                    "epochs": 1,
                    "test_loss_before": 0.5,
                    "test_loss_after": 0.2,
                    "flops": 150,
                },
            },
        },
        "image_quality": {
            "enabled": True,
            "extractor": "inception-test",
            "feature_dim": 2048,
            "num_generated": 20,
            "num_real": {"smile": 20},
            "kid_subsets": 10,
            "real_reference": {"smile": {"fid_real_half_vs_half": 5.0, "num_per_half": 10}},
            "sets": [
                {
                    "phase": "strategy",
                    "name": "finetune",
                    "task": "smile",
                    "fid": 30.0,
                    "kid_mean": 0.01,
                    "kid_std": 0.001,
                    "num_generated": 20,
                    "num_real": 20,
                },
                {
                    "phase": "fedavg",
                    "name": "global",
                    "task": "smile",
                    "fid": 90.0,
                    "kid_mean": 0.05,
                    "kid_std": 0.002,
                    "num_generated": 20,
                    "num_real": 20,
                },
                {
                    "phase": "edge_initial",
                    "name": "e0",
                    "task": "smile",
                    "fid": 60.0,
                    "kid_mean": 0.03,
                    "kid_std": 0.001,
                    "num_generated": 20,
                    "num_real": 20,
                },
            ],
        },
        "evaluation": {"seconds": {"fedavg": 3.0, "image_quality": 4.0}},
    }


def write(tmp_path: Path, report: dict[str, Any]) -> Path:
    (tmp_path / "report.json").write_text(json.dumps(report), encoding="utf-8")
    return tmp_path


def test_headline_ratios_match_a_hand_computation() -> None:
    # Execute
    numbers = headline(full_report())

    # Assert: BAIM per edge: mean upload 2_000 + task model 2_000 = 4_000 (whole BAIM: 2_000 + 6_000 = 8_000);
    # FedAvg per edge: mean of 40_000 and 40_000 = 40_000.
    b = numbers["bytes_per_edge"]
    assert b["baim_upload_only"] == 2_000
    assert b["baim_with_task_model"] == 4_000 and b["baim_with_whole_baim"] == 8_000
    assert b["fedavg"] == 40_000
    assert b["ratio_fedavg_over_baim_task_model"] == 10.0
    assert b["ratio_fedavg_over_baim_whole_baim"] == 5.0
    f = numbers["edge_flops_per_edge"]
    assert f["baim_training"] == 200 and f["fedavg"] == 750 and f["ratio_fedavg_over_baim"] == 3.75
    assert f["baim_training_plus_personalisation"] == 300
    assert numbers["cloud_flops"] == {"baim_all_strategies": 12_000, "baim_kept_strategy": 7_000, "fedavg": 0}
    assert numbers["test_loss"] == {
        "baim_task_models": 0.5,
        "personalised": pytest.approx(0.3),
        "fedavg": 0.6,
    }
    assert numbers["fid"]["baim_task_models"] == 30.0 and numbers["fid"]["fedavg"] == 90.0
    assert numbers["kept_strategy"] == "finetune"


def test_every_section_renders_from_a_full_report(tmp_path: Path) -> None:
    # Prepare: sample tensors as a run saves them
    out = write(tmp_path, full_report())
    phases = [
        ("real", "smile"),
        ("edge_initial", "e0"),
        ("baim", "smile"),
        ("strategy", "finetune__smile"),
        ("personalised", "e0"),
        ("fedavg", "global"),
    ]
    for phase, name in phases:
        save_samples(out / "samples" / phase / f"{name}.safetensors", torch.rand(4, 3, 8, 8))

    # Execute
    markdown = write_report_markdown(out).read_text()

    # Assert
    assert NOT_MEASURED not in markdown
    for title in ["Headline: BAIM vs FedAvg", "Image quality (FID / KID)", "Cloud training strategies",
                  "Task models", "Edges: BAIM vs FedAvg", "FedAvg baseline", "Personalisation"]:  # fmt: skip
        assert f"## {title}" in markdown
    assert "| bytes per edge, BAIM upload + task-model download | 4.00 kB | 40.00 kB | 10.0x |" in markdown
    assert "inception-test" in markdown and "20 generated images per set" in markdown
    assert "real CelebA faces" in markdown
    assert "e1 (crashed)" in markdown
    for plot in ["samples_smile.png", "test_loss.png", "costs.png", "fid.png"]:
        assert (out / "plots" / plot).stat().st_size > 1000
        assert f"(plots/{plot})" in markdown


def test_missing_sections_say_not_measured_instead_of_crashing(tmp_path: Path) -> None:
    # Prepare: a BAIM run without the baseline and measurements, procedural data
    report = full_report()
    for key in ("baselines", "personalisation", "image_quality", "downloads", "evaluation"):
        del report[key]
    report["data"]["kind"] = "procedural"
    report["cloud"]["rounds"] = []
    out = write(tmp_path, report)

    # Execute
    markdown = write_report_markdown(out).read_text()

    # Assert
    assert markdown.count(NOT_MEASURED) >= 6
    assert "procedural faces" in markdown
    assert "| bytes per edge, BAIM upload + task-model download | n/a | n/a | n/a |" in markdown


def test_an_almost_empty_report_still_renders(tmp_path: Path) -> None:
    markdown = write_report_markdown(write(tmp_path, {"scenario": {"name": "bare"}})).read_text()
    assert "# Run report: bare" in markdown and NOT_MEASURED in markdown


def test_baim_report_cli_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write(tmp_path, full_report())
    assert main(["report", str(tmp_path)]) == 0
    assert (tmp_path / "report.md").is_file()
    assert main(["report", str(tmp_path / "missing")]) == 2
    (tmp_path / "report.json").write_text("[1, 2]")
    assert main(["report", str(tmp_path)]) == 2
    assert "expected a JSON object" in capsys.readouterr().err


def failed_run_report() -> dict[str, Any]:
    """A run whose second cloud round failed three times: no task models were published."""
    return {
        "scenario": {"name": "gpu"},
        "failure": "cloud round 2 failed (tried 3 times; learners e0, e1): RuntimeError: no GPU",
        "edges": {},
        "tasks": {},
        "cloud": {
            "rounds": [],
            "flops": {},
            "round_errors": [
                {
                    "round": 2,
                    "attempts": 3,
                    "learners": ["e0", "e1"],
                    "error": "RuntimeError: no GPU | see\nlog",
                }
            ],
        },
        "data": {"kind": "procedural", "root": "/none"},
    }


def test_failed_run_and_round_errors_are_shown_before_the_headline(tmp_path: Path) -> None:
    # Prepare
    (tmp_path / "clean").mkdir()
    (tmp_path / "failed").mkdir()

    # Execute
    clean = write_report_markdown(write(tmp_path / "clean", {"scenario": {"name": "bare"}})).read_text()
    failed = write_report_markdown(write(tmp_path / "failed", failed_run_report())).read_text()

    # Assert
    assert "## Failures" not in clean
    assert failed.index("## Failures") < failed.index("## Headline")
    assert (
        "**The run failed:** cloud round 2 failed (tried 3 times; learners e0, e1): RuntimeError: no GPU"
        in failed
    )
    assert "| 2 | 3 | e0, e1 | RuntimeError: no GPU \\| see log |" in failed
    assert NOT_MEASURED + " (no task models were published)" in failed


def test_summary_table_lists_round_errors_and_the_failure() -> None:
    report = failed_run_report()
    report["cloud"].update(baim_version=None, baim_params=0, coordinator_restarts=0)

    table = summary_table(report)

    assert "cloud round 2 failed 3x: RuntimeError: no GPU" in table
    assert table.splitlines()[-1] == f"RUN FAILED: {report['failure']}"


def test_build_report_carries_run_id_failure_and_round_errors(tmp_path: Path) -> None:
    # Prepare: a coordinator summary() of a run whose first round failed
    scenario = tiny_scenario(tmp_path)
    source = resolve_source(scenario.data)
    error = {"round": 1, "attempts": 1, "learners": ["edge-0"], "error": "RuntimeError: no GPU"}
    summary: dict[str, Any] = {
        "accepted": [], "rejected": [], "rounds": [], "round_errors": [error], "baim_version": None,
        "baim_params": 0, "learners": ["edge-0"], "untrained_learners": ["edge-0"], "restarts": 0,
        "tasks": {},
    }  # fmt: skip

    # Execute
    report = build_report(
        scenario=scenario, source=source, partitions=make_partitions(source, scenario), edges={},
        coordinator=summary, ledger=Ledger(export_metrics=False), events=[], registry_uri="/r",
        wall_seconds=1.0, run_id="run-7", failure="cloud round 1 failed",
    )  # fmt: skip

    # Assert
    assert (report["run_id"], report["failure"]) == ("run-7", "cloud round 1 failed")
    assert report["cloud"]["round_errors"] == [error]
