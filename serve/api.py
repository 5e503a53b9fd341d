"""The HTTP API: request and response bodies, and the FastAPI apps of the two kinds of ingress.

`create_task_api(task, backend, ...)` is what a task application's replica serves at `/tasks/<task>`
(`POST /generate`, `GET /model`, running the model in the same process). `create_index_api(backends, ...)`
is what the index application serves at `/`: `/healthz`, `/tasks`, `/metrics`, the OpenAPI document, 404
for an unknown task, and the task routes of every task through handles (used only while Serve's proxy has
no route to that task's own application yet). Both register the task routes with `add_task_routes`, so
the two agree on every body, status and header. The contract is docs/http-api.md. No postponed
annotations here: FastAPI reads the route functions' annotations, which name local dependencies.
"""

import asyncio
import hashlib
import secrets
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Protocol

from fastapi import (
    APIRouter,
    Depends,
    FastAPI,
    Header,
    HTTPException,
    Path,
    Query,
    Request,
    Response,
    Security,
)
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBearer
from pydantic import BaseModel, ConfigDict, Field

from orchestrator.core.errors import UnknownTask
from orchestrator.core.metrics import GENERATION_SECONDS, METRICS_CONTENT_TYPE, render_latest
from orchestrator.core.names import DownloadKind
from serve.guard import RequestGuard

API_TOKEN_ENV = "BAIM_API_TOKEN"  # noqa: S105 (the variable name, not a secret)  # nosec B105
MAX_IMAGES_PER_REQUEST = 64
# The largest integer a double holds exactly: OpenAPI documents store bounds as JSON numbers (FastAPI writes
# them as floats, so 2**63 - 1 was published as 2**63), and JavaScript clients read seeds as doubles.
MAX_SEED = 2**53 - 1
MAX_BODY_BYTES = 16 * 1024  # a generate body is ~30 bytes; anything near this is not a real request
SPLIT_PATH = "/generate/split"
MAX_CUT = 1023  # far above any model's decoder stages; an unknown cut below it is a 422 from the model
# A split body holds activations: 64 images of a 64x64 model cut after a late stage are a few MiB.
MAX_SPLIT_BODY_BYTES = 32 * 1024 * 1024
TASK_ROUTE_TEMPLATE = "/tasks/{task}"  # a task application's route prefix, as metrics label it
# Declares the token in the OpenAPI document only; RequestGuard enforces it.
BEARER_SCHEME = HTTPBearer(
    auto_error=False, scheme_name="bearerAuth", description="BAIM_API_TOKEN (when the server sets one)"
)


def token_sha256(api_token: str | None) -> str | None:
    """What an ingress keeps of the bearer token: its sha256 (the token itself is never stored)."""
    return hashlib.sha256(api_token.encode()).hexdigest() if api_token else None


# ---- bodies -------------------------------------------------------------------------------------------


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


class GeneratingModel(BaseModel):
    kind: str = Field(
        description='Artifact kind that generates: "generation_model" (no encoders), "task_model" or '
        '"learner".'
    )
    parameter_count: int = Field(description="Its parameters.")
    sha256: str = Field(description="Its artifact's sha256 (GET /model?kind=generation downloads it).")
    nbytes: int = Field(description="Its download size in bytes.")


class SplitResponse(BaseModel):
    task: str = Field(description="The task the images were generated for.")
    model_version: str = Field(description="The registry version of the task model that ran the tail.")
    cut: int = Field(description="The decoder stage after which the head stopped.")
    images: list[str] = Field(description="One base64-encoded PNG image per row of the head's state.")


class TaskInfo(BaseModel):
    task: str = Field(description="Task name.")
    model_version: str = Field(description="Registry version being served.")
    kind: str = Field(
        description='The full task model\'s artifact kind: "task_model" (decomposed BAIM) or "learner".'
    )
    parameter_count: int = Field(description="Parameters of the full task model.")
    sha256: str = Field(
        description="sha256 of the full task model's artifact (spec + weights), as in the registry."
    )
    generates_with: GeneratingModel = Field(
        description="The model POST /generate runs: the generation-only artifact when the version has one."
    )


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
    "X-Model-Kind": {
        "description": "The download's kind: full (task model) or generation (generation-only artifact).",
        "schema": {"type": "string"},
    },
}


