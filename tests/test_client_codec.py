"""service/client.py against the codec: what TeacherClient sends decodes with decode_request, what
encode_response returns parses in the client, retries and errors. httpx.MockTransport stands in
for the network; the server itself is tested elsewhere."""

from __future__ import annotations

import email.utils
import functools
import json
import threading
import time

import httpx
import numpy as np
import pytest

import kdcache.service.client as client_module
import kdcache.service.push as push_module
from kdcache.offline.cache import content_ids
from kdcache.service.client import ClientError, TeacherClient, retry_after_seconds
from kdcache.service.protocol import (
    HEADER_LENGTH,
    ProtocolError,
    RequestedOutput,
    decode_request,
    encode_response,
    error_body,
)
from kdcache.service.push import push_main
from kdcache.service.signature import ModelSpec, model_metadata, validate

SPEC = ModelSpec(input_shape=(8, 8), input_dtype="uint8", num_classes=10, temperature=1.0, max_samples=64)
RNG = np.random.default_rng(1)
IMAGES = RNG.integers(0, 256, size=(40, 8, 8), dtype=np.uint8)


def teacher_logits(inputs: np.ndarray) -> np.ndarray:
    return inputs.reshape(len(inputs), -1)[:, : SPEC.num_classes].astype(np.float32) / 16


def softmax(logits: np.ndarray, temperature: float) -> np.ndarray:
    z = logits / temperature
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


class FakeTeacher:
    """A handler for httpx.MockTransport that decodes, validates and answers like the service,
    caching ids (content hashes when none are sent). ``script`` holds canned responses (or
    exceptions to raise) to return before the real answers."""

    def __init__(self, script=()):
        self.script = list(script)
        self.cached: set[str] = set()
        self.requests: list[httpx.Request] = []
        self.batches = []
        self.lock = threading.Lock()

    def __call__(self, request: httpx.Request) -> httpx.Response:
        with self.lock:
            self.requests.append(request)
            if self.script:
                step = self.script.pop(0)
                if isinstance(step, Exception):
                    raise step
                return step
        if request.url.path.endswith("/ready"):
            return httpx.Response(200)
        if request.method == "GET" and request.url.path.endswith("/models/teacher"):  # the metadata an .npz is fitted to
            return httpx.Response(200, json=model_metadata("teacher", SPEC, {}))
        try:
            decoded = decode_request(request.read(), request.headers.get(HEADER_LENGTH))
            batch = validate(decoded, SPEC)
        except ProtocolError as exc:
            return httpx.Response(exc.status, content=error_body(exc.message), headers={"Content-Type": "application/json"})
        ids = batch.ids if batch.ids is not None else content_ids(batch.inputs)
        with self.lock:
            self.batches.append(batch)
            hits = sum(sample_id in self.cached for sample_id in ids)
            if batch.store:
                self.cached.update(ids)
        logits = teacher_logits(batch.inputs)
        tensors = {"logits": logits, "soft_targets": softmax(logits, batch.temperature)}
        body, headers = encode_response(
            "teacher",
            decoded.id,
            {"cache_hits": hits, "cache_misses": len(ids) - hits},
            [(o.name, tensors[o.name], o.binary) for o in batch.outputs],
        )
        return httpx.Response(200, content=body, headers=headers)


def make_client(handler, **kwargs) -> TeacherClient:
    client = TeacherClient("teacher-host:8000", transport=httpx.MockTransport(handler), **kwargs)
    client.sleeps = []
    client._sleep = client.sleeps.append  # record the delays instead of sleeping
    return client


# ---------------------------------------------------------------------------------------------
# Codec


