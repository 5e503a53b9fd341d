"""The Ray Serve application: one autoscaling deployment per task model behind one FastAPI ingress.

    Ingress (FastAPI, @serve.ingress)   --handle-->   TaskModelDeployment "TaskModel_<task>", one per task
      GET  /healthz                                      generate(n, seed): @serve.batch, one forward
      GET  /tasks                                        info(): version, parameters, sha256
      POST /tasks/{task}/generate                        artifact(): the download body
      GET  /tasks/{task}/model
      GET  /metrics

The HTTP contract is documented in docs/http-api.md. Each task deployment loads `task/<task>` from the
registry (verified: safetensors + JSON spec + sha256, never a pickle).

Rollout. Every task replica polls the registry (`poll_seconds`) and, when a newer version of its task is
committed, loads it beside the current one and swaps a single reference: requests in flight finish on the
model they started with, later ones get the new one, no replica restarts, so no request fails. A version
that fails verification is logged and skipped; the replica keeps serving what it has. (Redeploying with
`serve.run` would not do: Serve gives every imperative deploy a new code version, so it restarts every
replica of every deployment, and with one replica a request can hit the gap.) `RegistryWatcher` redeploys
only when the set of tasks changes (the ingress needs a handle for a new task), with `max_surge_percent=100`
so the new replicas start before the old ones stop. `serve_registry` (behind `baim serve`) runs it.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
import os
import secrets
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

from fastapi import FastAPI, Header, HTTPException, Path, Response, Security
from fastapi.security import HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.handle import DeploymentHandle

from orchestrator.core.errors import ArtifactRejected, UnknownTask
from orchestrator.core.metrics import GENERATION_SECONDS, METRICS_CONTENT_TYPE, render_latest
from orchestrator.core.registry import Registry
from orchestrator.core.scenario import ServingConfig
from serve.guard import RequestGuard
from serve.models import (
    GenerationRequest,
    LoadedModel,
    artifact_body,
    generate_batch,
    load_model,
    png_base64,
)

logger = logging.getLogger(__name__)

TASK_OWNER_PREFIX = "task/"
API_TOKEN_ENV = "BAIM_API_TOKEN"  # noqa: S105 (the variable name, not a secret)  # nosec B105
MAX_IMAGES_PER_REQUEST = 64
# The largest integer a double holds exactly: OpenAPI documents store bounds as JSON numbers (FastAPI writes
# them as floats, so 2**63 - 1 was published as 2**63), and JavaScript clients read seeds as doubles.
MAX_SEED = 2**53 - 1
MAX_BODY_BYTES = 16 * 1024  # a generate body is ~30 bytes; anything near this is not a real request
DEFAULT_POLL_SECONDS = 5.0  # how often each task replica looks for a newer version in the registry
# How long @serve.batch waits for more requests after the first. 0: a lone request never waits, and under
# load a batch is whatever queued up while the previous batch ran (max_concurrent_batches is 1).
DEFAULT_BATCH_WAIT_S = 0.0
INGRESS_NUM_CPUS = 0.1  # the ingress only awaits handles; images are encoded on the task replicas
INGRESS_MAX_ONGOING = 256  # it only awaits handles; Serve's default of 5 would cap every task's concurrency
# Serve's defaults (30 s up, 600 s down) suit big clusters; task models start in about a second.
DEFAULT_AUTOSCALING = {"upscale_delay_s": 3.0, "downscale_delay_s": 30.0, "look_back_period_s": 15.0}
# Declares the token in the OpenAPI document only; RequestGuard enforces it (see create_api).
BEARER_SCHEME = HTTPBearer(
    auto_error=False, scheme_name="bearerAuth", description="BAIM_API_TOKEN (when the server sets one)"
)


def task_owner(task: str) -> str:
    """Registry owner of a task's models: `task/<task>`."""
    return TASK_OWNER_PREFIX + task


def deployment_name(task: str) -> str:
    return f"TaskModel_{task}"


def latest_task_versions(registry: Registry) -> dict[str, str]:
    """{task: newest committed version} for every `task/<task>` owner in the registry."""
    versions = {}
    for owner in registry.owners(TASK_OWNER_PREFIX):
        task = owner[len(TASK_OWNER_PREFIX) :]
        if "/" in task:
            continue  # not a task model owner (task names have no '/')
        latest = registry.latest(owner)
        if latest is not None:
            versions[task] = latest
    return versions


