"""The scenario schema: valid files load, every problem names its field, task expressions parse safely."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from orchestrator.core.errors import ScenarioError, UnknownTask
from orchestrator.core.scenario import (
    And,
    Attr,
    JoinEvent,
    Not,
    Or,
    Scenario,
    expression_attributes,
    format_validation_error,
    load_scenario,
    parse_task_expression,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
SCENARIOS = sorted((REPO_ROOT / "scenarios").glob("*.yaml"))


def valid_scenario() -> dict[str, Any]:
    """A small valid scenario touching every section; tests mutate a fresh copy."""
    model = {"widths": [8, 16], "latent_dim": 8}
    return {
        "name": "unit",
        "seed": 1,
        "data": {"resolution": 16, "test_per_task": 10, "cloud_per_task": 20, "holdout_per_task": 4},
        "tasks": [
            {"name": "male", "expression": "Male"},
            {"name": "smiling_women", "expression": "not Male and Smiling"},
        ],
        "edges": [
            {"id": "a", "task": "male", "shard_size": 30, "model": model},
            {"id": "b", "task": "male", "shard_size": 30, "model": model, "num_cpus": 0.5},
            {"id": "late", "task": "smiling_women", "shard_size": 30, "model": model, "start": False},
        ],
        "edge_groups": [
            {"prefix": "w", "count": 2, "task": "smiling_women", "shard_size": 20, "model": model}
        ],
        "cloud": {"strategies": ["finetune", "scratch"], "epochs": 1, "top_k": 2},
        "timeline": [
            {"kind": "slow", "at_seconds": 0, "edge": "a", "factor": 2},
            {"kind": "join", "at_seconds": 1, "edge": "late"},
            {"kind": "poison", "at_seconds": 2, "edge": "late", "mode": "noise", "scale": 0.5},
            {
                "kind": "join",
                "at_seconds": 3,
                "new_edge": {"id": "new", "task": "male", "shard_size": 10, "model": model},
            },
            {"kind": "crash", "at_seconds": 4, "edge": "new"},
            {"kind": "link", "at_seconds": 5, "edge": "w-1", "bandwidth_mbps": 1},
            {"kind": "coordinator_crash", "at_seconds": 6},
            {"kind": "leave", "at_seconds": 7, "edge": "b"},
        ],
        "time_scale": 0.0,
        "baselines": {"fedavg": {"enabled": True, "rounds": 1, "client_fraction": 0.5}},
        "serving": {"enabled": False, "min_replicas": 1, "max_replicas": 1},
    }


def problems_of(document: dict[str, Any]) -> list[str]:
    with pytest.raises(ValidationError) as caught:
        Scenario.model_validate(document)
    return format_validation_error(caught.value)


# ----- valid input


def test_valid_scenario_expands_groups_and_join_events():
    # Execute
    scenario = Scenario.model_validate(valid_scenario())
    # Assert
    edges = scenario.all_edges()
    assert [edge.id for edge in edges] == ["a", "b", "late", "w-0", "w-1", "new"]
    assert [edge.id for edge in scenario.initial_edges()] == ["a", "b", "w-0", "w-1"]
    assert scenario.edge("new").start is False
    assert scenario.squads() == {"male": ["a", "b", "new"], "smiling_women": ["late", "w-0", "w-1"]}
    assert isinstance(scenario.timeline[1], JoinEvent)
    assert scenario.test_size(scenario.tasks[0]) == 10


def test_unknown_task_lookup_raises_unknown_task_listing_known_names():
    scenario = Scenario.model_validate(valid_scenario())
    with pytest.raises(UnknownTask, match="known tasks: male, smiling_women"):
        scenario.task("nope")


@pytest.mark.parametrize("path", SCENARIOS, ids=[p.name for p in SCENARIOS])
def test_shipped_scenarios_validate(path: Path):
    scenario = load_scenario(path)
    assert scenario.all_edges()


def test_shipped_scenario_set_is_complete():
    names = {p.stem for p in SCENARIOS}
    assert {"quickstart", "paper_celeba", "churn", "heterogeneous", "tiny"} <= names


def test_paper_scenario_has_the_papers_settings():
    scenario = load_scenario(REPO_ROOT / "scenarios" / "paper_celeba.yaml")
    cloud = scenario.cloud
    assert len(scenario.all_edges()) == 10
    assert (cloud.top_k, cloud.connection_height, cloud.lr, cloud.kld_weight) == (2, 3, 0.005, 0.00025)
    assert (cloud.prune_interval, cloud.prune_ratio) == (10, 0.1)
    assert {edge.shard_size for edge in scenario.all_edges()} == {14720}
    assert sum(scenario.cloud_size(task) for task in scenario.tasks) == 14720
    assert scenario.data.require_real and scenario.data.resolution == 64


# ----- every problem names its field


def _set(document: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    target: Any = document
    parts = path.split(".")
    for part in parts[:-1]:
        target = target[int(part)] if isinstance(target, list) else target[part]
    last = parts[-1]
    if isinstance(target, list):
        target[int(last)] = value
    else:
        target[last] = value
    return document


BAD_INPUTS = [
    # (id, field path to set, value, expected line prefix, expected words in the message)
    ("unknown task", "edges.0.task", "nope", "edges.0.task:", "unknown task 'nope'"),
    ("zero shard", "edges.0.shard_size", 0, "edges.0.shard_size:", "greater than or equal to 1"),
    ("negative cpus", "edges.1.num_cpus", -1, "edges.1.num_cpus:", "greater than 0"),
    ("negative gpus", "edges.1.num_gpus", -0.5, "edges.1.num_gpus:", "greater than or equal to 0"),
    ("extra key", "edges.0.colour", "red", "edges.0.colour:", "Extra inputs are not permitted"),
    ("extra top key", "colour", "red", "colour:", "Extra inputs are not permitted"),
    ("event unknown edge", "timeline.0.edge", "ghost", "timeline.0.edge:", "unknown edge 'ghost'"),
    ("bad poison mode", "timeline.2.mode", "explode", "timeline.2.poison.mode:", "'nan'"),
    ("negative time", "timeline.0.at_seconds", -1, "timeline.0.slow.at_seconds:", "greater than or equal"),
    ("unknown kind", "timeline.0.kind", "meteor", "timeline.0:", "does not match any of the expected tags"),
    (
        "bad strategy",
        "cloud.strategies",
        ["distill"],
        "cloud.strategies.0:",
        "'finetune', 'freeze' or 'scratch'",
    ),
    ("dup strategy", "cloud.strategies", ["finetune", "finetune"], "cloud.strategies:", "unique"),
    ("top_k too big", "cloud.top_k", 4, "cloud.top_k:", "larger than the squad of task 'male'"),
    ("prune ratio 1", "cloud.prune_ratio", 1.0, "cloud.prune_ratio:", "less than 1"),
    ("budget 1", "cloud.task_model_budget", 1.0, "cloud.task_model_budget:", "greater than 1"),
    ("bad prune shape", "cloud.prune_shape", "linear", "cloud.prune_shape:", "'geometric' or 'cubic'"),
    # epochs 1 < prune_interval 10: the budget could never be reached
    ("budget unreachable", "cloud.task_model_budget", 1.5, "cloud:", "task_model_budget: needs at least one"),
    ("keep not run", "cloud.keep", "freeze", "cloud:", "keep: 'freeze' is not one of the strategies"),
    ("bad keep", "cloud.keep", "last", "cloud.keep:", "'finetune', 'freeze', 'scratch' or 'best'"),
    (
        "negative recovery",
        "cloud.recovery_epochs",
        -1,
        "cloud.recovery_epochs:",
        "greater than or equal to 0",
    ),
    ("resolution", "data.resolution", 18, "edges.0.model.widths:", "not divisible by 2**len(widths) = 4"),
    (
        "fraction zero",
        "baselines.fedavg.client_fraction",
        0,
        "baselines.fedavg.client_fraction:",
        "greater than 0",
    ),
    (
        "fraction >1",
        "baselines.fedavg.client_fraction",
        1.5,
        "baselines.fedavg.client_fraction:",
        "less than or",
    ),
    ("replicas", "serving.min_replicas", 3, "serving:", "min_replicas (3) must be <= max_replicas (1)"),
    ("port", "serving.port", 70000, "serving.port:", "less than or equal to 65535"),
    ("unknown attribute", "tasks.0.expression", "Mal", "tasks.0.expression:", "unknown attribute 'Mal'"),
    ("bad expression", "tasks.0.expression", "Male and", "tasks.0.expression:", "ends early"),
    ("empty widths", "edges.0.model.widths", [], "edges.0.model.widths:", "at least 1 item"),
    ("bad edge id", "edges.0.id", "a b", "edges.0.id:", "should match pattern"),
    ("dup task", "tasks.1.name", "male", "tasks:", "duplicate task name 'male'"),
    ("dup edge id", "edges.1.id", "a", "edges.1:", "duplicate edge id 'a' (first declared at edges.0)"),
    (
        "group clash",
        "edge_groups.0.prefix",
        "x",
        "edge_groups.0:",
        "duplicate edge id 'x-0' (first declared at edges.0)",
    ),
    ("join started edge", "timeline.1.edge", "a", "timeline.1.edge:", "starts with the run"),
    ("join unknown edge", "timeline.1.edge", "ghost", "timeline.1.edge:", "join names unknown edge 'ghost'"),
    ("event before join", "timeline.2.at_seconds", 0.5, "timeline.2.at_seconds:", "before it joins at 1.0s"),
    ("start false, no join", "edges.1.start", False, "edges.1.start:", "no join event"),
    ("link without change", "timeline.5.bandwidth_mbps", None, "timeline.5.link:", "needs `bandwidth_mbps`"),
    ("slow factor", "timeline.0.factor", 0.5, "timeline.0.slow.factor:", "greater than or equal to 1"),
    ("test size", "data.test_per_task", -3, "data.test_per_task", "must be >= 1 or 'all'"),
    ("test size zero", "data.test_per_task", 0, "data.test_per_task:", "must be >= 1 or 'all', received 0"),
    ("task test size zero", "tasks.1.test_size", 0, "tasks.1.test_size:", "must be >= 1 or 'all'"),
    ("not a list", "tasks", "male", "tasks:", "valid list"),
]


@pytest.mark.parametrize(
    ("path", "value", "prefix", "words"), [b[1:] for b in BAD_INPUTS], ids=[b[0] for b in BAD_INPUTS]
)
def test_every_schema_error_names_its_field(path: str, value: Any, prefix: str, words: str | None):
    # Prepare
    document = _set(valid_scenario(), path, value)
    if path == "edge_groups.0.prefix":
        # A group whose expanded ids collide with an explicit edge: rename edge `a` to `x-0`.
        document["edges"][0]["id"] = "x-0"
        document["timeline"][0]["edge"] = "x-0"
        document["edges"].append({**document["edges"][0], "id": "x-1"})
    # Execute
    problems = problems_of(document)
    # Assert
    matching = [line for line in problems if line.startswith(prefix)]
    assert matching, f"no problem starts with {prefix!r}: {problems}"
    if words is not None:
        assert any(words in line for line in matching), problems


def test_no_holdout_and_no_cloud_images_for_every_task_is_named_once():
    # The coordinator checks uploads on a task's holdout, else its cloud images: with neither, it would
    # reject every upload of the task.
    document = valid_scenario()
    document["data"].update(holdout_per_task=0, cloud_per_task=0)
    problems = problems_of(document)
    matching = [line for line in problems if "no images to check uploads on" in line]
    assert len(matching) == 1 and matching[0].startswith("data.holdout_per_task: "), problems


def test_no_holdout_and_no_cloud_images_for_one_task_names_its_field():
    document = valid_scenario()
    document["tasks"][1].update(holdout_size=0, cloud_size=0)
    problems = problems_of(document)
    assert problems == [
        "tasks.1.holdout_size: task 'smiling_women' has 0 holdout and 0 cloud images (holdout_size and "
        "cloud_size, else data.holdout_per_task and data.cloud_per_task) and no images to check uploads on; "
        "expected holdout + cloud >= 1"
    ]
    document = valid_scenario()
    document["data"]["holdout_per_task"] = 0
    document["tasks"][0]["cloud_size"] = 0
    assert [line.split(":")[0] for line in problems_of(document)] == ["tasks.0.cloud_size"]


def test_holdout_or_cloud_images_alone_are_enough():
    for holdout, cloud in [(0, 1), (1, 0)]:
        document = valid_scenario()
        document["data"].update(holdout_per_task=holdout, cloud_per_task=cloud)
        scenario = Scenario.model_validate(document)
        assert scenario.holdout_size(scenario.tasks[0]) + scenario.cloud_size(scenario.tasks[0]) == 1


def test_all_problems_are_reported_at_once_one_line_each():
    # Prepare: three independent problems.
    document = valid_scenario()
    document["edges"][0]["num_cpus"] = -1
    document["edges"][1]["colour"] = "red"
    document["serving"]["port"] = 0
    # Execute
    problems = problems_of(document)
    # Assert
    assert len(problems) == 3
    assert {line.split(":")[0] for line in problems} == {"edges.0.num_cpus", "edges.1.colour", "serving.port"}


def test_cross_field_problems_are_all_listed():
    document = valid_scenario()
    document["edges"][0]["task"] = "nope"
    document["timeline"][0]["edge"] = "ghost"
    problems = problems_of(document)
    assert any(line.startswith("edges.0.task:") for line in problems)
    assert any(line.startswith("timeline.0.edge:") for line in problems)


def test_group_problem_is_reported_once_not_per_edge():
    document = valid_scenario()
    document["edge_groups"][0]["count"] = 5
    document["edge_groups"][0]["task"] = "nope"
    problems = problems_of(document)
    assert problems.count("edge_groups.0.task: unknown task 'nope'; tasks: male, smiling_women") == 1


# ----- random mutations never escape as another exception

_FIELD_NAMES = set(Scenario.model_fields)
_INJECTED_KEY = "unexpected_key"


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix] if prefix else []
    if isinstance(node, dict):
        for key, value in node.items():
            found += _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found += _paths(value, (*prefix, index))
    return found


_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**6), max_value=10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6),
    st.sampled_from(["all", "Male", "not", "finetune", "join", "a", "late", "w-0", "nan"]),
    st.lists(st.integers(min_value=-3, max_value=64), max_size=4),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_mutations_give_field_named_errors_or_validate(data: st.DataObject):
    # Prepare: replace a value, delete a key or add an unknown key somewhere in a valid scenario.
    document = valid_scenario()
    path = data.draw(st.sampled_from(_paths(document)))
    operation = data.draw(st.sampled_from(["replace", "delete", "extra"]))
    parent: Any = document
    for part in path[:-1]:
        parent = parent[part]
    if operation == "replace":
        parent[path[-1]] = data.draw(_VALUES)
    elif operation == "delete" and isinstance(parent, dict):
        del parent[path[-1]]
    elif operation == "delete":
        parent.pop(path[-1])
    else:
        target = parent[path[-1]] if isinstance(parent[path[-1]], dict) else parent
        if isinstance(target, dict):
            target[_INJECTED_KEY] = data.draw(_VALUES)
    # Execute
    try:
        Scenario.model_validate(copy.deepcopy(document))
    except ValidationError as exc:
        problems = format_validation_error(exc)
    else:
        return
    # Assert: every line starts with a field path rooted at a scenario field.
    assert problems
    for line in problems:
        field_path, separator, message = line.partition(": ")
        assert separator and message, line
        assert field_path.split(".")[0] in _FIELD_NAMES | {_INJECTED_KEY}, line


# ----- load_scenario


def test_load_scenario_missing_file(tmp_path: Path):
    with pytest.raises(ScenarioError, match="scenario file not found"):
        load_scenario(tmp_path / "absent.yaml")


def test_load_scenario_yaml_syntax_error_names_the_line(tmp_path: Path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\ntasks:\n  - name: [unclosed\n")
    with pytest.raises(ScenarioError, match=r"line \d+, column \d+: YAML syntax error"):
        load_scenario(path)


def test_load_scenario_rejects_a_non_mapping(tmp_path: Path):
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ScenarioError, match="expected a YAML mapping at the top level, received list"):
        load_scenario(path)


def test_load_scenario_round_trips_through_yaml(tmp_path: Path):
    path = tmp_path / "ok.yaml"
    path.write_text(yaml.safe_dump(valid_scenario()))
    assert load_scenario(path) == Scenario.model_validate(valid_scenario())


def test_data_root_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    from orchestrator.core.scenario import DEFAULT_DATA_ROOT, DataConfig

    monkeypatch.delenv("BAIM_DATA_ROOT", raising=False)
    assert DataConfig().resolved_root() == DEFAULT_DATA_ROOT.resolve()
    monkeypatch.setenv("BAIM_DATA_ROOT", str(tmp_path / "env"))
    assert DataConfig().resolved_root() == tmp_path / "env"
    assert DataConfig(root=str(tmp_path / "yaml")).resolved_root() == tmp_path / "yaml"


def test_the_default_data_root_is_the_shared_copy_beside_the_checkout():
    from orchestrator.core.scenario import DEFAULT_DATA_ROOT, PROJECT_ROOT

    # the project root is the checkout (it was orchestrator/ once the schema moved a level down: the
    # quickstart then fell back to procedural faces without a word of error)
    assert PROJECT_ROOT == REPO_ROOT and (PROJECT_ROOT / "pyproject.toml").is_file()
    assert REPO_ROOT.parent / "shared" / "data" / "celeba" == DEFAULT_DATA_ROOT


# ----- task expressions


def test_parser_precedence_not_binds_tighter_than_and_than_or():
    assert parse_task_expression("not Male and Smiling or Young") == Or(
        And(Not(Attr("Male")), Attr("Smiling")), Attr("Young")
    )


def test_parser_parentheses_and_nested_not():
    assert parse_task_expression("not (Male or not Eyeglasses)") == Not(
        Or(Attr("Male"), Not(Attr("Eyeglasses")))
    )
    assert expression_attributes(parse_task_expression("(Male and Young) or Male")) == {"Male", "Young"}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty task expression"),
        ("Male and", "ends early"),
        ("Male Smiling", "unexpected 'Smiling' at position 5"),
        ("(Male", "expected ')'"),
        ("Male)", "unexpected ')' at position 4"),
        ("and Male", "unexpected 'and' at position 0"),
        ("Male & Young", "unexpected character '&' at position 5"),
        ("__import__('os')", "unexpected character"),
        ("Mal", "unknown attribute 'Mal'"),
    ],
)
def test_parser_errors_say_what_and_where(text: str, message: str):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_task_expression(text)


def test_unknown_attribute_error_lists_valid_names():
    with pytest.raises(ValueError, match="valid attribute names: Male, Smiling"):
        parse_task_expression("Bald", valid_attributes=("Male", "Smiling"))


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("max_loss_ratio", 0, "greater than 0"),
        ("max_loss_ratio", "high", "valid number"),
        ("max_weight_norm_ratio", 0.5, "greater than or equal to 1"),
    ],
)
def test_plausibility_gate_bounds_name_their_field(field: str, value: Any, words: str):
    document = valid_scenario()
    document.setdefault("cloud", {})["uploads"] = {field: value}

    problems = problems_of(document)

    assert any(line.startswith(f"cloud.uploads.{field}:") and words in line for line in problems), problems


def test_plausibility_gate_defaults():
    uploads = Scenario.model_validate(valid_scenario()).cloud.uploads
    assert (uploads.max_plausibility_loss, uploads.max_loss_ratio, uploads.max_weight_norm_ratio) == (
        10.0,
        2.5,
        50.0,
    )


def test_a_budget_with_a_pruning_epoch_and_keep_best_validate():
    document = valid_scenario()
    document["cloud"].update(
        {"epochs": 6, "prune_interval": 2, "recovery_epochs": 2, "task_model_budget": 1.2, "keep": "best"}
    )

    cloud = Scenario.model_validate(document).cloud

    assert (cloud.task_model_budget, cloud.recovery_epochs, cloud.keep) == (1.2, 2, "best")
    assert Scenario.model_validate(valid_scenario()).cloud.keep == "finetune"


def test_the_relay_guard_needs_held_out_images_and_the_method_is_one_of_three() -> None:
    document = valid_scenario()
    document["data"]["holdout_per_task"] = 0
    document["personalisation"] = {"method": "lora", "relay": True}
    assert any(p.startswith("personalisation.relay_guard: ") for p in problems_of(document))
    document["personalisation"]["relay_guard"] = False  # unguarded: no held-out images needed
    assert Scenario.model_validate(document).personalisation.relay_method == "fold_own"
    document["personalisation"]["relay_method"] = "sum"
    assert any(p.startswith("personalisation.relay_method: ") for p in problems_of(document))