@pytest.mark.parametrize("binary", [True, False])
def test_infer_request_decodes_and_response_parses(binary):
    fake = FakeTeacher()
    with make_client(fake, api_key="s3cret") as client:
        result = client.infer(
            IMAGES[:5],
            ids=["a", "b", "c", "d", 5],
            labels=[1, 2, -1, 3, 4],
            temperature=2.0,
            outputs=("soft_targets", "logits"),
            binary=binary,
        )
    request = fake.requests[0]
    assert request.method == "POST" and str(request.url) == "http://teacher-host:8000/v2/models/teacher/infer"
    assert request.headers["Authorization"] == "Bearer s3cret"
    assert (HEADER_LENGTH in request.headers) == binary
    batch = fake.batches[0]
    np.testing.assert_array_equal(batch.inputs, IMAGES[:5])
    assert list(batch.ids) == ["a", "b", "c", "d", "5"]
    assert batch.labels.tolist() == [1, 2, -1, 3, 4]
    assert (batch.temperature, batch.store) == (2.0, True)
    assert batch.outputs == [RequestedOutput("soft_targets", binary), RequestedOutput("logits", binary)]
    np.testing.assert_array_equal(result.logits, teacher_logits(IMAGES[:5]))
    np.testing.assert_allclose(result.soft_targets, softmax(teacher_logits(IMAGES[:5]), 2.0), rtol=1e-6)
    assert result.soft_targets.dtype == np.float32
    assert (result.cache_hits, result.cache_misses) == (0, 5)
    assert result.parameters == {"cache_hits": 0, "cache_misses": 5}


def test_infer_outputs_none_gets_every_output_in_binary():
    fake = FakeTeacher()
    with make_client(fake) as client:
        result = client.infer(IMAGES[:2], outputs=None, store=False)
    body = json.loads(fake.requests[0].read()[: int(fake.requests[0].headers[HEADER_LENGTH])])
    assert "outputs" not in body and body["parameters"] == {"store": False, "binary_data_output": True}
    assert result.soft_targets.shape == (2, 10) and result.logits.shape == (2, 10)
    assert fake.cached == set()


def test_infer_ids_default_to_none_and_server_hashes_content():
    fake = FakeTeacher()
    with make_client(fake) as client:
        first = client.infer(IMAGES[:3])
        again = client.infer(IMAGES[:3])
    assert fake.batches[0].ids is None
    assert (first.cache_hits, again.cache_hits) == (0, 3)
    assert first.logits is None  # only soft_targets was asked for


def test_bad_client_side_data_is_a_client_error():
    with make_client(FakeTeacher()) as client:
        with pytest.raises(ClientError, match="got 2 ids for 3 samples"):
            client.infer(IMAGES[:3], ids=["a", "b"])
        with pytest.raises(ClientError, match="labels must be 3 integers"):
            client.infer(IMAGES[:3], labels=[0.5, 1, 2])
        with pytest.raises(ClientError, match="complex64"):
            client.infer(np.zeros((2, 8, 8), np.complex64))


def test_malformed_response_is_a_client_error():
    fake = FakeTeacher([httpx.Response(200, content=b"<html>ok</html>")])
    with make_client(fake) as client, pytest.raises(ClientError, match="malformed response"):
        client.infer(IMAGES[:1])


# ---------------------------------------------------------------------------------------------
# Retries and errors


def test_503_with_retry_after_is_retried_after_that_delay():
    fake = FakeTeacher([httpx.Response(503, headers={"Retry-After": "2"}, content=error_body("warming up"))])
    with make_client(fake) as client:
        result, retries = client._infer(
            IMAGES[:2], ids=None, labels=None, temperature=None, store=True, outputs=("soft_targets",), binary=True
        )
    assert retries == 1 and client.sleeps == [2.0] and len(fake.requests) == 2
    assert result.soft_targets.shape == (2, 10)


def test_429_without_retry_after_backs_off_exponentially_with_jitter():
    fake = FakeTeacher([httpx.Response(429)] * 5)
    with make_client(fake) as client:
        client.infer(IMAGES[:1])
    assert len(client.sleeps) == 5
    for retry, delay in enumerate(client.sleeps):
        full = min(client_module.BACKOFF_CAP_S, client_module.BACKOFF_BASE_S * 2**retry)
        assert full / 2 <= delay <= full


