"""A Python client for the teacher service: v2 requests and responses, at one URL or spread over replicas.

The client speaks the same v2 protocol as ``tritonclient.http`` (binary tensors by default), with
the codec from ``service.protocol``. It retries what a restarting or busy server answers (429 and
503, honouring ``Retry-After``; refused connections and timeouts) and nothing else: any other
error status becomes a one-line ``ClientError`` carrying the server's message.

Given several replicas of the service (each its own ``teacher-serve``), it sends each request to
the next replica in turn, and a request one replica failed (those failures, or any 5xx) to
another at once; a replica that fails is set aside for a while, longer each time in a row. A 4xx
is the request's own fault wherever it goes: it fails at once, as with one URL.

Pushing is resumable by design: the server keys every sample by its id (or, without ids, by a
hash of its input bytes), so pushing the same transfer set again turns into cache hits. The push
loop (``push``, ``push_source``) lives with the ``teacher-push`` command, in ``service.push``.
"""

from __future__ import annotations

import email.utils
import random
import threading
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import httpx
import numpy as np

from ..offline.cache import normalize_ids
from ..offline.sources import SampleSpec, Source, TokenSpec
from .protocol import HEADER_LENGTH, ProtocolError, RequestedOutput, decode_response, encode_request, numpy_dtype

if TYPE_CHECKING:
    from .push import PushSummary

RETRY_STATUSES = (429, 503)
BACKOFF_BASE_S = 0.25
BACKOFF_CAP_S = 10.0
RETRY_AFTER_CAP_S = 60.0
SET_ASIDE_BASE_S = 0.5  # a replica's first failure in a row sets it aside this long, each next one twice as long
SET_ASIDE_CAP_S = 30.0


class ClientError(Exception):
    """A request that failed for good: one line with the status code and the server's message,
    or the connection failure."""


@dataclass
class InferResult:
    soft_targets: np.ndarray | None
    logits: np.ndarray | None
    cache_hits: int
    cache_misses: int
    parameters: dict[str, Any] = field(default_factory=dict)
    replica_url: str = ""  # the replica that answered


