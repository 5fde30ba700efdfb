"""teacher-push --url A --url B against two real teacher-serve processes: the batches are spread
over both (batch k to replica k in turn, so a re-push meets each sample's cache again), a
replica killed with kill -9 is routed around, a 4xx still fails at once, and with every
replica dead the one-line error names each URL. In process: a 5xx goes to another replica at once."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import BIN, small_float_teacher
from test_client_codec import IMAGES, FakeTeacher

from kdcache.service.client import ClientError, TeacherClient
from kdcache.service.launch import ServeProcess, free_port

SHAPE, CLASSES, SAMPLES = (4, 4), 3, 24  # 6 requests of 4


@pytest.fixture(scope="module")
def teacher_pt(tmp_path_factory) -> Path:
    return small_float_teacher(tmp_path_factory.mktemp("teacher"), SHAPE, CLASSES)[1]


@pytest.fixture
def transfer_npz(tmp_path) -> Path:
    path = tmp_path / "transfer.npz"
    inputs = np.random.default_rng(0).standard_normal((SAMPLES, *SHAPE)).astype(np.float32)
    np.savez(path, inputs=inputs, ids=np.array([f"s{i}" for i in range(SAMPLES)]))
    return path


def serve(tmp_path: Path, teacher: Path, name: str) -> ServeProcess:
    """One replica: a teacher-serve with its own cache."""
    args = ["--teacher", str(teacher), "--cache", str(tmp_path / f"cache-{name}"), "--device", "cpu"]
    return ServeProcess(args, tmp_path / f"serve-{name}.log")


def push(urls: list[str], data: Path, *extra: str) -> subprocess.CompletedProcess:
    flags = [arg for url in urls for arg in ("--url", url)]
    return subprocess.run(
        [str(BIN / "teacher-push"), *flags, "--data", str(data), "--batch-size", "4", "--concurrency", "2", "--no-progress", *extra],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def summary(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stderr
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("teacher-push: ")]
    return line


def answered(line: str) -> dict[str, int]:
    """The summary's requests answered, by replica URL."""
    listed = line.split(", answered: ")[1]
    return {url: int(count) for url, count in re.findall(r"(http://\S+) (\d+)", listed)}


def failed_in_one_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("teacher-push: error: ") and "Traceback" not in result.stderr, result.stderr
    return result.stderr


@pytest.mark.slow
def test_a_push_is_spread_over_two_replicas_and_goes_on_when_one_is_killed(tmp_path, teacher_pt, transfer_npz):
    a, b = (serve(tmp_path, teacher_pt, name) for name in "ab")
    with a, b:
        a.wait_ready(), b.wait_ready()
        urls = [a.url, b.url]
        first = summary(push(urls, transfer_npz))
        assert f" {SAMPLES} samples, 0 hits, {SAMPLES} misses, " in first and answered(first) == {a.url: 3, b.url: 3}, first
        again = summary(push(urls, transfer_npz))  # each batch goes to the replica that cached it
        assert f" {SAMPLES} samples, {SAMPLES} hits, 0 misses, " in again and answered(again) == {a.url: 3, b.url: 3}, again

        refused = failed_in_one_line(push(urls, transfer_npz, "--temperature", "-1"))  # the request's fault: no other replica tried
        assert "HTTP 422: temperature" in refused and refused.count("http://") == 1, refused

        b.kill()  # kill -9
        rerouted = summary(push(urls, transfer_npz))
        assert f" {SAMPLES} samples, {SAMPLES // 2} hits, {SAMPLES // 2} misses, " in rerouted, rerouted  # b's half, new to a
        assert answered(rerouted) == {a.url: 6, b.url: 0} and " 0 retries" not in rerouted, rerouted


@pytest.mark.slow
def test_with_every_replica_dead_the_error_names_each_url(transfer_npz):
    urls = [f"http://127.0.0.1:{free_port()}" for _ in range(2)]  # nothing listens there: refused, as after kill -9
    error = failed_in_one_line(push(urls, transfer_npz, "--max-retries", "1"))
    assert "every replica failed" in error, error
    for url in urls:
        assert f"{url}: cannot reach the server (ConnectError" in error, error


def test_a_5xx_goes_to_another_replica_and_the_request_fails_when_each_answered_one():
    fake = FakeTeacher()
    broken = {"a"}

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(500, content=b"boom") if request.url.host in broken else fake(request)

    with TeacherClient(["a:1", "b:1"], transport=httpx.MockTransport(handler)) as client:
        sleeps = []
        client._sleep = sleeps.append
        assert {client.infer(IMAGES[:1]).replica_url for _ in range(3)} == {"http://b:1"} and sleeps == []  # no wait to go to b
        broken.add("b")
        with pytest.raises(ClientError) as info:
            client.infer(IMAGES[:1])
    error = str(info.value)  # a 5xx is not retried where it came from: one try on each
    assert error.startswith("/v2/models/teacher/infer: every replica failed, after 1 retries: "), error
    assert "http://a:1: HTTP 500: boom" in error and "http://b:1: HTTP 500: boom" in error, error
