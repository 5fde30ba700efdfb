"""The service in process: real app, real teacher, real cache, through httpx's ASGI transport."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from kdcache.offline.cache import CacheError, CacheReader, make_layout
from kdcache.offline.journal import JOURNAL_NAME
from kdcache.offline.losses import distillation_loss
from kdcache.service.app import create_app
from kdcache.service.batcher import Batcher, QueueFull
from kdcache.service.protocol import RequestedOutput, decode_response, encode_request
from kdcache.service.runtime import TeacherService
from kdcache.service.settings import ServeSettings
from kdcache.service.store import CacheStore
from kdcache.service.teacher import load_teacher

T = 4.0
FULL = make_layout("full")


def run(coro):
    return asyncio.run(coro)


@contextlib.asynccontextmanager
async def serving(tmp_path: Path, teachers: list[Path], *, api_key: str | None = None, teacher=None, **options):
    settings = ServeSettings(teacher=[str(p) for p in teachers], cache=tmp_path / "cache", device="cpu", temperature=T, **options)
    teacher = teacher or load_teacher(settings.teacher, ensemble=settings.ensemble, temperature=T, device="cpu")
    service = TeacherService.open(settings, teacher, api_key)
    app = create_app(service)
    await service.start()
    for _ in range(500):
        if service.ready:
            break
        await asyncio.sleep(0.01)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test", headers=headers) as client:
            yield service, client
    finally:
        await service.stop()


async def infer(client, inputs, *, ids=None, labels=None, binary=True, outputs=("soft_targets", "logits"), model="teacher", **params):
    tensors = [("input", inputs)]
    if ids is not None:
        tensors.append(("id", np.asarray(ids, dtype=object) if np.asarray(ids).dtype.kind != "i" else np.asarray(ids)))
    if labels is not None:
        tensors.append(("label", np.asarray(labels, dtype=np.int64)))
    body, headers = encode_request(tensors, parameters=params or None, outputs=[RequestedOutput(o, binary) for o in outputs], binary=binary)
    response = await client.post(f"/v2/models/{model}/infer", content=body, headers=headers)
    if response.status_code != 200:
        return response, None, None
    header, tensors_out = decode_response(response.content, response.headers.get("inference-header-content-length"))
    return response, header, tensors_out


def reference_soft_targets(model: torch.nn.Module, x: np.ndarray, temperature: float) -> np.ndarray:
    import digits

    with torch.no_grad():
        return torch.softmax(torch.from_numpy(digits.teacher_logits(model, x)) / temperature, dim=1).numpy()


def test_routes_and_metadata(tmp_path, digits_teacher_pt):
    async def body():
        async with serving(tmp_path, [digits_teacher_pt]) as (service, client):
            assert (await client.get("/v2/health/live")).json() == {"live": True}
            assert (await client.get("/v2/health/ready")).status_code == 200
            assert (await client.get("/v2/models/teacher/ready")).status_code == 200
            assert "binary_tensor_data" in (await client.get("/v2")).json()["extensions"]
            meta = (await client.get("/v2/models/teacher")).json()
            assert meta["inputs"][0] == {"name": "input", "datatype": "UINT8", "shape": [-1, 8, 8]}
            assert meta["outputs"][0] == {"name": "soft_targets", "datatype": "FP32", "shape": [-1, 10]}
            assert meta["parameters"]["teacher"]["fingerprint"] == service.teacher.fingerprint
            missing = await client.get("/v2/models/other")
            assert missing.status_code == 404 and "unknown model" in missing.json()["error"]
            assert (await client.get("/v2/models/teacher/versions/7")).status_code == 404
            assert "kd_requests_total" in (await client.get("/metrics")).text

    run(body())


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_soft_targets_match_the_teacher_and_are_stored(tmp_path, digits_teacher, digits_teacher_pt, binary):
    x = digits_teacher["x_test"][:50]
    y = digits_teacher["y_test"][:50]

    async def body():
        async with serving(tmp_path, [digits_teacher_pt]) as (service, client):
            response, header, out = await infer(client, x, ids=[f"s{i}" for i in range(50)], labels=y, binary=binary)
            assert response.status_code == 200, response.text
            assert header["parameters"]["cache_misses"] == 50 and header["parameters"]["cache_hits"] == 0
            np.testing.assert_allclose(out["soft_targets"], reference_soft_targets(digits_teacher["teacher"], x, T), atol=1e-5)
            np.testing.assert_allclose(out["soft_targets"].sum(axis=1), 1.0, atol=1e-5)
            # The same request again: every sample is a hit, the teacher does not run, nothing is stored twice.
            forwards = service.metrics.batch_size._sum.get()
            response, header, again = await infer(client, x, ids=[f"s{i}" for i in range(50)], binary=binary, temperature=2.0)
            assert header["parameters"] == {"cache_hits": 50, "cache_misses": 0, "temperature": 2.0, "stored": True}
            assert service.metrics.batch_size._sum.get() == forwards
            np.testing.assert_allclose(again["soft_targets"], reference_soft_targets(digits_teacher["teacher"], x, 2.0), atol=1e-5)
            np.testing.assert_array_equal(again["logits"], out["logits"])
            return service

    service = run(body())
    cache = CacheReader(service.store.directory).read()
    assert sorted(cache["ids"]) == sorted(f"s{i}" for i in range(50))
    order = np.argsort([int(i[1:]) for i in cache["ids"]])
    np.testing.assert_array_equal(cache["inputs"][order], x)
    np.testing.assert_array_equal(cache["labels"][order], y)
    assert not (service.store.directory / JOURNAL_NAME).exists()  # a clean stop publishes everything


def test_content_ids_partial_hits_and_store_false(tmp_path, digits_teacher, digits_teacher_pt):
    x = digits_teacher["x_test"][:40]

    async def body():
        async with serving(tmp_path, [digits_teacher_pt], max_batch=16) as (service, client):
            _, header, first = await infer(client, x[:20])  # no ids: the sha256 of each input is its id
            assert header["parameters"]["cache_misses"] == 20
            _, header, mixed = await infer(client, x)  # 20 known, 20 new, split into batches of 16
            assert (header["parameters"]["cache_hits"], header["parameters"]["cache_misses"]) == (20, 20)
            np.testing.assert_array_equal(mixed["logits"][:20], first["logits"])
            _, header, _ = await infer(client, digits_teacher["x_train"][:10], store=False)
            assert header["parameters"]["stored"] is False
            assert service.store.num_samples == 40
            _, header, _ = await infer(client, digits_teacher["x_train"][:10])
            assert header["parameters"]["cache_misses"] == 10  # store=false left nothing behind
            assert service.store.num_samples == 50
            assert service.metrics.batch_size._sum.get() == 20 + 20 + 10 + 10

    run(body())


def test_bad_requests_are_rejected_and_write_nothing(tmp_path, digits_teacher_pt):
    good = np.zeros((2, 8, 8), dtype=np.uint8)

    def raw(payload: dict, headers: dict | None = None) -> tuple[bytes, dict]:
        return json.dumps(payload).encode(), headers or {}

    cases = {
        "not json": (400, (b"{nope", {}), None),
        "no inputs": (400, raw({"outputs": []}), "inputs"),
        "wrong dtype": (422, encode_request([("input", good.astype(np.float32))]), "input"),
        "wrong shape": (422, encode_request([("input", np.zeros((2, 8, 9), np.uint8))]), "input"),
        "duplicate ids": (422, encode_request([("input", good), ("id", np.array(["a", "a"], dtype=object))]), "id"),
        "ids length": (422, encode_request([("input", good), ("id", np.array(["a"], dtype=object))]), "id"),
        "label range": (422, encode_request([("input", good), ("label", np.array([0, 10]))]), "label"),
        "unknown input": (422, encode_request([("input", good), ("extra", np.zeros(2, np.int64))]), "extra"),
        "unknown datatype": (
            400,
            raw({"inputs": [{"name": "input", "shape": [1, 8, 8], "datatype": "FP8", "data": [0] * 64}]}),
            "FP8",
        ),
        "truncated binary": (400, (encode_request([("input", good)])[0][:-5], encode_request([("input", good)])[1]), "input"),
        "bad header length": (400, (encode_request([("input", good)])[0], {"Inference-Header-Content-Length": "x"}), None),
        "huge shape": (
            413,
            raw({"inputs": [{"name": "input", "shape": [1 << 40, 8, 8], "datatype": "UINT8", "parameters": {"binary_data_size": 1}}]}),
            None,
        ),
        "negative temperature": (422, encode_request([("input", good)], parameters={"temperature": -1}), "temperature"),
        "store not bool": (422, encode_request([("input", good)], parameters={"store": "yes"}), "store"),
        "no_outputs not bool": (422, encode_request([("input", good)], parameters={"no_outputs": 1}), "no_outputs"),
        "no_outputs and outputs": (
            422,
            encode_request([("input", good)], parameters={"no_outputs": True}, outputs=[RequestedOutput("logits", True)]),
            "no_outputs",
        ),
    }

    async def body():
        async with serving(tmp_path, [digits_teacher_pt], max_body_mb=0.01) as (service, client):
            for name, (status, (payload, headers), field) in cases.items():
                response = await client.post("/v2/models/teacher/infer", content=payload, headers=headers)
                assert response.status_code == status, (name, response.text)
                message = response.json()["error"]
                assert field is None or field in message, (name, message)
            too_big = await client.post("/v2/models/teacher/infer", content=b"x" * 20000)
            assert too_big.status_code == 413
            assert service.store.num_samples == 0
            assert service.metrics.batch_size._sum.get() == 0  # the teacher never ran
            return service

    service = run(body())
    assert CacheReader(service.store.directory).num_samples == 0


def test_answers_are_counted_by_status_and_refusals_by_kind(tmp_path, digits_teacher_pt):
    """kd_requests counts every answer of the infer routes, whoever wrote it (the route or an
    exception handler); kd_errors counts each refusal under its kind."""

    async def body():
        async with serving(tmp_path, [digits_teacher_pt], max_body_mb=0.01) as (service, client):
            sent = {
                200: encode_request([("input", np.zeros((2, 8, 8), np.uint8))]),
                400: (b"{nope", {}),
                413: (b"x" * 20000, {}),
                415: (b"{}", {"Content-Encoding": "gzip"}),
                422: encode_request([("input", np.zeros((2, 8, 9), np.uint8))]),
            }
            for status, (payload, headers) in sent.items():
                assert (await client.post("/v2/models/teacher/infer", content=payload, headers=headers)).status_code == status
            assert (await client.post("/v2/models/other/infer", content=b"{}")).status_code == 404
            assert (await client.get("/v2/models/other")).status_code == 404  # not an inference request
            requests, errors = service.metrics.requests, service.metrics.errors
            assert {s: requests.labels(status=str(s))._value.get() for s in (200, 400, 404, 413, 415, 422)} == dict.fromkeys(
                (200, 400, 404, 413, 415, 422), 1.0
            )
            assert {k: errors.labels(kind=k)._value.get() for k in ("bad_request", "too_large", "invalid")} == {
                "bad_request": 2.0,
                "too_large": 1.0,
                "invalid": 1.0,
            }

            async def broken(body: bytes, header_length: str | None) -> tuple[bytes, dict[str, str]]:
                raise RuntimeError("boom")

            service.handle = broken  # an unexpected failure: a JSON 500, counted like any other answer
            # The route answers it: nothing is re-raised into the server (the transport would raise it).
            transport = httpx.ASGITransport(app=create_app(service))
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as raw_client:
                response = await raw_client.post("/v2/models/teacher/infer", content=b"{}")
            assert response.status_code == 500 and response.json() == {"error": "internal error: RuntimeError: boom"}
            assert requests.labels(status="500")._value.get() == 1 and errors.labels(kind="internal")._value.get() == 1

    run(body())


def test_nan_inputs_are_rejected(tmp_path, digits_teacher, second_teacher_pt):
    """A float model: NaN and Inf inputs are refused, naming the sample."""
    import digits

    x = (digits_teacher["x_test"][:4] / 16).astype(np.float32)
    path = tmp_path / "float.pt"
    record = torch.load(second_teacher_pt, weights_only=True)
    record.update(input_dtype="float32", preprocessing={"scale": 1.0, "mean": [0.0], "std": [1.0]})
    torch.save(record, path)
    assert digits.PREPROCESSING.scale == 1 / 16

    async def body():
        async with serving(tmp_path, [path]) as (service, client):
            response, _, out = await infer(client, x)
            assert response.status_code == 200
            bad = x.copy()
            bad[2, 3, 3] = np.nan
            response, _, _ = await infer(client, bad)
            assert response.status_code == 422 and "#2" in response.json()["error"]
            bad[2, 3, 3] = np.inf
            response, _, _ = await infer(client, bad)
            assert response.status_code == 422
            assert service.store.num_samples == 4

    run(body())


def test_api_key(tmp_path, digits_teacher_pt):
    async def body():
        async with serving(tmp_path, [digits_teacher_pt], api_key="s3cret") as (service, client):
            assert (await client.get("/v2/models/teacher")).status_code == 200
            for headers in ({"Authorization": ""}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
                for method, path in (
                    ("GET", "/v2"),
                    ("GET", "/v2/models/teacher"),
                    ("POST", "/v2/models/teacher/infer"),
                    ("GET", "/metrics"),
                ):
                    response = await client.request(method, path, headers=headers)
                    assert response.status_code == 401, (headers, path)
                    assert "s3cret" not in response.text
            for path in ("/v2/health/live", "/v2/health/ready"):
                assert (await client.get(path, headers={"Authorization": ""})).status_code == 200

    run(body())


class GatedTeacher:
    """The real digits teacher behind a gate, to hold a batch inside the model on purpose."""

    def __init__(self, teacher) -> None:
        self.teacher = teacher
        self.gate = threading.Event()
        self.entered = threading.Event()

    def encode(self, *args, **kwargs):
        self.entered.set()
        self.gate.wait(30)
        return self.teacher.encode(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.teacher, name)

    async def hold(self, request) -> asyncio.Task:
        """Shut the gate, start ``request`` (a coroutine) and return its task once its batch is
        inside the model; ``gate.set()`` lets it finish."""
        self.gate.clear()
        self.entered.clear()
        task = asyncio.create_task(request)
        while not self.entered.is_set():
            await asyncio.sleep(0.005)
        return task


def test_full_queue_answers_503_and_health_stays_up_during_a_long_batch(tmp_path, digits_teacher, digits_teacher_pt):
    base = load_teacher([str(digits_teacher_pt)], temperature=T, device="cpu")
    gated = GatedTeacher(base)
    x = digits_teacher["x_train"]

    async def body():
        # The queue holds 6.5 KiB of inputs and their targets: 64 digits (64 bytes and 10 float32 logits each).
        async with serving(tmp_path, [digits_teacher_pt], teacher=gated, max_batch=16, max_queue_mb=6.5 / 1024) as (service, client):
            gated.gate.set()
            await infer(client, x[:1])  # warm
            first = await gated.hold(infer(client, x[:64], ids=np.arange(64)))
            live = await asyncio.wait_for(client.get("/v2/health/live"), 2)
            assert live.status_code == 200
            assert (await client.get("/v2/health/ready")).status_code == 200
            response, _, _ = await infer(client, x[100:164], ids=np.arange(100, 164))
            assert response.status_code == 503
            assert response.headers["retry-after"]
            assert "queue is full" in response.json()["error"]
            gated.gate.set()
            response, header, _ = await first
            assert response.status_code == 200 and header["parameters"]["cache_misses"] == 64
            assert service.store.num_samples == 65

    run(body())


def test_batcher_bounds_the_queue_by_bytes():
    async def body():
        batcher = Batcher(lambda x, *_: {"logits": np.zeros((len(x), 2), np.float32)}, store=None, layout=FULL, max_batch=4, max_queue_bytes=100)
        batcher.start()
        first = batcher.submit(np.zeros((10, 8), np.uint8), np.arange(10).astype(str).astype(object), np.full(10, -1), False)
        assert len(first) == 3  # split into jobs of at most max_batch
        with pytest.raises(QueueFull):
            batcher.submit(np.zeros((10, 8), np.uint8), np.arange(10).astype(str).astype(object), np.full(10, -1), False)
        results = await asyncio.gather(*(job.future for job in first))
        assert [len(r.fields["logits"]) for r in results] == [4, 4, 2]
        await batcher.stop()

    run(body())


def test_a_batch_runs_at_once_when_no_other_request_can_join_and_waits_for_one_that_can():
    """One client sending requests one after another never waits out --max-delay-ms (60 s here:
    the first wait_for would time out); a request the route is still handling is waited for, and
    joins the batch."""
    sizes: list[int] = []

    def encode(x, *_):
        sizes.append(len(x))
        return {"logits": np.zeros((len(x), 2), np.float32)}

    def ids(n, start=0):
        return np.arange(start, start + n).astype(str).astype(object)

    async def body():
        batcher = Batcher(encode, store=None, layout=FULL, max_batch=4, max_delay_s=60.0)
        batcher.start()
        batcher.enter()  # one request, alone
        (job,) = batcher.submit(np.zeros((2, 8), np.uint8), ids(2), np.full(2, -1), False)
        await asyncio.wait_for(job.future, 10)
        batcher.leave()
        batcher.enter(), batcher.enter()  # two requests: the second is still being read when the first queues
        (first,) = batcher.submit(np.zeros((2, 8), np.uint8), ids(2, 2), np.full(2, -1), False)
        await asyncio.sleep(0.05)
        assert not first.future.done()  # waiting for the second
        (second,) = batcher.submit(np.zeros((2, 8), np.uint8), ids(2, 4), np.full(2, -1), False)
        await asyncio.wait_for(asyncio.gather(first.future, second.future), 10)
        assert sizes == [2, 4]
        await batcher.stop()

    run(body())


@pytest.mark.parametrize("ensemble", ["geometric", "arithmetic"])
def test_ensemble_soft_targets_and_the_trainer_reproduces_them(tmp_path, digits_teacher, digits_teacher_pt, second_teacher_pt, ensemble):
    x = digits_teacher["x_test"][:30]
    members = [load_teacher([str(p)], temperature=T, device="cpu") for p in (digits_teacher_pt, second_teacher_pt)]
    member_logits = [torch.from_numpy(m.forward(x)) for m in members]
    if ensemble == "geometric":
        expected = torch.softmax(torch.stack(member_logits).mean(0) / T, dim=1)
    else:
        expected = torch.stack([torch.softmax(z / T, dim=1) for z in member_logits]).mean(0)

    async def body():
        async with serving(tmp_path, [digits_teacher_pt, second_teacher_pt], ensemble=ensemble) as (service, client):
            response, header, out = await infer(client, x, ids=np.arange(30))
            assert response.status_code == 200, response.text
            assert len(service.teacher.members) == 2
            if ensemble == "arithmetic":
                refused, _, _ = await infer(client, x, temperature=2.0)
                assert refused.status_code == 422 and "arithmetic" in refused.json()["error"]
            return out, service

    out, service = run(body())
    np.testing.assert_allclose(out["soft_targets"], expected.numpy(), atol=1e-5)
    # What the trainer sees: the stored logits, softened at the same temperature inside the loss.
    cache = CacheReader(service.store.directory).read()
    order = np.argsort(cache["ids"].astype(int))
    stored = torch.from_numpy(cache["logits"][order].astype(np.float32))
    trainer_targets = torch.softmax(stored / T, dim=1)
    np.testing.assert_allclose(trainer_targets.numpy(), out["soft_targets"], atol=1e-6)
    # And the loss is zero (up to rounding) for a student that outputs exactly those logits.
    loss = distillation_loss(stored.clone(), stored, torch.full((30,), -1), T, 1.0)
    assert abs(float(loss)) < 1e-5


def test_a_cache_of_another_teacher_is_refused(tmp_path, digits_teacher_pt, second_teacher_pt):
    first = load_teacher([str(digits_teacher_pt)], temperature=T, device="cpu")
    CacheStore(tmp_path / "cache", first.cache_meta()).close()
    other = load_teacher([str(second_teacher_pt)], temperature=T, device="cpu")
    with pytest.raises(CacheError, match="teacher_fingerprint"):
        CacheStore(tmp_path / "cache", other.cache_meta())


def test_store_takes_each_id_once_even_within_one_write(tmp_path, digits_teacher_pt):
    """The batcher joins concurrent requests into one write, so one write can repeat an id."""
    teacher = load_teacher([str(digits_teacher_pt)], temperature=T, device="cpu")
    store = CacheStore(tmp_path / "cache", teacher.cache_meta())
    x = np.zeros((3, 8, 8), np.uint8)
    x[2] += 1
    logits = np.zeros((3, 10), np.float32)
    first = store.write(np.array(["a", "b", "a"], dtype=object), x, {"logits": logits}, np.full(3, -1))
    second = store.write(np.array(["b", "c"], dtype=object), x[:2], {"logits": logits[:2]}, np.full(2, -1))
    assert first.result(10) == 2 and second.result(10) == 1
    store.close()
    assert sorted(CacheReader(tmp_path / "cache").read(("ids",))["ids"]) == ["a", "b", "c"]


def test_buffered_ack_stores_too(tmp_path, digits_teacher, digits_teacher_pt):
    x = digits_teacher["x_test"][:64]

    async def body():
        async with serving(tmp_path, [digits_teacher_pt], ack="buffered", max_batch=16) as (service, client):
            assert not service.store.durable
            response, header, _ = await infer(client, x, ids=np.arange(64))
            assert response.status_code == 200 and header["parameters"]["cache_misses"] == 64
            return service

    service = run(body())
    stored = CacheReader(service.store.directory).read(("ids",))["ids"]
    assert sorted(stored.astype(int).tolist()) == list(range(64))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_serving_on_cuda_with_bfloat16_autocast(tmp_path, digits_teacher, digits_teacher_pt):
    x = digits_teacher["x_test"][:100]
    teacher = load_teacher([str(digits_teacher_pt)], temperature=T, device="cuda", dtype="bfloat16")

    async def body():
        async with serving(tmp_path, [digits_teacher_pt], teacher=teacher, device="cuda", dtype="bfloat16") as (service, client):
            response, header, out = await infer(client, x, ids=np.arange(100))
            assert response.status_code == 200, response.text
            return out

    out = run(body())
    assert out["soft_targets"].dtype == np.float32
    np.testing.assert_allclose(out["soft_targets"], reference_soft_targets(digits_teacher["teacher"], x, T), atol=2e-2)


def test_a_full_disk_answers_507_keeps_what_was_acknowledged_and_recovers(tiny_filesystem, digits_teacher, digits_teacher_pt):
    import os

    x = np.concatenate([digits_teacher["x_train"], digits_teacher["x_test"]] * 4)

    async def body():
        async with serving(tiny_filesystem, [digits_teacher_pt]) as (service, client):
            stats = os.statvfs(tiny_filesystem)
            filler = tiny_filesystem / "filler"
            filler.write_bytes(b"\0" * (stats.f_bavail * stats.f_frsize - (5 << 20)))  # leave 5 MiB
            acknowledged, refused = [], 0
            for start in range(0, len(x), 64):
                index = np.arange(start, start + 64)
                response, _, _ = await infer(client, x[index], ids=index, outputs=("logits",))
                if response.status_code == 200:
                    assert refused == 0, "a request succeeded after the disk was full"
                    acknowledged.extend(index.tolist())
                else:
                    assert response.status_code == 507, response.text
                    assert "disk is full" in response.json()["error"] and response.headers["retry-after"]
                    refused += 1
                    if refused == 3:
                        break
            assert acknowledged and refused == 3
            assert (await client.get("/v2/health/ready")).status_code == 200
            filler.unlink()  # space is back: the service takes writes again
            response, _, _ = await infer(client, x[:64] + 1, ids=np.arange(100_000, 100_064), outputs=("logits",))
            assert response.status_code == 200, response.text
            return acknowledged + list(range(100_000, 100_064)), service

    acknowledged, service = run(body())
    stored = set(CacheReader(service.store.directory).read(("ids",))["ids"].astype(int).tolist())
    assert set(acknowledged) <= stored
    assert CacheReader(service.store.directory).verify() == []
