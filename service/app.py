"""The HTTP layer: Open Inference Protocol (KServe v2) routes over the batcher and the cache.

Routes only translate HTTP: ``service.protocol`` decodes and validates, the cache store answers
hits, the batcher runs misses through the teacher, and the answer is encoded back. Nothing here
touches HDF5 or the model directly.

Statuses: 400 malformed body, 401 missing or wrong token, 404 unknown model, 413 body or batch
too large, 415 a compressed body (Content-Encoding), 422 a well-formed request the model cannot
take (shape, dtype, NaN, duplicate ids), 503 queue full or not ready (with ``Retry-After``), 507
cache disk full. Every error body is
``{"error": "..."}``, as KServe clients expect.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import PlainTextResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..offline.cache import content_ids
from . import __version__
from .batcher import Batcher, BodyBudget, QueueFull
from .metrics import Metrics
from .protocol import DecodedRequest, ModelSpec, ProtocolError, datatype_of, decode_request, encode_response, error_body, validate
from .settings import ServeSettings
from .store import CacheStore, StoreError

log = logging.getLogger("teacher-serve")

HEALTH_PREFIX = "/v2/health/"
HEADER_LENGTH = "inference-header-content-length"
# Below these sizes decoding and hashing are cheaper than a hop to the thread pool.
INLINE_BODY_BYTES = 256 << 10
RETRY_AFTER_S = "1"

# OpenAPI for the infer routes. They read the raw body (the binary extension needs the bytes as
# sent), so FastAPI sees no body parameter; this spells the v2 request out for /docs and for
# schema-driven fuzzers (tests/test_fuzz.py runs schemathesis over it).
_DATATYPES = ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64", "BYTES"]
_JSON_ELEMENT = {"oneOf": [{"type": "number"}, {"type": "boolean"}, {"type": "string"}]}
_TENSOR_DATA = {
    "type": "array",
    "description": "the elements, row-major: flat or nested as the shape; BYTES elements are strings",
    "items": {"oneOf": [_JSON_ELEMENT, {"type": "array", "items": {}}]},
}
_REQUEST_INPUT = {
    "type": "object",
    "required": ["name", "shape", "datatype"],
    "properties": {
        "name": {"type": "string", "description": "input (required), id or label", "examples": ["input", "id", "label"]},
        "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
        "datatype": {"type": "string", "enum": _DATATYPES},
        "data": _TENSOR_DATA,
        "parameters": {
            "type": "object",
            "properties": {
                "binary_data_size": {
                    "type": "integer",
                    "minimum": 0,
                    "description": "the tensor's bytes follow the JSON (binary extension) instead of 'data'",
                }
            },
        },
    },
}
_INFER_REQUEST = {
    "type": "object",
    "required": ["inputs"],
    "properties": {
        "id": {"type": "string"},
        "parameters": {
            "type": "object",
            "properties": {
                "temperature": {"type": "number", "exclusiveMinimum": 0, "description": "softmax temperature of soft_targets"},
                "store": {"type": "boolean", "description": "append the samples to the cache (default true)"},
                "binary_data_output": {"type": "boolean"},
            },
        },
        "inputs": {"type": "array", "items": _REQUEST_INPUT},
        "outputs": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name"],
                "properties": {
                    "name": {"type": "string", "enum": ["soft_targets", "logits"]},
                    "parameters": {"type": "object", "properties": {"binary_data": {"type": "boolean"}}},
                },
            },
        },
    },
    "example": {"id": "r1", "inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [0.0, 0.5, 1.0, 0.25]}]},
}
_INFER_RESPONSE = {
    "type": "object",
    "required": ["model_name", "outputs"],
    "properties": {
        "model_name": {"type": "string"},
        "model_version": {"type": "string"},
        "id": {"type": "string"},
        "parameters": {"type": "object"},
        "outputs": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name", "datatype", "shape"],
                "properties": {
                    "name": {"type": "string"},
                    "datatype": {"type": "string"},
                    "shape": {"type": "array", "items": {"type": "integer"}},
                    "data": {"type": "array"},
                    "parameters": {"type": "object"},
                },
            },
        },
    },
}
_ERROR = {
    "content": {"application/json": {"schema": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}}}}
}
INFER_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "soft targets and logits; application/octet-stream when any output is binary",
        "content": {
            "application/json": {"schema": _INFER_RESPONSE},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    },
    **{
        status: {"description": description, **_ERROR}
        for status, description in (
            (400, "malformed request"),
            (401, "missing or wrong bearer token"),
            (404, "unknown model or version"),
            (413, "body or batch too large"),
            (415, "a Content-Encoding other than identity"),
            (422, "a request the model cannot take"),
            (503, "queue full or not ready (Retry-After)"),
            (507, "cache disk full (Retry-After)"),
        )
    },
}
INFER_OPENAPI: dict[str, Any] = {
    "parameters": [
        {
            "name": "Inference-Header-Content-Length",
            "in": "header",
            "required": False,
            "schema": {"type": "integer", "minimum": 0},
            "description": "length of the JSON part when binary tensors follow it",
        }
    ],
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": _INFER_REQUEST},
            "application/octet-stream": {
                "schema": {"type": "string", "format": "binary"},
                "description": "binary tensor extension: the JSON request, then the tensors' bytes",
            },
        },
    },
}


def soft_targets(logits: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(logits / T) per row, in float32."""
    # Shift, then scale: softmax is shift-invariant, and a tiny temperature then sends the other
    # logits to -inf (exp 0) where logits / T overflowed and inf - inf made NaN soft targets, sent
    # as NaN literals, which are not JSON (found by tests/test_fuzz.py).
    z = logits - logits.max(axis=1, keepdims=True)
    with np.errstate(over="ignore"):
        z /= np.float32(temperature)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z


