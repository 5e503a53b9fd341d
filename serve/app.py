"""The Ray Serve applications that serve a registry's task models: one application per task, one hop.

    proxy --/tasks/<task>/...--> "<app>-task-<task>": TaskModelDeployment "TaskModel_<task>" (FastAPI
                                 ingress: validates, batches with @serve.batch, runs the model; autoscales)
          --anything else-----> "<app>" at "/": IndexDeployment "Index" (/healthz, /tasks, /metrics,
                                 /openapi.json, 404 for unknown tasks)
    every replica --snapshot every second--> "<app>-metrics": MetricsHub (sums them for GET /metrics)

Why per-task applications rather than task models multiplexed in one deployment, and what each costs:
docs/http-api.md ("Applications"). Each task replica follows the registry to its task's newest version
(serve.models.TaskModelFollower), so new versions roll out without a redeploy. The same applications come
from Python (`RegistryWatcher`, `serve_registry`, behind `baim serve`) and from a Serve config file
(`serve_config`, behind `baim serve --write-config`; `serve deploy` / `serve run` apply it): the config's
import paths are the typed builders `task_application`, `index_application`, `metrics_application`.

This module has no `from __future__ import annotations`: Serve reads the builders' pydantic annotations at
run time to validate a config's `args`.
"""

import asyncio
import ipaddress
import logging
import os
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import ray
from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.handle import DeploymentHandle

from orchestrator.core.names import TASK_OWNER_PREFIX, DownloadKind
from orchestrator.core.registry import Registry
from orchestrator.core.scenario import NAME_PATTERN, ServingConfig
from serve.api import (
    API_TOKEN_ENV,
    MAX_BODY_BYTES,
    MAX_IMAGES_PER_REQUEST,
    TaskBackend,
    TaskUnavailable,
    create_index_api,
    create_task_api,
    token_sha256,
)
from serve.metrics import FamilySnapshot, MetricsAggregate, snapshot
from serve.models import (
    DEFAULT_POLL_SECONDS,
    GenerationRequest,
    TaskModelFollower,
    generate_and_encode,
    generate_split_and_encode,
    model_artifact,
)

logger = logging.getLogger(__name__)

DEFAULT_APP_NAME = "baim"
# How long @serve.batch waits for more requests after the first. 0: a lone request never waits, and under
# load a batch is whatever queued up while the previous batch ran (max_concurrent_batches is 1).
DEFAULT_BATCH_WAIT_S = 0.0
# Serve's defaults (30 s up, 600 s down) suit big clusters; task models start in about a second.
DEFAULT_AUTOSCALING = {"upscale_delay_s": 3.0, "downscale_delay_s": 30.0, "look_back_period_s": 15.0}
INDEX_DEPLOYMENT = "Index"
METRICS_DEPLOYMENT = "MetricsHub"
# The index serves no model (task requests reach their own applications); the hub only adds numbers.
INDEX_OPTIONS: dict[str, Any] = {
    "ray_actor_options": {"num_cpus": 0.1},
    "max_ongoing_requests": 64,
    "max_surge_percent": 100,  # a redeploy (a new task) starts the new replica before stopping the old
}
METRICS_OPTIONS: dict[str, Any] = {
    "num_replicas": 1,  # one place that holds every replica's snapshot
    "ray_actor_options": {"num_cpus": 0.05},
    "max_ongoing_requests": 256,
}
METRICS_PUSH_SECONDS = 1.0  # how often a replica sends its metrics when they changed
METRICS_REFRESH_SECONDS = 10.0  # ... and unchanged ones, so that a restarted hub gets them back


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


@dataclass(frozen=True)
class AppNames:
    """Names and route prefixes of the applications that serve one registry (`index` at `route_prefix`)."""

    index: str = DEFAULT_APP_NAME
    route_prefix: str = "/"

    def __post_init__(self) -> None:
        if not self.index:
            raise ValueError("index: expected a non-empty application name")
        if not self.route_prefix.startswith("/") or (
            self.route_prefix != "/" and self.route_prefix.endswith("/")
        ):
            raise ValueError(
                f"route_prefix: expected '/' or '/path' (no trailing '/'), received {self.route_prefix!r}"
            )

    @property
    def metrics(self) -> str:
        return f"{self.index}-metrics"

    def task_app(self, task: str) -> str:
        return f"{self.index}-task-{task}"

    def task_route(self, task: str) -> str:
        return f"{self.route_prefix.rstrip('/')}/tasks/{task}"


