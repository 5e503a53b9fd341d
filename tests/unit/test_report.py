"""report.md and plots from a small hand-written report.json; headline ratios by hand; missing sections."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from orchestrator.cli.main import main
from orchestrator.core.metrics import Ledger
from orchestrator.core.receipts import CoordinatorSummary
from orchestrator.core.reports import REPORT_FORMAT_VERSION, RunReport
from orchestrator.data.partitions import make_partitions
from orchestrator.data.sources import resolve_source
from orchestrator.evaluation.evaluate import save_samples
from orchestrator.report.build import build_report, summary_table, write_report
from orchestrator.report.markdown import NOT_MEASURED, ReportInvalid, headline, write_report_markdown
from tests.support.reports import bare_report, failed_run_report, hand_report, write_report_json
from tests.support.scenarios import tiny_scenario


def test_headline_ratios_match_a_hand_computation() -> None:
    # Execute
    numbers = headline(RunReport.model_validate(hand_report()))

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
    out = write_report_json(tmp_path, hand_report())
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
                  "Task models", "Edges: BAIM vs FedAvg", "FedAvg baseline", "Personalisation",
                  "Relay: adapters back to the cloud", "Placements of end users' requests"]:  # fmt: skip
        assert f"## {title}" in markdown
    assert "| bytes per edge, BAIM upload + task-model download | 4.00 kB | 40.00 kB | 10.0x |" in markdown
    assert "inception-test" in markdown and "20 generated images per set" in markdown
    assert "real CelebA faces" in markdown
    assert "e1 (crashed)" in markdown
    assert "Guarded: accepted; held-out loss smile 0.31000 -> 0.27000." in markdown
    assert "Published as baim@v000002 with task/smile@v000002." in markdown
    for plot in ["samples_smile.png", "test_loss.png", "costs.png", "fid.png"]:
        assert (out / "plots" / plot).stat().st_size > 1000
        assert f"(plots/{plot})" in markdown


def test_missing_sections_say_not_measured_instead_of_crashing(tmp_path: Path) -> None:
    # Prepare: a BAIM run without the baseline and measurements, procedural data
    report = hand_report()
    for key in ("baselines", "personalisation", "image_quality", "downloads", "evaluation"):
        del report[key]
    report["data"]["kind"] = "procedural"
    report["cloud"]["rounds"] = []
    out = write_report_json(tmp_path, report)

    # Execute
    markdown = write_report_markdown(out).read_text()

    # Assert
    assert markdown.count(NOT_MEASURED) >= 6
    assert "procedural faces" in markdown
    assert "| bytes per edge, BAIM upload + task-model download | n/a | n/a | n/a |" in markdown


def test_disabled_measurements_say_why(tmp_path: Path) -> None:
    report = hand_report()
    report["baselines"] = {"fedavg": {"enabled": False}}
    report["image_quality"] = {"enabled": False, "reason": "no Inception weights"}
    report["personalisation"] = {"enabled": False}

    markdown = write_report_markdown(write_report_json(tmp_path, report)).read_text()

    assert NOT_MEASURED + " (disabled in the scenario)" in markdown
    assert NOT_MEASURED + " (no Inception weights)" in markdown


def test_a_bare_run_still_renders(tmp_path: Path) -> None:
    markdown = write_report_markdown(write_report_json(tmp_path, bare_report())).read_text()
    assert "# Run report: hand" in markdown and NOT_MEASURED in markdown


def test_a_report_that_does_not_fit_names_every_wrong_field(tmp_path: Path) -> None:
    # Prepare: a typo'd key, a missing field and a wrong type
    report = hand_report()
    report["edges"]["e0"]["bytes_snt"] = report["edges"]["e0"].pop("bytes_sent")
    del report["totals"]["wall_seconds"]
    report["tasks"]["smile"]["params"] = "many"

    # Execute
    with pytest.raises(ReportInvalid) as caught:
        write_report_markdown(write_report_json(tmp_path, report))

    # Assert
    lines = str(caught.value).splitlines()
    assert lines[0] == f"{tmp_path / 'report.json'}: not a report.json of this version:"
    assert any(line.startswith("edges.e0.bytes_sent: ") for line in lines)
    assert any(line.startswith("edges.e0.bytes_snt: ") for line in lines)
    assert any(line.startswith("totals.wall_seconds: ") for line in lines)
    assert any(line.startswith("tasks.smile.params: ") for line in lines)


def test_a_report_of_another_format_version_says_so_before_any_field(tmp_path: Path) -> None:
    report = hand_report()
    report["format_version"] = REPORT_FORMAT_VERSION - 1
    del report["totals"]["wall_seconds"]

    with pytest.raises(ReportInvalid) as caught:
        write_report_markdown(write_report_json(tmp_path, report))

    assert str(caught.value) == (
        f"{tmp_path / 'report.json'}: report.json format_version {REPORT_FORMAT_VERSION - 1}, and this "
        f"version reads {REPORT_FORMAT_VERSION}: rerun the scenario with this version (`baim run`) or read "
        "it with the version that wrote it"
    )


def test_report_json_round_trips_through_the_model(tmp_path: Path) -> None:
    # Prepare
    document = hand_report()
    del document["downloads"]  # a section the model must leave out, not write as null

    # Execute
    write_report(RunReport.model_validate(document), tmp_path / "report.json")

    # Assert: the same JSON, key for key and in the same order
    written = (tmp_path / "report.json").read_text()
    assert written == json.dumps(document, indent=1) + "\n"
    assert "downloads" not in json.loads(written)


def test_baim_report_cli_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_report_json(tmp_path, hand_report())
    assert main(["report", str(tmp_path)]) == 0
    assert (tmp_path / "report.md").is_file()
    assert main(["report", str(tmp_path / "missing")]) == 2
    (tmp_path / "report.json").write_text("[1, 2]")
    assert main(["report", str(tmp_path)]) == 2
    assert "not a report.json of this version" in capsys.readouterr().err
    (tmp_path / "report.json").write_text("{not json")
    assert main(["report", str(tmp_path)]) == 2
    assert "Invalid JSON" in capsys.readouterr().err


def test_failed_run_and_round_errors_are_shown_before_the_headline(tmp_path: Path) -> None:
    # Prepare
    (tmp_path / "clean").mkdir()
    (tmp_path / "failed").mkdir()

    # Execute
    clean = write_report_markdown(write_report_json(tmp_path / "clean", bare_report())).read_text()
    failed = write_report_markdown(write_report_json(tmp_path / "failed", failed_run_report())).read_text()

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
    report = RunReport.model_validate(failed_run_report())

    table = summary_table(report)

    assert "cloud round 2 failed 3x: RuntimeError: no GPU" in table
    assert table.splitlines()[-1] == f"RUN FAILED: {report.failure}"


def test_build_report_carries_run_id_failure_and_round_errors(tmp_path: Path) -> None:
    # Prepare: a coordinator summary() of a run whose first round failed
    scenario = tiny_scenario(tmp_path)
    source = resolve_source(scenario.data)
    error = {"round": 1, "attempts": 1, "learners": ["edge-0"], "error": "RuntimeError: no GPU"}
    summary = CoordinatorSummary.model_validate({
        "run_id": "run-7", "accepted": [], "rejected": [], "rounds": [], "round_errors": [error],
        "baim_version": None, "baim_params": 0, "learners": ["edge-0"], "untrained_learners": ["edge-0"],
        "restarts": 0, "tasks": {}, "ledger": Ledger(export_metrics=False).snapshot(),
    })  # fmt: skip

    # Execute
    report = build_report(
        scenario=scenario, source=source, partitions=make_partitions(source, scenario), edges={},
        coordinator=summary, ledger=Ledger(export_metrics=False), events=[], registry_uri="/r",
        wall_seconds=1.0, run_id="run-7", failure="cloud round 1 failed",
    )  # fmt: skip

    # Assert
    document = report.model_dump(mode="json")
    assert (document["run_id"], document["failure"]) == ("run-7", "cloud round 1 failed")
    assert document["cloud"]["round_errors"] == [error]


def load_compare_reports() -> Any:
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "compare_reports.py"
    spec = importlib.util.spec_from_file_location("compare_reports", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_compare_reports_ignores_timings_ids_paths_and_arrival_order_only(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare: B is A run again elsewhere (other times, id, output folder, upload order), then one real change
    compare = load_compare_reports()
    a = hand_report()
    a["uploads"] = [{"edge_id": e, "version": 1, "accepted": True, "reason": "", "detail": "",
                     "sha256": "ab" * 32, "artifact": f"edge/{e}@v000001"} for e in ("e0", "e1")]  # fmt: skip
    a["registry"] = "/runs/a/registry"
    a["cloud"]["rounds"][0]["strategies"]["finetune"]["checkpoint_uri"] = "/runs/a/registry/ray_train/x"
    b = json.loads(json.dumps(a))
    b.update(run_id="another", registry="/runs/b/registry", uploads=a["uploads"][::-1])
    b["cloud"]["rounds"][0]["strategies"]["finetune"]["checkpoint_uri"] = "/runs/b/registry/ray_train/x"
    b["totals"]["wall_seconds"] = 99.0
    b["edges"]["e0"]["train_seconds"] = 9.0
    paths = [
        write_report_json(tmp_path / name, report) / "report.json" for name, report in (("a", a), ("b", b))
    ]

    # Execute / Assert: nothing differs
    assert compare.main([str(p) for p in paths]) == 0
    assert capsys.readouterr().out.startswith("0 differing paths")

    # Execute / Assert: a value differs
    b["tasks"]["smile"]["params"] = 51
    write_report_json(tmp_path / "b", b)
    assert compare.main([str(p) for p in paths]) == 1
    assert capsys.readouterr().out.splitlines()[0] == "tasks.smile.params: 50 in A, 51 in B"


def test_strategy_table_says_which_trainer_ran_and_skips_unevaluated_epochs(tmp_path: Path) -> None:
    # Prepare: the hand report's finetune ran on Ray Train, chosen by auto; scratch's epoch 1 not evaluated.
    report = hand_report()
    strategies = report["cloud"]["rounds"][0]["strategies"]
    strategies["finetune"]["chosen_by"] = "cloud.trainer: auto (3e+12 estimated FLOPs per strategy > 2e+11)"
    strategies["scratch"]["test_loss"] = [None, 0.8]
    # Execute
    markdown = write_report_markdown(write_report_json(tmp_path, report)).read_text()
    # Assert: one row per strategy with its runner and the reason; scratch's curve starts at epoch 2.
    assert (
        "| finetune | 0 | 0.9000 | 2 | 0.5000 | 7000 FLOP | 1.0 | "
        "ray_train (cloud.trainer: auto (3e+12 estimated FLOPs per strategy > 2e+11)) |"
    ) in markdown
    assert (
        "| scratch | 2 | 0.8000 | 2 | 0.8000 | 5000 FLOP | 2.0 | local (cloud.trainer: local) |" in markdown
    )
