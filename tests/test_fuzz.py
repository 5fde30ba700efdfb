"""Fuzzing the service: schemathesis over its OpenAPI spec, and malformed binary bodies.

Two kinds of fuzzer, each against the real app with the real digits teacher and a real cache:

* **schemathesis** generates requests for every route from ``/openapi.json`` (positive and
  negative data; the infer routes carry a v2 request body schema), with the bearer token and
  without it. No answer may be a 5xx, and answers must match the documented responses.
* **mutations**: hypothesis draws a valid request (binary like tritonclient sends it, or JSON),
  then breaks it one way: a wrong ``Inference-Header-Content-Length``, a ``binary_data_size``
  that does not match the bytes, a truncated or extended body, a huge or odd shape, an unknown
  or mismatched datatype, flipped bytes in the JSON header, a field replaced by random JSON, a
  duplicate input, an empty body, a Content-Encoding the body does not have, a garbage
  Content-Length. The expected status of each request comes from the codec itself (an oracle
  that mirrors the route: 415, 413, 400, then ``decode_request`` + ``validate``); a mutation that
  happens to leave the request valid is discarded, so every request sent must be refused, with
  that status, never a 5xx and never a hang. Afterwards the teacher never ran, the cache holds
  no samples, and the journal is empty.

Each test has a CI size (``CI_EXAMPLES``, derandomized) and a soak twin marked ``soak``
(``pytest -m soak``) whose size is ``KD_FUZZ_EXAMPLES`` (default 2000), randomized.
``python -m bench.fuzz`` runs the same mutation families and schemathesis against a real
``teacher-serve`` over HTTP; it imports this module for them.
"""

from __future__ import annotations

import asyncio
import copy
import gzip
import json
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from kdcache.offline.cache import CacheReader
from kdcache.offline.journal import JOURNAL_NAME
from kdcache.service.app import create_app
from kdcache.service.protocol import (
    BINARY_CONTENT_TYPE,
    DATATYPES,
    HEADER_LENGTH,
    JSON_CONTENT_TYPE,
    ProtocolError,
    RequestedOutput,
    decode_request,
    decode_response,
    encode_request,
)
from kdcache.service.runtime import TeacherService
from kdcache.service.settings import ServeSettings
from kdcache.service.signature import ModelSpec, validate

CI_EXAMPLES = 30
SOAK_EXAMPLES = int(os.environ.get("KD_FUZZ_EXAMPLES", "2000"))
SIZES = [pytest.param(CI_EXAMPLES, id="ci"), pytest.param(SOAK_EXAMPLES, id="soak", marks=pytest.mark.soak)]
TOKEN = "fuzz-token"
MODEL = "teacher"
INFER_PATHS = (f"/v2/models/{MODEL}/infer", f"/v2/models/{MODEL}/versions/1/infer")
REQUEST_TIMEOUT_S = 30.0  # a request not answered by then is a hang
SAMPLE_SHAPE = (8, 8)  # the digits teacher's input: uint8 [8, 8]


def fuzz_settings(examples: int, soak: bool = False) -> settings:
    return settings(
        max_examples=examples,
        derandomize=not soak,  # CI: the same examples every run
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        print_blob=True,
    )


# ---------------------------------------------------------------------------------------------
# Requests on the wire, and what the service must answer


@dataclass
class Wire:
    """A v2 request as its parts: the JSON header and the binary chunks, in input order."""

    header: Any  # a dict for a request built here; mutations may make anything of it
    chunks: list[bytes]
    binary: bool

    def frame(self) -> tuple[bytes, dict[str, str]]:
        head = json.dumps(self.header, separators=(",", ":")).encode()  # ensure_ascii: lone surrogates stay escapes
        if not self.binary:
            return head, {"Content-Type": JSON_CONTENT_TYPE}
        return head + b"".join(self.chunks), {"Content-Type": BINARY_CONTENT_TYPE, HEADER_LENGTH: str(len(head))}

    def binary_inputs(self) -> list[int]:
        return [i for i, entry in enumerate(self.header["inputs"]) if "binary_data_size" in entry.get("parameters", {})]

    def chunk_index(self, input_index: int) -> int:
        return self.binary_inputs().index(input_index)


