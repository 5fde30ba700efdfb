"""teacher-serve --targets topk:K|sampled:N, end to end: a real server writes a compressed cache
directly, answers dense soft targets decoded from what it keeps (fresh or as a cache hit), keeps its draw seed across
restarts, refuses another layout on the same cache, and offline-distill trains on the cache
with no further option."""

from __future__ import annotations

import asyncio
import json
import subprocess

import httpx
import numpy as np
import pytest
import torch
from conftest import BIN, small_float_teacher

from kdcache.offline.cache import CacheReader
from kdcache.offline.cache.rng import draw_seeds
from kdcache.service.app import create_app
from kdcache.service.client import TeacherClient
from kdcache.service.launch import ServeProcess
from kdcache.service.protocol import RequestedOutput, decode_response, encode_request
from kdcache.service.runtime import TeacherService
from kdcache.service.settings import ServeSettings
from kdcache.service.teacher import load_teacher

SHAPE, CLASSES, T = (1, 8, 8), 10, 2.0


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return small_float_teacher(tmp_path_factory.mktemp("teacher"), SHAPE, CLASSES)


def transfer_set(path, n: int = 40) -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng(0)
    x = rng.random((n, *SHAPE), dtype=np.float32)
    ids = [f"img-{i}" for i in range(n)]
    np.savez(path, inputs=x, labels=rng.integers(0, CLASSES, n), ids=np.array(ids))
    return x, ids


def serve_args(teacher_pt, cache, *extra) -> list[str]:
    return ["--teacher", str(teacher_pt), "--cache", str(cache), "--device", "cpu", "--temperature", str(T), *extra]