# ---- HTTP bodies --------------------------------------------------------------------------------------


class GenerateRequest(BaseModel):
    """Body of POST /tasks/{task}/generate. Strict ints: "3", 3.0 and true are rejected, not coerced."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"n": 4, "seed": 7}, {"n": 1}]})

    n: int = Field(strict=True, ge=1, le=MAX_IMAGES_PER_REQUEST, description="How many images, 1..64.")
    seed: int | None = Field(
        default=None,
        strict=True,
        ge=0,
        le=MAX_SEED,
        description="Seed of the noise, 0..2^53-1; the same seed, n and model version give the same images. "
        "Drawn at random (and returned) when absent.",
    )


class GenerateResponse(BaseModel):
    task: str = Field(description="The task the images were generated for.")
    model_version: str = Field(description="The registry version of the task model that generated them.")
    seed: int = Field(description="The seed used (the request's, or the one drawn for it).")
    images: list[str] = Field(description="n base64-encoded PNG images.")


class TaskInfo(BaseModel):
    task: str = Field(description="Task name.")
    model_version: str = Field(description="Registry version being served.")
    kind: str = Field(description='Artifact kind: "task_model" (decomposed BAIM) or "learner".')
    parameter_count: int = Field(description="Parameters of the served model.")
    sha256: str = Field(description="sha256 of the artifact (spec + weights), as in the registry.")


class TasksResponse(BaseModel):
    tasks: list[TaskInfo] = Field(description="Every served task, sorted by name.")


class ErrorResponse(BaseModel):
    """Body of every error but 422 (whose `detail` is pydantic's list of problems)."""

    detail: str = Field(description="What was wrong with the request, in words.")


def error_response(description: str) -> dict[str, Any]:
    return {"model": ErrorResponse, "description": description}


# Documented in the OpenAPI document, so that clients (and schemathesis) know every status a route can give.
GUARD_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: error_response("Content-Length is not an integer, or the body is not UTF-8 text"),
    413: error_response(f"Request body over {MAX_BODY_BYTES} bytes (declared or sent)"),
}
AUTH_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: error_response("Missing or wrong bearer token (header WWW-Authenticate: Bearer)"),
}
TASK_RESPONSES: dict[int | str, dict[str, Any]] = {
    404: error_response("Unknown task; the detail names the known ones"),
    503: error_response("No replica of the task answered; retry later"),
}
MODEL_HEADERS = {
    "ETag": {
        "description": "The artifact's sha256 in quotes: send it back in If-None-Match.",
        "schema": {"type": "string"},
    },
    "X-Task": {"description": "The task.", "schema": {"type": "string"}},
    "X-Model-Version": {"description": "The registry version.", "schema": {"type": "string"}},
    "X-Model-Sha256": {"description": "sha256 of the body.", "schema": {"type": "string"}},
}


# ---- the task model deployment ------------------------------------------------------------------------