def task_deployment_options(
    serving_cfg: ServingConfig,
    *,
    batch_wait_timeout_s: float = DEFAULT_BATCH_WAIT_S,
    autoscaling_overrides: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Serve deployment options of every task deployment, from the scenario's `serving` section.

    Used as `.options(**...)` from Python and as the config file's `deployments` entry, so both agree.
    `autoscaling_overrides` adds Serve autoscaling_config keys (e.g. downscale_delay_s).
    """
    if not isinstance(serving_cfg, ServingConfig):
        raise TypeError(f"serving_cfg: expected a ServingConfig, received {type(serving_cfg).__name__}")
    if batch_wait_timeout_s < 0:
        raise ValueError(f"batch_wait_timeout_s: expected >= 0, received {batch_wait_timeout_s}")
    return {
        "autoscaling_config": {
            "min_replicas": serving_cfg.min_replicas,
            "max_replicas": serving_cfg.max_replicas,
            "target_ongoing_requests": serving_cfg.target_ongoing_requests,
            **DEFAULT_AUTOSCALING,
            **(autoscaling_overrides or {}),
        },
        "ray_actor_options": {"num_cpus": serving_cfg.num_cpus},
        # Room for a full batch plus the next one filling while it runs.
        "max_ongoing_requests": max(5, 2 * serving_cfg.max_batch_size),
        # A redeploy restarts replicas: start the new ones before stopping the old.
        "max_surge_percent": 100,
        "user_config": {
            "max_batch_size": serving_cfg.max_batch_size,
            "batch_wait_timeout_s": batch_wait_timeout_s,
        },
    }


def resolve_api_token(api_token: str | None) -> str | None:
    """`api_token`, or BAIM_API_TOKEN from the environment when None; empty means no token."""
    if api_token is None:
        api_token = os.environ.get(API_TOKEN_ENV)
    return api_token or None


# ---- metrics from every replica ---------------------------------------------------------------------------


class MetricsPusher:
    """Sends this replica's metrics snapshot to the MetricsHub of `metrics_app`, from a daemon thread."""

    def __init__(self, metrics_app: str, source: str) -> None:
        self._metrics_app = metrics_app
        self._source = source
        self._stop = threading.Event()
        threading.Thread(target=self._run, name="push-metrics", daemon=True).start()

    @classmethod
    def for_this_replica(cls, metrics_app: str | None) -> "MetricsPusher | None":
        if metrics_app is None:
            return None
        return cls(metrics_app, serve.get_replica_context().replica_id.to_full_id_str())

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        hub: DeploymentHandle | None = None
        sent: list[FamilySnapshot] | None = None
        sent_at = 0.0
        failures = 0
        while not self._stop.wait(METRICS_PUSH_SECONDS):
            families = snapshot()
            if families == sent and time.monotonic() - sent_at < METRICS_REFRESH_SECONDS:
                continue
            try:
                if hub is None:
                    hub = serve.get_deployment_handle(METRICS_DEPLOYMENT, app_name=self._metrics_app)
                hub.push.remote(self._source, families).result(timeout_s=10)
            except Exception as err:  # the hub may not be up yet, or restarting; the next tick retries
                failures += 1
                log = logger.warning if failures == 3 else logger.debug
                log(
                    "metrics: cannot reach %s in %s (%d tries): %s",
                    METRICS_DEPLOYMENT,
                    self._metrics_app,
                    failures,
                    err,
                )
                hub = None
                continue
            sent, sent_at, failures = families, time.monotonic(), 0


@serve.deployment(name=METRICS_DEPLOYMENT, **METRICS_OPTIONS)
class MetricsHub:
    """The latest metrics snapshot of every replica, and their sum (serve.metrics.MetricsAggregate)."""

    def __init__(self) -> None:
        self._aggregate = MetricsAggregate()

    def push(self, source: str, families: list[FamilySnapshot]) -> None:
        self._aggregate.push(source, families)

    def sources(self) -> list[str]:
        """The replicas (full Serve replica ids) that have sent metrics."""
        return self._aggregate.sources()

    def render(self, source: str | None = None) -> bytes:
        """Prometheus text of every replica's metrics summed, or of one replica's."""
        return self._aggregate.render(source)


# ---- the task application ---------------------------------------------------------------------------------


def replica_cpu_threads() -> int:
    """Intra-op threads for this replica: the whole CPUs it reserved, at least 1 (more only oversubscribe)."""
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    return max(1, int(cpus))


@serve.deployment
@serve.ingress()
class TaskModelDeployment:
    """One task's HTTP routes and model in one replica; follows the registry to the task's newest version.

    `user_config` (lightweight): {"max_batch_size", "batch_wait_timeout_s"} for @serve.batch.
    """

    def __init__(
        self,
        registry_uri: str,
        task: str,
        *,
        api_token_sha256: str | None = None,
        max_body_bytes: int = MAX_BODY_BYTES,
        poll_seconds: float = DEFAULT_POLL_SECONDS,
        pinned_version: str | None = None,
        metrics_app: str | None = None,
    ) -> None:
        import torch

        torch.set_num_threads(replica_cpu_threads())
        self._task = task
        self._api_token_sha256 = api_token_sha256
        self._max_body_bytes = max_body_bytes
        self._model = TaskModelFollower(
            registry_uri, task, poll_seconds=poll_seconds, pinned_version=pinned_version
        )
        self._pusher = MetricsPusher.for_this_replica(metrics_app)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_task_api(self._task, self, self._api_token_sha256, self._max_body_bytes)

    def reconfigure(self, config: dict[str, Any]) -> None:
        """Batching parameters; Serve calls this at start and on a user_config change."""
        # @serve.batch adds these setters to the method at runtime; mypy sees only the decorated signature.
        batcher: Any = self._generate_batched
        batcher.set_max_batch_size(int(config.get("max_batch_size", 8)))
        batcher.set_batch_wait_timeout_s(float(config.get("batch_wait_timeout_s", DEFAULT_BATCH_WAIT_S)))

    async def generate(self, n: int, seed: int) -> dict[str, Any]:
        return await self._generate_batched(GenerationRequest(n=n, seed=seed))

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=DEFAULT_BATCH_WAIT_S)
    async def _generate_batched(self, requests: list[GenerationRequest]) -> list[dict[str, Any]]:
        model = self._model.current.model
        # The forward and the PNG encoding run off the event loop, so the next batch keeps filling meanwhile.
        return await asyncio.to_thread(generate_and_encode, model, requests)

    async def info(self) -> dict[str, Any]:
        return self._model.current.info()

    async def artifact(self, kind: DownloadKind = "full") -> dict[str, Any]:
        return model_artifact(self._model.current, kind)

    async def generate_split(self, cut: int, body: bytes, model_version: str | None) -> dict[str, Any]:
        model = self._model.current.model
        return await asyncio.to_thread(
            generate_split_and_encode,
            model,
            cut,
            body,
            expected_version=model_version,
            max_images=MAX_IMAGES_PER_REQUEST,
        )

    def __del__(self) -> None:
        for part in (getattr(self, "_model", None), getattr(self, "_pusher", None)):
            if part is not None:
                part.stop()