def retry_after_seconds(value: str | None) -> float | None:
    """``Retry-After`` as seconds (it may be a number of seconds or an HTTP date), capped."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - time.time()
    if seconds != seconds:  # NaN
        return None
    return min(max(seconds, 0.0), RETRY_AFTER_CAP_S)


def is_language_model(metadata: dict[str, Any]) -> bool:
    """Whether v2 model metadata describes a language-model teacher: ``"task": "lm"`` in its
    parameters, or an input named ``input_ids``."""
    parameters = metadata.get("parameters")
    inputs = metadata.get("inputs")
    if isinstance(parameters, dict) and parameters.get("task") == "lm":
        return True
    return isinstance(inputs, list) and any(isinstance(t, dict) and t.get("name") == "input_ids" for t in inputs)


def token_spec_of(metadata: dict[str, Any], where: str) -> TokenSpec:
    """What a language-model teacher takes, from its v2 model metadata: ``input_ids`` INT64
    [-1, L], and the parameters ``vocab_size`` V and ``sequence_length`` L (else the shape's L)."""
    try:
        tensor = next(t for t in metadata["inputs"] if t["name"] == "input_ids")
        parameters = metadata.get("parameters") or {}
        vocab_size = int(parameters["vocab_size"])
        seq_len = int(parameters.get("sequence_length") or tensor["shape"][1])
        datatype = tensor["datatype"]
    except (KeyError, TypeError, ValueError, IndexError, StopIteration, AttributeError) as exc:
        raise ClientError(f"{where}: language-model metadata lacks the input_ids tensor or vocab_size ({exc!r:.200})") from None
    if datatype != "INT64" or seq_len < 1 or vocab_size < 1:
        raise ClientError(f"{where}: input_ids is {datatype} of length {seq_len}, vocab_size {vocab_size}: expected INT64 and both >= 1")
    return TokenSpec(seq_len=seq_len, vocab_size=vocab_size)


def sample_spec_of(metadata: dict[str, Any], where: str) -> SampleSpec | TokenSpec:
    """What one sample must be, from v2 model metadata: the input tensor's shape (less the batch
    axis) and datatype, and the class count of the soft_targets output (its last axis); for a
    language model (``is_language_model``), its ``token_spec_of``."""
    if is_language_model(metadata):
        return token_spec_of(metadata, where)
    try:
        tensor = next(t for t in metadata["inputs"] if t["name"] == "input")
        shape = tuple(int(dim) for dim in tensor["shape"][1:])
        dtype = numpy_dtype("input", tensor["datatype"])
        output = next(t for t in metadata["outputs"] if t["name"] == "soft_targets")
        num_classes = int(output["shape"][-1])
    except (KeyError, TypeError, ValueError, IndexError, StopIteration, ProtocolError) as exc:
        raise ClientError(f"{where}: model metadata lacks the input tensor or the soft_targets output ({exc!r:.200})") from None
    if dtype is None or not shape or min(shape) < 1:
        raise ClientError(f"{where}: model input is {tensor['datatype']} {list(tensor['shape'])}, not fixed-shape numbers")
    return SampleSpec(input_shape=shape, input_dtype=dtype.name, num_classes=num_classes)


def one_line(text: str, limit: int = 300) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


class Replica:
    """One URL of the service: its connection pool, and until when it is set aside after failing."""

    def __init__(self, url: str, http: httpx.Client) -> None:
        self.url = url
        self.http = http
        self.failures = 0  # in a row
        self.aside_until = 0.0  # time.monotonic()


class Replicas:
    """The replicas of one service, taken in turn (round-robin per request); safe to share between threads."""

    def __init__(self, replicas: Sequence[Replica]) -> None:
        self.all = list(replicas)
        self._turn = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.all)

    def pick(self, avoid: Collection[Replica] = (), turn: int | None = None) -> Replica:
        """The next replica in turn (or from number ``turn``) that is neither set aside nor in
        ``avoid``; when each one outside ``avoid`` is set aside, the one back soonest. ``avoid``
        must leave one."""
        now = time.monotonic()
        if turn is None:
            with self._lock:
                turn = self._turn
                self._turn += 1
        in_turn = [self.all[(turn + i) % len(self.all)] for i in range(len(self.all))]
        allowed = [replica for replica in in_turn if replica not in avoid]
        return next((replica for replica in allowed if replica.aside_until <= now), None) or min(allowed, key=lambda r: r.aside_until)

    def is_aside(self, replica: Replica) -> bool:
        return replica.aside_until > time.monotonic()

    def failed(self, replica: Replica) -> None:
        with self._lock:
            replica.failures += 1
            aside = min(SET_ASIDE_CAP_S, SET_ASIDE_BASE_S * 2 ** min(replica.failures - 1, 16))
            replica.aside_until = time.monotonic() + aside

    def answered(self, replica: Replica) -> None:
        with self._lock:
            replica.failures = 0
            replica.aside_until = 0.0