def split_wire(body: bytes, headers: dict[str, str]) -> Wire:
    length = headers.get(HEADER_LENGTH)
    if length is None:
        return Wire(json.loads(body), [], False)
    header = json.loads(body[: int(length)])
    chunks, offset = [], int(length)
    for entry in header["inputs"]:
        size = entry.get("parameters", {}).get("binary_data_size")
        if size is not None:
            chunks.append(body[offset : offset + size])
            offset += size
    return Wire(header, chunks, True)


def expected_status(body: bytes, headers: dict[str, str], spec: ModelSpec, max_body_bytes: int) -> int | None:
    """What the infer route must answer, by the codec itself; None for a request it accepts.

    Mirrors ``service.app``'s order: Content-Encoding (415), body size (413), the header length
    as an integer (400), then ``decode_request`` and ``validate``. Any other exception here is a
    crash the service would answer with a 500, so it propagates.
    """
    lower = {key.lower(): value for key, value in headers.items()}
    if lower.get("content-encoding", "identity").strip().lower() not in ("", "identity"):
        return 415
    declared = lower.get("content-length")
    if declared is not None and declared.isascii() and declared.isdigit() and int(declared) > max_body_bytes:
        return 413
    if len(body) > max_body_bytes:
        return 413
    raw_length = lower.get(HEADER_LENGTH.lower())
    length = None
    if raw_length is not None:
        try:
            length = int(raw_length)
        except ValueError:
            return 400
    try:
        validate(decode_request(body, length), spec)
    except ProtocolError as exc:
        return exc.status
    return None


# ---------------------------------------------------------------------------------------------
# Strategies: valid requests, then one mutation each

HEADER_TEXT = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=24)  # a valid HTTP header value
JSON_TEXT = st.text(st.characters(codec="utf-8") | st.sampled_from(["\ud800", "\udfff", "\x00", "\u2028"]), max_size=12)
# Values at the edges, which random draws reach too rarely: past float and int64 ranges, tiny,
# lone surrogates (JSON can spell them, UTF-8 cannot hold them), empty.
EDGE_SCALARS = st.sampled_from(
    [10**400, -(10**400), 2**64, 2**63, -(2**63) - 1, 1e308, -1e308, 5e-324, 0, -1, "\ud800", "a\udfffb", "", "\x00", [], {}]
)
JSON_VALUES = st.recursive(
    EDGE_SCALARS
    | st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.integers(min_value=-(10**400), max_value=10**400)
    | st.floats()  # NaN and infinities included: json.dumps writes them, json.loads reads them
    | JSON_TEXT,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(JSON_TEXT, children, max_size=4),
    max_leaves=10,
)


@st.composite
def valid_requests(draw: st.DrawFn, binary: bool | None = None, ids: str | None = None) -> Wire:
    """A request the digits teacher takes, encoded as tritonclient encodes it (service.protocol.encode_request)."""
    n = draw(st.integers(1, 4))
    x = np.frombuffer(draw(st.binary(min_size=64 * n, max_size=64 * n)), np.uint8).reshape(n, *SAMPLE_SHAPE)
    tensors: list[tuple[str, np.ndarray]] = [("input", x)]
    ids = ids or draw(st.sampled_from(["none", "bytes", "int"]))
    if ids == "bytes":  # 10+ bytes per element on the wire: no fixed-size datatype ever matches its size
        tensors.append(("id", np.array([f"fuzz-{i}" for i in range(n)], dtype=object)))
    elif ids == "int":
        tensors.append(("id", np.arange(n, dtype=np.int64) + draw(st.integers(0, 2**40))))
    if draw(st.booleans()):
        tensors.append(("label", np.array(draw(st.lists(st.integers(-1, 9), min_size=n, max_size=n)), dtype=np.int64)))
    binary = draw(st.booleans()) if binary is None else binary
    outputs = draw(st.sampled_from([None, ("soft_targets",), ("logits", "soft_targets")]))
    temperature = draw(st.none() | st.floats(0.5, 8.0) | st.floats(float(np.finfo(np.float32).tiny), 1e308))
    body, headers = encode_request(
        tensors,
        parameters=None if temperature is None else {"temperature": temperature},
        outputs=None if outputs is None else [RequestedOutput(name, binary) for name in outputs],
        binary=binary,
    )
    return split_wire(body, headers)