@serve.deployment
class TaskModelDeployment:
    """Serves one task's model and follows the registry to its newest version (see the module docstring).

    `user_config` (optional, lightweight): {"max_batch_size", "batch_wait_timeout_s"} for @serve.batch.
    """

    def __init__(
        self,
        registry_uri: str,
        task: str,
        *,
        num_threads: int = 1,
        poll_seconds: float = DEFAULT_POLL_SECONDS,
        pinned_version: str | None = None,
    ) -> None:
        import torch

        # A replica reserves a fraction of a core or a few cores; more intra-op threads only oversubscribe.
        torch.set_num_threads(max(1, num_threads))
        self._registry = Registry(registry_uri)
        self._task = task
        self._rejected: set[str] = set()
        # (model, download body), replaced as one reference, so a batch always sees a matching pair.
        self._current: tuple[LoadedModel, bytes] = (
            self._load(pinned_version) if pinned_version else self._load_newest_good()
        )
        self._stop = threading.Event()
        if pinned_version is None and poll_seconds > 0:
            threading.Thread(
                target=self._follow_registry, args=(poll_seconds,), name=f"follow-{task}", daemon=True
            ).start()

    def reconfigure(self, config: dict[str, Any]) -> None:
        """Batching parameters; Serve calls this at start and on a user_config change."""
        # @serve.batch adds these setters to the method at runtime; mypy sees only the decorated signature.
        batcher: Any = self._generate_batched
        batcher.set_max_batch_size(int(config.get("max_batch_size", 8)))
        batcher.set_batch_wait_timeout_s(float(config.get("batch_wait_timeout_s", DEFAULT_BATCH_WAIT_S)))

    def _load(self, version: str) -> tuple[LoadedModel, bytes]:
        payload = self._registry.get(task_owner(self._task), version)
        return load_model(payload, task=self._task, model_version=version), artifact_body(payload)

    def _load_newest_good(self) -> tuple[LoadedModel, bytes]:
        """The newest version that passes verification (a corrupt newest one must not stop a replica)."""
        versions = self._registry.versions(task_owner(self._task))
        for version in reversed(versions):
            try:
                return self._load(version)
            except (ArtifactRejected, ValueError, LookupError) as err:
                self._rejected.add(version)
                logger.error(
                    "task %s: version %s rejected, trying an older one: %s", self._task, version, err
                )
        if not versions:
            raise UnknownTask(self._task)
        raise ArtifactRejected(f"{task_owner(self._task)}", f"none of the versions {versions} loads")

    def _follow_registry(self, poll_seconds: float) -> None:
        # The rollout: load the newest version beside the current one, then swap the reference. Requests
        # in flight finish on the model they started with; nothing restarts, so nothing fails.
        while not self._stop.wait(poll_seconds):
            try:
                latest = self._registry.latest(task_owner(self._task))
                current = self._current[0].model_version
                if latest is None or latest == current or latest in self._rejected:
                    continue
                try:
                    self._current = self._load(latest)
                except (ArtifactRejected, ValueError, LookupError) as err:
                    self._rejected.add(latest)
                    logger.error(
                        "task %s: version %s rejected, still serving %s: %s", self._task, latest, current, err
                    )
                    continue
                logger.info("task %s: rolled from %s to %s", self._task, current, latest)
            except Exception:  # a registry hiccup must not end the follower; the next poll retries
                logger.exception("task %s: registry poll failed", self._task)

    def __del__(self) -> None:
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()

    def _loaded(self) -> tuple[LoadedModel, bytes]:
        return self._current

    async def generate(self, n: int, seed: int) -> dict[str, Any]:
        return await self._generate_batched(GenerationRequest(n=n, seed=seed))

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=DEFAULT_BATCH_WAIT_S)
    async def _generate_batched(self, requests: list[GenerationRequest]) -> list[dict[str, Any]]:
        model, _ = self._loaded()
        # Run the forward and the PNG encoding off the event loop so the next batch keeps filling meanwhile.
        return await asyncio.to_thread(self._generate_and_encode, model, requests)

    @staticmethod
    def _generate_and_encode(model: LoadedModel, requests: list[GenerationRequest]) -> list[dict[str, Any]]:
        started = time.perf_counter()
        images = generate_batch(model, requests)
        seconds = time.perf_counter() - started
        return [
            {"model_version": model.model_version, "images": png_base64(batch), "generation_seconds": seconds}
            for batch in images
        ]

    def info(self) -> dict[str, Any]:
        return self._loaded()[0].info()

    def artifact(self) -> dict[str, Any]:
        model, body = self._loaded()
        return {"model_version": model.model_version, "sha256": model.sha256, "body": body}


# ---- the ingress --------------------------------------------------------------------------------------


@serve.deployment(ray_actor_options={"num_cpus": INGRESS_NUM_CPUS}, max_ongoing_requests=INGRESS_MAX_ONGOING)
@serve.ingress()
class Ingress:
    """HTTP front: validates requests and forwards them to the task deployments by handle."""

    def __init__(
        self,
        task_handles: dict[str, DeploymentHandle],
        api_token_sha256: str | None = None,
        max_body_bytes: int = MAX_BODY_BYTES,
    ) -> None:
        self._handles = dict(task_handles)
        self._api_token_sha256 = api_token_sha256
        self._max_body_bytes = max_body_bytes

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_api(self._handles, self._api_token_sha256, self._max_body_bytes)


