"""Fuzz a real ``teacher-serve`` over HTTP: the fuzzers of tests/test_fuzz.py, out of process.

A ``teacher-serve`` subprocess with a bearer token and a tiny digits-shaped teacher gets
``--examples N`` cases from each fuzzer: every mutation family of tests/test_fuzz.py (each
request sent must get exactly the codec's 4xx), ``raw_content_length`` (garbage Content-Length
headers on a raw socket: 4xx or a closed connection), and schemathesis over ``/openapi.json``
with the token and without it (no 5xx, responses as documented). Afterwards the cache must hold
no samples, the journal must be empty and the server log must hold no traceback; exit 1
otherwise. Results: docs/reliability.md, "4. Fuzzing".

    .venv/bin/python -m bench.fuzz --examples 1000
"""

from __future__ import annotations

import re
import socket
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
from hypothesis import HealthCheck, assume, given, settings

from bench import harness
from kdcache.offline.cache import CacheReader
from kdcache.offline.journal import JOURNAL_NAME
from kdcache.service.launch import ServeProcess
from kdcache.service.signature import ModelSpec

TOKEN_ENV = "KD_FUZZ_TOKEN"
TOKEN = "bench-fuzz-token"
SPEC = ModelSpec(input_shape=(8, 8), input_dtype="uint8", num_classes=10, temperature=4.0, max_samples=1 << 20)
MAX_BODY_MB = 64.0
TIMEOUT_S = 30.0


def start_server(workdir: Path) -> ServeProcess:
    """``teacher-serve`` with a tiny random-weight digits-shaped teacher, a bearer token and a body limit."""
    teacher = harness.write_teacher(workdir / "teacher.pt", "mlp-small", (8, 8), 10, levels=17)
    args = ["--teacher", str(teacher.path), "--cache", str(workdir / "cache"), "--device", "cpu"]
    args += ["--api-key-env", TOKEN_ENV, "--max-body-mb", str(MAX_BODY_MB)]
    return ServeProcess(args, workdir / "serve.log", env={TOKEN_ENV: TOKEN})


