"""The `baim` command line: exit codes, one line per problem, the generated reference, the demo."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from orchestrator.cli.main import main
from orchestrator.core.scenario import load_scenario
from orchestrator.data.partitions import Partitions

REPO_ROOT = Path(__file__).resolve().parents[2]
TINY = REPO_ROOT / "scenarios" / "tiny.yaml"


def write_bad_scenario(tmp_path: Path) -> Path:
    document = yaml.safe_load(TINY.read_text())
    document["edges"][1]["num_cpus"] = -1
    document["edges"][2]["task"] = "nope"
    document["colour"] = "red"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def test_validate_valid_file_exits_0(capsys: pytest.CaptureFixture[str]):
    assert main(["validate", str(TINY)]) == 0
    assert "valid scenario 'tiny'" in capsys.readouterr().out


def test_validate_invalid_file_exits_2_with_one_line_per_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    # Execute
    status = main(["validate", str(write_bad_scenario(tmp_path))])
    # Assert
    lines = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert lines == [
        "edges.1.num_cpus: Input should be greater than 0",
        "colour: Extra inputs are not permitted",
    ]


def test_validate_reports_cross_field_problems_once_fields_are_valid(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    document = yaml.safe_load(TINY.read_text())
    document["edges"][2]["task"] = "nope"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(document))
    assert main(["validate", str(path)]) == 2
    assert capsys.readouterr().err.startswith("edges.2.task: unknown task 'nope'; tasks: male, female")


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "scenario file not found"), ("tasks: [\n", "line 2, column 1: YAML syntax error")],
    ids=["missing", "syntax"],
)
def test_validate_unreadable_file_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content, message
):
    path = tmp_path / "scenario.yaml"
    if content is not None:
        path.write_text(content)
    assert main(["validate", str(path)]) == 2
    assert message in capsys.readouterr().err


def test_validate_check_data_reports_impossible_sizes(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    document = yaml.safe_load(TINY.read_text())
    document["edges"][0]["shard_size"] = 50_000
    path = tmp_path / "big.yaml"
    path.write_text(yaml.safe_dump(document))
    assert main(["validate", str(path)]) == 0  # the schema alone cannot know the data's size
    assert main(["validate", str(path), "--check-data"]) == 2
    assert "edge 'edge-0' shard (task 'male': Male): requested 50000 images" in capsys.readouterr().err


def test_module_entry_point_exits_2_without_traceback(tmp_path: Path):
    completed = subprocess.run(
        [sys.executable, "-m", "orchestrator", "validate", str(write_bad_scenario(tmp_path))],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 2
    assert "Traceback" not in completed.stderr
    assert completed.stderr.splitlines()[0] == "edges.1.num_cpus: Input should be greater than 0"


def test_no_subcommand_prints_help_and_exits_2(capsys: pytest.CaptureFixture[str]):
    assert main([]) == 2
    assert "validate" in capsys.readouterr().err


def test_checked_in_scenario_reference_is_up_to_date(tmp_path: Path):
    out = tmp_path / "reference.md"
    assert main(["schema", "--out", str(out)]) == 0
    committed = (REPO_ROOT / "docs" / "scenario-reference.md").read_text()
    assert out.read_text() == committed, "regenerate with `baim schema --out docs/scenario-reference.md`"
    assert "| `top_k` |" in committed and "kind: poison" in committed


def test_checked_in_comparison_schema_is_up_to_date(tmp_path: Path):
    out = tmp_path / "comparison.md"
    assert main(["schema", "--comparison", "--out", str(out)]) == 0
    committed = (REPO_ROOT / "docs" / "comparison.md").read_text()
    assert out.read_text() == committed, "regenerate with `baim schema --comparison --out docs/comparison.md`"
    assert "| `bytes_sent_per_edge` |" in committed and "## time_to_quality.rows[]" in committed


def test_schema_json_is_a_json_schema(capsys: pytest.CaptureFixture[str]):
    assert main(["schema", "--json"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema["title"] == "Scenario"
    assert "tasks" in schema["required"]


def test_demo_on_procedural_data_prints_shards_and_writes_partitions(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    # Execute: no CelebA at the given root, so the procedural faces are used.
    status = main(["demo", str(TINY), "--out", str(tmp_path / "out"), "--data-root", str(tmp_path / "none")])
    # Assert
    output = capsys.readouterr().out
    assert status == 0
    assert "procedural faces" in output
    scenario = load_scenario(TINY)
    for edge in scenario.all_edges():
        assert edge.id in output
    partitions = Partitions.from_json((tmp_path / "out" / "partitions.json").read_text())
    assert partitions.data_kind == "procedural"
    assert {k: len(v) for k, v in partitions.edges.items()} == {
        e.id: e.shard_size for e in scenario.all_edges()
    }
    assert json.loads((tmp_path / "out" / "data.json").read_text())["kind"] == "procedural"


def test_demo_on_the_shared_subset_says_celeba(
    shared_celeba: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    status = main(
        ["demo", str(REPO_ROOT / "scenarios" / "quickstart.yaml"), "--data-root", str(shared_celeba)]
    )
    output = capsys.readouterr().out
    assert status == 0
    assert f"data: CelebA at {shared_celeba.resolve()} (10000 images)" in output
    assert "test split: drawn from the training pool with seed 7" in output


def test_demo_require_real_without_data_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    paper = REPO_ROOT / "scenarios" / "paper_celeba.yaml"
    assert main(["demo", str(paper), "--data-root", str(tmp_path / "none")]) == 2
    assert "data.require_real: no CelebA found at" in capsys.readouterr().err


def test_run_into_an_out_dir_holding_another_run_exits_2_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
):
    # Prepare: --out holds an earlier run's coordinator state; Ray must not even start.
    import ray

    from actors.coordinator import STATE_KEY
    from orchestrator.core.registry import Registry

    out = tmp_path / "out"
    state = {"run_id": "20240101T000000Z-abcdef", "accepted": [], "rounds": []}
    Registry(str(out / "registry")).put_json(STATE_KEY, state)
    files_before = sorted(p.relative_to(out) for p in out.rglob("*"))

    def no_ray(*args: object, **kwargs: object) -> None:
        raise AssertionError("Ray started")

    monkeypatch.setattr(ray, "init", no_ray)
    monkeypatch.setattr(ray, "put", no_ray)

    # Execute
    status = main(["run", str(TINY), "--out", str(out), "--no-serve", "--data-root", str(tmp_path / "none")])

    # Assert
    assert status == 2
    assert capsys.readouterr().err.strip() == (
        f"--out {out} already holds a run (id 20240101T000000Z-abcdef, "
        f"registry {(out / 'registry').resolve()}); pick a new --out or delete it"
    )
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == files_before
    assert Registry(str(out / "registry")).get_json(STATE_KEY) == state


def test_run_takes_the_registry_from_baim_registry(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
):
    # Prepare: the registry named by $BAIM_REGISTRY (as cluster.yaml exports it) holds another run.
    import ray

    from actors.coordinator import STATE_KEY
    from orchestrator.core.registry import Registry

    shared = tmp_path / "shared-registry"
    Registry(str(shared)).put_json(STATE_KEY, {"run_id": "other-run", "accepted": [], "rounds": []})
    monkeypatch.setenv("BAIM_REGISTRY", str(shared))
    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # other tests may have left Ray running
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray started"))
    args = ["run", str(TINY), "--no-serve", "--data-root", str(tmp_path / "none")]

    # Execute / Assert: the run uses that registry (not --out/registry), so it refuses to start.
    assert main([*args, "--out", str(tmp_path / "out")]) == 2
    assert f"registry {shared} already holds a run (id other-run)" in capsys.readouterr().err
    # --registry beats the environment: a fresh registry is accepted up to starting Ray.
    with pytest.raises(pytest.fail.Exception, match="Ray started"):
        main([*args, "--out", str(tmp_path / "out2"), "--registry", str(tmp_path / "fresh")])


def test_serve_without_a_registry_exits_2(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.delenv("BAIM_REGISTRY", raising=False)
    assert main(["serve"]) == 2
    assert "--registry: required (or set BAIM_REGISTRY)" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "message"),
    [(["--port", "70000"], "port"), (["--poll-seconds", "0"], "--poll-seconds: expected > 0")],
)
def test_serve_bad_settings_exit_2_before_ray_starts(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    extra: list[str],
    message: str,
):
    import ray

    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray started"))
    (tmp_path / "registry").mkdir()
    assert main(["serve", "--registry", str(tmp_path / "registry"), *extra]) == 2
    assert message in capsys.readouterr().err


def test_serve_a_missing_local_registry_exits_2_and_creates_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
):
    import ray

    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray started"))
    monkeypatch.chdir(tmp_path)
    assert main(["serve", "--registry", "regsitry"]) == 2  # a typo, relative
    assert capsys.readouterr().err.strip() == f"--registry {tmp_path / 'regsitry'}: no such folder"
    assert not (tmp_path / "regsitry").exists()


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.8.0.1", True), ("::1", True), ("localhost", True), ("0.0.0.0", False),
     ("10.0.0.5", False), ("::", False), ("example.com", False)],
)  # fmt: skip
def test_is_loopback(host: str, loopback: bool):
    from serve.app import is_loopback

    assert is_loopback(host) is loopback
