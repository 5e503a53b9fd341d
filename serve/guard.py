"""RequestGuard: the ASGI middleware in front of every ingress route.

It does three things before and around the FastAPI app, in this order:
1. Bearer token: when the ingress has a token, every path but `open_paths` needs `Authorization: Bearer <t>`
   (401 otherwise). Only the token's sha256 is held; the comparison is constant-time.
2. Body limit: a request whose Content-Length, or whose streamed body, exceeds `max_body_bytes` (or the
   larger limit `body_limits` gives paths ending in a suffix, e.g. split generation's activations) gets 413
   before any JSON parsing; the body is read here (bounded) and replayed to the app. A request without a
   body (no Content-Length, or 0, and no Transfer-Encoding) goes straight to the app.
3. Metrics: every response is counted by route template, method and status, and timed
   (`baim_http_requests_total`, `baim_http_request_seconds`, on orchestrator.core.metrics' registry).
   A task application's routes are labelled with their full template (`route_label_prefix`
   "/tasks/{task}" + "/generate"), the same label the index gives them.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from prometheus_client import Counter, Histogram

from orchestrator.core.metrics import METRICS_REGISTRY

logger = logging.getLogger(__name__)

UNMATCHED_ROUTE = "unmatched"

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

HTTP_REQUESTS_TOTAL = Counter(
    "baim_http_requests",
    "HTTP requests served by the ingress, by route template, method and status code.",
    ["route", "method", "status"],
    registry=METRICS_REGISTRY,
)
HTTP_REQUEST_SECONDS = Histogram(
    "baim_http_request_seconds",
    "Seconds from request start to response start at the ingress, by route template.",
    ["route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
    registry=METRICS_REGISTRY,
)


class RequestGuard:
    """ASGI middleware: bearer token, body size limit, request metrics (see the module docstring)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        api_token_sha256: str | None,
        max_body_bytes: int,
        open_paths: tuple[str, ...] = ("/healthz",),
        route_label_prefix: str = "",
        body_limits: tuple[tuple[str, int], ...] = (),
    ) -> None:
        for what, limit in (("max_body_bytes", max_body_bytes), *body_limits):
            if limit <= 0:
                raise ValueError(f"{what}: expected a body limit > 0, received {limit}")
        self.app = app
        self.api_token_sha256 = api_token_sha256
        self.max_body_bytes = max_body_bytes
        self.body_limits = body_limits
        self.open_paths = open_paths
        self.route_label_prefix = route_label_prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status_holder = {"status": 500, "started": False}

        async def send_and_record(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
                status_holder["started"] = True
                HTTP_REQUEST_SECONDS.labels(route=self._route_label(scope)).observe(
                    time.perf_counter() - started
                )
            await send(message)

        try:
            await self._guarded(scope, receive, send_and_record)
        finally:
            HTTP_REQUESTS_TOTAL.labels(
                route=self._route_label(scope),
                method=scope.get("method", ""),
                status=str(status_holder["status"]),
            ).inc()

    def _route_label(self, scope: Scope) -> str:
        label = route_label(scope)
        return label if label == UNMATCHED_ROUTE else self.route_label_prefix + label

    def _limit(self, scope: Scope) -> int:
        path = relative_path(scope)
        return next(
            (limit for suffix, limit in self.body_limits if path.endswith(suffix)), self.max_body_bytes
        )

    async def _guarded(self, scope: Scope, receive: Receive, send: Send) -> None:
        limit = self._limit(scope)
        needs_token = self.api_token_sha256 is not None and relative_path(scope) not in self.open_paths
        if needs_token and not self._authorized(scope):
            detail = "missing or wrong bearer token: send 'Authorization: Bearer <BAIM_API_TOKEN>'"
            await send_json(send, 401, {"detail": detail}, extra_headers=[(b"www-authenticate", b"Bearer")])
            return
        declared = header(scope, b"content-length")
        if declared is not None:
            # isascii too: str.isdigit() accepts "²" (Latin-1 0xB2), which int() then refuses.
            if not (declared.isascii() and declared.isdigit()):
                await send_json(
                    send, 400, {"detail": f"Content-Length: expected an integer, received {declared!r}"}
                )
                return
            if int(declared) > limit:
                await send_json(send, 413, {"detail": too_large(f"{declared} bytes declared", limit)})
                return

        if (declared is None or int(declared) == 0) and header(scope, b"transfer-encoding") is None:
            # No body (RFC 9112, 6.3): nothing to read or bound. Not calling receive() matters under Serve,
            # where each receive() is a call from the replica back to the proxy.
            await self.app(scope, receive, send)
            return

        # Read the whole body here, bounded, then replay it: FastAPI would turn an exception raised while it
        # reads the body into a vague 400, and nothing downstream should ever hold an unbounded body.
        body = bytearray()
        more_body = True
        while more_body:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more_body = bool(message.get("more_body", False))
            if len(body) > limit:
                await send_json(send, 413, {"detail": too_large(f"more than {limit} bytes sent", limit)})
                return

        replayed = False

        async def replay_receive() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay_receive, send)

    def _authorized(self, scope: Scope) -> bool:
        value = header(scope, b"authorization") or ""
        scheme, _, token = value.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return False
        presented = hashlib.sha256(token.strip().encode()).hexdigest()
        assert self.api_token_sha256 is not None
        return hmac.compare_digest(presented, self.api_token_sha256)


def too_large(what: str, limit: int) -> str:
    return f"request body too large: {what}, limit is {limit} bytes"


def header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return bytes(value).decode("latin-1")
    return None


def relative_path(scope: Scope) -> str:
    """The path below the application's route prefix (Serve puts the prefix in root_path)."""
    path = scope.get("path", "")
    root = scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :]
    return path or "/"


def route_label(scope: Scope) -> str:
    """The matched route template (e.g. /tasks/{task}/generate), so task names never become label values."""
    route = scope.get("route")
    return str(getattr(route, "path", UNMATCHED_ROUTE))


async def send_json(
    send: Send, status: int, body: dict[str, Any], extra_headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    payload = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers + (extra_headers or [])})
    await send({"type": "http.response.body", "body": payload})