# ---- what the routes call -----------------------------------------------------------------------------


class TaskBackend(Protocol):
    """What runs a task's model: the task replica itself, or a handle to it (the index's fallback).

    `generate` returns {"model_version", "images" (base64 PNGs), "generation_seconds"}; `info` returns
    TaskInfo's fields; `artifact(kind)` returns {"model_version", "sha256", "body", "kind", "artifact_kind"}
    (the download body of kind "full" or "generation"); `generate_split` returns what `generate` does, or
    {"status", "detail"} for a request it refuses.
    """

    async def generate(self, n: int, seed: int) -> dict[str, Any]: ...

    async def info(self) -> dict[str, Any]: ...

    async def artifact(self, kind: DownloadKind = "full") -> dict[str, Any]: ...

    async def generate_split(self, cut: int, body: bytes, model_version: str | None) -> dict[str, Any]: ...


class TaskUnavailable(Exception):  # noqa: N818 (an outcome, like UnknownTask)
    """No replica of a task answered (it died twice, or its application is not deployed): a 503."""


@dataclass(frozen=True)
class ResolvedTask:
    task: str
    backend: TaskBackend


async def _task_unavailable(request: Request, exc: Exception) -> Response:
    return JSONResponse(status_code=503, content={"detail": str(exc)})


def _new_api(
    *, api_token_sha256: str | None, max_body_bytes: int, route_label_prefix: str, **kwargs: Any
) -> FastAPI:
    api = FastAPI(
        title="BAIM task models",
        description="Generate images with decomposed BAIM task models; download them for an edge toolbox.",
        version="1",
        responses=GUARD_RESPONSES,
        **kwargs,
    )
    api.add_middleware(
        RequestGuard,
        api_token_sha256=api_token_sha256,
        max_body_bytes=max_body_bytes,
        open_paths=("/healthz",),
        route_label_prefix=route_label_prefix,
        body_limits=((SPLIT_PATH, max(max_body_bytes, MAX_SPLIT_BODY_BYTES)),),
    )
    api.add_exception_handler(TaskUnavailable, _task_unavailable)
    return api


def _auth(api_token_sha256: str | None) -> tuple[list[Any], dict[int | str, dict[str, Any]]]:
    # RequestGuard enforces the token; this dependency only declares the bearer scheme in the OpenAPI
    # document (auto_error=False: it never rejects anything itself).
    if api_token_sha256 is None:
        return [], {}
    return [Security(BEARER_SCHEME)], AUTH_RESPONSES


def add_task_routes(
    router: APIRouter | FastAPI,
    *,
    prefix: str,
    resolve: Callable[..., ResolvedTask],
    api_token_sha256: str | None,
) -> None:
    """POST `{prefix}/generate` and GET `{prefix}/model`; `resolve` is the FastAPI dependency that names
    the task and its backend (the path parameter in the index, a constant in a task application)."""
    auth_dependencies, auth_responses = _auth(api_token_sha256)

    @router.post(
        f"{prefix}/generate",
        response_model=GenerateResponse,
        dependencies=auth_dependencies,
        responses={**auth_responses, **TASK_RESPONSES},
    )
    async def generate(
        body: GenerateRequest, target: Annotated[ResolvedTask, Depends(resolve)]
    ) -> GenerateResponse:
        seed = body.seed if body.seed is not None else secrets.randbelow(2**32)
        result = await target.backend.generate(body.n, seed)
        GENERATION_SECONDS.labels(task=target.task).observe(result["generation_seconds"])
        return GenerateResponse(
            task=target.task, model_version=result["model_version"], seed=seed, images=result["images"]
        )

    @router.post(
        f"{prefix}{SPLIT_PATH}",
        response_model=SplitResponse,
        dependencies=auth_dependencies,
        openapi_extra={
            "requestBody": {
                "required": True,
                "description": "The head's state (baim.split.generate_head) as safetensors bytes",
                "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
            }
        },
        responses={
            **auth_responses,
            **TASK_RESPONSES,
            409: error_response("model_version names another version than the one served"),
        },
    )
    async def generate_split(
        request: Request,
        target: Annotated[ResolvedTask, Depends(resolve)],
        cut: int = Query(ge=0, le=MAX_CUT, description="The decoder stage after which the head stopped."),
        model_version: str | None = Query(
            default=None, max_length=200, description="The version the head ran (409 if another is served)."
        ),
    ) -> SplitResponse:
        result = await target.backend.generate_split(cut, await request.body(), model_version)
        if "status" in result:
            raise HTTPException(status_code=result["status"], detail=result["detail"])
        GENERATION_SECONDS.labels(task=target.task).observe(result["generation_seconds"])
        return SplitResponse(
            task=target.task, model_version=result["model_version"], cut=cut, images=result["images"]
        )

    @router.get(
        f"{prefix}/model",
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
        target: Annotated[ResolvedTask, Depends(resolve)],
        kind: Annotated[
            DownloadKind,
            Query(
                description="full: the task model (reconstruction, personalisation); generation: the "
                "generation-only artifact (no encoders; the full model when the version has none)."
            ),
        ] = "full",
        if_none_match: str | None = Header(
            default=None, description='"<sha256>" of a cached copy: 304 (empty body) if it is still current'
        ),
    ) -> Response:
        cached = (if_none_match or "").strip('"')
        artifact = await target.backend.artifact(kind)
        # The sha256 is public (GET /tasks lists it): a plain comparison. hmac.compare_digest raised
        # TypeError on a non-ASCII header value, a 500 (found by tests/integration/test_openapi_fuzz.py).
        headers = model_headers(target.task, artifact["model_version"], artifact["sha256"], artifact["kind"])
        if cached and cached == artifact["sha256"]:
            return Response(status_code=304, headers=headers)
        return Response(content=artifact["body"], media_type="application/octet-stream", headers=headers)