def test_connection_errors_and_timeouts_are_retried():
    request = httpx.Request("POST", "http://teacher-host:8000/")
    fake = FakeTeacher([httpx.ConnectError("connection refused", request=request), httpx.ReadTimeout("timed out", request=request)])
    with make_client(fake) as client:
        assert client.infer(IMAGES[:1]).cache_misses == 1
    assert len(client.sleeps) == 2


def test_gives_up_after_max_retries():
    fake = FakeTeacher([httpx.Response(503, content=error_body("overloaded"))] * 10)
    with make_client(fake, max_retries=3) as client, pytest.raises(ClientError) as info:
        client.infer(IMAGES[:1])
    assert len(fake.requests) == 4
    assert str(info.value) == "http://teacher-host:8000/v2/models/teacher/infer: HTTP 503: overloaded (gave up after 3 retries)"


def test_unreachable_server_gives_one_line():
    request = httpx.Request("POST", "http://teacher-host:8000/")
    fake = FakeTeacher([httpx.ConnectError("[Errno 111] Connection refused", request=request)] * 3)
    with make_client(fake, max_retries=2) as client, pytest.raises(ClientError) as info:
        client.infer(IMAGES[:1])
    assert str(info.value) == (
        "http://teacher-host:8000/v2/models/teacher/infer: cannot reach the server (ConnectError: [Errno 111] Connection refused) after 2 retries"
    )


def test_4xx_is_not_retried_and_carries_the_servers_message():
    fake = FakeTeacher()
    with make_client(fake) as client, pytest.raises(ClientError) as info:
        client.infer(np.zeros((2, 8, 9), np.uint8))
    assert len(fake.requests) == 1 and client.sleeps == []
    assert str(info.value) == "http://teacher-host:8000/v2/models/teacher/infer: HTTP 422: input: shape [2, 8, 9], model expects [-1, 8, 8]"


@pytest.mark.parametrize(
    ("response", "message"),
    [
        (httpx.Response(401, content=error_body("missing or bad API key")), "HTTP 401: missing or bad API key"),
        (httpx.Response(500, content=b"Internal\nServer Error"), "HTTP 500: Internal Server Error"),
        (httpx.Response(502), "HTTP 502: Bad Gateway"),
    ],
)
def test_error_messages_are_one_line(response, message):
    with make_client(FakeTeacher([response])) as client, pytest.raises(ClientError) as info:
        client.infer(IMAGES[:1])
    assert str(info.value).endswith(message) and "\n" not in str(info.value)


def test_retry_after_parsing():
    assert retry_after_seconds("3") == 3.0
    assert retry_after_seconds("0.5") == 0.5
    assert retry_after_seconds("-4") == 0.0
    assert retry_after_seconds("100000") == client_module.RETRY_AFTER_CAP_S
    assert retry_after_seconds(None) is None and retry_after_seconds("soon") is None
    later = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 <= retry_after_seconds(later) <= 30


def test_ready_wait_ready_and_metadata():
    fake = FakeTeacher(
        [httpx.Response(503), httpx.Response(503), httpx.Response(200), httpx.Response(200, json={"name": "teacher", "inputs": []})]
    )
    with make_client(fake) as client:
        assert client.ready() is False
        client.wait_ready(timeout=5)
        assert client.metadata() == {"name": "teacher", "inputs": []}
    assert [r.url.path for r in fake.requests] == ["/v2/models/teacher/ready"] * 3 + ["/v2/models/teacher"]

    never = FakeTeacher([httpx.Response(503)] * 1000)
    with make_client(never) as client, pytest.raises(ClientError, match="not ready after 0.05 s"):
        client._sleep = time.sleep
        client.wait_ready(timeout=0.05)


# ---------------------------------------------------------------------------------------------
# push and teacher-push