Mutation = Callable[[st.DrawFn, Wire], tuple[bytes, dict[str, str]]]
MUTATIONS: dict[str, tuple[Callable[[], st.SearchStrategy[Wire]], Mutation]] = {}


def mutation(name: str, base: Callable[[], st.SearchStrategy[Wire]] = valid_requests) -> Callable[[Mutation], Mutation]:
    def register(function: Mutation) -> Mutation:
        MUTATIONS[name] = (base, function)
        return function

    return register


@mutation("header_length")
def wrong_header_length(draw: st.DrawFn, wire: Wire) -> tuple[bytes, dict[str, str]]:
    body, headers = wire.frame()
    length = int(headers.get(HEADER_LENGTH, len(body)))
    kind = draw(st.sampled_from(["short", "long", "past_end", "negative", "text", "huge", "number_like", "missing"]))
    if kind == "missing":
        headers.pop(HEADER_LENGTH, None)
        return body, headers
    value = {
        "short": lambda: str(draw(st.integers(0, max(0, length - 1)))),
        "long": lambda: str(draw(st.integers(length + 1, len(body) + 1))),
        "past_end": lambda: str(draw(st.integers(len(body) + 1, len(body) + 10**6))),
        "negative": lambda: str(draw(st.integers(-(2**70), -1))),
        "text": lambda: draw(HEADER_TEXT),
        "huge": lambda: str(10 ** draw(st.integers(12, 60))),
        "number_like": lambda: draw(st.sampled_from([f"{length}.0", f"{length}e0", f"0x{length:x}", f"+{length}", f"{length}_0", "-0"])),
    }[kind]()
    headers[HEADER_LENGTH] = value
    return body, headers


@mutation("binary_data_size", lambda: valid_requests(binary=True))
def wrong_binary_size(draw: st.DrawFn, wire: Wire) -> tuple[bytes, dict[str, str]]:
    index = draw(st.sampled_from(wire.binary_inputs()))
    parameters = wire.header["inputs"][index]["parameters"]
    size = parameters["binary_data_size"]
    parameters["binary_data_size"] = draw(
        st.integers(0, 2 * size + 16).filter(lambda v: v != size)
        | st.integers(-(2**70), -1)
        | st.sampled_from([2**64, 2**31, str(size), float(size), True, None, [size], {"size": size}])
    )
    return wire.frame()


@mutation("truncated")
def truncated(draw: st.DrawFn, wire: Wire) -> tuple[bytes, dict[str, str]]:
    body, headers = wire.frame()
    return body[: draw(st.integers(0, len(body) - 1))], headers


@mutation("trailing_bytes")
def trailing(draw: st.DrawFn, wire: Wire) -> tuple[bytes, dict[str, str]]:
    body, headers = wire.frame()
    return body + draw(st.binary(min_size=1, max_size=64)), headers


HUGE_SHAPES = st.sampled_from(
    [
        [1 << 40, 8, 8],
        [2**62, 2**62],
        [2**63, 1],
        [2**64 + 1],
        [0, 2**63],
        [2**40, 2**40, 0],
        [1, 1 << 28, 1],
        [(1 << 28) + 1],
    ]
)


@mutation("shape")
def odd_shape(draw: st.DrawFn, wire: Wire) -> tuple[bytes, dict[str, str]]:
    index = draw(st.integers(0, len(wire.header["inputs"]) - 1))
    wire.header["inputs"][index]["shape"] = draw(
        HUGE_SHAPES
        | st.lists(st.integers(0, 2**70), max_size=8)
        | st.integers(33, 100).map(lambda k: [1] * k)  # more dimensions than numpy takes
        | st.lists(st.integers(-(2**40), 16), min_size=1, max_size=4)
        | st.lists(st.sampled_from([8.0, "8", True, None, [8]]) | st.integers(0, 8), min_size=1, max_size=4)
        | st.sampled_from(["8,8", 64, {}, None])
    )
    return wire.frame()


