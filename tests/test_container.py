"""The Dockerfile. A cheap check that always runs: the image's CMD, ENV and HEALTHCHECK, run
outside a container, serve and report ready. The real thing, opt-in (KD_CONTAINER_TESTS=1 and
podman or docker on PATH): build the image, serve a teacher from a mounted volume, get soft
targets over HTTP, stop with SIGTERM, and read the shards the non-root user left in the cache."""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from pathlib import Path

import container
import digits
import httpx
import numpy as np
import pytest
import torch
from conftest import BIN, save_teacher_record
from test_serve_e2e import Server, softmax

from kdcache.offline import models
from kdcache.offline.cache import CacheReader
from kdcache.service.client import TeacherClient
from kdcache.service.launch import free_port


def small_teacher(directory: Path) -> tuple[torch.nn.Module, Path]:
    """An untrained mlp-small for 8x8 digits: enough to check the container serves what it loads."""
    torch.manual_seed(0)
    model = models.build("mlp-small", (8, 8), 10).eval()
    directory.mkdir(parents=True, exist_ok=True)
    return model, save_teacher_record(model, directory / "teacher.pt", arch="mlp-small")


def test_dockerfile_declares_a_non_root_service_on_its_volumes():
    env = container.env()
    volumes = container.exec_form(container.last("VOLUME"), "VOLUME")
    assert Path(env["TEACHER_SERVE_CACHE"]) in map(Path, volumes)
    assert Path(env["TEACHER_SERVE_TEACHER"]).parent in map(Path, volumes)
    assert container.last("EXPOSE") == env["TEACHER_SERVE_PORT"] == "8000"
    assert container.last("USER").split(":")[0] == str(container.CONTAINER_UID)
    options, _ = container.healthcheck()
    # A large teacher takes a while to load and warm up: do not count that as unhealthy.
    assert container.seconds(options["start-period"]) >= 60
    assert container.seconds(options["timeout"]) < container.seconds(options["interval"])


@pytest.mark.slow
def test_cmd_and_healthcheck_work_outside_a_container(tmp_path):
    """The CMD with the image's ENV (paths moved into tmp_path, a free port) serves, and the
    HEALTHCHECK command fails before it is up and passes once it is ready."""
    _, teacher = small_teacher(tmp_path / "teacher")
    env = {key: value for key, value in container.env().items() if key.startswith(("TEACHER_SERVE_", "PYTHON"))}
    env |= {"TEACHER_SERVE_TEACHER": str(teacher), "TEACHER_SERVE_CACHE": str(tmp_path / "cache"), "TEACHER_SERVE_PORT": str(free_port())}
    # In the image the venv's bin is first on PATH: `python` and `teacher-serve` come from there.
    env["PATH"] = f"{BIN}{os.pathsep}{os.environ['PATH']}"
    _, health = container.healthcheck()
    command = container.cmd()

    def check() -> subprocess.CompletedProcess:
        return subprocess.run(health, env={**os.environ, **env}, capture_output=True, text=True, timeout=30)

    assert check().returncode != 0, "the health check passes with no server"
    # The CMD exactly, configured by the environment alone (ServeProcess would add --port).
    server = Server.__new__(Server)
    server.port = int(env["TEACHER_SERVE_PORT"])
    server.url = f"http://127.0.0.1:{server.port}"
    server.log_path = tmp_path / "serve.log"
    server._log = open(server.log_path, "wb")  # noqa: SIM115 - closed in stop()
    server.proc = subprocess.Popen(command, stdout=server._log, stderr=subprocess.STDOUT, env={**os.environ, **env})
    try:
        server.wait_ready(timeout=60)
        result = check()
        assert result.returncode == 0, result.stderr + server.output()
    finally:
        exit_code = server.stop()
    assert exit_code == 0, server.output()


ENGINE = container.engine()
needs_engine = pytest.mark.skipif(
    ENGINE is None or os.environ.get("KD_CONTAINER_TESTS") != "1",
    reason="container test: set KD_CONTAINER_TESTS=1 with podman or docker on PATH (see README, 'Deployment: container')",
)


def engine_run(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([ENGINE, *args], capture_output=True, text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, f"{ENGINE} {' '.join(args)}: exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def image() -> str:
    build = container.build_command(ENGINE)
    result = subprocess.run(build, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, f"{' '.join(build)}: exit {result.returncode}\n{result.stdout[-6000:]}\n{result.stderr[-6000:]}"
    return container.IMAGE


@pytest.mark.slow
@needs_engine
def test_image_serves_a_mounted_teacher_and_leaves_shards_owned_by_its_user(tmp_path, image):
    model, _ = small_teacher(tmp_path / "teacher")
    cache = tmp_path / "cache"
    cache.mkdir()
    cache.chmod(0o777)  # the container's user (UID 10001) writes here; works with docker and podman alike
    port = free_port()
    name = f"kdcache-test-{uuid.uuid4().hex[:8]}"
    url = f"http://127.0.0.1:{port}"
    try:
        engine_run(
            "run", "--detach", "--name", name, "--network", "host",
            "--env", f"TEACHER_SERVE_PORT={port}", "--env", "TEACHER_SERVE_DEVICE=cpu",
            "--health-interval", "2s",  # only to see "healthy" sooner here
            "--volume", f"{tmp_path / 'teacher'}:/teacher:ro", "--volume", f"{cache}:/cache",
            image,
        )  # fmt: skip
        deadline = time.monotonic() + 120
        while True:
            state = engine_run("inspect", "--format", "{{.State.Status}}", name).stdout.strip()
            assert state == "running", f"container {state}:\n" + engine_run("logs", name, check=False).stderr
            try:
                if httpx.get(f"{url}/v2/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "not ready after 120 s:\n" + engine_run("logs", name, check=False).stderr
            time.sleep(0.5)

        # The image's own HEALTHCHECK agrees. Podman runs it on a systemd timer, absent here; ask for it.
        if container.is_podman(ENGINE):
            engine_run("healthcheck", "run", name)
        else:
            while engine_run("inspect", "--format", "{{.State.Health.Status}}", name).stdout.strip() != "healthy":
                assert time.monotonic() < deadline + 30, "the HEALTHCHECK never passed"
                time.sleep(1)

        x = digits.load_split()["x_test"][:40]
        ids = [f"digit-{i}" for i in range(len(x))]
        with TeacherClient(url) as client:
            result = client.infer(x, ids=ids)
        assert result.cache_misses == len(x)
        np.testing.assert_allclose(result.soft_targets, softmax(digits.teacher_logits(model, x), 4.0), atol=1e-5)

        engine_run("stop", "--time", "60", name, timeout=90)  # SIGTERM, then 60 s before SIGKILL
        exit_code = engine_run("inspect", "--format", "{{.State.ExitCode}}", name).stdout.strip()
        assert exit_code == "0", "teacher-serve did not exit cleanly on SIGTERM:\n" + engine_run("logs", name, check=False).stderr

        written = sorted(cache.rglob("*"))
        assert any(path.suffix == ".h5" for path in written), written
        for path in written:
            assert path.stat().st_uid == container.CONTAINER_UID, f"{path} is owned by UID {path.stat().st_uid}"
        reader = CacheReader(cache)
        assert reader.num_samples == len(x)
        stored = reader.read(("ids", "logits"))
        stored_ids = [i.decode() if isinstance(i, bytes) else str(i) for i in stored["ids"]]
        assert sorted(stored_ids) == sorted(ids)
    finally:
        subprocess.run([ENGINE, "rm", "--force", name], capture_output=True, timeout=120)