class Tally:
    """One fuzzer's results: statuses, 5xx, and the problems (with the first few examples)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.statuses: Counter[str] = Counter()
        self.discarded = 0
        self.problems: list[str] = []
        self.problem_count = 0
        self.seconds = 0.0

    def problem(self, message: str) -> None:
        self.problem_count += 1
        if len(self.problems) < 3:
            self.problems.append(message[:400])

    @property
    def cases(self) -> int:
        return sum(self.statuses.values())

    @property
    def server_errors(self) -> int:
        return sum(n for status, n in self.statuses.items() if status.isdigit() and int(status) >= 500)

    def row(self) -> dict[str, Any]:
        return {
            "fuzzer": self.name,
            "cases": self.cases,
            "discarded_valid": self.discarded,
            "statuses": dict(sorted(self.statuses.items())),
            "5xx": self.server_errors,
            "problems": self.problem_count,
            "examples": self.problems,
            "seconds": round(self.seconds, 1),
        }


def hypothesis_settings(examples: int, seed_fixed: bool) -> settings:
    return settings(max_examples=examples, derandomize=seed_fixed, database=None, deadline=None, suppress_health_check=list(HealthCheck))


def run_mutations(tf: Any, family: str, url: str, examples: int, seed_fixed: bool) -> Tally:
    tally = Tally(family)
    limit = int(MAX_BODY_MB * (1 << 20))
    with httpx.Client(base_url=url, timeout=TIMEOUT_S, headers={"Authorization": f"Bearer {TOKEN}"}) as client:

        @hypothesis_settings(examples, seed_fixed)
        @given(request=tf.malformed_requests(family))
        def fuzz(request: tuple[str, bytes, dict[str, str]]) -> None:
            path, body, headers = request
            try:
                expected = tf.expected_status(body, headers, SPEC, limit)
            except Exception as exc:  # the codec itself crashed: the server answers 500
                tally.problem(f"oracle crashed: {type(exc).__name__}: {exc} on {body[:200]!r}")
                expected = 400
            if expected is None:
                tally.discarded += 1
            assume(expected is not None)
            raw = [(key.encode("latin-1"), value.encode("latin-1")) for key, value in headers.items()]
            try:
                response = client.post(path, content=body, headers=raw)
            except httpx.TimeoutException:
                tally.statuses["timeout"] += 1
                tally.problem(f"no answer in {TIMEOUT_S} s: {headers} {body[:200]!r}")
                return
            tally.statuses[str(response.status_code)] += 1
            if response.status_code != expected:
                tally.problem(f"expected {expected}, got {response.status_code} {response.text[:200]}: {headers} {body[:200]!r}")

        start = time.perf_counter()
        fuzz()
        tally.seconds = time.perf_counter() - start
    return tally


RAW_CONTENT_LENGTHS = [b"\xb2", b"\xb9", b"-1", b"abc", b"1e3", b"0x10", b"+5", b"5 5", b"9" * 30, b"", b"18446744073709551616"]


def run_raw_content_length(tf: Any, port: int, examples: int, seed_fixed: bool) -> Tally:
    """Garbage Content-Length values, written on a socket: httpx refuses to send them."""
    from hypothesis import strategies as st

    tally = Tally("raw_content_length")
    values = st.sampled_from(RAW_CONTENT_LENGTHS) | tf.HEADER_TEXT.map(str.encode).filter(lambda v: not v.isdigit())

    @hypothesis_settings(min(examples, 200), seed_fixed)  # a handful of distinct values; 200 is plenty
    @given(wire=tf.valid_requests(), value=values, path=st.sampled_from(tf.INFER_PATHS))
    def fuzz(wire: Any, value: bytes, path: str) -> None:
        body, headers = wire.frame()
        head = [f"POST {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", f"Authorization: Bearer {TOKEN}", "Connection: close"]
        head += [f"{key}: {val}" for key, val in headers.items()]
        request = "\r\n".join(head).encode() + b"\r\nContent-Length: " + value + b"\r\n\r\n" + body
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S) as sock:
            sock.sendall(request)
            sock.shutdown(socket.SHUT_WR)
            reply = b""
            try:
                while chunk := sock.recv(65536):
                    reply += chunk
            except TimeoutError:
                tally.statuses["timeout"] += 1
                tally.problem(f"no answer in {TIMEOUT_S} s for Content-Length {value!r}")
                return
            except ConnectionResetError:
                pass
        match = re.match(rb"HTTP/1\.[01] (\d{3})", reply)
        status = match.group(1).decode() if match else "closed"
        tally.statuses[status] += 1
        if status != "closed" and not 400 <= int(status) < 500:  # closing without an answer is fine too
            tally.problem(f"Content-Length {value!r}: {reply[:200]!r}")

    start = time.perf_counter()
    fuzz()
    tally.seconds = time.perf_counter() - start
    return tally


def run_schemathesis(tf: Any, url: str, examples: int, seed_fixed: bool, with_token: bool) -> tuple[Tally, int]:
    import schemathesis

    tally = Tally("schemathesis" + ("" if with_token else " (no token)"))
    auth = {"Authorization": f"Bearer {TOKEN}"}
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json", headers=auth)
    checks = tf.schemathesis_checks()
    headers = auth if with_token else {}
    infer_ok = 0

    @hypothesis_settings(examples, seed_fixed)
    @given(case=tf.schemathesis_strategy(schema))
    def fuzz(case: Any) -> None:
        nonlocal infer_ok
        try:
            response = case.call(base_url=url, headers=headers, timeout=TIMEOUT_S)
        except Exception as exc:  # a timeout or a dropped connection
            tally.statuses["error"] += 1
            tally.problem(f"{case.method} {case.formatted_path}: {type(exc).__name__}: {exc}")
            return
        tally.statuses[str(response.status_code)] += 1
        if response.status_code == 200 and case.path.endswith("/infer"):
            infer_ok += 1
        if not with_token and not case.path.startswith("/v2/health/") and response.status_code != 401:
            tally.problem(f"{case.method} {case.formatted_path} without the token: {response.status_code}")
        try:
            case.validate_response(response, checks=checks, headers=headers)
        except Exception as exc:
            tally.problem(f"{case.method} {case.formatted_path}: {str(exc).strip()[:300]}")

    start = time.perf_counter()
    fuzz()
    tally.seconds = time.perf_counter() - start
    return tally, infer_ok


def main(argv: list[str] | None = None) -> int:
    parser = harness.parser(__doc__)
    parser.add_argument("--examples", type=int, default=200, help="examples per fuzzer")
    parser.add_argument("--derandomize", action="store_true", help="the same examples every run")
    parser.add_argument(
        "--only", nargs="+", metavar="FUZZER", help="run only these fuzzers (mutation families, raw_content_length, schemathesis)"
    )
    args = parser.parse_args(argv)

    from tests import test_fuzz as tf  # the fuzzers themselves; they need the test extras

    families = [name for name in sorted(tf.MUTATIONS) if name != "content_length"]  # in process only; raw_content_length here
    wanted = set(args.only or [*families, "raw_content_length", "schemathesis"])
    with harness.workdir("kd-fuzz-") as workdir:
        server = start_server(workdir)
        started = time.perf_counter()
        try:
            server.wait_ready()
            harness.say(f"teacher-serve ready on {server.url}; {args.examples} examples per fuzzer")
            tallies: list[Tally] = []
            for family in families:
                if family in wanted:
                    tallies.append(run_mutations(tf, family, server.url, args.examples, args.derandomize))
                    harness.say(f"  {family}: {tallies[-1].cases} cases, {tallies[-1].seconds:.1f} s")
            if "raw_content_length" in wanted:
                tallies.append(run_raw_content_length(tf, server.port, args.examples, args.derandomize))
                harness.say(f"  raw_content_length: {tallies[-1].cases} cases")
            schemathesis_infer_ok = 0
            if "schemathesis" in wanted:
                for with_token in (True, False):
                    tally, ok = run_schemathesis(tf, server.url, args.examples, args.derandomize, with_token)
                    tallies.append(tally)
                    schemathesis_infer_ok += ok
                    harness.say(f"  {tally.name}: {tally.cases} cases, {tally.seconds:.1f} s")
        finally:
            exit_code = server.stop()
        seconds = time.perf_counter() - started
        log = server.output()
        cache = workdir / "cache"
        samples = CacheReader(cache).num_samples if cache.exists() else 0
        journal = cache / JOURNAL_NAME
        journal_bytes = journal.stat().st_size if journal.exists() else 0

    rows = [tally.row() for tally in tallies]
    summary = {
        "examples_per_fuzzer": args.examples,
        "fuzzers": rows,
        "cases": sum(row["cases"] for row in rows),
        "5xx": sum(row["5xx"] for row in rows),
        "problems": sum(row["problems"] for row in rows),
        "schemathesis_infer_200": schemathesis_infer_ok,
        "samples_in_cache": samples,
        "journal_bytes": journal_bytes,
        "server_tracebacks": log.count("Traceback"),
        "server_exit_code": exit_code,
        "seconds": round(seconds, 1),
    }
    failed = (
        summary["5xx"]
        or summary["problems"]
        or summary["samples_in_cache"] > 0
        and schemathesis_infer_ok == 0
        or journal_bytes
        or summary["server_tracebacks"]
        or exit_code != 0
    )
    summary["ok"] = not failed
    harness.emit(summary, args.json, print_table)
    return 1 if failed else 0


def print_table(summary: dict[str, Any]) -> None:
    width = max(len(row["fuzzer"]) for row in summary["fuzzers"])
    print(f"{'fuzzer':<{width}}  {'cases':>6}  {'valid':>5}  {'5xx':>4}  {'problems':>8}  {'s':>6}  statuses")
    for row in summary["fuzzers"]:
        statuses = " ".join(f"{status}:{n}" for status, n in row["statuses"].items())
        print(
            f"{row['fuzzer']:<{width}}  {row['cases']:>6}  {row['discarded_valid']:>5}  {row['5xx']:>4}  {row['problems']:>8}  "
            f"{row['seconds']:>6.1f}  {statuses}"
        )
        for example in row["examples"]:
            print(f"{'':<{width}}    ! {example}")
    print(f"{'total':<{width}}  {summary['cases']:>6}  {'':>5}  {summary['5xx']:>4}  {summary['problems']:>8}  {summary['seconds']:>6.1f}")
    print(
        f"samples in cache: {summary['samples_in_cache']} (schemathesis infer 200s: {summary['schemathesis_infer_200']}); "
        f"journal: {summary['journal_bytes']} bytes; server tracebacks: {summary['server_tracebacks']}; "
        f"server exit code: {summary['server_exit_code']}"
    )
    print("valid = mutations that left the request valid, discarded unsent")
    print("OK" if summary["ok"] else "FAILED")


if __name__ == "__main__":
    sys.exit(main())