@mutation("datatype")
def odd_datatype(draw: st.DrawFn, wire: Wire) -> tuple[bytes, dict[str, str]]:
    index = draw(st.integers(0, len(wire.header["inputs"]) - 1))
    entry = wire.header["inputs"][index]
    entry["datatype"] = draw(
        st.sampled_from([*DATATYPES, "BYTES"]).filter(lambda d: d != entry["datatype"])
        | st.sampled_from(["BF16", "FP8", "uint8", "Uint8", "STRING", "INT128", "", " UINT8"])
        | st.text(max_size=12)
        | st.none()
        | st.integers()
        | st.lists(st.just("UINT8"), max_size=2)
    )
    return wire.frame()


@mutation("json_byte_flips")
def json_byte_flips(draw: st.DrawFn, wire: Wire) -> tuple[bytes, dict[str, str]]:
    body, headers = wire.frame()
    json_end = int(headers.get(HEADER_LENGTH, len(body)))
    flipped = bytearray(body)
    for _ in range(draw(st.integers(1, 4))):
        flipped[draw(st.integers(0, json_end - 1))] ^= draw(st.integers(1, 255))
    return bytes(flipped), headers


@mutation("bytes_tensor_flips", lambda: valid_requests(binary=True, ids="bytes"))
def bytes_tensor_flips(draw: st.DrawFn, wire: Wire) -> tuple[bytes, dict[str, str]]:
    """Flipped bytes in a BYTES tensor's binary form: its 4-byte length prefixes and its text."""
    id_index = next(i for i, entry in enumerate(wire.header["inputs"]) if entry["name"] == "id")
    chunk = bytearray(wire.chunks[wire.chunk_index(id_index)])
    for _ in range(draw(st.integers(1, 3))):
        chunk[draw(st.integers(0, len(chunk) - 1))] ^= draw(st.integers(1, 255))
    wire.chunks[wire.chunk_index(id_index)] = bytes(chunk)
    return wire.frame()


def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """The places in a JSON document: dict keys and list indices, depth first; of a tensor's data
    only the first two elements, so that the structure, not the pixels, gets most of the draws."""
    found = [prefix] if prefix else []
    if isinstance(value, dict):
        for key, item in value.items():
            found += _paths(item, (*prefix, key))
    elif isinstance(value, list):
        items = value[:2] if prefix and prefix[-1] == "data" else value
        for index, item in enumerate(items):
            found += _paths(item, (*prefix, index))
    return found


@mutation("json_field")
def json_field(draw: st.DrawFn, wire: Wire) -> tuple[bytes, dict[str, str]]:
    """One to three fields of the JSON header replaced by random JSON (huge integers, NaN, lone
    surrogates, ...) or removed."""
    wire.header.setdefault("parameters", {}).setdefault("temperature", 4.0)  # so that temperature is a place to fuzz too
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(wire.header)
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = wire.header
        for step in path[:-1]:
            parent = parent[step]
        if isinstance(parent, dict) and draw(st.integers(0, 4)) == 0:
            del parent[path[-1]]
        else:
            parent[path[-1]] = draw(JSON_VALUES)
    return wire.frame()


JSON_SCALARS = (
    EDGE_SCALARS
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.integers(min_value=-(10**400), max_value=10**400)
    | st.floats()
    | st.booleans()
    | JSON_TEXT
    | st.none()
)


