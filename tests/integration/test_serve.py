"""The Serve app against a real Ray Serve instance on loopback, with real task models in a tmp registry.

One application is deployed per module (start-up is the slow part); tests that change it (rollout, token)
restore what they change.
"""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
from ray import serve

from baim.decompose import TaskModel, decompose
from baim.split import generate_head, split_points, split_state_to_bytes
from orchestrator.core.artifacts import pack_module
from orchestrator.core.registry import Registry
from orchestrator.core.scenario import ServingConfig
from serve.api import MAX_SPLIT_BODY_BYTES
from serve.app import (
    METRICS_DEPLOYMENT,
    RegistryWatcher,
    index_application,
    start_http,
    task_application,
)
from serve.client import Toolbox
from serve.guard import Message, Receive, RequestGuard, Scope, Send
from serve.models import decode_png_base64, to_uint8
from tests.support.models import tiny_baim
from tests.support.network import free_port

RESOLUTION = 16
APP_NAME = "baim-test"
POLL_SECONDS = 1.0  # how often task replicas look for a new version
TOKEN = "test-token-7f3a"  # the application requires it (test_bearer_token); every other call sends it


def lower_keys(headers: object) -> dict[str, str]:
    return {key.lower(): value for key, value in headers.items()}  # type: ignore[attr-defined]


@dataclass
class Reply:
    status: int
    body: bytes
    headers: dict[str, str]

    def json(self) -> dict:
        return json.loads(self.body)


@dataclass
class Service:
    base: str
    registry: Registry
    watcher: RegistryWatcher
    smiling_v1: TaskModel

    def call(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None) -> Reply:
        request = urllib.request.Request(
            self.base + path,
            data=body,
            method=method,
            headers={
                "Content-Type": "application/json",
                "Authorization": f"Bearer {TOKEN}",
                **(headers or {}),
            },
        )
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return Reply(response.status, response.read(), lower_keys(response.headers))
        except urllib.error.HTTPError as err:
            return Reply(err.code, err.read(), lower_keys(err.headers))

    def generate(self, task: str, n: int, seed: int | None = None) -> Reply:
        body = {"n": n} if seed is None else {"n": n, "seed": seed}
        return self.call("POST", f"/tasks/{task}/generate", json.dumps(body).encode())