# ---- the index application --------------------------------------------------------------------------------


class HandleBackend:
    """A task's routes through a handle to its application (the index's path while the proxy has no route to
    that application yet). A call that hit a dying replica is repeated once on another: every call is a pure
    function of (model version, arguments); a second failure is the service's, a 503, never a 500."""

    def __init__(self, task: str, app_name: str) -> None:
        self._task = task
        self._app_name = app_name
        self._handle: DeploymentHandle | None = None

    async def _deployment(self) -> DeploymentHandle:
        if self._handle is None:
            try:
                self._handle = await asyncio.to_thread(
                    serve.get_deployment_handle, deployment_name(self._task), self._app_name
                )
            except Exception as err:  # the application is not deployed (yet)
                logger.warning("task %s: no application %s: %s", self._task, self._app_name, err)
                raise TaskUnavailable(f"task {self._task!r}: not deployed yet; retry later") from None
        return self._handle

    async def _call(self, method: str, *args: Any) -> Any:
        handle = await self._deployment()
        for attempt in (1, 2):
            try:
                return await getattr(handle, method).remote(*args)
            except RayActorError as err:
                logger.warning(
                    "task %s: replica died during a call (attempt %d): %s", self._task, attempt, err
                )
        raise TaskUnavailable(f"task {self._task!r}: no replica answered; retry later")

    async def generate(self, n: int, seed: int) -> dict[str, Any]:
        result: dict[str, Any] = await self._call("generate", n, seed)
        return result

    async def info(self) -> dict[str, Any]:
        result: dict[str, Any] = await self._call("info")
        return result

    async def artifact(self, kind: DownloadKind = "full") -> dict[str, Any]:
        result: dict[str, Any] = await self._call("artifact", kind)
        return result

    async def generate_split(self, cut: int, body: bytes, model_version: str | None) -> dict[str, Any]:
        result: dict[str, Any] = await self._call("generate_split", cut, body, model_version)
        return result