def create_api(
    handles: Mapping[str, DeploymentHandle], api_token_sha256: str | None, max_body_bytes: int
) -> FastAPI:
    """The FastAPI app of one ingress replica (built in the replica, after its constructor)."""
    api = FastAPI(
        title="BAIM task models",
        description="Generate images with decomposed BAIM task models; download them for an edge toolbox.",
        version="1",
        responses=GUARD_RESPONSES,
    )
    api.add_middleware(
        RequestGuard,
        api_token_sha256=api_token_sha256,
        max_body_bytes=max_body_bytes,
        open_paths=("/healthz",),
    )

    # RequestGuard enforces the token; this dependency only declares the bearer scheme in the OpenAPI
    # document (auto_error=False: it never rejects anything itself).
    auth_dependencies = [Security(BEARER_SCHEME)] if api_token_sha256 is not None else []
    auth_responses = AUTH_RESPONSES if api_token_sha256 is not None else {}

    # The served tasks as the path parameter's examples: documentation, and what schemathesis tries first.
    task_examples = sorted(handles) or None
    task_description = "A served task (GET /tasks lists them)."

    def handle_for(task: str) -> DeploymentHandle:
        if task not in handles:
            raise HTTPException(status_code=404, detail=str(UnknownTask(task, sorted(handles))))
        return handles[task]

    async def call_replica(task: str, call: Callable[[], Awaitable[Any]]) -> Any:
        # Every replica call is a pure function of (model version, arguments), so a call that hit a replica
        # dying under it is safe to repeat once on another; a second failure is the service's, not the
        # client's: 503, never 500.
        for attempt in (1, 2):
            try:
                return await call()
            except RayActorError as err:
                logger.warning("task %s: replica died during a call (attempt %d): %s", task, attempt, err)
        raise HTTPException(status_code=503, detail=f"task {task!r}: no replica answered; retry later")

    @api.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @api.get(
        "/tasks",
        response_model=TasksResponse,
        dependencies=auth_dependencies,
        responses={**auth_responses, 503: TASK_RESPONSES[503]},
    )
    async def list_tasks() -> TasksResponse:
        tasks = sorted(handles)
        infos = await asyncio.gather(*(call_replica(task, handles[task].info.remote) for task in tasks))
        return TasksResponse(tasks=[TaskInfo(**info) for info in infos])

    @api.post(
        "/tasks/{task}/generate",
        response_model=GenerateResponse,
        dependencies=auth_dependencies,
        responses={**auth_responses, **TASK_RESPONSES},
    )
    async def generate(
        body: GenerateRequest,
        task: str = Path(description=task_description, examples=task_examples),
    ) -> GenerateResponse:
        handle = handle_for(task)
        seed = body.seed if body.seed is not None else secrets.randbelow(2**32)
        result = await call_replica(task, lambda: handle.generate.remote(body.n, seed))
        GENERATION_SECONDS.labels(task=task).observe(result["generation_seconds"])
        return GenerateResponse(
            task=task, model_version=result["model_version"], seed=seed, images=result["images"]
        )

    @api.get(
        "/tasks/{task}/model",
        response_class=Response,
        dependencies=auth_dependencies,
        responses={
            200: {
                "content": {"application/octet-stream": {}},
                "description": "spec_json + b'\\n' + weights",
                "headers": MODEL_HEADERS,
            },
            304: {
                "description": "If-None-Match named the current sha256: the cached copy is current",
                "headers": MODEL_HEADERS,
            },
            **auth_responses,
            **TASK_RESPONSES,
        },
    )
    async def download_model(
        task: str = Path(description=task_description, examples=task_examples),
        if_none_match: str | None = Header(
            default=None, description='"<sha256>" of a cached copy: 304 (empty body) if it is still current'
        ),
    ) -> Response:
        handle = handle_for(task)
        cached = (if_none_match or "").strip('"')
        if cached:
            info = await call_replica(task, handle.info.remote)
            # The sha256 is public (GET /tasks lists it): a plain comparison. hmac.compare_digest raised
            # TypeError on a non-ASCII header value, a 500 (found by tests/integration/test_openapi_fuzz.py).
            if cached == info["sha256"]:
                return Response(status_code=304, headers=_model_headers(task, info["model_version"], cached))
        artifact = await call_replica(task, handle.artifact.remote)
        return Response(
            content=artifact["body"],
            media_type="application/octet-stream",
            headers=_model_headers(task, artifact["model_version"], artifact["sha256"]),
        )

    @api.get(
        "/metrics",
        response_class=Response,
        dependencies=auth_dependencies,
        responses={
            **auth_responses,
            200: {"content": {METRICS_CONTENT_TYPE: {}}, "description": "Prometheus text"},
        },
    )
    async def metrics() -> Response:
        return Response(content=render_latest(), media_type=METRICS_CONTENT_TYPE)

    return api


