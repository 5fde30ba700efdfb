"""A Python client for the teacher service, and ``teacher-push``, which sends a transfer set to it.

The client speaks the same v2 protocol as ``tritonclient.http`` (binary tensors by default), with
the codec from ``service.protocol``. It retries what a restarting or busy server answers (429 and
503, honouring ``Retry-After``; refused connections and timeouts) and nothing else: any other
error status becomes a one-line ``ClientError`` carrying the server's message.

Pushing is resumable by design: the server keys every sample by its id (or, without ids, by a
hash of its input bytes), so pushing the same transfer set again turns into cache hits.
"""

from __future__ import annotations

import argparse
import email.utils
import os
import random
import sys
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import httpx
import numpy as np
from tqdm import tqdm

from ..offline.cache import CacheError, normalize_ids, read_transfer_set
from .protocol import HEADER_LENGTH, ProtocolError, RequestedOutput, decode_response, encode_request

RETRY_STATUSES = (429, 503)
BACKOFF_BASE_S = 0.25
BACKOFF_CAP_S = 10.0
RETRY_AFTER_CAP_S = 60.0


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


@dataclass
class PushSummary:
    samples: int
    cache_hits: int
    cache_misses: int
    seconds: float
    requests: int
    retries: int

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        return (
            f"{self.samples} samples, {self.cache_hits} hits, {self.cache_misses} misses, {self.seconds:.1f} s, "
            f"{self.samples_per_s:.0f} samples/s ({self.requests} requests, {self.retries} retries)"
        )


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


def _one_line(text: str, limit: int = 300) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


