"""The HTTP layer: the Open Inference Protocol (KServe v2) routes over a ``TeacherService``.

Routes only translate HTTP. The infer route checks, in order: the request-body budget (503),
the model name and version (404), the Content-Encoding (415), the body size (413); then
``TeacherService.handle`` decodes, validates and answers. Every refusal is an exception, and the
exception handlers below map each kind to its status, its ``kd_errors`` label and its
``Retry-After``.

Statuses: 400 malformed body, 401 missing or wrong token, 404 unknown model, 413 body or batch
too large, 415 a compressed body (Content-Encoding), 422 a well-formed request the model cannot
take (shape, dtype, NaN, duplicate ids), 503 queue full or not ready (with ``Retry-After``), 507
cache disk full. Every error body is ``{"error": "..."}``, as KServe clients expect.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import PlainTextResponse, Response
from prometheus_client import Counter
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import __version__
from .batcher import BodyBudget, QueueFull
from .protocol import HEADER_LENGTH, ProtocolError, error_body
from .runtime import ServiceUnavailable, TeacherService
from .signature import AUTH_RESPONSES, HEALTH_READY_RESPONSES, METADATA_RESPONSES, READY_RESPONSES, RESPONSES, request_openapi
from .store import StoreError

log = logging.getLogger("teacher-serve")

HEALTH_PREFIX = "/v2/health/"
INFER_ROUTE = "infer"
RETRY_AFTER_S = "1"
STORE_RETRY_AFTER_S = "5"
PROTOCOL_ERROR_KINDS = {400: "bad_request", 413: "too_large", 415: "bad_request", 422: "invalid"}


class ModelNotFound(Exception):
    """A model name or version this server does not serve (404)."""


class ServerBusy(Exception):
    """The request bodies held at once are at their limit (503)."""


class InternalError(Exception):
    """An inference that failed for a reason no refusal describes (500), already logged."""


@dataclass(frozen=True)
class Refusal:
    status: int
    kind: str | None  # the kd_errors label; None: not counted as an error
    message: str
    retry_after: str | None = None


# Each refusal's status, kd_errors label and Retry-After, by exception.
REFUSALS: dict[type[Exception], Callable[[Any], Refusal]] = {
    ModelNotFound: lambda exc: Refusal(404, None, str(exc)),
    ServerBusy: lambda exc: Refusal(503, "busy", str(exc), RETRY_AFTER_S),
    ProtocolError: lambda exc: Refusal(exc.status, PROTOCOL_ERROR_KINDS.get(exc.status, "too_large"), exc.message),
    QueueFull: lambda exc: Refusal(503, "queue_full", f"{exc}; retry later", RETRY_AFTER_S),
    ServiceUnavailable: lambda exc: Refusal(503, "not_ready", str(exc), RETRY_AFTER_S),
    StoreError: lambda exc: Refusal(
        exc.status, "disk_full" if exc.status == 507 else "store", str(exc), STORE_RETRY_AFTER_S if exc.status in (503, 507) else None
    ),
    InternalError: lambda exc: Refusal(500, "internal", str(exc)),
}


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return Response(error_body(message), status_code=status, media_type="application/json", headers=headers)


def _is_infer(scope: dict) -> bool:
    route = scope.get("route")  # set by the router once a route matched
    return route is not None and getattr(route, "name", None) == INFER_ROUTE


class BearerAuth:
    """Pure ASGI middleware: every route but the health routes needs ``Authorization: Bearer``
    with the token, compared in constant time. The token never reaches a log."""

    def __init__(self, app: Callable[..., Awaitable[None]], token: str) -> None:
        self.app = app
        self.expected = f"Bearer {token}".encode()

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope["path"].startswith(HEALTH_PREFIX):
            await self.app(scope, receive, send)
            return
        given = next((value for key, value in scope["headers"] if key == b"authorization"), b"")
        if not hmac.compare_digest(given, self.expected):
            response = _error(401, "missing or wrong bearer token (send 'Authorization: Bearer <token>')", {"WWW-Authenticate": "Bearer"})
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


class CountAnswers:
    """Pure ASGI middleware: ``kd_requests`` counts every answer of the infer routes by status,
    whether the route wrote it or an exception handler did."""

    def __init__(self, app: Callable[..., Awaitable[None]], requests: Counter) -> None:
        self.app = app
        self.requests = requests

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def counted(message: dict) -> None:
            if message["type"] == "http.response.start" and _is_infer(scope):
                self.requests.labels(status=str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counted)


def create_app(service: TeacherService) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    app = FastAPI(title="teacher-serve", version=__version__, lifespan=lifespan)
    app.state.service = service
    settings = service.settings
    metrics = service.metrics
    bodies = BodyBudget(settings.max_inflight_bytes)
    if service.api_key:
        app.add_middleware(BearerAuth, token=service.api_key)
    app.add_middleware(CountAnswers, requests=metrics.requests)

    # -- errors -----------------------------------------------------------------------------
    async def refuse(request: Request, exc: Exception) -> Response:
        refusal = next(REFUSALS[kind] for kind in type(exc).__mro__ if kind in REFUSALS)(exc)
        if refusal.kind is not None:
            metrics.errors.labels(kind=refusal.kind).inc()
        return _error(refusal.status, refusal.message, {"Retry-After": refusal.retry_after} if refusal.retry_after else None)

    for refused in REFUSALS:
        app.add_exception_handler(refused, refuse)

    # Other routes: Starlette's outermost handler, which answers and then re-raises for the server's log.
    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> Response:
        if _is_infer(request.scope):
            metrics.errors.labels(kind="internal").inc()
            metrics.requests.labels(status="500").inc()  # CountAnswers, inside, never sees this answer
        return _error(500, f"internal error: {type(exc).__name__}: {exc}")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        # 405 carries Allow (the route's methods), which RFC 9110 requires of it.
        return _error(exc.status_code, str(exc.detail), exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return _error(422, f"{where}: {first.get('msg', 'invalid request')}")

    def check_model(name: str, version: str | None = None) -> None:
        if name != settings.model_name:
            raise ModelNotFound(f"unknown model {name!r}; this server serves {settings.model_name!r}")
        if version not in (None, "", "1"):
            raise ModelNotFound(f"unknown version {version!r} of model {name!r}; it has version '1'")

    # -- routes -----------------------------------------------------------------------------
    # Each versioned route has its own function: one function under both paths would give the
    # unversioned one a ``version`` query parameter, which the protocol does not have.
    @app.get("/v2/health/live")
    async def live() -> dict[str, bool]:
        return {"live": True}

    @app.get("/v2/health/ready", responses=HEALTH_READY_RESPONSES)
    async def ready() -> Response:
        if service.ready:
            return Response(b'{"ready":true}', media_type="application/json")
        return Response(b'{"ready":false}', status_code=503, media_type="application/json", headers={"Retry-After": RETRY_AFTER_S})

    @app.get("/v2", responses=AUTH_RESPONSES)
    async def server_metadata() -> dict[str, Any]:
        return {"name": "teacher-serve", "version": __version__, "extensions": ["binary_tensor_data"]}

    @app.get("/v2/models/{name}", responses=METADATA_RESPONSES)
    async def model_metadata(name: str) -> Any:
        check_model(name)
        return service.model_metadata()

    @app.get("/v2/models/{name}/versions/{version}", responses=METADATA_RESPONSES)
    async def model_version_metadata(name: str, version: str) -> Any:
        check_model(name, version)
        return service.model_metadata()

    @app.get("/v2/models/{name}/ready", responses=READY_RESPONSES)
    async def model_ready(name: str) -> Response:
        check_model(name)
        return await ready()

    @app.get("/v2/models/{name}/versions/{version}/ready", responses=READY_RESPONSES)
    async def model_version_ready(name: str, version: str) -> Response:
        check_model(name, version)
        return await ready()

    def declared_length(request: Request) -> int | None:
        """The Content-Length, when it is a plain decimal number."""
        declared = request.headers.get("content-length")
        # isascii: str.isdigit also takes "\xb2" (superscript two), which int() refuses (a 500
        # before, in process; uvicorn's parsers refuse such a Content-Length themselves).
        return int(declared) if declared is not None and declared.isascii() and declared.isdigit() else None

    def body_bytes(request: Request) -> int:
        """What the request's body will hold: its Content-Length, or the largest body allowed
        when it is sent in chunks; 0 when it is over the limit (answered 413 without reading)."""
        declared = declared_length(request)
        if declared is not None:
            return declared if declared <= settings.max_body_bytes else 0
        return settings.max_body_bytes

    async def read_body(request: Request) -> bytes:
        # The body is read as sent: a compressed one would only fail later as "not valid JSON",
        # and a plain body labelled gzip would be taken as if the label were not there.
        encoding = request.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise ProtocolError(415, None, f"Content-Encoding {encoding!r} is not supported; send the body uncompressed")
        declared, limit = declared_length(request), settings.max_body_bytes
        if declared is not None and declared > limit:
            raise ProtocolError(413, None, f"request body is {declared} bytes; the limit is {limit} (--max-body-mb)")
        chunks, total = [], 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit:
                raise ProtocolError(413, None, f"request body exceeds {limit} bytes (--max-body-mb)")
            chunks.append(chunk)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def infer(request: Request, name: str, version: str | None) -> Response:
        held = body_bytes(request)
        if not bodies.take(held):
            # The body is read and dropped piece by piece, so that the client reads this answer
            # rather than a connection reset in the middle of its upload.
            async for _ in request.stream():
                pass
            raise ServerBusy(
                f"the server holds {bodies.held >> 20} MiB of request bodies (--max-inflight-mb {settings.max_inflight_mb:g}); retry later"
            )
        service.batcher.enter()  # until it leaves, a forming batch may wait for this request's samples
        try:
            check_model(name, version)
            payload, headers = await service.handle(await read_body(request), request.headers.get(HEADER_LENGTH))
        except tuple(REFUSALS):
            raise
        except Exception as exc:  # a 500 with a message, logged here with its traceback; the server keeps serving
            log.exception("inference failed")
            raise InternalError(f"internal error: {type(exc).__name__}: {exc}") from None
        finally:
            service.batcher.leave()
            bodies.give(held)
        return Response(payload, headers=headers)

    request_body = request_openapi()

    @app.post("/v2/models/{name}/infer", name=INFER_ROUTE, responses=RESPONSES, openapi_extra=request_body)
    async def model_infer(name: str, request: Request) -> Response:
        return await infer(request, name, None)

    @app.post("/v2/models/{name}/versions/{version}/infer", name=INFER_ROUTE, responses=RESPONSES, openapi_extra=request_body)
    async def model_version_infer(name: str, version: str, request: Request) -> Response:
        return await infer(request, name, version)

    @app.get("/metrics", response_class=PlainTextResponse, responses=AUTH_RESPONSES)  # documented as text/plain, what Prometheus reads
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    return app
