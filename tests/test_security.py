"""Security of the service: the token guards every route but health, is compared in constant
time and never logged; the model name in the URL is never a path; no request reads or writes
outside the cache directory; an exposed server without a token warns; the container is not root
(tests/test_container.py)."""

from __future__ import annotations

import hmac
import os
import secrets
import socket
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import BIN
from test_service import infer, run, serving

from kdcache.offline.cache import CacheReader
from kdcache.service.launch import ServeProcess
from kdcache.service.protocol import RequestedOutput, encode_request

# Names that would reach files if the model name were ever joined to a path, raw and URL-encoded.
# (httpx resolves a literal ``..`` before sending, so those go through ``raw_get``.)
HOSTILE_NAMES = [
    "..%2Fteacher", "%2e%2e%2f%2e%2e%2fetc%2fpasswd", "%2Fetc%2Fpasswd", "teacher%2F..%2Fteacher",
    "teacher%00", "teacher.pt", "~root", "C:%5Cwindows", "teacher%20", "TEACHER",
]  # fmt: skip
# Ids are data: they are stored in HDF5 as strings and never become file names.
HOSTILE_IDS = ["../../outside/evil", "/tmp/kd-evil", "..\\..\\evil", "shard-000000.h5", "manifest.json", ".journal", "é/\u202e"]


def request_body(n: int = 4, ids: list[str] | None = None) -> tuple[bytes, dict[str, str]]:
    x = np.random.default_rng(0).integers(0, 17, size=(n, 8, 8), dtype=np.uint8)
    tensors = [("input", x)]
    if ids is not None:
        tensors.append(("id", np.array(ids, dtype=object)))
    return encode_request(tensors, outputs=[RequestedOutput("logits", True)])


def raw_get(port: int, target: str, token: str | None = None) -> int:
    """A request line sent byte for byte (httpx would normalise ``..`` away); returns the status."""
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n".encode())
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    return int(reply.split(b" ", 2)[1])


def tree(root: Path, skip: tuple[Path, ...]) -> dict[str, int]:
    return {
        str(p.relative_to(root)): p.stat().st_size
        for p in sorted(root.rglob("*"))
        if p.is_file() and not any(p == s or s in p.parents for s in skip)
    }