def _model_headers(task: str, model_version: str, sha256: str) -> dict[str, str]:
    return {"ETag": f'"{sha256}"', "X-Task": task, "X-Model-Version": model_version, "X-Model-Sha256": sha256}


# ---- building and deploying ---------------------------------------------------------------------------


def token_sha256(api_token: str | None) -> str | None:
    """What the ingress keeps of the bearer token: its sha256 (the token never enters Serve's config)."""
    return hashlib.sha256(api_token.encode()).hexdigest() if api_token else None


def build_app(
    registry_uri: str,
    serving_cfg: ServingConfig,
    *,
    tasks: Iterable[str] | None = None,
    pinned_versions: Mapping[str, str] | None = None,
    poll_seconds: float = DEFAULT_POLL_SECONDS,
    api_token: str | None = None,
    batch_wait_timeout_s: float = DEFAULT_BATCH_WAIT_S,
    autoscaling_overrides: Mapping[str, Any] | None = None,
) -> serve.Application:
    """The Serve application for a registry: one TaskModelDeployment per task, behind the Ingress.

    `tasks` defaults to every `task/<name>` owner in the registry. Each deployment serves its task's newest
    version and follows new ones every `poll_seconds` (0: never), unless `pinned_versions` names a version.
    `api_token` defaults to the BAIM_API_TOKEN environment variable (unset or empty: no auth).
    `autoscaling_overrides` adds Serve autoscaling_config keys (e.g. downscale_delay_s) to the scenario's.
    """
    if not isinstance(serving_cfg, ServingConfig):
        raise TypeError(f"serving_cfg: expected a ServingConfig, received {type(serving_cfg).__name__}")
    if poll_seconds < 0:
        raise ValueError(f"poll_seconds: expected >= 0, received {poll_seconds}")
    pinned_versions = dict(pinned_versions or {})
    if tasks is None:
        tasks = latest_task_versions(Registry(registry_uri))
    tasks = sorted(set(tasks) | set(pinned_versions))
    if not tasks:
        logger.warning("registry %s holds no task models yet: serving an empty /tasks", registry_uri)
    if api_token is None:
        api_token = os.environ.get(API_TOKEN_ENV) or None
    autoscaling_config = {
        "min_replicas": serving_cfg.min_replicas,
        "max_replicas": serving_cfg.max_replicas,
        "target_ongoing_requests": serving_cfg.target_ongoing_requests,
        **DEFAULT_AUTOSCALING,
        **(autoscaling_overrides or {}),
    }
    handles = {}
    for task in tasks:
        handles[task] = TaskModelDeployment.options(  # type: ignore[attr-defined]
            name=deployment_name(task),
            autoscaling_config=autoscaling_config,
            ray_actor_options={"num_cpus": serving_cfg.num_cpus},
            # Room for a full batch plus the next one filling while it runs.
            max_ongoing_requests=max(5, 2 * serving_cfg.max_batch_size),
            # A redeploy (a new task appears) restarts replicas: start the new ones before stopping the old.
            max_surge_percent=100,
            user_config={
                "max_batch_size": serving_cfg.max_batch_size,
                "batch_wait_timeout_s": batch_wait_timeout_s,
            },
        ).bind(
            registry_uri,
            task,
            num_threads=max(1, int(serving_cfg.num_cpus)),
            poll_seconds=poll_seconds,
            pinned_version=pinned_versions.get(task),
        )
    ingress = Ingress.options(max_surge_percent=100)  # type: ignore[attr-defined]
    return ingress.bind(handles, token_sha256(api_token))