def model_headers(task: str, model_version: str, sha256: str, kind: str = "full") -> dict[str, str]:
    return {
        "ETag": f'"{sha256}"',
        "X-Task": task,
        "X-Model-Version": model_version,
        "X-Model-Sha256": sha256,
        "X-Model-Kind": kind,
    }


# ---- the two apps -------------------------------------------------------------------------------------


def create_task_api(
    task: str, backend: TaskBackend, api_token_sha256: str | None, max_body_bytes: int = MAX_BODY_BYTES
) -> FastAPI:
    """A task application's HTTP app, below its route prefix `/tasks/<task>`: `/generate` and `/model`.

    No OpenAPI document of its own: the index serves the one document, which these routes answer to.
    """
    api = _new_api(
        api_token_sha256=api_token_sha256,
        max_body_bytes=max_body_bytes,
        route_label_prefix=TASK_ROUTE_TEMPLATE,
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
    )
    resolved = ResolvedTask(task, backend)
    add_task_routes(api, prefix="", resolve=lambda: resolved, api_token_sha256=api_token_sha256)
    return api


def create_index_api(
    backends: Mapping[str, TaskBackend],
    api_token_sha256: str | None,
    max_body_bytes: int = MAX_BODY_BYTES,
    *,
    render_metrics: Callable[[], Awaitable[bytes]] | None = None,
) -> FastAPI:
    """The index application's HTTP app (the OpenAPI document, `/healthz`, `/tasks`, `/metrics`, 404s).

    `render_metrics` gives the `/metrics` body (every replica's metrics, summed; it may raise
    TaskUnavailable); None: this process's own.
    """
    api = _new_api(api_token_sha256=api_token_sha256, max_body_bytes=max_body_bytes, route_label_prefix="")
    auth_dependencies, auth_responses = _auth(api_token_sha256)
    # The served tasks as the path parameter's examples: documentation, and what schemathesis tries first.
    task_examples = sorted(backends) or None

    def resolve(
        task: str = Path(description="A served task (GET /tasks lists them).", examples=task_examples),
    ) -> ResolvedTask:
        if task not in backends:
            raise HTTPException(status_code=404, detail=str(UnknownTask(task, sorted(backends))))
        return ResolvedTask(task, backends[task])

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
        infos = await asyncio.gather(*(backends[task].info() for task in sorted(backends)))
        return TasksResponse(tasks=[TaskInfo(**info) for info in infos])

    add_task_routes(api, prefix=TASK_ROUTE_TEMPLATE, resolve=resolve, api_token_sha256=api_token_sha256)

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
        body = render_latest() if render_metrics is None else await render_metrics()
        return Response(content=body, media_type=METRICS_CONTENT_TYPE)

    return api