def test_a_running_server_guards_every_route_and_never_logs_the_token(tmp_path, digits_teacher_pt):
    token, other = f"kd-{secrets.token_hex(16)}", f"kd-{secrets.token_hex(16)}"
    cache, outside = tmp_path / "cache", tmp_path / "outside"
    outside.mkdir()
    (outside / "canary.txt").write_text("unchanged")
    args = [
        "--teacher", str(digits_teacher_pt), "--cache", str(cache), "--device", "cpu", "--api-key-env", "KD_TOKEN",
        "--access-log", "--log-level", "debug",
    ]  # fmt: skip
    server = ServeProcess(args, tmp_path / "serve.log", command=[str(BIN / "teacher-serve")], env={"KD_TOKEN": token}, cwd=outside)
    before = tree(tmp_path, skip=(cache, tmp_path / "serve.log"))
    try:
        server.wait_ready(90)
        authed = {"Authorization": f"Bearer {token}"}
        spec = httpx.get(f"{server.url}/openapi.json", headers=authed, timeout=10).json()
        routes = []
        for path, methods in spec["paths"].items():
            for method in methods:
                routes.append((method.upper(), path.replace("{name}", "teacher").replace("{version}", "1")))
        routes += [("GET", "/docs"), ("GET", "/redoc"), ("GET", "/openapi.json"), ("GET", "/nowhere"), ("GET", "/v2/healthz")]
        protected = [r for r in routes if not r[1].startswith("/v2/health/")]
        assert ("GET", "/metrics") in protected and ("POST", "/v2/models/teacher/infer") in protected
        body, headers = request_body()
        refused = {
            "no header": {},
            "empty": {"Authorization": ""},
            "other token": {"Authorization": f"Bearer {other}"},
            "no scheme": {"Authorization": token},
            "basic": {"Authorization": f"Basic {token}"},
            "prefix": {"Authorization": f"Bearer {token[:-1]}"},
            "longer": {"Authorization": f"Bearer {token}x"},
            "lower-case scheme and two spaces": {"Authorization": f"bearer  {token}"},
        }
        with httpx.Client(base_url=server.url, timeout=30) as http:
            for label, auth in refused.items():
                for method, path in protected:
                    response = http.request(method, path, headers={**auth, **headers}, content=body if method == "POST" else None)
                    assert response.status_code == 401, (label, method, path, response.status_code)
                    assert token not in response.text and other not in response.text
                response = http.get(f"/metrics?token={token}")
                assert response.status_code == 401
            for path in ("/v2/health/live", "/v2/health/ready"):
                assert http.get(path).status_code == 200
            # A health prefix does not open other routes, however the path is spelled.
            for target in ("/v2/health/../models/teacher", "/v2/health/%2e%2e/models/teacher", "/v2/health/live/../../models/teacher"):
                assert raw_get(server.port, target) in (401, 404), target
            for target in ("/v2/models/..", "/v2/models/../teacher", "/v2/models/../models/teacher/ready", "/v2/models/teacher/.."):
                assert raw_get(server.port, target, token) in (400, 404), target
            # The model name is matched against the one served, never opened.
            for name in HOSTILE_NAMES:
                for method, path in (
                    ("GET", f"/v2/models/{name}"),
                    ("GET", f"/v2/models/{name}/ready"),
                    ("POST", f"/v2/models/{name}/infer"),
                ):
                    response = http.request(method, path, headers={**authed, **headers}, content=body if method == "POST" else None)
                    assert response.status_code in (400, 404), (name, path, response.status_code, response.text)
            # Hostile ids are stored as data.
            hostile_body, hostile_headers = request_body(len(HOSTILE_IDS), HOSTILE_IDS)
            response = http.post("/v2/models/teacher/infer", headers={**authed, **hostile_headers}, content=hostile_body)
            assert response.status_code == 200, response.text
            # A NUL inside an id is refused up front: HDF5 strings end at NUL, so such an id once
            # failed the whole shard at publication.
            nul_body, nul_headers = request_body(2, ["fine", "a\x00b"])
            response = http.post("/v2/models/teacher/infer", headers={**authed, **nul_headers}, content=nul_body)
            assert response.status_code == 422 and "NUL" in response.text, response.text
            assert http.post("/v2/models/teacher/infer", headers={**authed, **headers}, content=body).status_code == 200
            http.post("/v2/models/teacher/infer", headers={"Authorization": f"Bearer {other}", **headers}, content=body)
    finally:
        assert server.stop() == 0, server.output()
    log = server.output()
    assert "POST /v2/models/teacher/infer" in log, "the access log is on, so requests were logged"
    assert token not in log and other not in log and token[:12] not in log, "a token reached the log"
    assert (outside / "canary.txt").read_text() == "unchanged"
    assert tree(tmp_path, skip=(cache, tmp_path / "serve.log")) == before, "a file outside the cache changed"
    stored = set(CacheReader(cache).read(("ids",))["ids"].tolist())
    assert set(HOSTILE_IDS) <= stored and "fine" not in stored


def test_an_exposed_server_without_a_token_warns(tmp_path, digits_teacher_pt):
    args = ["--teacher", str(digits_teacher_pt), "--cache", str(tmp_path / "cache"), "--device", "cpu", "--host", "0.0.0.0"]
    server = ServeProcess(args, tmp_path / "serve.log", command=[str(BIN / "teacher-serve")])
    try:
        server.wait_ready(90)
    finally:
        server.stop()
    warnings = [line for line in server.output().splitlines() if "WARNING" in line and "0.0.0.0" in line]
    assert len(warnings) == 1 and "--api-key-env" in warnings[0], server.output()


def test_the_token_is_compared_in_constant_time(tmp_path, digits_teacher_pt, monkeypatch):
    """Every check goes through hmac.compare_digest with the whole header, whatever its length
    or how early it differs; nothing compares the token with ``==`` first."""
    seen: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a, b):
        seen.append((bytes(a), bytes(b)))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    token = "s3cret-token"

    async def body():
        async with serving(tmp_path, [digits_teacher_pt], api_key=token) as (_, client):
            for given in ("", "x", f"Bearer {token[:3]}", f"Bearer {token}", f"Bearer {token}{token}"):
                status = (await client.get("/v2/models/teacher", headers={"Authorization": given})).status_code
                assert status == (200 if given == f"Bearer {token}" else 401)

    run(body())
    assert [given for given, _ in seen] == [
        b"",
        b"x",
        f"Bearer {token[:3]}".encode(),
        f"Bearer {token}".encode(),
        f"Bearer {token}{token}".encode(),
    ]
    assert all(expected == f"Bearer {token}".encode() for _, expected in seen)


FILE_EVENTS = {"open", "os.remove", "os.rename", "os.replace", "os.mkdir", "os.rmdir", "os.truncate", "os.chmod", "os.symlink",
               "os.link", "os.listdir", "os.scandir", "shutil.rmtree", "shutil.copyfile", "shutil.move"}  # fmt: skip
_recording: list[tuple[str, tuple]] | None = None