@pytest.fixture(scope="module")
def service(ray_session: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    registry = Registry(str(tmp_path_factory.mktemp("serve") / "registry"))
    baim = tiny_baim(seed=0)
    smiling = decompose(baim, "smiling").eval()
    registry.put("task/smiling", "v000001", pack_module(smiling, smiling.spec()))
    # A lone learner is servable too (kind "learner", as an edge uploads it).
    learner = baim.learner("e2")
    spec = {"kind": "learner", "edge_id": "edge-2", "task": "male", "learner": learner.spec.to_dict()}
    registry.put("task/male", "v000001", pack_module(learner, spec))

    serving = ServingConfig(port=free_port(), min_replicas=1, max_replicas=1, num_cpus=0.5, max_batch_size=8)
    serve.shutdown()  # HTTP options apply only to a fresh Serve instance
    start_http(serving)
    watcher = RegistryWatcher(
        registry.uri, serving, app_name=APP_NAME, api_token=TOKEN, poll_seconds=POLL_SECONDS
    )
    watcher.poll()
    yield Service(f"http://127.0.0.1:{serving.port}", registry, watcher, smiling)
    serve.shutdown()


# ---- routes -------------------------------------------------------------------------------------------


def test_healthz_and_tasks(service: Service) -> None:
    assert service.call("GET", "/healthz").json() == {"status": "ok"}
    tasks = {t["task"]: t for t in service.call("GET", "/tasks").json()["tasks"]}
    assert sorted(tasks) == ["male", "smiling"]
    smiling = tasks["smiling"]
    assert smiling["model_version"] == "v000001"
    assert smiling["kind"] == "task_model"
    assert smiling["sha256"] == service.registry.ref("task/smiling", "v000001").sha256
    assert smiling["parameter_count"] == sum(p.numel() for p in service.smiling_v1.parameters())
    assert tasks["male"]["kind"] == "learner"


def test_generation_is_deterministic_per_seed(service: Service) -> None:
    # Execute
    first = service.generate("smiling", 3, seed=42).json()
    second = service.generate("smiling", 3, seed=42).json()
    other = service.generate("smiling", 3, seed=43).json()

    # Assert: same seed, same PNG bytes; the images are the task model's own generate(n, seed)
    assert first == second
    assert (first["task"], first["model_version"], first["seed"]) == ("smiling", "v000001", 42)
    assert other["images"] != first["images"]
    served = np.stack([decode_png_base64(image) for image in first["images"]])
    expected = to_uint8(service.smiling_v1.generate(3, seed=42))
    assert served.shape == (3, RESOLUTION, RESOLUTION, 3)
    assert np.abs(served.astype(int) - expected.astype(int)).max() <= 1


def test_missing_seed_is_drawn_and_returned(service: Service) -> None:
    drawn = service.generate("male", 2).json()
    assert isinstance(drawn["seed"], int) and drawn["seed"] >= 0
    replay = service.generate("male", 2, seed=drawn["seed"]).json()
    assert replay["images"] == drawn["images"]


BAD_REQUESTS = [
    ("n zero", "/tasks/smiling/generate", b'{"n": 0}', 422, "greater than or equal to 1"),
    ("n too big", "/tasks/smiling/generate", b'{"n": 65}', 422, "less than or equal to 64"),
    ("n string", "/tasks/smiling/generate", b'{"n": "3"}', 422, "valid integer"),
    ("n float", "/tasks/smiling/generate", b'{"n": 2.5}', 422, "valid integer"),
    ("n bool", "/tasks/smiling/generate", b'{"n": true}', 422, "valid integer"),
    ("n missing", "/tasks/smiling/generate", b'{"seed": 1}', 422, "Field required"),
    ("negative seed", "/tasks/smiling/generate", b'{"n": 1, "seed": -1}', 422, "greater than or equal to 0"),
    ("huge seed", "/tasks/smiling/generate", b'{"n": 1, "seed": 9223372036854775808}', 422, "less than"),
    ("unknown field", "/tasks/smiling/generate", b'{"n": 1, "steps": 50}', 422, "Extra inputs"),
    ("bad json", "/tasks/smiling/generate", b'{"n": 1', 422, "JSON decode error"),
    ("not an object", "/tasks/smiling/generate", b"[1, 2]", 422, "valid dictionary"),
    ("empty body", "/tasks/smiling/generate", b"", 422, "Field required"),
    (
        "body too large",
        "/tasks/smiling/generate",
        b'{"n": 1, "pad": "' + b"x" * 20000 + b'"}',
        413,
        "too large",
    ),
    ("unknown task", "/tasks/hats/generate", b'{"n": 1}', 404, "known tasks: male, smiling"),
    ("unknown task model", "/tasks/hats/model", None, 404, "unknown task"),
    ("unknown route", "/nope", None, 404, "Not Found"),
]


@pytest.mark.parametrize(
    ("path", "body", "status", "reason"), [c[1:] for c in BAD_REQUESTS], ids=[c[0] for c in BAD_REQUESTS]
)
def test_bad_requests_get_4xx_with_a_reason(
    service: Service, path: str, body: bytes | None, status: int, reason: str
) -> None:
    reply = service.call("POST" if body is not None else "GET", path, body)
    assert reply.status == status
    assert reason in reply.body.decode()
    # The service keeps serving.
    assert service.generate("smiling", 1, seed=0).status == 200


def test_concurrent_requests_all_succeed_and_match_sequential(service: Service) -> None:
    # Prepare: the reference, one request at a time
    seeds = list(range(100, 124))
    sequential = {seed: service.generate("smiling", 2, seed=seed).json()["images"] for seed in seeds}

    # Execute: all at once, so Serve batches them with arbitrary neighbours
    with ThreadPoolExecutor(max_workers=12) as pool:
        replies = list(pool.map(lambda seed: service.generate("smiling", 2, seed=seed), seeds))

    # Assert
    assert [r.status for r in replies] == [200] * len(seeds)
    differing, total = 0, 0
    for seed, reply in zip(seeds, replies, strict=True):
        for batched, alone in zip(reply.json()["images"], sequential[seed], strict=True):
            a = decode_png_base64(batched).astype(int)
            b = decode_png_base64(alone).astype(int)
            assert np.abs(a - b).max() <= 1  # float rounding of another batch shape at most (serve.models)
            differing += int((a != b).sum())
            total += a.size
    assert differing <= total * 1e-3


def test_model_download_and_toolbox_over_http(service: Service, tmp_path: Path) -> None:
    # Execute
    reply = service.call("GET", "/tasks/smiling/model")
    toolbox = Toolbox(tmp_path / "cache", endpoint=service.base, api_token=TOKEN)
    first = toolbox.fetch("smiling")
    second = toolbox.fetch("smiling")

    # Assert: the body is spec + newline + weights, hashing to the artifact's sha256
    payload = service.registry.get("task/smiling", "v000001")
    assert reply.status == 200
    assert reply.headers["x-model-sha256"] == payload.sha256
    assert hashlib.sha256(reply.body).hexdigest() == payload.sha256
    assert reply.body == payload.spec_json.encode() + b"\n" + payload.weights
    assert (first.cache_hit, first.bytes_received) == (False, len(reply.body))
    assert (second.cache_hit, second.bytes_received) == (True, 0)
    assert toolbox.bytes_received == len(reply.body)
    assert isinstance(first.model, TaskModel)
    assert torch.equal(first.model.generate(2, seed=5), service.smiling_v1.generate(2, seed=5))
    not_modified = service.call(
        "GET", "/tasks/smiling/model", headers={"If-None-Match": f'"{payload.sha256}"'}
    )
    assert (not_modified.status, not_modified.body) == (304, b"")


def wait_for_metrics(service: Service, *needles: str) -> str:
    """GET /metrics until it shows every needle: replicas send their counts about once a second."""
    deadline = time.monotonic() + 30
    text = ""
    while time.monotonic() < deadline:
        text = service.call("GET", "/metrics").body.decode()
        if all(needle in text for needle in needles):
            break
        time.sleep(0.5)
    return text


def test_metrics_count_requests(service: Service) -> None:
    service.generate("smiling", 1, seed=1)
    service.call("POST", "/tasks/smiling/generate", b'{"n": 0}')
    service.call("GET", "/tasks/hats/model")
    expected = [
        'baim_http_requests_total{method="POST",route="/tasks/{task}/generate",status="200"}',
        'baim_http_requests_total{method="POST",route="/tasks/{task}/generate",status="422"}',
        'baim_http_requests_total{method="GET",route="/tasks/{task}/model",status="404"}',
        'baim_http_request_seconds_count{route="/tasks/{task}/generate"}',
        'baim_generation_seconds_count{task="smiling"}',
    ]
    text = wait_for_metrics(service, *expected)
    for line in expected:
        assert line in text


def test_a_generate_request_takes_one_hop(service: Service) -> None:
    # Each replica's own metrics, as the MetricsHub holds them: a generate request is served (counted) by
    # the task application's replica; the index never sees it. An unknown task is the index's 404.
    hub = serve.get_deployment_handle(METRICS_DEPLOYMENT, app_name=f"{APP_NAME}-metrics")
    generated = 'baim_http_requests_total{method="POST",route="/tasks/{task}/generate",status="200"}'
    not_found = 'baim_http_requests_total{method="POST",route="/tasks/{task}/generate",status="404"}'
    for seed in range(3):
        assert service.generate("smiling", 1, seed=seed).status == 200
    assert service.generate("hats", 1, seed=0).status == 404
    wait_for_metrics(service, not_found)

    by_source = {}
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        by_source = {
            source: hub.render.remote(source).result().decode() for source in hub.sources.remote().result()
        }
        task_sources = [text for source, text in by_source.items() if f"::{APP_NAME}-task-smiling#" in source]
        if task_sources and generated in task_sources[0]:
            break
        time.sleep(0.5)
    index = [text for source, text in by_source.items() if f"::{APP_NAME}#Index#" in source]
    smiling = [text for source, text in by_source.items() if f"::{APP_NAME}-task-smiling#" in source]
    assert len(index) == 1 and len(smiling) == 1, sorted(by_source)
    assert generated in smiling[0] and generated not in index[0]
    assert not_found in index[0] and not_found not in smiling[0]


def test_rollout_during_a_stream_of_requests_fails_none(service: Service) -> None:
    # Prepare: a stream of requests from two clients
    stop = threading.Event()
    outcomes: list[tuple[int, str]] = []
    lock = threading.Lock()

    def client(offset: int) -> None:
        seed = offset
        while not stop.is_set():
            reply = service.generate("smiling", 2, seed=seed)
            version = reply.json().get("model_version", "") if reply.status == 200 else reply.body.decode()
            with lock:
                outcomes.append((reply.status, version))
            seed += 2

    threads = [threading.Thread(target=client, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    time.sleep(1.0)

    # Execute: a training round publishes v000002; the replica follows the registry to it
    new = decompose(tiny_baim(seed=1), "smiling")
    service.registry.put("task/smiling", "v000002", pack_module(new, new.spec()))
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            versions = {t["task"]: t["model_version"] for t in service.call("GET", "/tasks").json()["tasks"]}
            if versions["smiling"] == "v000002":
                break
            time.sleep(0.5)
        time.sleep(1.0)  # a few more requests on the new version
    finally:
        stop.set()
        for thread in threads:
            thread.join()

    # Assert
    assert versions == {"smiling": "v000002", "male": "v000001"}
    assert [o for o in outcomes if o[0] != 200] == []
    served = [version for _, version in outcomes]
    assert served[0] == "v000001" and served[-1] == "v000002"
    switched = served.index("v000002")
    assert switched > 0 and "v000001" not in served[switched + 4 :]  # the two clients overlap the swap
    assert service.watcher.poll() is False  # same tasks: no redeploy
    fresh = service.generate("smiling", 2, seed=9).json()["images"]
    expected = to_uint8(new.eval().generate(2, seed=9))
    assert (
        np.abs(np.stack([decode_png_base64(i) for i in fresh]).astype(int) - expected.astype(int)).max() <= 1
    )


def test_a_corrupt_new_version_is_not_rolled_out(service: Service) -> None:
    # Prepare: a committed version whose weights do not match its sha256 (e.g. a disk fault)
    current = {t["task"]: t["model_version"] for t in service.call("GET", "/tasks").json()["tasks"]}[
        "smiling"
    ]
    good = service.registry.get("task/smiling", current)
    version = service.registry.next_version("task/smiling")
    folder = Path(service.registry.uri) / "artifacts" / "task" / "smiling" / version
    folder.mkdir()
    (folder / "weights.safetensors").write_bytes(good.weights[:-8] + b"\x00" * 8)
    (folder / "spec.json").write_text(good.spec_json)
    (folder / "sha256").write_text(good.sha256)
    assert service.registry.latest("task/smiling") == version

    # Execute
    time.sleep(4 * POLL_SECONDS)

    # Assert: still serving the last good version
    tasks = {t["task"]: t["model_version"] for t in service.call("GET", "/tasks").json()["tasks"]}
    assert tasks["smiling"] == current
    reply = service.generate("smiling", 1, seed=0)
    assert (reply.status, reply.json()["model_version"]) == (200, current)


def replica_ids(app_name: str) -> set[str]:
    """Full ids of the live Serve replicas of one application (Serve names each replica actor by it)."""
    return {
        actor["name"]
        for actor in ray.util.list_named_actors(all_namespaces=True)
        if actor["name"].startswith(f"SERVE_REPLICA::{app_name}#")
    }


@pytest.mark.slow  # a new task's replica and a new index replica start: 20-60 s on two shared cores
def test_a_new_task_is_added_while_serving_without_failures(service: Service) -> None:
    # Prepare: a stream of requests to an existing task
    stop = threading.Event()
    statuses: list[int] = []

    def client() -> None:
        seed = 0
        while not stop.is_set():
            statuses.append(service.generate("male", 1, seed=seed).status)
            seed += 1

    male_replicas = replica_ids(f"{APP_NAME}-task-male")
    thread = threading.Thread(target=client)
    thread.start()
    time.sleep(1.0)

    # Execute: a new task appears; the watcher deploys its application, then the index that lists it
    hats = decompose(tiny_baim(seed=2), "male")  # any task model will do for a new task name
    service.registry.put("task/hats", "v000001", pack_module(hats, hats.spec()))
    try:
        assert service.watcher.poll() is True
        time.sleep(1.0)
    finally:
        stop.set()
        thread.join()

    # Assert: no failed request, the new task served and listed, the other tasks' replicas untouched
    assert service.watcher.deployed_tasks == ["hats", "male", "smiling"]
    assert statuses and set(statuses) == {200}
    assert service.generate("hats", 1, seed=0).status == 200
    assert "hats" in {t["task"] for t in service.call("GET", "/tasks").json()["tasks"]}
    assert male_replicas and replica_ids(f"{APP_NAME}-task-male") == male_replicas


def test_bearer_token(service: Service, tmp_path: Path) -> None:
    # The module's application requires TOKEN; Service.call sends it unless told not to.
    no_token: dict[str, str] = {"Authorization": ""}
    assert service.call("GET", "/healthz", headers=no_token).status == 200
    for path in ("/tasks", "/metrics", "/tasks/smiling/model", "/docs", "/openapi.json"):
        assert service.call("GET", path, headers=no_token).status == 401
        assert service.call("GET", path, headers={"Authorization": "Bearer wrong"}).status == 401
        assert service.call("GET", path, headers={"Authorization": TOKEN}).status == 401  # no scheme
    denied = service.call("POST", "/tasks/smiling/generate", b'{"n": 1}', headers=no_token)
    assert denied.status == 401 and "bearer token" in denied.json()["detail"]
    assert denied.headers["www-authenticate"] == "Bearer"
    assert service.generate("smiling", 1, seed=0).status == 200
    with pytest.raises(ConnectionError, match="401"):
        Toolbox(tmp_path / "cache", endpoint=service.base).fetch("smiling")


def test_config_builders_validate_their_args(service: Service) -> None:
    # What `serve run` / `serve deploy` do with a config file's `args`: Serve reads the builder's pydantic
    # annotation and validates the dict into it (serve.app has no postponed annotations for this reason).
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary as build

    task_args = {"registry_uri": service.registry.uri, "task": "smiling", "metrics_app": "baim-metrics"}
    assert isinstance(build(task_application, task_args), serve.Application)
    assert isinstance(
        build(index_application, {"tasks": {"smiling": "baim-task-smiling"}}), serve.Application
    )
    with pytest.raises(ValueError, match="poll_seconds"):
        build(task_application, {**task_args, "poll_seconds": -1})
    with pytest.raises(ValueError, match="task"):
        build(task_application, {**task_args, "task": "a/b"})
    with pytest.raises(ValueError, match="Extra inputs"):
        build(index_application, {"tasks": {}, "replicas": 2})


@pytest.mark.parametrize("etag", ['"caf\xe9"', "\xff", '"*"', '"a", "b"', ""], ids=repr)
def test_odd_if_none_match_gets_the_model(service: Service, etag: str) -> None:
    # Found by tests/integration/test_openapi_fuzz.py: hmac.compare_digest raised TypeError on a non-ASCII
    # str, so a Latin-1 If-None-Match was a 500. Any value that is not the current sha256 gets the body.
    reply = service.call("GET", "/tasks/smiling/model", headers={"If-None-Match": etag})
    assert reply.status == 200
    assert hashlib.sha256(reply.body).hexdigest() == reply.headers["x-model-sha256"]


def test_the_largest_seed_is_exact(service: Service) -> None:
    # The OpenAPI document published 2**63 - 1 as the float 2**63 (found by test_openapi_fuzz.py): seeds
    # now stop at 2**53 - 1, which every JSON reader (and the document) holds exactly.
    largest = 2**53 - 1
    accepted = service.generate("smiling", 1, seed=largest)
    assert (accepted.status, accepted.json()["seed"]) == (200, largest)
    rejected = service.generate("smiling", 1, seed=largest + 1)
    assert rejected.status == 422 and "less than or equal to 9007199254740991" in rejected.body.decode()


# ---- split generation ---------------------------------------------------------------------------------


def test_split_generation_equals_unsplit_for_every_cut(service: Service, tmp_path: Path) -> None:
    # Whichever version is served now (earlier tests of this module roll `smiling` forward).
    toolbox = Toolbox(tmp_path / "cache", endpoint=service.base, api_token=TOKEN)
    served = service.generate("smiling", 3, seed=11).json()
    unsplit = np.stack([decode_png_base64(image) for image in served["images"]])
    head_model = toolbox.fetch("smiling").model
    assert isinstance(head_model, TaskModel)

    for cut in split_points(head_model):
        result = toolbox.generate_split("smiling", 3, cut, seed=11)

        assert (result.model_version, result.cut) == (served["model_version"], cut)
        np.testing.assert_array_equal(result.images, unsplit)
        state = generate_head(head_model, 3, cut, seed=11)
        assert result.uplink_bytes == len(split_state_to_bytes(state))


def split_body(model: TaskModel, cut: int, how: str) -> bytes:
    state = generate_head(model, 2, cut, seed=3)
    key = next(k for k in sorted(state) if k.startswith("stage/"))
    if how == "shape":
        state[key] = state[key][..., :-1].contiguous()
    elif how == "dtype":
        state[key] = state[key].double()
    elif how == "nan":
        state[key] = torch.full_like(state[key], float("nan"))
    return split_state_to_bytes(state)


@pytest.mark.parametrize(
    ("how", "query", "status", "reason"),
    [
        ("shape", "cut=1", 422, "of shape"),
        ("dtype", "cut=1", 422, "torch.float64"),
        ("nan", "cut=1", 422, "non-finite"),
        ("garbage", "cut=1", 422, "split state"),
        ("ok", "cut=99", 422, "cut"),
        ("ok", "cut=-1", 422, "greater than or equal to 0"),
        ("ok", "cut=1&model_version=v000009", 409, "v000009"),
    ],
)
def test_bad_split_requests_get_4xx_and_serving_goes_on(
    service: Service, how: str, query: str, status: int, reason: str
) -> None:
    body = b"\x00" * 64 if how == "garbage" else split_body(service.smiling_v1, 1, how)
    headers = {"Content-Type": "application/octet-stream"}

    reply = service.call("POST", f"/tasks/smiling/generate/split?{query}", body, headers)

    assert reply.status == status, reply.body[:300]
    assert reason in reply.body.decode()
    good = service.call(
        "POST", "/tasks/smiling/generate/split?cut=1", split_body(service.smiling_v1, 1, "ok")
    )
    assert good.status == 200 and len(good.json()["images"]) == 2


def test_a_split_body_over_the_limit_gets_413_before_it_is_sent(service: Service) -> None:
    # Declared, not sent: the guard answers from Content-Length (sending 32 MiB would race the reply).
    host, port = service.base.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    connection.putrequest("POST", "/tasks/smiling/generate/split?cut=1")
    connection.putheader("Authorization", f"Bearer {TOKEN}")
    connection.putheader("Content-Length", str(MAX_SPLIT_BODY_BYTES + 1))
    connection.endheaders()
    reply = connection.getresponse()
    assert reply.status == 413 and "too large" in reply.read().decode()
    connection.close()
    assert service.generate("smiling", 1, seed=0).status == 200


def test_a_learner_cannot_be_split(service: Service) -> None:
    body = split_body(service.smiling_v1, 1, "ok")
    reply = service.call("POST", "/tasks/male/generate/split?cut=1", body)
    assert reply.status == 422 and "cannot be split" in reply.body.decode()


@pytest.mark.parametrize("length", ["\xb2", "1\xb9", "-1", "1e3", " "], ids=repr)
def test_a_content_length_that_is_not_ascii_digits_gets_400(length: str) -> None:
    # str.isdigit() is true for "²" (Latin-1 0xB2), which int() refuses: the guard raised, a 500. Serve's
    # uvicorn proxy happens to reject such a header first, so the guard is called directly here.
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        raise AssertionError("the request must not reach the app")

    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    guard = RequestGuard(app, api_token_sha256=None, max_body_bytes=1024)
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/",
        "headers": [(b"content-length", length.encode("latin-1"))],
    }
    asyncio.run(guard(scope, receive, send))
    assert sent[0]["status"] == 400
    assert "Content-Length: expected an integer" in json.loads(sent[1]["body"])["detail"]
