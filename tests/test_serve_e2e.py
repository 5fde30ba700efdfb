"""End to end against a real ``teacher-serve`` subprocess on a loopback port: teacher-push,
tritonclient, many concurrent clients, SIGTERM, kill -9 after acknowledgement, and the refusals
at start-up."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import digits
import httpx
import numpy as np
import pytest
from conftest import BIN

from kdcache.offline.cache import CacheReader, content_ids
from kdcache.offline.journal import JOURNAL_NAME
from kdcache.service.client import TeacherClient
from kdcache.service.launch import LaunchError, ServeProcess

T = 4.0


SERVERS: list[Server] = []


@pytest.fixture(autouse=True)
def _no_server_outlives_its_test():
    yield
    while SERVERS:
        server = SERVERS.pop()
        if server.proc.poll() is None:
            server.kill()


class Server(ServeProcess):
    """A teacher-serve subprocess; a failure to start shows its whole log."""

    def __init__(self, tmp_path: Path, args: list[str], env: dict[str, str] | None = None, module: bool = False) -> None:
        command = [sys.executable, "-m", "kdcache.service"] if module else [str(BIN / "teacher-serve")]
        super().__init__(args, tmp_path / f"serve-{len(SERVERS)}-{time.monotonic_ns()}.log", command=command, env=env)
        SERVERS.append(self)

    def wait_ready(self, timeout: float = 90.0) -> Server:
        try:
            super().wait_ready(timeout)
        except LaunchError as exc:
            raise AssertionError(f"{exc}\n{self.output()}") from None
        return self


def serve_args(teacher: Path, cache: Path, *extra: str) -> list[str]:
    return ["--teacher", str(teacher), "--cache", str(cache), "--device", "cpu", "--temperature", str(T), *extra]


def reference_logits(digits_teacher: dict, x: np.ndarray) -> np.ndarray:
    return digits.teacher_logits(digits_teacher["teacher"], x)


def softmax(z: np.ndarray, temperature: float) -> np.ndarray:
    z = z / temperature
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_push_tritonclient_concurrent_clients_and_sigterm(tmp_path, digits_teacher, digits_teacher_pt):
    x = digits_teacher["x_train"]
    transfer = tmp_path / "transfer.npz"
    np.savez(transfer, inputs=x, labels=digits_teacher["y_train"])
    cache = tmp_path / "cache"
    # Configured through the environment, as in a container; started as `python -m kdcache.service`.
    env = {"TEACHER_SERVE_MAX_BATCH": "64", "TEACHER_SERVE_API_KEY_ENV": "KD_TOKEN", "KD_TOKEN": "tok-123"}
    server = Server(tmp_path, serve_args(digits_teacher_pt, cache), env=env, module=True).wait_ready()
    try:
        push = [str(BIN / "teacher-push"), "--url", server.url, "--data", str(transfer), "--batch-size", "100", "--concurrency", "3"]
        unauthorised = subprocess.run(push, capture_output=True, text=True, timeout=120)
        assert unauthorised.returncode == 2 and "401" in unauthorised.stderr, unauthorised.stderr
        assert "Traceback" not in unauthorised.stderr
        first = subprocess.run([*push, "--api-key-env", "KD_TOKEN"], capture_output=True, text=True, timeout=120, env={**os.environ, **env})
        assert first.returncode == 0, first.stderr + server.output()
        summary = first.stdout + first.stderr
        assert f"{len(x)} samples" in summary and f"{len(x)} misses" in summary.replace(",", ""), summary
        again = subprocess.run([*push, "--api-key-env", "KD_TOKEN"], capture_output=True, text=True, timeout=120, env={**os.environ, **env})
        assert again.returncode == 0 and f"{len(x)} hits" in (again.stdout + again.stderr).replace(",", ""), again.stdout + again.stderr

        # A stock Triton client, JSON and binary.
        httpclient = pytest.importorskip("tritonclient.http")
        triton = httpclient.InferenceServerClient(server.url.removeprefix("http://"))
        sample = digits_teacher["x_test"][:8]
        expected = softmax(reference_logits(digits_teacher, sample), T)
        headers = {"Authorization": "Bearer tok-123"}
        for binary in (False, True):
            tensor = httpclient.InferInput("input", list(sample.shape), "UINT8")
            tensor.set_data_from_numpy(sample, binary_data=binary)
            output = httpclient.InferRequestedOutput("soft_targets", binary_data=binary)
            # (tritonclient adds its own headers to the dict it is given, so give it a copy)
            result = triton.infer("teacher", [tensor], outputs=[output], headers=dict(headers), parameters={"store": False})
            np.testing.assert_allclose(result.as_numpy("soft_targets"), expected, atol=1e-5)
        assert triton.is_server_ready(headers=dict(headers)) and triton.is_model_ready("teacher", headers=dict(headers))
        triton.close()

        # Many concurrent clients, overlapping ids: each id ends up in the cache exactly once.
        extra = digits_teacher["x_test"]
        errors: list[BaseException] = []

        def client_thread(worker: int) -> None:
            try:
                with TeacherClient(server.url, api_key="tok-123") as client:
                    rng = np.random.default_rng(worker)
                    for _ in range(6):
                        pick = rng.choice(len(extra), 24, replace=False)
                        result = client.infer(extra[pick], ids=[f"test-{i}" for i in pick], outputs=("logits",))
                        np.testing.assert_allclose(result.logits, reference_logits(digits_teacher, extra[pick]), atol=1e-5)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=client_thread, args=(w,)) for w in range(12)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert not errors, errors[0]
        metrics = httpx.get(f"{server.url}/metrics", headers=headers).text
        assert "kd_cache_hits_total" in metrics and "kd_batch_size_bucket" in metrics
    finally:
        code = server.stop(signal.SIGTERM)
    assert code == 0, server.output()
    reader = CacheReader(cache)
    assert reader.verify() == []
    assert not (cache / JOURNAL_NAME).exists()
    stored = reader.read()
    assert len(stored["ids"]) == len(set(stored["ids"]))
    test_ids = {i for i in stored["ids"] if i.startswith("test-")}
    assert len(stored["ids"]) == len(x) + len(test_ids)
    by_id = dict(zip(stored["ids"], range(len(stored["ids"])), strict=True))
    rows = [by_id[i] for i in content_ids(x)]
    np.testing.assert_array_equal(stored["labels"][rows], digits_teacher["y_train"])
    np.testing.assert_allclose(stored["logits"][rows], reference_logits(digits_teacher, x), atol=1e-5)


def test_kill_9_after_acknowledgement_loses_nothing(tmp_path, digits_teacher, digits_teacher_pt):
    cache = tmp_path / "cache"
    x = np.concatenate([digits_teacher["x_train"], digits_teacher["x_test"]])
    expected = reference_logits(digits_teacher, x)
    acknowledged: set[int] = set()
    lock = threading.Lock()
    stop = threading.Event()

    server = Server(tmp_path, serve_args(digits_teacher_pt, cache, "--max-batch", "32", "--shard-samples", "300")).wait_ready()

    def client_thread(worker: int) -> None:
        with TeacherClient(server.url, max_retries=0, timeout=10) as client:
            for start in range(worker * 16, len(x), 4 * 16):
                if stop.is_set():
                    return
                index = np.arange(start, min(start + 16, len(x)))
                try:
                    client.infer(x[index], ids=index, outputs=("logits",))
                except Exception:  # noqa: BLE001 - the server died mid-request: not acknowledged
                    return
                with lock:
                    acknowledged.update(index.tolist())

    threads = [threading.Thread(target=client_thread, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    while len(acknowledged) < 600:
        time.sleep(0.01)
        assert any(t.is_alive() for t in threads)
    server.kill()  # kill -9 while requests are in flight
    stop.set()
    for thread in threads:
        thread.join(30)
    with lock:
        acked = sorted(acknowledged)
    assert len(acked) >= 600

    journal_bytes = (cache / JOURNAL_NAME).stat().st_size
    restarted = Server(tmp_path, serve_args(digits_teacher_pt, cache, "--shard-samples", "300")).wait_ready()
    assert journal_bytes == 0 or "recovered the journal" in restarted.output(), restarted.output()
    assert restarted.stop() == 0, restarted.output()
    verify = subprocess.run([str(BIN / "cache-inspect"), str(cache), "--verify"], capture_output=True, text=True, timeout=120)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    stored = CacheReader(cache).read(("ids", "logits"))
    by_id = dict(zip(stored["ids"], range(len(stored["ids"])), strict=True))
    missing = [i for i in acked if str(i) not in by_id]
    assert not missing, f"{len(missing)} acknowledged samples lost, e.g. {missing[:5]}"
    rows = [by_id[str(i)] for i in acked]
    np.testing.assert_allclose(stored["logits"][rows], expected[acked], atol=1e-5)


def test_refusals_at_start_up(tmp_path, digits_teacher_pt, second_teacher_pt):
    cache = tmp_path / "cache"
    first = Server(tmp_path, serve_args(digits_teacher_pt, cache)).wait_ready()
    assert first.stop() == 0
    other = subprocess.run([str(BIN / "teacher-serve"), *serve_args(second_teacher_pt, cache)], capture_output=True, text=True, timeout=120)
    assert other.returncode == 2
    assert "refusing to start" in other.stderr and "teacher_fingerprint" in other.stderr, other.stderr
    assert "Traceback" not in other.stderr
    cases = {
        "no teacher": ([str(BIN / "teacher-serve"), "--cache", str(cache)], "--teacher"),
        "missing file": ([str(BIN / "teacher-serve"), *serve_args(tmp_path / "nope.pt", cache)], "nope.pt"),
        "bad max batch": ([str(BIN / "teacher-serve"), *serve_args(digits_teacher_pt, cache), "--max-batch", "0"], "--max-batch"),
        "unset key": ([str(BIN / "teacher-serve"), *serve_args(digits_teacher_pt, cache), "--api-key-env", "KD_UNSET_TOKEN"], "KD_UNSET_TOKEN"),
    }
    for name, (command, needle) in cases.items():
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert result.returncode == 2, (name, result.stderr)
        assert needle in result.stderr and "Traceback" not in result.stderr, (name, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1, (name, result.stderr)
    assert json.loads((cache / "manifest.json").read_text())["num_samples"] == 0