class TeacherClient:
    """One connection pool to one model of a teacher service; safe to share between threads."""

    def __init__(
        self,
        url: str,
        model: str = "teacher",
        *,
        api_key: str | None = None,
        timeout: float = 60.0,
        max_retries: int = 8,
        transport: httpx.BaseTransport | None = None,  # tests pass an httpx.MockTransport
    ) -> None:
        if "://" not in url:
            url = f"http://{url}"
        self.url = url.rstrip("/")
        self.model = model
        self.max_retries = max_retries
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # Idle connections expire here before uvicorn's 5 s keep-alive closes them on its side: with
        # equal timeouts a request can go out on a connection the server is closing (seen as
        # ReadError under load, bench/flood.py).
        limits = httpx.Limits(keepalive_expiry=2.0)
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout, transport=transport, limits=limits)
        self._model_path = f"/v2/models/{quote(model, safe='')}"
        self._sleep = time.sleep
        self._random = random.Random()

    # -- HTTP with retries ----------------------------------------------------------------------

    def _backoff(self, retry: int) -> float:
        # "Equal jitter": at least half the exponential delay, so retries stay spread out but never
        # hammer a server that is still starting.
        delay = min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2**retry)
        return delay * (0.5 + 0.5 * self._random.random())

    def _error_line(self, path: str, response: httpx.Response) -> str:
        try:
            message = response.json()["error"]
        except Exception:  # not our JSON error body: a proxy's page, an empty body
            message = response.text or response.reason_phrase
        return f"{self.url}{path}: HTTP {response.status_code}: {_one_line(str(message))}"

    def _request(
        self, method: str, path: str, *, content: bytes | None = None, headers: dict[str, str] | None = None
    ) -> tuple[httpx.Response, int]:
        """The response (status < 400) and how many retries it took; ClientError otherwise."""
        retries = 0
        while True:
            try:
                response = self._http.request(method, path, content=content, headers=headers)
            except httpx.TransportError as exc:  # refused, reset, timed out: the server may be restarting
                if retries >= self.max_retries:
                    raise ClientError(
                        f"{self.url}{path}: cannot reach the server ({type(exc).__name__}: {_one_line(str(exc)) or 'no details'}) "
                        f"after {retries} retries"
                    ) from None
                delay = self._backoff(retries)
            else:
                if response.status_code not in RETRY_STATUSES:
                    if response.status_code >= 400:
                        raise ClientError(self._error_line(path, response))
                    return response, retries
                if retries >= self.max_retries:
                    raise ClientError(f"{self._error_line(path, response)} (gave up after {retries} retries)")
                delay = retry_after_seconds(response.headers.get("Retry-After"))
                if delay is None:
                    delay = self._backoff(retries)
            retries += 1
            self._sleep(delay)

    # -- health and metadata --------------------------------------------------------------------

    def ready(self) -> bool:
        """Whether the model answers ready now (no retries)."""
        try:
            return self._http.get(f"{self._model_path}/ready").status_code == 200
        except httpx.TransportError:
            return False

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.ready():
            if time.monotonic() >= deadline:
                raise ClientError(f"{self.url}: model {self.model!r} not ready after {timeout:g} s")
            self._sleep(0.25)

    def metadata(self) -> dict[str, Any]:
        response, _ = self._request("GET", self._model_path)
        try:
            metadata = response.json()
        except ValueError:
            raise ClientError(f"{self.url}{self._model_path}: model metadata is not JSON") from None
        if not isinstance(metadata, dict):
            raise ClientError(f"{self.url}{self._model_path}: model metadata is not a JSON object")
        return metadata

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
        """One request. ``outputs=None`` asks for every output the model has."""
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
    ) -> tuple[InferResult, int]:
        inputs = np.asarray(inputs)
        tensors: list[tuple[str, np.ndarray]] = [("input", inputs)]
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
            requested = None if outputs is None else [RequestedOutput(name, binary) for name in outputs]
            body, headers = encode_request(tensors, parameters=parameters, outputs=requested, binary=binary)
        except ValueError as exc:  # ids, labels or an input dtype the protocol cannot carry
            raise ClientError(f"bad request data: {exc}") from None

        path = f"{self._model_path}/infer"
        response, retries = self._request("POST", path, content=body, headers=headers)
        try:
            header, arrays = decode_response(response.content, response.headers.get(HEADER_LENGTH))
        except ProtocolError as exc:
            raise ClientError(f"{self.url}{path}: malformed response ({exc})") from None
        parameters = header.get("parameters") or {}
        try:
            hits, misses = int(parameters.get("cache_hits", 0)), int(parameters.get("cache_misses", 0))
        except (TypeError, ValueError):
            raise ClientError(f"{self.url}{path}: cache_hits/cache_misses are not integers in the response") from None
        return InferResult(arrays.get("soft_targets"), arrays.get("logits"), hits, misses, parameters), retries

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
        """Send every sample (store=true) in batches from ``concurrency`` threads; stops at the
        first request that fails for good. Re-pushing what is cached already costs only hits."""
        if batch_size < 1 or concurrency < 1:
            raise ClientError(f"batch_size and concurrency must be at least 1, got {batch_size} and {concurrency}")
        inputs = np.asarray(inputs)
        count = len(inputs)
        try:
            ids = None if ids is None else normalize_ids(ids, count)
        except ValueError as exc:
            raise ClientError(f"ids: {exc}") from None
        labels = None if labels is None else np.asarray(labels)
        batches = iter(range(0, count, batch_size))
        summary = PushSummary(samples=0, cache_hits=0, cache_misses=0, seconds=0.0, requests=0, retries=0)
        started = time.perf_counter()

        def send(start: int) -> tuple[InferResult, int]:
            stop = min(start + batch_size, count)
            return self._infer(
                inputs[start:stop],
                ids=None if ids is None else ids[start:stop],
                labels=None if labels is None else labels[start:stop],
                temperature=temperature,
                store=True,
                outputs=("soft_targets",),
                binary=True,
            )

        with tqdm(total=count, unit="sample", desc="push", disable=not progress, file=sys.stderr) as bar:
            pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="teacher-push")
            pending: dict[Future[tuple[InferResult, int]], int] = {}
            try:
                # A bounded window of batches in flight: enough to keep every worker busy.
                for start in batches:
                    pending[pool.submit(send, start)] = min(start + batch_size, count) - start
                    if len(pending) >= 2 * concurrency:
                        break
                while pending:
                    done, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for future in done:
                        samples = pending.pop(future)
                        result, retries = future.result()
                        summary.samples += samples
                        summary.cache_hits += result.cache_hits
                        summary.cache_misses += result.cache_misses
                        summary.requests += 1
                        summary.retries += retries
                        bar.update(samples)
                        bar.set_postfix(hits=summary.cache_hits, misses=summary.cache_misses, refresh=False)
                        start = next(batches, None)
                        if start is not None:
                            pending[pool.submit(send, start)] = min(start + batch_size, count) - start
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
        summary.seconds = time.perf_counter() - started
        return summary

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> TeacherClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------
# teacher-push


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def push_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="teacher-push",
        description="Send a transfer set (.npz with inputs, optional labels and ids) to a teacher service, which caches "
        "the teacher's outputs. Safe to re-run: samples cached already come back as hits.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--url", required=True, help="the service, e.g. http://gpu-host:8000")
    p.add_argument("--data", required=True, help="transfer set .npz")
    p.add_argument("--model", default="teacher")
    p.add_argument("--batch-size", type=_positive_int, default=256, help="samples per request")
    p.add_argument("--concurrency", type=_positive_int, default=4, help="requests in flight")
    p.add_argument("--temperature", type=float, default=None, help="default: the service's serving temperature")
    p.add_argument("--api-key-env", metavar="VAR", default=None, help="environment variable holding the API key")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    p.add_argument("--max-retries", type=int, default=8, help="per request, on 429/503 and connection failures")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def push_main(argv: Sequence[str] | None = None) -> int:
    from .cli import run_cli

    args = push_parser().parse_args(argv)

    def body() -> int:
        api_key = None
        if args.api_key_env:
            api_key = os.environ.get(args.api_key_env)
            if not api_key:
                raise ClientError(f"--api-key-env: environment variable {args.api_key_env} is not set")
        transfer = read_transfer_set(args.data)
        with TeacherClient(args.url, args.model, api_key=api_key, timeout=args.timeout, max_retries=args.max_retries) as client:
            summary = client.push(
                transfer["inputs"],
                ids=transfer.get("ids"),
                labels=transfer.get("labels"),
                batch_size=args.batch_size,
                concurrency=args.concurrency,
                temperature=args.temperature,
                progress=not args.no_progress,
            )
        print(f"teacher-push: {summary.line()}")
        return 0

    return run_cli("teacher-push", body, (CacheError, ClientError))


__all__ = ["ClientError", "InferResult", "PushSummary", "TeacherClient", "push_main", "retry_after_seconds"]
