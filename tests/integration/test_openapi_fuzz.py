"""Schemathesis against the OpenAPI document of the real Serve app (issue 8): no request gets a 5xx.

One application on loopback, with a bearer token and one task model. Every generated request carries the
token, so the routes behind it are fuzzed; negative cases drop it, and schemathesis' `ignored_auth` check
replays accepted requests without it and with a wrong one, expecting 401 (the document declares the bearer
scheme). Every operation runs all of schemathesis' default checks: not_a_server_error, status code /
content type / response header / response schema conformance, positive and negative data acceptance,
missing required header, unsupported method, ignored auth. Strings are drawn from Latin-1, not only ASCII,
because HTTP header values may hold any Latin-1 byte.

Run: `.venv/bin/pytest tests/integration/test_openapi_fuzz.py -q -s` (-s prints the status histogram).
"""

from __future__ import annotations

import json
import os
import urllib.request
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from ray import serve

from baim.decompose import decompose
from orchestrator.core.artifacts import pack_module
from orchestrator.core.registry import Registry
from orchestrator.core.scenario import ServingConfig
from serve.api import MAX_BODY_BYTES, MAX_IMAGES_PER_REQUEST, MAX_SEED, create_index_api, token_sha256
from serve.app import RegistryWatcher, start_http
from tests.support.models import tiny_baim
from tests.support.network import free_port

TASKS = ["smiling"]
TOKEN = "fuzz-token-93c1"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
# Hypothesis examples per operation (schemathesis' explicit-example and coverage phases add their own).
MAX_EXAMPLES = 50
# Derandomized by default, so the default suite does not turn red on a commit that did not cause it;
# BAIM_FUZZ_RANDOM=1 draws new cases each run (Hypothesis prints the seed of a failure to replay it).
DERANDOMIZE = os.environ.get("BAIM_FUZZ_RANDOM") != "1"

# The document that create_index_api builds is what the index serves (checked by
# test_the_served_document_is_this_one); the task routes it describes are answered by each task's own
# application (serve.api.create_task_api), which registers the same routes. It is built here, without Ray,
# because schemathesis' fixture loader (schemathesis.pytest.from_fixture) fails on pytest 9.2: it sets
# Function._nodeid, which 9.2 no longer has.
DOCUMENT = create_index_api(dict.fromkeys(TASKS), token_sha256(TOKEN), MAX_BODY_BYTES).openapi()  # type: ignore[arg-type]
schema = schemathesis.openapi.from_dict(
    DOCUMENT, config=schemathesis.Config.from_dict({"generation": {"codec": "latin-1"}})
)
OPERATIONS = {f"{method.upper()} {path}" for path, methods in DOCUMENT["paths"].items() for method in methods}
# A valid split body is the safetensors state of this model's head (baim.split): no schema describes it, so
# generated bodies are all rejected (422), and "positive data" cannot be accepted; test_serve.py has its 2xx.
SPLIT = "POST /tasks/{task}/generate/split"


@pytest.fixture(scope="module")
def base_url(ray_session: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    registry = Registry(str(tmp_path_factory.mktemp("fuzz") / "registry"))
    model = decompose(tiny_baim(seed=0), TASKS[0]).eval()
    registry.put(f"task/{TASKS[0]}", "v000001", pack_module(model, model.spec()))
    serving = ServingConfig(port=free_port(), min_replicas=1, max_replicas=1, num_cpus=0.5, max_batch_size=8)
    serve.shutdown()  # HTTP options apply only to a fresh Serve instance
    start_http(serving)
    RegistryWatcher(registry.uri, serving, app_name="baim-fuzz", api_token=TOKEN, poll_seconds=0).poll()
    yield f"http://127.0.0.1:{serving.port}"
    serve.shutdown()


@pytest.fixture(scope="module")
def traffic() -> Iterator[Counter[tuple[str, int]]]:
    """(operation, status) -> responses to generated requests (not counting the checks' own probes).

    Checked once the module's fuzz tests are done: a fuzz run that sent nothing, or never got an operation
    past the token and the validation, proves nothing.
    """
    counts: Counter[tuple[str, int]] = Counter()
    yield counts
    print(f"\nschemathesis: {counts.total()} requests, by operation and status:")
    for (operation, status), count in sorted(counts.items()):
        print(f"  {operation:30s} {status}  {count}")
    fuzzed = {operation for operation, _ in counts}
    succeeded = {operation for operation, status in counts if 200 <= status < 300}
    assert counts.total() > 0, "the fuzz tests sent no request"
    assert succeeded == fuzzed - {SPLIT}, f"operations never answered 2xx: {sorted(fuzzed - succeeded)}"


def test_the_served_document_is_this_one(base_url: str) -> None:
    request = urllib.request.Request(f"{base_url}/openapi.json", headers=AUTH)
    with urllib.request.urlopen(request, timeout=60) as response:
        assert json.loads(response.read()) == DOCUMENT
    assert {
        "GET /healthz",
        "GET /tasks",
        "POST /tasks/{task}/generate",
        "GET /tasks/{task}/model",
    } <= OPERATIONS


def test_the_document_states_the_bounds_the_server_applies() -> None:
    # FastAPI writes numeric bounds as JSON floats: a bound a double cannot hold exactly (2**63 - 1 was one)
    # publishes a different limit from the one the server enforces.
    body = DOCUMENT["components"]["schemas"]["GenerateRequest"]["properties"]
    seed_bounds = next(option for option in body["seed"]["anyOf"] if option.get("type") == "integer")
    assert (body["n"]["minimum"], body["n"]["maximum"]) == (1, MAX_IMAGES_PER_REQUEST)
    assert (seed_bounds["minimum"], seed_bounds["maximum"]) == (0, MAX_SEED)
    assert int(float(MAX_SEED)) == MAX_SEED


def has_integral_float(value: object) -> bool:
    """Whether a JSON value holds a float like 3.0 anywhere (JSON Schema's "integer" accepts it)."""
    if isinstance(value, float):
        return value.is_integer()
    if isinstance(value, dict):
        return any(has_integral_float(item) for item in value.values())
    if isinstance(value, list):
        return any(has_integral_float(item) for item in value)
    return False


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES, deadline=None, derandomize=DERANDOMIZE, suppress_health_check=list(HealthCheck)
)
def test_no_server_errors(case: schemathesis.Case, base_url: str, traffic: Counter[tuple[str, int]]) -> None:
    # The API takes strict JSON integers on purpose ("n": 3.0 gets 422, docs/http-api.md), which JSON
    # Schema cannot say: its "integer" admits 3.0, so positive_data_acceptance would flag those bodies.
    positive_unknowable = has_integral_float(case.body) or case.operation.label == SPLIT
    excluded = [schemathesis.checks.positive_data_acceptance] if positive_unknowable else []
    # case.call_and_validate in two steps, so that the histogram counts the responses that fail a check too.
    transport: dict[str, Any] = {"base_url": base_url, "headers": AUTH, "timeout": 60}
    response = case.call(**transport)
    traffic[(case.operation.label, response.status_code)] += 1
    case.validate_response(response, headers=AUTH, excluded_checks=excluded, transport_kwargs=transport)