def push(url: str, data) -> None:
    result = subprocess.run(
        [str(BIN / "teacher-push"), "--url", url, "--data", str(data), "--batch-size", "16"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("targets", ["topk:5", "sampled:16"])
def test_serve_writes_a_compressed_cache_and_answers_dense_soft_targets(tmp_path, teacher, targets):
    model, teacher_pt = teacher
    x, ids = transfer_set(tmp_path / "transfer.npz")
    cache = tmp_path / "cache"
    with ServeProcess(serve_args(teacher_pt, cache, "--targets", targets, "--target-seed", "9"), tmp_path / "serve.log") as server:
        server.wait_ready()
        push(server.url, tmp_path / "transfer.npz")
        with TeacherClient(server.url) as client:
            fresh = client.infer(x[:2], ids=["new-0", "new-1"], outputs=("soft_targets",))
            hit = client.infer(x[:2], ids=ids[:2], outputs=("soft_targets",))
    with torch.no_grad():
        teacher_logits = model(torch.from_numpy(x)).numpy()
    assert fresh.cache_hits == 0 and hit.cache_hits == 2
    reader = CacheReader(cache)
    layout = reader.meta.layout
    # Dense, decoded from the fields encoded on the teacher's device: what a later hit answers.
    kept = layout.decode(layout.encode(teacher_logits[:2], draw_seeds(9, ["new-0", "new-1"], 1)[:, 0]))
    np.testing.assert_allclose(fresh.soft_targets, torch.softmax(torch.from_numpy(kept) / T, -1).numpy(), atol=1e-5)
    np.testing.assert_allclose(hit.soft_targets.sum(-1), 1.0, rtol=1e-5)
    assert reader.meta.logits_layout == targets and reader.meta.serving_temperature == T
    assert reader.meta.target_seed == (9 if targets.startswith("sampled") else 0)  # recorded only where draws use it
    stored = reader.read(("ids", *layout.fields(CLASSES)))
    order = np.argsort(stored["ids"].astype(str))
    rows = [ids.index(i) for i in stored["ids"][order] if i in ids]
    direct = layout.encode(teacher_logits[rows], draw_seeds(9, [ids[r] for r in rows], 1)[:, 0])
    for name, values in direct.items():
        kept = stored[name][order][np.isin(stored["ids"][order], ids)]
        np.testing.assert_allclose(kept.astype(np.float64), values.astype(np.float64), rtol=1e-5, atol=1e-5, err_msg=name)

    inspect = json.loads(
        subprocess.run([str(BIN / "cache-inspect"), str(cache), "--json"], capture_output=True, text=True, check=True).stdout
    )
    assert inspect["logits_layout"] == targets
    run = subprocess.run(
        [str(BIN / "offline-distill"), "--cache", str(cache), "--epochs", "1", "--out", str(tmp_path / "run"), "--no-progress", "--no-export"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["temperature"] == T


@pytest.mark.slow
def test_a_restart_keeps_the_layout_and_draw_seed_and_another_is_refused(tmp_path, teacher):
    _, teacher_pt = teacher
    cache = tmp_path / "cache"
    with ServeProcess(serve_args(teacher_pt, cache, "--targets", "sampled:4", "--target-seed", "9"), tmp_path / "serve.log") as server:
        server.wait_ready()
        assert server.stop() == 0
    with ServeProcess(serve_args(teacher_pt, cache), tmp_path / "serve2.log") as server:
        server.wait_ready()  # no --targets, no --target-seed: the cache's
        assert server.stop() == 0
    assert "taken from the cache" in server.output() and "--targets sampled:4" in server.output()
    assert CacheReader(cache).meta.logits_layout == "sampled:4" and CacheReader(cache).meta.target_seed == 9
    for other, given in (
        (["--targets", "topk:2"], "--targets topk:2"),
        (["--targets", "sampled:4", "--target-seed", "3"], "--target-seed 3"),
        (["--temperature", "1"], "--temperature 1"),
    ):
        args = serve_args(teacher_pt, cache, *other)
        if "--temperature" in other:
            args = args[:-4] + other  # the last --temperature wins anyway; keep one
        result = subprocess.run([str(BIN / "teacher-serve"), *args], capture_output=True, text=True, timeout=120)
        assert result.returncode == 2 and result.stderr.startswith(f"teacher-serve: error: {given} disagrees with the cache"), result.stderr


async def _infer(client, inputs, ids, **parameters):
    body, headers = encode_request(
        [("input", inputs), ("id", np.array(ids, dtype=object))], parameters=parameters or None,
        outputs=[RequestedOutput("soft_targets", True)], binary=True,
    )  # fmt: skip
    response = await client.post("/v2/models/teacher/infer", content=body, headers=headers)
    if response.status_code != 200:
        return response, None, None
    header, outputs = decode_response(response.content, response.headers.get("inference-header-content-length"))
    return response, header["parameters"], outputs["soft_targets"]


@pytest.mark.parametrize("targets", ["topk:3", "sampled:8"])
def test_a_sparse_cache_serves_only_its_serving_temperature(tmp_path, teacher, targets):
    """A cache hit answers the decoded sparse targets, which exist only at the serving temperature:
    another request temperature is refused (422), for hits and fresh samples alike, as for an
    arithmetic ensemble, and the model metadata says so."""
    _, teacher_pt = teacher
    x = np.random.default_rng(1).random((6, *SHAPE), dtype=np.float32)
    ids = [f"s{i}" for i in range(6)]
    settings = ServeSettings(teacher=[str(teacher_pt)], cache=tmp_path / "cache", device="cpu", temperature=T, targets=targets)
    service = TeacherService.open(settings, load_teacher(settings.teacher, temperature=T, device="cpu"))

    async def body():
        await service.start()
        while not service.ready:
            await asyncio.sleep(0.01)
        transport = httpx.ASGITransport(app=create_app(service))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            parameters = (await client.get("/v2/models/teacher")).json()["parameters"]
            assert parameters["targets"] == targets and parameters["fixed_temperature"] is True
            assert targets in parameters["fixed_temperature_reason"]
            response, answer, first = await _infer(client, x, ids)
            assert response.status_code == 200 and answer["cache_misses"] == 6, response.text

            for request_ids in (ids, ["new-0", "new-1"]):  # hits, and fresh samples
                refused, _, _ = await _infer(client, x[: len(request_ids)], request_ids, temperature=2 * T)
                assert refused.status_code == 422, refused.text
                error = refused.json()["error"]
                assert error.startswith("temperature: ") and targets in error and f"send {T:g}" in error, error
            assert service.store.num_samples == 6  # nothing stored

            response, answer, hits = await _infer(client, x, ids, temperature=T)
            assert response.status_code == 200 and answer["cache_hits"] == 6 and answer["temperature"] == T
            np.testing.assert_allclose(hits.sum(-1), 1.0, rtol=1e-5)
            if targets.startswith("topk"):  # what the cache keeps: the top classes exactly, the draws' frequencies
                np.testing.assert_array_equal(hits.argmax(-1), first.argmax(-1))
            else:
                np.testing.assert_allclose(hits * 8, np.round(hits * 8), atol=1e-5)
        await service.stop()

    asyncio.run(body())


@pytest.mark.parametrize(
    ("targets", "message"),
    [
        ("topk:10", "--targets: topk:10 needs K < C, the teacher's 10 classes"),
        ("topk:0", "--targets: topk:K needs K >= 1"),
        ("sampled:0", "--targets: sampled:N needs N >= 1"),
        ("ranked:2", "--targets: Value error, unknown target layout 'ranked:2'"),
        ("topk:two", "needs an integer K"),
    ],
)
def test_bad_targets_are_refused_in_one_line_and_write_nothing(tmp_path, teacher, targets, message):
    _, teacher_pt = teacher
    cache = tmp_path / "cache"
    result = subprocess.run(
        [str(BIN / "teacher-serve"), *serve_args(teacher_pt, cache, "--targets", targets)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if "error" in line]
    assert lines and message in lines[-1] and "Traceback" not in result.stderr, result.stderr
    assert not cache.exists()