class TeacherService:
    """Everything one running service holds: the teacher, its batcher, the cache, metrics."""

    def __init__(self, settings: ServeSettings, teacher: Any, store: CacheStore, api_key: str | None = None) -> None:
        self.settings = settings
        self.teacher = teacher
        self.store = store
        self.api_key = api_key
        self.metrics = Metrics()
        self.metrics.cache_samples.set(store.num_samples)
        store_metrics = self.metrics

        def on_write(samples: int, stored: int, seconds: float) -> None:
            store_metrics.write_seconds.observe(seconds)
            store_metrics.stored.inc(stored)
            store_metrics.cache_samples.set(store.num_samples)

        store._on_write = on_write
        self.batcher = Batcher(
            teacher.forward,
            store=store,
            max_batch=settings.max_batch,
            max_delay_s=settings.max_delay_ms / 1000,
            max_queue_bytes=settings.max_queue_bytes,
            logits_dtype=settings.logits_dtype,
            metrics=self.metrics,
        )
        contract = teacher.contract
        self.spec = ModelSpec(
            input_shape=tuple(contract.input_shape),
            input_dtype=contract.input_dtype,
            num_classes=teacher.num_classes,
            temperature=settings.temperature,
            max_samples=max(
                1, settings.max_queue_bytes // max(1, int(np.prod(contract.input_shape)) * np.dtype(contract.input_dtype).itemsize)
            ),
            fixed_temperature=teacher.ensemble == "arithmetic",
        )
        self.ready = False
        self._warmup: asyncio.Task | None = None

    async def start(self) -> None:
        self.batcher.start()
        self._warmup = asyncio.get_running_loop().create_task(self._warm_up())

    async def _warm_up(self) -> None:
        try:
            await self.batcher.run_in_worker(self.teacher.warmup, self.settings.max_batch)
        except Exception:
            log.exception("teacher warm-up failed; the service stays not ready")
            return
        self.ready = True
        log.info("ready: model %r, %d samples in the cache", self.settings.model_name, self.store.num_samples)

    async def stop(self) -> None:
        self.ready = False
        if self._warmup is not None and not self._warmup.done():
            await asyncio.gather(self._warmup, return_exceptions=True)
        await self.batcher.stop()
        await run_in_threadpool(self.store.close)
        log.info("stopped: cache %s holds %d samples, all published", self.store.directory, self.store.num_samples)

    # -- metadata ---------------------------------------------------------------------------
    def model_metadata(self) -> dict[str, Any]:
        shape = [-1, *self.spec.input_shape]
        classes = self.spec.num_classes
        return {
            "name": self.settings.model_name,
            "versions": ["1"],
            "platform": "pytorch",
            "inputs": [
                {"name": "input", "datatype": datatype_of(np.dtype(self.spec.input_dtype)), "shape": shape},
                {"name": "id", "datatype": "BYTES", "shape": [-1], "optional": True},
                {"name": "label", "datatype": "INT64", "shape": [-1], "optional": True},
            ],
            "outputs": [
                {"name": "soft_targets", "datatype": "FP32", "shape": [-1, classes]},
                {"name": "logits", "datatype": "FP32", "shape": [-1, classes]},
            ],
            "parameters": {
                "temperature": self.settings.temperature,
                "ack": self.settings.ack,
                "max_batch": self.settings.max_batch,
                "cache_samples": self.store.num_samples,
                "teacher": self.teacher.describe(),
            },
        }

    # -- inference --------------------------------------------------------------------------
    async def infer(self, body: bytes, header_length: int | None) -> tuple[bytes, dict[str, str]]:
        if len(body) > INLINE_BODY_BYTES:
            decoded = await run_in_threadpool(decode_request, body, header_length)
        else:
            decoded = decode_request(body, header_length)
        return await self._infer(decoded)

    async def _infer(self, decoded: DecodedRequest) -> tuple[bytes, dict[str, str]]:
        batch = validate(decoded, self.spec)
        if not self.ready:
            raise ServiceUnavailable("the teacher is still warming up")
        n = len(batch.inputs)
        ids = batch.ids
        if ids is None:
            ids = (
                await run_in_threadpool(content_ids, batch.inputs) if batch.inputs.nbytes > INLINE_BODY_BYTES else content_ids(batch.inputs)
            )
        labels = batch.labels if batch.labels is not None else np.full(n, -1, dtype=np.int64)

        if self.store.known(ids):
            rows, hit_logits = await asyncio.wrap_future(self.store.lookup(ids))
        else:
            rows, hit_logits = np.full(n, -1, dtype=np.int64), None
        miss = rows < 0
        misses = int(miss.sum())
        logits = np.empty((n, self.spec.num_classes), dtype=np.float32)
        if misses < n:
            logits[~miss] = hit_logits
        if misses:
            if misses == n:
                jobs = self.batcher.submit(batch.inputs, ids, labels, batch.store)
            else:
                jobs = self.batcher.submit(batch.inputs[miss], ids[miss], labels[miss], batch.store)
            results = await asyncio.gather(*(job.future for job in jobs))
            logits[miss] = results[0].logits if len(results) == 1 else np.concatenate([r.logits for r in results])
            writes = {id(r.write): r.write for r in results if r.write is not None}
            if writes:
                if self.settings.ack == "durable":
                    await asyncio.gather(*(asyncio.wrap_future(w) for w in writes.values()))
                else:
                    for write in writes.values():
                        write.add_done_callback(self._log_buffered_failure)
        self.metrics.samples.inc(n)
        self.metrics.cache_hits.inc(n - misses)
        self.metrics.cache_misses.inc(misses)

        outputs = []
        for requested in batch.outputs:
            values = soft_targets(logits, batch.temperature) if requested.name == "soft_targets" else logits
            outputs.append((requested.name, values, requested.binary))
        parameters = {"cache_hits": n - misses, "cache_misses": misses, "temperature": batch.temperature, "stored": batch.store}
        return encode_response(self.settings.model_name, decoded.id, parameters, outputs)

    def _log_buffered_failure(self, write: Any) -> None:
        if write.exception() is not None:
            self.metrics.errors.labels(kind="buffered_write").inc()
            log.error("a buffered write was lost: %s", write.exception())