def test_push_batches_concurrently_and_resumes_as_hits():
    fake = FakeTeacher()
    ids = np.array([f"s{i}" for i in range(len(IMAGES))], dtype=object)
    with make_client(fake) as client:
        first = client.push(IMAGES, ids=ids, labels=np.arange(len(IMAGES)) % 10, batch_size=7, concurrency=3, progress=False)
        again = client.push(IMAGES, ids=ids, batch_size=16, concurrency=2, progress=False)
    assert (first.samples, first.cache_hits, first.cache_misses, first.requests, first.retries) == (40, 0, 40, 6, 0)
    assert (again.samples, again.cache_hits, again.cache_misses, again.requests) == (40, 40, 0, 3)
    assert first.samples_per_s > 0
    assert sorted(fake.cached) == sorted(ids)
    assert all(batch.store for batch in fake.batches)
    sent = sorted(np.concatenate([batch.ids for batch in fake.batches[:6]]))
    assert sent == sorted(ids)  # every sample exactly once


def test_push_counts_retries_and_stops_at_a_failure():
    fake = FakeTeacher([httpx.Response(503, headers={"Retry-After": "0"})])
    with make_client(fake) as client:
        summary = client.push(IMAGES[:10], batch_size=5, concurrency=1, progress=False)
    assert (summary.requests, summary.retries, summary.cache_misses) == (2, 1, 10)

    with make_client(FakeTeacher()) as client, pytest.raises(ClientError, match="HTTP 422: label"):
        client.push(IMAGES, labels=np.full(len(IMAGES), 99), batch_size=8, progress=False)


@pytest.fixture
def transfer_npz(tmp_path):
    path = tmp_path / "transfer.npz"
    np.savez(path, inputs=IMAGES[:20], labels=np.arange(20) % 10)
    return path


@pytest.fixture
def fake_service(monkeypatch):
    fake = FakeTeacher()
    monkeypatch.setattr(push_module, "TeacherClient", functools.partial(TeacherClient, transport=httpx.MockTransport(fake)))
    return fake


def test_push_main_pushes_and_prints_a_summary(transfer_npz, fake_service, capsys, monkeypatch):
    monkeypatch.setenv("KD_KEY", "k")
    argv = ["--url", "http://h:1", "--data", str(transfer_npz), "--batch-size", "8", "--api-key-env", "KD_KEY", "--no-progress"]
    assert push_main(argv) == 0
    assert push_main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("teacher-push: 20 samples, 0 hits, 20 misses, ")
    assert out[1].startswith("teacher-push: 20 samples, 20 hits, 0 misses, ") and "samples/s" in out[1]
    assert fake_service.requests[0].headers["Authorization"] == "Bearer k"


@pytest.mark.parametrize(
    ("make_argv", "message"),
    [
        (lambda npz: ["--data", str(npz.parent / "missing.npz")], "missing.npz: no such file"),
        (lambda npz: ["--data", str(npz), "--api-key-env", "KD_UNSET_VAR"], "environment variable KD_UNSET_VAR is not set"),
        (lambda npz: ["--data", str(npz), "--temperature", "-1"], "HTTP 422: temperature: must be a finite number > 0"),
    ],
)
def test_push_main_errors_are_one_line_exit_2(make_argv, message, transfer_npz, fake_service, capsys, monkeypatch):
    monkeypatch.delenv("KD_UNSET_VAR", raising=False)
    assert push_main(["--url", "http://h:1", "--no-progress", *make_argv(transfer_npz)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("teacher-push: error: ") and message in err, err


def test_push_main_bad_npz_and_unreachable_server(tmp_path, transfer_npz, capsys):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    assert push_main(["--url", "http://127.0.0.1:9", "--data", str(bad)]) == 2
    assert "not a readable .npz file" in capsys.readouterr().err
    # A real refused connection (port 9, discard, is closed here), no retries so it fails at once.
    assert push_main(["--url", "http://127.0.0.1:9", "--data", str(transfer_npz), "--max-retries", "0", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot reach the server (ConnectError" in err, err
