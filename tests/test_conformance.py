"""HTTP conformance of a live ``teacher-serve``: the schemathesis CLI, every check
(``--checks all``), against a real uvicorn child process, as a user would run it:

    schemathesis run --checks all http://127.0.0.1:8000/openapi.json

Every status a route sends must be in the OpenAPI document (404 for an unknown model, 401 for a
missing token, 503 while not ready), every 405 must carry ``Allow`` (RFC 9110), and no answer
may be a 5xx or differ from its documented schema. The run is deterministic and bounded
(``MAX_EXAMPLES`` per operation and phase), a few seconds; ``tests/test_fuzz.py`` fuzzes the
app in process, and ``python -m bench.fuzz`` for longer.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import BIN, save_teacher_record

from kdcache.offline import models
from kdcache.service.launch import ServeProcess

MAX_EXAMPLES = 10
TOKEN = "conformance-token"


@pytest.fixture(scope="module")
def teacher_pt(tmp_path_factory) -> Path:
    """An untrained digits-shaped teacher: conformance does not depend on what it predicts."""
    torch.manual_seed(0)
    model = models.build("mlp-small", (8, 8), 10)
    return save_teacher_record(model, tmp_path_factory.mktemp("teacher") / "teacher.pt", arch="mlp-small")


def run_schemathesis(url: str, workdir: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """The CLI in ``workdir``, where it keeps its cache of past failures (.schemathesis/), which
    it would otherwise replay from the working directory in later runs."""
    cli = BIN / "schemathesis"
    if not cli.exists():
        pytest.fail(f"{cli}: missing; the test extra installs schemathesis (pip install -e '.[test]')")
    command = [str(cli), "run", "--checks", "all", "-n", str(MAX_EXAMPLES), "--generation-deterministic", "--no-color", *extra]
    return subprocess.run([*command, f"{url}/openapi.json"], capture_output=True, text=True, timeout=120, cwd=workdir)


@pytest.mark.slow
@pytest.mark.parametrize("auth", [False, True], ids=["open", "token"])
def test_schemathesis_cli_finds_no_failure(tmp_path, teacher_pt, auth):
    args = ["--teacher", str(teacher_pt), "--cache", str(tmp_path / "cache"), "--device", "cpu", "--max-delay-ms", "1"]
    env = {}
    headers: list[str] = []
    if auth:
        args += ["--api-key-env", "KD_CONFORMANCE_TOKEN"]
        env["KD_CONFORMANCE_TOKEN"] = TOKEN
        headers = ["-H", f"Authorization: Bearer {TOKEN}"]
    with ServeProcess(args, tmp_path / "serve.log", env=env) as server:
        server.wait_ready()
        result = run_schemathesis(server.url, tmp_path, *headers)
    report = result.stdout + result.stderr
    summary = report[report.rfind("SUMMARY") :] if "SUMMARY" in report else report[-3000:]
    assert result.returncode == 0, f"schemathesis exited with {result.returncode}:\n{report[-6000:]}"
    assert re.search(r"(\d+) generated, \1 passed", summary), summary
    assert "failure" not in summary.lower(), summary