@mutation("json_data", lambda: valid_requests(binary=False))
def json_data(draw: st.DrawFn, wire: Wire) -> tuple[bytes, dict[str, str]]:
    """A JSON tensor re-typed to any datatype, with some of its elements replaced by random scalars."""
    entry = draw(st.sampled_from(wire.header["inputs"]))
    entry["datatype"] = draw(st.sampled_from([*DATATYPES, "BYTES"]))
    data = entry["data"]
    if entry["datatype"] == "BYTES":
        data[:] = [str(value) for value in data]  # BYTES in JSON are strings: get past that check
    for _ in range(draw(st.integers(1, 3))):
        data[draw(st.integers(0, len(data) - 1))] = draw(JSON_SCALARS)
    return wire.frame()


@mutation("request_parameters")
def request_parameters(draw: st.DrawFn, wire: Wire) -> tuple[bytes, dict[str, str]]:
    """The request-level fields (temperature, store, binary_data_output, the request id, the
    parameters object itself) set to random JSON, the rest of the request left valid."""
    field = draw(st.sampled_from(["temperature", "store", "binary_data_output", "id", "parameters"]))
    value = draw(JSON_VALUES)
    if field == "id":
        wire.header["id"] = value
    elif field == "parameters":
        wire.header["parameters"] = value
    else:
        wire.header.setdefault("parameters", {})[field] = value
    return wire.frame()


@mutation("duplicate_input")
def duplicate_input(draw: st.DrawFn, wire: Wire) -> tuple[bytes, dict[str, str]]:
    index = draw(st.integers(0, len(wire.header["inputs"]) - 1))
    if index in wire.binary_inputs():
        chunk = wire.chunk_index(index)
        wire.chunks.insert(chunk + 1, wire.chunks[chunk])
    wire.header["inputs"].insert(index + 1, copy.deepcopy(wire.header["inputs"][index]))
    return wire.frame()


@mutation("empty_body")
def empty_body(draw: st.DrawFn, wire: Wire) -> tuple[bytes, dict[str, str]]:
    headers = draw(
        st.sampled_from([{}, {HEADER_LENGTH: "0"}, {"Content-Type": BINARY_CONTENT_TYPE}, {"Content-Type": JSON_CONTENT_TYPE}])
        | HEADER_TEXT.map(lambda v: {HEADER_LENGTH: v})
    )
    return b"", dict(headers)


@mutation("content_encoding")
def content_encoding(draw: st.DrawFn, wire: Wire) -> tuple[bytes, dict[str, str]]:
    body, headers = wire.frame()
    headers["Content-Encoding"] = draw(
        st.sampled_from(["gzip", "deflate", "br", "compress", "x-gzip", "zstd", "GZIP", "gzip, identity", "identity, gzip"])
        | HEADER_TEXT.filter(lambda v: v.lower() != "identity")
    )
    if draw(st.booleans()):
        body = gzip.compress(body)  # compressed for real: still refused, the service reads bodies as sent
    return body, headers


@mutation("content_length")
def odd_content_length(draw: st.DrawFn, wire: Wire) -> tuple[bytes, dict[str, str]]:
    """A garbage Content-Length on an otherwise broken body. In process only: over a socket the
    HTTP parser answers these itself (bench.fuzz sends them raw)."""
    body, headers = wire.frame()
    headers["Content-Length"] = draw(st.sampled_from(["\xb2", "\xb9", "-1", "abc", "1e3", "0x10", " ", "9" * 30]) | HEADER_TEXT)
    headers[HEADER_LENGTH] = "not-a-number"  # keeps the request refused whatever the Content-Length says
    return body, headers


@st.composite
def malformed_requests(draw: st.DrawFn, family: str) -> tuple[str, bytes, dict[str, str]]:
    base, mutate = MUTATIONS[family]
    wire = draw(base())
    body, headers = mutate(draw, wire)
    return draw(st.sampled_from(INFER_PATHS)), body, headers


# ---------------------------------------------------------------------------------------------
# The service in process, on an event loop in a thread, so that a synchronous hypothesis test
# can drive it (tests/test_service.py's serving() runs inside one asyncio.run instead).


