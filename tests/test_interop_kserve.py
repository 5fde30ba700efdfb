"""Interoperability with the KServe Python SDK's own v2 client (``kserve.InferenceRESTClient``),
beside ``tritonclient`` (tests/test_serve_e2e.py, tests/test_protocol.py): against a real
``teacher-serve`` process, JSON and binary requests with ids and labels, the health and
readiness calls, an error message read from the answer, and the samples in the cache afterwards.

The SDK is heavy (kubernetes, grpcio, pandas: about 450 MB), so it is not in the ``test`` extra;
``pip install 'kdcache[interop]'`` installs it, and without it this file is skipped.
"""

from __future__ import annotations

import asyncio
import signal

import digits
import httpx
import numpy as np
import pytest
import torch
from conftest import save_teacher_record

from kdcache.offline import models
from kdcache.offline.cache import CacheReader
from kdcache.service.launch import ServeProcess

kserve = pytest.importorskip("kserve", reason="the KServe SDK is not installed: pip install 'kdcache[interop]'")
from kserve.protocol.infer_type import RequestedOutput  # noqa: E402 - only once the SDK is known to be there

T = 2.0
TOKEN = "interop-token"
HEADERS = {"Authorization": f"Bearer {TOKEN}"}


def softmax(z: np.ndarray, temperature: float) -> np.ndarray:
    z = z / temperature
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def infer_request(x: np.ndarray, ids: list[str], labels: np.ndarray, binary: bool) -> kserve.InferRequest:
    """A request as the SDK builds it: uint8 inputs, BYTES ids and INT64 labels, both outputs."""
    tensors = []
    for name, values, datatype in (("input", x, "UINT8"), ("id", np.array(ids, dtype=object), "BYTES"), ("label", labels, "INT64")):
        tensor = kserve.InferInput(name, list(values.shape), datatype)
        tensor.set_data_from_numpy(values, binary_data=binary)
        tensors.append(tensor)
    outputs = [RequestedOutput(name, parameters={"binary_data": binary}) for name in ("soft_targets", "logits")]
    return kserve.InferRequest("teacher", tensors, request_id=f"kserve-{binary}", request_outputs=outputs)


@pytest.mark.slow
def test_kserve_rest_client_json_and_binary(tmp_path):
    torch.manual_seed(0)
    model = models.build("mlp-small", (8, 8), 10).eval()
    teacher = save_teacher_record(model, tmp_path / "teacher.pt", arch="mlp-small")
    x = np.random.default_rng(0).integers(0, 17, size=(12, 8, 8), dtype=np.uint8)
    labels = np.arange(12, dtype=np.int64) % 10
    expected_logits = digits.teacher_logits(model, x)
    cache = tmp_path / "cache"
    args = ["--teacher", str(teacher), "--cache", str(cache), "--device", "cpu", "--temperature", str(T), "--api-key-env", "KD_TOKEN"]

    async def talk(url: str) -> None:
        client = kserve.InferenceRESTClient(kserve.RESTConfig(protocol="v2", timeout=60))
        try:
            assert await client.is_server_live(url, headers=HEADERS)
            assert await client.is_server_ready(url, headers=HEADERS)
            assert await client.is_model_ready(url, "teacher", headers=HEADERS)
            for binary, rows in ((False, slice(0, 6)), (True, slice(6, 12))):
                ids = [f"kserve-{'binary' if binary else 'json'}-{i}" for i in range(rows.start, rows.stop)]
                response_headers: dict[str, str] = {}
                result = await client.infer(
                    url, infer_request(x[rows], ids, labels[rows], binary), model_name="teacher", headers=dict(HEADERS),
                    response_headers=response_headers,
                )  # fmt: skip
                assert ("inference-header-content-length" in response_headers) == binary
                outputs = {output.name: output.as_numpy() for output in result.outputs}
                assert result.model_name == "teacher" and set(outputs) == {"soft_targets", "logits"}
                np.testing.assert_allclose(outputs["logits"], expected_logits[rows], rtol=1e-5, atol=1e-5)
                np.testing.assert_allclose(outputs["soft_targets"], softmax(expected_logits[rows], T), rtol=1e-5, atol=1e-6)
            with pytest.raises(httpx.HTTPStatusError, match=r"unknown model 'nope'.*404"):
                await client.infer(url, infer_request(x[:1], ["x"], labels[:1], False), model_name="nope", headers=dict(HEADERS))
        finally:
            await client.close()

    with ServeProcess(args, tmp_path / "serve.log", env={"KD_TOKEN": TOKEN}) as server:
        server.wait_ready()
        asyncio.run(talk(server.url))
        assert server.stop(signal.SIGTERM) == 0, server.output()
    stored = CacheReader(cache).read()
    by_id = dict(zip(stored["ids"], stored["labels"], strict=True))
    assert by_id == {f"kserve-{kind}-{i}": int(labels[i]) for kind, rows in (("json", range(6)), ("binary", range(6, 12))) for i in rows}