def _audit(event: str, args: tuple) -> None:
    if _recording is not None and event in FILE_EVENTS:
        _recording.append((event, args))


def test_no_request_reads_or_writes_outside_the_cache(tmp_path, digits_teacher_pt):
    """Python's audit hooks see every file the process opens, renames or removes while hostile
    requests run: writes only ever touch the cache directory, and reads elsewhere are only the
    interpreter's own modules."""
    global _recording
    sys.addaudithook(_audit)
    cache = (tmp_path / "cache").resolve()
    code_roots = [Path(p).resolve() for p in {sys.prefix, sys.base_prefix, *sys.path} if p]

    async def body():
        global _recording
        async with serving(tmp_path, [digits_teacher_pt], shard_samples=8) as (service, client):
            _recording = []
            x = np.random.default_rng(1).integers(0, 17, size=(len(HOSTILE_IDS), 8, 8), dtype=np.uint8)
            response, _, _ = await infer(client, x, ids=HOSTILE_IDS)
            assert response.status_code == 200, response.text
            for name in HOSTILE_NAMES:
                assert (await client.get(f"/v2/models/{name}")).status_code in (400, 404)
                response, _, _ = await infer(client, x[:2], model=name)
                assert response.status_code in (400, 404)
            for _ in range(3):  # enough rows for shard rollovers and manifest updates
                x = np.random.default_rng(2 + _).integers(0, 17, size=(10, 8, 8), dtype=np.uint8)
                assert (await infer(client, x))[0].status_code == 200
        _recording, events = None, _recording
        return events

    events = run(body())
    assert any(event == "os.rename" for event, _ in events), "the recording saw no shard being published"
    outside = []
    for event, args in events:
        target = args[0] if args else None
        if not isinstance(target, (str, bytes, Path)):
            continue  # a file descriptor: opened earlier, where the path was checked
        path = Path(target.decode() if isinstance(target, bytes) else target).resolve()
        writes = event != "open" or any(flag in str(args[1]) for flag in "wax+") or (isinstance(args[2], int) and args[2] & 0o3)
        if path == cache or cache in path.parents:
            continue
        if not writes and any(root in path.parents for root in code_roots):
            continue
        outside.append((event, str(path), args[1:3]))
    assert not outside, f"file access outside the cache: {outside[:10]}"
    for event, args in events:  # and the ids never became names, inside the cache either
        for hostile in ("evil", "kd-evil"):
            assert hostile not in str(args[:2]), (event, args)


@pytest.mark.parametrize("name", ["../cache", "..", "a/b", "x" * 65, ""])
def test_the_served_model_name_cannot_be_a_path(tmp_path, digits_teacher_pt, name):
    result = ServeProcess(
        ["--teacher", str(digits_teacher_pt), "--cache", str(tmp_path / "cache"), "--model-name", name], tmp_path / "serve.log",
        command=[str(BIN / "teacher-serve")],
    )  # fmt: skip
    assert result.proc.wait(60) == 2
    result.stop()
    assert "model_name" in result.output() or "model-name" in result.output(), result.output()


def authorization_values(token: str, examples: int) -> list[str]:
    """Header values drawn by hypothesis: near misses of the token and arbitrary latin-1 text."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    text = st.text(st.characters(min_codepoint=32, max_codepoint=255), max_size=80)
    bases = st.sampled_from([f"Bearer {token}", token, f"bearer {token}", "Bearer", "Bearer ", f"Bearer {token[:-1]}"])
    values = st.one_of(st.tuples(bases, text.map(lambda t: t[:8])).map("".join), text)
    drawn: list[str] = []

    @settings(max_examples=examples, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
    @given(values)
    def collect(value: str) -> None:
        drawn.append(value)

    collect()
    return drawn


def check_authorization_values(tmp_path: Path, teacher_pt: Path, examples: int) -> None:
    """Any Authorization value but the exact one gets 401 on a guarded route; never a 5xx."""
    token = "s3cret-token"
    values = authorization_values(token, examples)

    async def body():
        async with serving(tmp_path, [teacher_pt], api_key=token) as (_, client):
            for value in values:
                response = await client.get("/v2/models/teacher", headers={"Authorization": value.encode("latin-1")})
                assert response.status_code == (200 if value == f"Bearer {token}" else 401), (value, response.status_code)

    run(body())
    assert len(values) >= examples // 2


def test_random_authorization_headers(tmp_path, digits_teacher_pt):
    check_authorization_values(tmp_path, digits_teacher_pt, 200)


@pytest.mark.soak
def test_soak_random_authorization_headers(tmp_path, digits_teacher_pt):
    check_authorization_values(tmp_path, digits_teacher_pt, int(os.environ.get("KD_FUZZ_EXAMPLES", "5000")))