@serve.deployment(name=INDEX_DEPLOYMENT, **INDEX_OPTIONS)
@serve.ingress()
class IndexDeployment:
    """`/`: the OpenAPI document, /healthz, /tasks, /metrics, 404 for unknown tasks (serve.api)."""

    def __init__(
        self,
        task_apps: dict[str, str],
        api_token_sha256: str | None = None,
        max_body_bytes: int = MAX_BODY_BYTES,
        metrics_app: str | None = None,
    ) -> None:
        self._backends: dict[str, TaskBackend] = {
            task: HandleBackend(task, app) for task, app in task_apps.items()
        }
        self._api_token_sha256 = api_token_sha256
        self._max_body_bytes = max_body_bytes
        self._metrics_app = metrics_app
        self._hub: DeploymentHandle | None = None
        self._pusher = MetricsPusher.for_this_replica(metrics_app)

    def __serve_build_asgi_app__(self) -> FastAPI:
        render = self._render_metrics if self._metrics_app is not None else None
        return create_index_api(
            self._backends, self._api_token_sha256, self._max_body_bytes, render_metrics=render
        )

    async def _render_metrics(self) -> bytes:
        try:
            if self._hub is None:
                self._hub = await asyncio.to_thread(
                    serve.get_deployment_handle, METRICS_DEPLOYMENT, self._metrics_app
                )
            body: bytes = await self._hub.render.remote()
            return body
        except Exception as err:  # the hub is not deployed yet, or restarting
            logger.warning("metrics: %s in %s did not answer: %s", METRICS_DEPLOYMENT, self._metrics_app, err)
            self._hub = None
            raise TaskUnavailable(f"metrics: {METRICS_DEPLOYMENT} did not answer; retry later") from None

    def __del__(self) -> None:
        pusher = getattr(self, "_pusher", None)
        if pusher is not None:
            pusher.stop()


# ---- builders: from Python, and the import paths of a Serve config file -----------------------------------


class TaskAppArgs(BaseModel):
    """`args` of `import_path: serve.app:task_application` (one task's application)."""

    model_config = ConfigDict(extra="forbid")

    registry_uri: str = Field(min_length=1, description="Registry root: a local path or a pyarrow.fs URI.")
    task: str = Field(pattern=NAME_PATTERN, description="The task whose `task/<task>` models it serves.")
    metrics_app: str | None = Field(
        default=None, description="Application of the MetricsHub its replicas report to (None: none)."
    )
    poll_seconds: float = Field(
        default=DEFAULT_POLL_SECONDS,
        ge=0,
        description="How often replicas look for a newer version (0: never).",
    )
    pinned_version: str | None = Field(default=None, description="Serve this version and never follow.")


class IndexAppArgs(BaseModel):
    """`args` of `import_path: serve.app:index_application`."""

    model_config = ConfigDict(extra="forbid")

    tasks: dict[str, str] = Field(description="Every served task: the name of the application serving it.")
    metrics_app: str | None = Field(
        default=None,
        description="Application of the MetricsHub that GET /metrics reads (None: this process).",
    )