class TeacherClient:
    """Connection pools to one model of a teacher service, at one URL or at each of its replicas
    (``url`` a list); safe to share between threads."""

    def __init__(
        self,
        url: str | Sequence[str],
        model: str = "teacher",
        *,
        api_key: str | None = None,
        timeout: float = 60.0,
        max_retries: int = 8,
        transport: httpx.BaseTransport | None = None,  # tests pass an httpx.MockTransport
    ) -> None:
        urls = list(dict.fromkeys((u if "://" in u else f"http://{u}").rstrip("/") for u in ([url] if isinstance(url, str) else url)))
        if not urls:
            raise ClientError("no URL given for the teacher service")
        self.urls = urls
        self.url = ", ".join(urls)  # for messages: the URL, or every replica's
        self.model = model
        self.max_retries = max_retries
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # Idle connections expire here before uvicorn's 5 s keep-alive closes them on its side: with
        # equal timeouts a request can go out on a connection the server is closing (seen as
        # ReadError under load, bench/flood.py).
        limits = httpx.Limits(keepalive_expiry=2.0)
        self._replicas = Replicas(
            [Replica(u, httpx.Client(base_url=u, headers=headers, timeout=timeout, transport=transport, limits=limits)) for u in urls]
        )
        self._model_path = f"/v2/models/{quote(model, safe='')}"
        self._sleep = time.sleep
        self._random = random.Random()

    # -- HTTP with retries ----------------------------------------------------------------------

    def _backoff(self, retry: int) -> float:
        # "Equal jitter": at least half the exponential delay, so retries stay spread out but never
        # hammer a server that is still starting.
        delay = min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2**retry)
        return delay * (0.5 + 0.5 * self._random.random())

    def _error_message(self, response: httpx.Response) -> str:
        try:
            message = response.json()["error"]
        except Exception:  # not our JSON error body: a proxy's page, an empty body
            message = response.text or response.reason_phrase
        return f"HTTP {response.status_code}: {one_line(str(message))}"

    def _request(
        self, method: str, path: str, *, content: bytes | None = None, headers: dict[str, str] | None = None, turn: int | None = None
    ) -> tuple[httpx.Response, int, str]:
        """The response (status < 400), how many retries it took and the URL of the replica that
        answered; ClientError otherwise. A retry goes to the next replica in turn at once, or,
        when none is free, after a backoff (or the ``Retry-After`` of the replica asked again).
        After ``max_retries`` only a replica this request has not failed on yet is asked."""
        retries = 0
        errors: dict[Replica, str] = {}  # the last error of each replica that failed this request
        lasting: set[Replica] = set()  # those whose 5xx a retry there would not change
        replica = self._replicas.pick(turn=turn)
        while True:
            try:
                response = replica.http.request(method, path, content=content, headers=headers)
            except httpx.TransportError as exc:  # refused, reset, timed out: the server may be restarting
                errors[replica] = f"cannot reach the server ({type(exc).__name__}: {one_line(str(exc)) or 'no details'})"
                retry_after, unreachable = None, True
            else:
                status = response.status_code
                if status < 400:
                    self._replicas.answered(replica)
                    return response, retries, replica.url
                if status not in RETRY_STATUSES and (status < 500 or len(self._replicas) == 1):
                    raise ClientError(f"{replica.url}{path}: {self._error_message(response)}")
                errors[replica] = self._error_message(response)
                if status not in RETRY_STATUSES:
                    lasting.add(replica)
                retry_after, unreachable = retry_after_seconds(response.headers.get("Retry-After")), False
            self._replicas.failed(replica)
            avoid = set(errors) if retries >= self.max_retries else lasting
            if len(avoid) == len(self._replicas):
                raise ClientError(self._give_up_line(path, errors, retries, unreachable=unreachable))
            following = self._replicas.pick(avoid)
            if following is replica or self._replicas.is_aside(following):
                self._sleep(self._backoff(retries) if retry_after is None or following is not replica else retry_after)
            retries += 1
            replica = following

    def _give_up_line(self, path: str, errors: dict[Replica, str], retries: int, *, unreachable: bool) -> str:
        if len(self._replicas) == 1:
            ((replica, error),) = errors.items()
            return f"{replica.url}{path}: {error} " + (f"after {retries} retries" if unreachable else f"(gave up after {retries} retries)")
        named = "; ".join(f"{replica.url}: {error}" for replica, error in errors.items())
        return f"{path}: every replica failed, after {retries} retries: {named}"

    # -- health and metadata --------------------------------------------------------------------

    def ready(self) -> bool:
        """Whether the model answers ready now (no retries), at one replica at least."""
        for replica in self._replicas.all:
            try:
                if replica.http.get(f"{self._model_path}/ready").status_code == 200:
                    return True
            except httpx.TransportError:
                pass
        return False

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.ready():
            if time.monotonic() >= deadline:
                raise ClientError(f"{self.url}: model {self.model!r} not ready after {timeout:g} s")
            self._sleep(0.25)

    def _metadata(self) -> tuple[dict[str, Any], str]:
        """The model metadata, and where it came from (the answering replica's URL and path)."""
        response, _, url = self._request("GET", self._model_path)
        where = f"{url}{self._model_path}"
        try:
            metadata = response.json()
        except ValueError:
            raise ClientError(f"{where}: model metadata is not JSON") from None
        if not isinstance(metadata, dict):
            raise ClientError(f"{where}: model metadata is not a JSON object")
        return metadata, where

    def metadata(self) -> dict[str, Any]:
        return self._metadata()[0]

    def sample_spec(self) -> SampleSpec | TokenSpec:
        """What one sample must be for this model (``sample_spec_of`` its metadata): a
        ``TokenSpec`` for a language model."""
        return sample_spec_of(*self._metadata())

    # -- inference ------------------------------------------------------------------------------

    def infer(
        self,
        inputs: Any,
        *,
        ids: Any = None,
        labels: Any = None,
        temperature: float | None = None,
        store: bool = True,
        outputs: Sequence[str] | None = ("soft_targets",),
        binary: bool = True,
    ) -> InferResult:
        """One request. ``outputs=None`` asks for every output the model has, ``()`` for none
        (the answer's parameters only: cache hits and misses)."""
        result, _ = self._infer(inputs, ids=ids, labels=labels, temperature=temperature, store=store, outputs=outputs, binary=binary)
        return result

    def _infer(
        self,
        inputs: Any,
        *,
        ids: Any,
        labels: Any,
        temperature: float | None,
        store: bool,
        outputs: Sequence[str] | None,
        binary: bool,
        label_names: list[str] | None = None,
        input_name: str = "input",
        extra: Sequence[tuple[str, np.ndarray]] = (),
        turn: int | None = None,  # the replica to ask first: number ``turn`` in turn (``Replicas.pick``)
    ) -> tuple[InferResult, int]:
        inputs = np.asarray(inputs)
        tensors: list[tuple[str, np.ndarray]] = [(input_name, inputs), *extra]
        try:
            if ids is not None:
                tensors.append(("id", normalize_ids(ids, len(inputs))))
            if labels is not None:
                labels = np.asarray(labels)
                if labels.shape != (len(inputs),) or labels.dtype.kind not in "iu":
                    raise ValueError(f"labels must be {len(inputs)} integers, got shape {list(labels.shape)} of {labels.dtype}")
                tensors.append(("label", labels.astype(np.int64, copy=False)))
            parameters: dict[str, Any] = {"store": store}
            if temperature is not None:
                parameters["temperature"] = float(temperature)
            if label_names is not None:
                parameters["label_names"] = list(label_names)
            if outputs is not None and not outputs:
                parameters["no_outputs"] = True  # an empty list would mean every output (v2)
            requested = None if not outputs else [RequestedOutput(name, binary) for name in outputs]
            body, headers = encode_request(tensors, parameters=parameters, outputs=requested, binary=binary)
        except ValueError as exc:  # ids, labels or an input dtype the protocol cannot carry
            raise ClientError(f"bad request data: {exc}") from None

        path = f"{self._model_path}/infer"
        response, retries, url = self._request("POST", path, content=body, headers=headers, turn=turn)
        try:
            header, arrays = decode_response(response.content, response.headers.get(HEADER_LENGTH))
        except ProtocolError as exc:
            raise ClientError(f"{url}{path}: malformed response ({exc})") from None
        parameters = header.get("parameters") or {}
        try:
            hits, misses = int(parameters.get("cache_hits", 0)), int(parameters.get("cache_misses", 0))
        except (TypeError, ValueError):
            raise ClientError(f"{url}{path}: cache_hits/cache_misses are not integers in the response") from None
        return InferResult(arrays.get("soft_targets"), arrays.get("logits"), hits, misses, parameters, url), retries

    def push(
        self,
        inputs: Any,
        *,
        ids: Any = None,
        labels: Any = None,
        batch_size: int = 256,
        concurrency: int = 4,
        temperature: float | None = None,
        progress: bool = True,
    ) -> PushSummary:
        """Send every sample of in-memory arrays (store=true) in batches from ``concurrency``
        threads; stops at the first request that fails for good. Re-pushing what is cached
        already costs only hits. The loop is ``service.push.push_arrays``."""
        from .push import push_arrays  # teacher-push's module, which imports this one

        return push_arrays(
            self, inputs, ids=ids, labels=labels, batch_size=batch_size, concurrency=concurrency, temperature=temperature, progress=progress
        )

    def push_source(
        self, source: Source, *, batch_size: int = 256, concurrency: int = 4, temperature: float | None = None, progress: bool = True
    ) -> PushSummary:
        """Stream a ``Source`` (kdcache.offline.sources) to the service as ``push`` sends
        arrays, holding at most the window of requests in flight (``service.push.push_source``)."""
        from .push import push_source  # teacher-push's module, which imports this one

        return push_source(self, source, batch_size=batch_size, concurrency=concurrency, temperature=temperature, progress=progress)

    def close(self) -> None:
        for replica in self._replicas.all:
            replica.http.close()

    def __enter__(self) -> TeacherClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


__all__ = ["ClientError", "InferResult", "TeacherClient", "retry_after_seconds", "sample_spec_of"]