def build_service(tmp_path: Path, teacher_pt: Path, api_key: str | None = None, **options: Any) -> TeacherService:
    from kdcache.service.teacher import load_teacher

    settings = ServeSettings(teacher=[str(teacher_pt)], cache=tmp_path / "cache", device="cpu", temperature=4.0, **options)
    teacher = load_teacher(settings.teacher, temperature=settings.temperature, device="cpu")
    return TeacherService.open(settings, teacher, api_key)


class InProcess:
    def __init__(self, tmp_path: Path, teacher_pt: Path, api_key: str | None = None, **options: Any) -> None:
        self.service = build_service(tmp_path, teacher_pt, api_key, **options)
        self.app = create_app(self.service)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fuzz-loop", daemon=True)
        self.thread.start()
        self._call(self.service.start())
        deadline = time.monotonic() + 60
        while not self.service.ready:
            assert time.monotonic() < deadline, "the service did not become ready"
            time.sleep(0.01)
        auth = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url="http://test", headers=auth)
        self.statuses: Counter[int] = Counter()

    def _call(self, coroutine: Any, timeout: float = REQUEST_TIMEOUT_S) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def post(self, path: str, body: bytes, headers: dict[str, str]) -> httpx.Response:
        raw = [(key.encode("latin-1"), value.encode("latin-1")) for key, value in headers.items()]
        try:
            response = self._call(self.client.post(path, content=body, headers=raw))
        except TimeoutError:
            raise AssertionError(f"no answer in {REQUEST_TIMEOUT_S} s (a hang): {path} {headers} {body[:200]!r}") from None
        self.statuses[response.status_code] += 1
        return response

    def close(self) -> None:
        try:
            self._call(self.client.aclose())
            self._call(self.service.stop(), timeout=60)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()

    def __enter__(self) -> InProcess:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def assert_refused(response: httpx.Response, expected: int, what: str) -> None:
    assert response.status_code < 500, f"{what}: {response.status_code} {response.text[:500]}"
    assert response.status_code == expected, f"{what}: expected {expected}, got {response.status_code} {response.text[:300]}"
    error = response.json()["error"]
    assert isinstance(error, str) and error and "Traceback" not in error


def assert_nothing_written(service: TeacherService, *, teacher_ran: bool = False) -> None:
    """After the service stopped: no samples, in memory or on disk, and an empty journal."""
    if not teacher_ran:
        assert service.metrics.batch_size._sum.get() == 0, "the teacher ran for a refused request"
    assert service.store.num_samples == 0
    directory = service.store.directory
    assert CacheReader(directory).num_samples == 0
    journal = directory / JOURNAL_NAME
    assert not journal.exists() or journal.stat().st_size == 0


def no_errors_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


# ---------------------------------------------------------------------------------------------
# Malformed bodies


@pytest.mark.parametrize("examples", SIZES)
@pytest.mark.parametrize("family", sorted(MUTATIONS))
def test_malformed_requests_are_refused_and_write_nothing(tmp_path, digits_teacher_pt, caplog, family, examples):
    caplog.set_level(logging.WARNING)
    with InProcess(tmp_path, digits_teacher_pt) as server:
        spec, limit = server.service.spec, server.service.settings.max_body_bytes

        @fuzz_settings(examples, soak=examples != CI_EXAMPLES)
        @given(request=malformed_requests(family))
        def fuzz(request: tuple[str, bytes, dict[str, str]]) -> None:
            path, body, headers = request
            expected = expected_status(body, headers, spec, limit)
            assume(expected is not None)  # the mutation left a valid request: not this test's business
            assert_refused(server.post(path, body, headers), expected, f"{family}: {headers} {body[:300]!r}")

        fuzz()
    assert sum(server.statuses.values()) > 0
    assert all(400 <= status < 500 for status in server.statuses), server.statuses
    assert_nothing_written(server.service)
    assert no_errors_logged(caplog) == []


def _refuse_constant(name: str) -> None:
    raise AssertionError(f"the response holds {name}, which is not JSON")