class MetricsAppArgs(BaseModel):
    """`args` of `import_path: serve.app:metrics_application` (none)."""

    model_config = ConfigDict(extra="forbid")


def build_task_app(
    args: TaskAppArgs, options: Mapping[str, Any] | None = None, api_token: str | None = None
) -> serve.Application:
    """A task's application; `options` are its deployment's Serve options (default: task_deployment_options
    of the default ServingConfig), `api_token` defaults to BAIM_API_TOKEN (see resolve_api_token)."""
    options = dict(options) if options is not None else task_deployment_options(ServingConfig())
    deployment = TaskModelDeployment.options(name=deployment_name(args.task), **options)  # type: ignore[attr-defined]
    return deployment.bind(
        args.registry_uri,
        args.task,
        api_token_sha256=token_sha256(resolve_api_token(api_token)),
        poll_seconds=args.poll_seconds,
        pinned_version=args.pinned_version,
        metrics_app=args.metrics_app,
    )


def build_index_app(args: IndexAppArgs, api_token: str | None = None) -> serve.Application:
    return IndexDeployment.bind(  # type: ignore[attr-defined]
        dict(args.tasks), token_sha256(resolve_api_token(api_token)), metrics_app=args.metrics_app
    )


def task_application(args: TaskAppArgs) -> serve.Application:
    """Config builder (`serve.app:task_application`): deployment options come from the config's
    `deployments` section, the token from BAIM_API_TOKEN where the application is built (the cluster)."""
    return build_task_app(args)


def index_application(args: IndexAppArgs) -> serve.Application:
    """Config builder (`serve.app:index_application`); the token as for task_application."""
    return build_index_app(args)


def metrics_application(args: MetricsAppArgs) -> serve.Application:
    """Config builder (`serve.app:metrics_application`)."""
    return MetricsHub.bind()  # type: ignore[attr-defined,no-any-return]


@dataclass(frozen=True)
class AppSpec:
    """One application to deploy: what a config file's `applications` entry says, typed."""

    name: str
    route_prefix: str | None
    args: TaskAppArgs | IndexAppArgs | MetricsAppArgs
    deployment: str
    options: dict[str, Any]

    @property
    def import_path(self) -> str:
        builder = {
            TaskAppArgs: task_application,
            IndexAppArgs: index_application,
            MetricsAppArgs: metrics_application,
        }
        function = builder[type(self.args)]
        return f"{function.__module__}:{function.__name__}"

    def application(self, api_token: str | None = None) -> serve.Application:
        if isinstance(self.args, TaskAppArgs):
            return build_task_app(self.args, self.options, api_token)
        if isinstance(self.args, IndexAppArgs):
            return build_index_app(self.args, api_token)
        return metrics_application(self.args)

    def run_target(self, api_token: str | None = None) -> serve.RunTarget:
        return serve.RunTarget(
            target=self.application(api_token), name=self.name, route_prefix=self.route_prefix
        )

    def config_entry(self) -> dict[str, Any]:
        """This application as an entry of a Serve config file's `applications`."""
        return {
            "name": self.name,
            "route_prefix": self.route_prefix,
            "import_path": self.import_path,
            "args": self.args.model_dump(mode="json", exclude_defaults=True),
            "deployments": [{"name": self.deployment, **self.options}],
        }