class ServiceUnavailable(Exception):
    pass


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return Response(error_body(message), status_code=status, media_type="application/json", headers=headers)


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
    if service.api_key:
        app.add_middleware(BearerAuth, token=service.api_key)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return _error(422, f"{where}: {first.get('msg', 'invalid request')}")

    def check_model(name: str, version: str | None = None) -> Response | None:
        if name != settings.model_name:
            return _error(404, f"unknown model {name!r}; this server serves {settings.model_name!r}")
        if version not in (None, "", "1"):
            return _error(404, f"unknown version {version!r} of model {name!r}; it has version '1'")
        return None

    @app.get("/v2/health/live")
    async def live() -> dict[str, bool]:
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready() -> Response:
        if service.ready:
            return Response(b'{"ready":true}', media_type="application/json")
        return Response(b'{"ready":false}', status_code=503, media_type="application/json", headers={"Retry-After": RETRY_AFTER_S})

    @app.get("/v2")
    async def server_metadata() -> dict[str, Any]:
        return {"name": "teacher-serve", "version": __version__, "extensions": ["binary_tensor_data"]}

    @app.get("/v2/models/{name}")
    @app.get("/v2/models/{name}/versions/{version}")
    async def model_metadata(name: str, version: str | None = None) -> Any:
        return check_model(name, version) or service.model_metadata()

    @app.get("/v2/models/{name}/ready")
    @app.get("/v2/models/{name}/versions/{version}/ready")
    async def model_ready(name: str, version: str | None = None) -> Response:
        problem = check_model(name, version)
        if problem is not None:
            return problem
        return await ready()

    @app.post("/v2/models/{name}/infer", responses=INFER_RESPONSES, openapi_extra=INFER_OPENAPI)
    @app.post("/v2/models/{name}/versions/{version}/infer", responses=INFER_RESPONSES, openapi_extra=INFER_OPENAPI)
    async def infer(name: str, request: Request, version: str | None = None) -> Response:
        held = body_bytes(request)
        if not bodies.take(held):
            response = await refuse_busy(request)
        else:
            try:
                response = await _infer(name, version, request)
            finally:
                bodies.give(held)
        metrics.requests.labels(status=str(response.status_code)).inc()
        return response

    bodies = BodyBudget(settings.max_inflight_bytes)

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

    async def refuse_busy(request: Request) -> Response:
        # The body is read and dropped piece by piece, so that the client reads this answer
        # rather than a connection reset in the middle of its upload.
        async for _ in request.stream():
            pass
        metrics.errors.labels(kind="busy").inc()
        message = f"the server holds {bodies.held >> 20} MiB of request bodies (--max-inflight-mb {settings.max_inflight_mb:g}); retry later"
        return _error(503, message, {"Retry-After": RETRY_AFTER_S})

    async def _infer(name: str, version: str | None, request: Request) -> Response:
        problem = check_model(name, version)
        if problem is not None:
            return problem
        # The body is read as sent: a compressed one would only fail later as "not valid JSON",
        # and a plain body labelled gzip would be taken as if the label were not there.
        encoding = request.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            metrics.errors.labels(kind="bad_request").inc()
            return _error(415, f"Content-Encoding {encoding!r} is not supported; send the body uncompressed")
        declared = declared_length(request)
        limit = settings.max_body_bytes
        if declared is not None and declared > limit:
            metrics.errors.labels(kind="too_large").inc()
            return _error(413, f"request body is {declared} bytes; the limit is {limit} (--max-body-mb)")
        chunks, total = [], 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit:
                metrics.errors.labels(kind="too_large").inc()
                return _error(413, f"request body exceeds {limit} bytes (--max-body-mb)")
            chunks.append(chunk)
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        raw_length = request.headers.get(HEADER_LENGTH)
        header_length: int | None = None
        if raw_length is not None:
            try:
                header_length = int(raw_length)
            except ValueError:
                metrics.errors.labels(kind="bad_request").inc()
                return _error(400, f"Inference-Header-Content-Length: {raw_length!r} is not an integer")
        try:
            payload, headers = await service.infer(body, header_length)
        except ProtocolError as exc:
            metrics.errors.labels(kind="invalid" if exc.status == 422 else "bad_request" if exc.status == 400 else "too_large").inc()
            return _error(exc.status, exc.message)
        except QueueFull as exc:
            metrics.errors.labels(kind="queue_full").inc()
            return _error(503, f"{exc}; retry later", {"Retry-After": RETRY_AFTER_S})
        except ServiceUnavailable as exc:
            metrics.errors.labels(kind="not_ready").inc()
            return _error(503, str(exc), {"Retry-After": RETRY_AFTER_S})
        except StoreError as exc:
            metrics.errors.labels(kind="disk_full" if exc.status == 507 else "store").inc()
            headers = {"Retry-After": "5"} if exc.status in (503, 507) else None
            return _error(exc.status, str(exc), headers)
        except Exception as exc:  # noqa: BLE001 - a 500 with a message, logged with its traceback
            log.exception("inference failed")
            metrics.errors.labels(kind="internal").inc()
            return _error(500, f"internal error: {type(exc).__name__}: {exc}")
        return Response(payload, headers=headers)

    @app.get("/metrics", response_class=PlainTextResponse)  # documented as text/plain, what Prometheus reads
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    return app