@pytest.mark.parametrize("examples", SIZES)
def test_the_fuzzers_start_from_valid_requests(tmp_path, digits_teacher_pt, examples):
    """The control: unmutated, the fuzzers' requests are answered 200 (sent with store=false)."""
    with InProcess(tmp_path, digits_teacher_pt) as server:
        spec = server.service.spec

        @fuzz_settings(max(10, examples // 10), soak=examples != CI_EXAMPLES)
        @given(wire=valid_requests(), path=st.sampled_from(INFER_PATHS))
        def control(wire: Wire, path: str) -> None:
            wire.header.setdefault("parameters", {})["store"] = False
            body, headers = wire.frame()
            assert expected_status(body, headers, spec, 1 << 20) is None
            response = server.post(path, body, headers)
            assert response.status_code == 200, response.text
            # Strict JSON (no NaN or Infinity literals) and finite soft targets, at any temperature.
            length = response.headers.get(HEADER_LENGTH)
            json.loads(response.content[: int(length) if length else None], parse_constant=_refuse_constant)
            _, outputs = decode_response(response.content, length)
            assert all(np.isfinite(values).all() for values in outputs.values()), outputs

        control()
    assert_nothing_written(server.service, teacher_ran=True)


# The inputs the fuzzers found that crashed the service with a 500 before the fixes in
# service/protocol.py and service/app.py, each as (body, headers, expected status).
_IMAGE = {"name": "input", "shape": [1, 8, 8], "datatype": "UINT8", "data": [0] * 64}
REPRODUCERS = {
    "lone surrogate in a JSON BYTES element": (
        b'{"inputs":[' + json.dumps(_IMAGE).encode() + b',{"name":"id","shape":[1],"datatype":"BYTES","data":["\\ud800"]}]}',
        {},
        400,
    ),
    "integer literal beyond float range in FP32 data": (
        b'{"inputs":[{"name":"input","shape":[1],"datatype":"FP32","data":[1' + b"0" * 400 + b"]}]}",
        {},
        400,
    ),
    "integer temperature beyond float range": (
        b'{"parameters":{"temperature":1' + b"0" * 400 + b'},"inputs":[' + json.dumps(_IMAGE).encode() + b"]}",
        {},
        422,
    ),
    "zero-size shape with a dimension past int64": (
        json.dumps({"inputs": [{"name": "input", "shape": [0, 2**63], "datatype": "UINT8", "data": []}]}).encode(),
        {},
        413,
    ),
    "zero-size shape whose other dimensions overflow": (
        json.dumps({"inputs": [{"name": "input", "shape": [2**40, 2**40, 0], "datatype": "UINT8", "data": []}]}).encode(),
        {},
        413,
    ),
    "more dimensions than numpy takes": (
        json.dumps({"inputs": [{"name": "input", "shape": [1] * 65, "datatype": "UINT8", "data": [0]}]}).encode(),
        {},
        400,
    ),
    "a temperature that is 0 in float32 (NaN soft targets before)": (
        b'{"parameters":{"temperature":1e-40},"inputs":[' + json.dumps(_IMAGE).encode() + b"]}",
        {},
        422,
    ),
    "a Content-Length that str.isdigit takes and int refuses": (b"{}", {"Content-Length": "\xb2"}, 400),
    "a plain body labelled gzip": (
        encode_request([("input", np.zeros((1, 8, 8), np.uint8))])[0],
        {**encode_request([("input", np.zeros((1, 8, 8), np.uint8))])[1], "Content-Encoding": "gzip"},
        415,
    ),
}


def test_tiny_temperatures_give_finite_soft_targets(tmp_path, digits_teacher, digits_teacher_pt):
    """logits / T overflowed to inf for tiny T, and inf - inf made NaN soft targets (a 200 whose
    JSON body held NaN literals)."""
    x = digits_teacher["x_test"][:3]
    with InProcess(tmp_path, digits_teacher_pt) as server:
        for temperature in (1e-37, 2e-38, float(np.finfo(np.float32).tiny)):
            body, headers = encode_request(
                [("input", x)], parameters={"temperature": temperature, "store": False}, outputs=[RequestedOutput("soft_targets", False)]
            )
            response = server.post(INFER_PATHS[0], body, headers)
            assert response.status_code == 200, response.text
            soft = json.loads(response.content, parse_constant=_refuse_constant)["outputs"][0]["data"]
            assert sorted(set(soft)) == [0.0, 1.0]  # one-hot: the argmax of the logits


def test_reproducers_of_fixed_crashes(tmp_path, digits_teacher_pt, caplog):
    caplog.set_level(logging.WARNING)
    with InProcess(tmp_path, digits_teacher_pt) as server:
        spec, limit = server.service.spec, server.service.settings.max_body_bytes
        for name, (body, headers, status) in REPRODUCERS.items():
            assert expected_status(body, headers, spec, limit) == status, name
            assert_refused(server.post(INFER_PATHS[0], body, headers), status, name)
    assert_nothing_written(server.service)
    assert no_errors_logged(caplog) == []


# ---------------------------------------------------------------------------------------------
# schemathesis over the OpenAPI spec


def schemathesis_checks() -> list[Any]:
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance

    # Not negative_data_rejection: its rejection statuses leave out 413, which the service rightly
    # answers to a body declaring a huge shape (schema-violating or not).
    return [not_a_server_error, response_schema_conformance, content_type_conformance]


def schemathesis_strategy(schema: Any) -> Any:
    """Positive and negative cases for every operation; as many again with the served model's name
    and version in the path, so that the infer routes get past 404 to the codec."""
    from schemathesis import GenerationMode

    served = {"name": MODEL, "version": "1"}
    strategies = []
    for result in schema.get_all_operations():
        operation = result.ok()
        fixed = {key: value for key, value in served.items() if f"{{{key}}}" in operation.path}
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            strategies.append(operation.as_strategy(mode))
            if fixed:
                strategies.append(operation.as_strategy(mode, path_parameters=fixed))
    return st.one_of(strategies)


@pytest.mark.parametrize("examples", SIZES)
@pytest.mark.parametrize("auth", ["token", "no-token"])
def test_schemathesis_finds_no_server_error(tmp_path, digits_teacher_pt, caplog, auth, examples):
    import schemathesis
    from schemathesis.python import asgi

    caplog.set_level(logging.WARNING)
    service = build_service(tmp_path, digits_teacher_pt, api_key=TOKEN)
    app = create_app(service)
    headers = {"Authorization": f"Bearer {TOKEN}"} if auth == "token" else {}
    statuses: Counter[int] = Counter()
    try:
        # Loading the schema starts the app's lifespan (the teacher's warm-up) on schemathesis's
        # event loop thread; it lasts until shutdown_lifespans() below.
        schema = schemathesis.openapi.from_asgi("/openapi.json", app, headers={"Authorization": f"Bearer {TOKEN}"})
        deadline = time.monotonic() + 60
        while not service.ready:
            assert time.monotonic() < deadline, "the service did not become ready"
            time.sleep(0.01)
        checks = schemathesis_checks()

        @fuzz_settings(examples, soak=examples != CI_EXAMPLES)
        @given(case=schemathesis_strategy(schema))
        def fuzz(case: Any) -> None:
            response = case.call(headers=headers, timeout=REQUEST_TIMEOUT_S)
            statuses[response.status_code] += 1
            assert response.status_code < 500, f"{case.method} {case.formatted_path}: {response.status_code} {response.text[:500]}"
            if auth == "no-token" and not case.path.startswith("/v2/health/"):
                assert response.status_code == 401, (case.path, response.status_code)
            case.validate_response(response, checks=checks, headers=headers)

        fuzz()
    finally:
        asgi.shutdown_lifespans()  # the lifespan's exit: service.stop(), which publishes the cache
    assert sum(statuses.values()) > 0 and all(status < 500 for status in statuses), statuses
    # Valid requests may have stored samples; whatever is there must read back whole.
    assert CacheReader(service.store.directory).verify() == []
    assert not (service.store.directory / JOURNAL_NAME).exists() or (service.store.directory / JOURNAL_NAME).stat().st_size == 0
    assert no_errors_logged(caplog) == []