def application_specs(
    registry_uri: str,
    serving_cfg: ServingConfig,
    tasks: Iterable[str],
    *,
    names: AppNames = AppNames(),
    poll_seconds: float = DEFAULT_POLL_SECONDS,
    pinned_versions: Mapping[str, str] | None = None,
    batch_wait_timeout_s: float = DEFAULT_BATCH_WAIT_S,
    autoscaling_overrides: Mapping[str, Any] | None = None,
) -> list[AppSpec]:
    """The metrics hub, one application per task, and the index, in the order they should start."""
    pinned_versions = dict(pinned_versions or {})
    tasks = sorted(set(tasks) | set(pinned_versions))
    options = task_deployment_options(
        serving_cfg, batch_wait_timeout_s=batch_wait_timeout_s, autoscaling_overrides=autoscaling_overrides
    )
    specs = [AppSpec(names.metrics, None, MetricsAppArgs(), METRICS_DEPLOYMENT, dict(METRICS_OPTIONS))]
    for task in tasks:
        args = TaskAppArgs(
            registry_uri=registry_uri,
            task=task,
            metrics_app=names.metrics,
            poll_seconds=poll_seconds,
            pinned_version=pinned_versions.get(task),
        )
        specs.append(
            AppSpec(names.task_app(task), names.task_route(task), args, deployment_name(task), options)
        )
    index_args = IndexAppArgs(tasks={task: names.task_app(task) for task in tasks}, metrics_app=names.metrics)
    specs.append(AppSpec(names.index, names.route_prefix, index_args, INDEX_DEPLOYMENT, dict(INDEX_OPTIONS)))
    return specs


def serve_config(specs: Iterable[AppSpec], serving_cfg: ServingConfig) -> dict[str, Any]:
    """A Serve config file (what `serve build` writes) for `specs`: `serve deploy` / `serve run` apply it.

    Validated with Serve's own schema before it is returned.
    """
    from ray.serve.schema import ServeDeploySchema

    config = {
        "proxy_location": "EveryNode",
        "http_options": {"host": serving_cfg.host, "port": serving_cfg.port},
        "applications": [spec.config_entry() for spec in specs],
    }
    ServeDeploySchema.model_validate(config)
    return config


# ---- deploying and following a registry -------------------------------------------------------------------


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
    """Keeps Serve serving every task model in a registry.

    New versions of a served task need nothing from here (its replicas follow the registry). A new task gets
    its own application (the others are not touched), then the index is redeployed to list it.
    `build_options` go to `application_specs` (poll_seconds, pinned_versions, batch_wait_timeout_s,
    autoscaling_overrides).
    """

    def __init__(
        self,
        registry_uri: str,
        serving_cfg: ServingConfig,
        *,
        app_name: str = DEFAULT_APP_NAME,
        route_prefix: str = "/",
        api_token: str | None = None,
        **build_options: Any,
    ) -> None:
        self.registry_uri = registry_uri
        self.serving_cfg = serving_cfg
        self.names = AppNames(app_name, route_prefix)
        self.api_token = api_token
        self.build_options = build_options
        self.deployed_tasks: list[str] | None = None
        self._registry = Registry(registry_uri)

    def specs(self, tasks: Iterable[str]) -> list[AppSpec]:
        return application_specs(
            self.registry_uri, self.serving_cfg, tasks, names=self.names, **self.build_options
        )

    def poll(self) -> bool:
        """Deploy when the registry's tasks differ from the deployed ones (or on the first call)."""
        tasks = sorted(latest_task_versions(self._registry))
        if tasks == self.deployed_tasks:
            return False
        specs = self.specs(tasks)
        if self.deployed_tasks is None:
            serve.run_many([spec.run_target(self.api_token) for spec in specs])
        else:
            new_apps = {self.names.task_app(task) for task in set(tasks) - set(self.deployed_tasks)}
            # The new tasks' applications first (running before the index lists them), then the index.
            serve.run_many([spec.run_target(self.api_token) for spec in specs if spec.name in new_apps])
            index = specs[-1]
            serve.run(index.application(self.api_token), name=index.name, route_prefix=index.route_prefix)
        logger.info(
            "applications of %s serve tasks %s (was %s)", self.names.index, tasks, self.deployed_tasks
        )
        self.deployed_tasks = tasks
        return True


def serve_registry(
    registry_uri: str,
    serving_cfg: ServingConfig,
    poll_seconds: float = DEFAULT_POLL_SECONDS,
    *,
    stop: threading.Event | None = None,
    app_name: str = DEFAULT_APP_NAME,
    route_prefix: str = "/",
) -> None:
    """Serve every task model of a registry over HTTP, following new versions and new tasks (both polled
    every `poll_seconds`) until `stop` is set.

    The body of `baim serve --registry DIR`. Needs a Ray connection (`ray.init()` first, or Serve starts a
    local one). Blocks; returns when `stop` is set (never, by default), leaving the applications running.
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