class BuildArgs(BaseModel):
    """Arguments of `app_builder` (`serve run serve.app:app_builder registry_uri=DIR`, or a config file)."""

    model_config = ConfigDict(extra="forbid")

    registry_uri: str = Field(min_length=1, description="Registry root: a local path or a pyarrow.fs URI.")
    serving: ServingConfig = Field(default_factory=ServingConfig, description="Replicas, CPUs and batching.")


def app_builder(args: BuildArgs | dict[str, Any]) -> serve.Application:
    """Serve's application builder (see docs/http-api.md, "Serve config file").

    Serve passes the config's `args` as a dict here (this module's postponed annotations hide the pydantic
    type from it), so they are validated here; a bad key or value raises pydantic's ValidationError.
    """
    parsed = args if isinstance(args, BuildArgs) else BuildArgs.model_validate(args)
    return build_app(parsed.registry_uri, parsed.serving)


def start_http(serving_cfg: ServingConfig) -> None:
    """Start Serve's HTTP proxy on serving_cfg.host:port (cluster-wide; fixed until serve.shutdown())."""
    if not is_loopback(serving_cfg.host) and not os.environ.get(API_TOKEN_ENV):
        logger.warning(
            "serving on %s, which is not loopback, without %s: anyone who can reach port %d can generate "
            "and download the task models",
            serving_cfg.host,
            API_TOKEN_ENV,
            serving_cfg.port,
        )
    serve.start(http_options={"host": serving_cfg.host, "port": serving_cfg.port})


def is_loopback(host: str) -> bool:
    """Whether `host` names this machine only (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: only "localhost" is known to be loopback without resolving it
        return False


class RegistryWatcher:
    """Keeps a Serve application serving every task model in a registry.

    New versions of a served task need nothing from here (its replicas follow the registry); a new task
    needs a handle in the ingress, so `poll` redeploys the application when the set of tasks changes.
    """

    def __init__(
        self,
        registry_uri: str,
        serving_cfg: ServingConfig,
        *,
        app_name: str = "baim",
        route_prefix: str = "/",
        api_token: str | None = None,
        **build_options: Any,
    ) -> None:
        self.registry_uri = registry_uri
        self.serving_cfg = serving_cfg
        self.app_name = app_name
        self.route_prefix = route_prefix
        self.api_token = api_token
        self.build_options = build_options
        self.deployed_tasks: list[str] | None = None
        self._registry = Registry(registry_uri)

    def poll(self) -> bool:
        """Deploy when the registry's tasks differ from the deployed ones (or on the first call)."""
        tasks = sorted(latest_task_versions(self._registry))
        if tasks == self.deployed_tasks:
            return False
        app = build_app(
            self.registry_uri, self.serving_cfg, tasks=tasks, api_token=self.api_token, **self.build_options
        )
        serve.run(app, name=self.app_name, route_prefix=self.route_prefix)
        logger.info("application %s serves tasks %s (was %s)", self.app_name, tasks, self.deployed_tasks)
        self.deployed_tasks = tasks
        return True


def serve_registry(
    registry_uri: str,
    serving_cfg: ServingConfig,
    poll_seconds: float = 5.0,
    *,
    stop: threading.Event | None = None,
    app_name: str = "baim",
    route_prefix: str = "/",
) -> None:
    """Serve every task model of a registry over HTTP, following new versions and new tasks (both polled
    every `poll_seconds`) until `stop` is set.

    The body of `baim serve --registry DIR`. Needs a Ray connection (`ray.init()` first, or Serve starts a
    local one). Blocks; returns when `stop` is set (never, by default), leaving the application running.
    """
    if poll_seconds <= 0:
        raise ValueError(f"poll_seconds: expected > 0, received {poll_seconds}")
    start_http(serving_cfg)
    watcher = RegistryWatcher(
        registry_uri, serving_cfg, app_name=app_name, route_prefix=route_prefix, poll_seconds=poll_seconds
    )
    watcher.poll()
    logger.info(
        "serving %d task models at http://%s:%d%s",
        len(watcher.deployed_tasks or []),
        serving_cfg.host,
        serving_cfg.port,
        route_prefix,
    )
    stop = stop or threading.Event()
    while not stop.wait(poll_seconds):
        try:
            watcher.poll()
        except Exception:  # a registry hiccup must not stop serving; the next poll retries
            logger.exception("registry poll failed; still serving %s", watcher.deployed_tasks)
