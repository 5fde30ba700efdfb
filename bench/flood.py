"""Flood: many clients offer ``teacher-serve`` far more than its queue holds, without retrying.

Checks: every refusal is 429 or 503 with ``Retry-After``, no other status; the health routes
answer 200 throughout (probed every 100 ms); the server's peak RSS (sampled every 50 ms) stays
within ``--max-growth-mb`` of its size before the flood; every request answered 200 has all its
samples in the cache after SIGTERM. Exit 1 when a check fails. Results: docs/reliability.md,
"3. Flood".

    python -m bench.flood                                  # 64 clients, 30 s
    python -m bench.flood --clients 16 --seconds 8 --json  # about what CI runs (tests/test_reliability.py)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench import harness
from bench.crash import INPUT_SHAPE, make_teacher
from kdcache.offline.cache import CacheReader
from kdcache.service.launch import ServeProcess
from kdcache.service.protocol import HEADER_LENGTH, RequestedOutput, encode_request


@dataclass
class FloodResult:
    clients: int
    seconds: float
    batch: int
    queue_mb: float
    inflight_mb: float
    requests: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    refusals_without_retry_after: int = 0
    transport_errors: int = 0
    offered_samples: int = 0
    acknowledged_samples: int = 0
    lost: int = 0
    rss_before_mb: float = 0.0
    rss_peak_mb: float = 0.0
    health_probes: int = 0
    health_failures: int = 0
    health_max_ms: float = 0.0
    server_exit: int | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def rejection_rate(self) -> float:
        refused = sum(n for status, n in self.statuses.items() if status in ("429", "503"))
        return refused / max(1, self.requests)


def body_for(prefix: str, start: int, inputs: np.ndarray) -> tuple[bytes, dict[str, str]]:
    ids = np.array([f"{prefix}-{start + i}" for i in range(len(inputs))], dtype=object)
    return encode_request([("input", inputs), ("id", ids)], parameters={"store": True}, outputs=[RequestedOutput("logits", True)])


async def flood(url: str, args: argparse.Namespace, result: FloodResult, acknowledged: list[str]) -> None:
    rng = np.random.default_rng(args.seed)
    pool = rng.integers(0, 17, size=(args.batch * 8, *INPUT_SHAPE), dtype=np.uint8)
    deadline = time.monotonic() + args.seconds
    # Idle connections expire on the client before the server's 5 s keep-alive closes them: the same
    # expiry on both sides races, and a request sent on a connection the server is closing fails.
    limits = httpx.Limits(max_connections=args.clients + 4, max_keepalive_connections=args.clients + 4, keepalive_expiry=2.0)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:

        async def client(worker: int) -> None:
            sent = 0
            while time.monotonic() < deadline:
                offset = (sent * args.batch) % len(pool)
                inputs = pool[offset : offset + args.batch]
                body, headers = body_for(f"c{worker}", sent * args.batch, inputs)
                sent += 1
                result.requests += 1
                result.offered_samples += len(inputs)
                try:
                    response = await http.post("/v2/models/teacher/infer", content=body, headers=headers)
                except httpx.TransportError as exc:
                    result.transport_errors += 1
                    result.problems.append(f"transport error: {type(exc).__name__}: {exc}")
                    continue
                status = str(response.status_code)
                result.statuses[status] = result.statuses.get(status, 0) + 1
                if response.status_code == 200:
                    acknowledged.extend(f"c{worker}-{sent * args.batch - args.batch + i}" for i in range(len(inputs)))
                    assert response.headers.get(HEADER_LENGTH) is not None
                elif response.status_code in (429, 503) and "retry-after" not in response.headers:
                    result.refusals_without_retry_after += 1

        await asyncio.gather(*(client(w) for w in range(args.clients)))


def probe(url: str, deadline: float, result: FloodResult) -> None:
    """On its own thread and connection, so that the flood's event loop does not delay it."""
    with httpx.Client(base_url=url, timeout=10) as http:
        while time.monotonic() < deadline:
            for route in ("/v2/health/live", "/v2/health/ready"):
                started = time.perf_counter()
                try:
                    ok = http.get(route).status_code == 200
                except httpx.TransportError as exc:
                    ok = False
                    result.problems.append(f"health probe {route}: {type(exc).__name__}: {exc}")
                result.health_probes += 1
                result.health_failures += not ok
                result.health_max_ms = max(result.health_max_ms, 1000 * (time.perf_counter() - started))
            time.sleep(0.1)


def run(args: argparse.Namespace) -> FloodResult:
    root = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="kd-flood-"))
    root.mkdir(parents=True, exist_ok=True)
    teacher = make_teacher(root)
    cache = root / "cache"
    serve_args = [
        "--teacher", str(teacher.path), "--cache", str(cache), "--device", "cpu", "--max-batch", "256",
        "--max-queue-mb", str(args.queue_mb), "--max-inflight-mb", str(args.inflight_mb), "--log-level", "warning",
    ]  # fmt: skip
    result = FloodResult(args.clients, args.seconds, args.batch, args.queue_mb, args.inflight_mb)
    server = ServeProcess(serve_args, root / "serve.log")
    server.wait_ready(120)
    try:
        # Warm: one request through every path, so the baseline includes the allocator's steady state.
        warm, headers = body_for("warm", 0, np.zeros((args.batch, *INPUT_SHAPE), dtype=np.uint8))
        for _ in range(3):
            httpx.post(f"{server.url}/v2/models/teacher/infer", content=warm, headers=headers, timeout=120).raise_for_status()
        result.rss_before_mb = server.memory("VmRSS") / 2**20
        peak = [result.rss_before_mb]
        sampling = threading.Event()

        def sample() -> None:
            while not sampling.wait(0.05):
                peak[0] = max(peak[0], server.memory("VmRSS") / 2**20)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        acknowledged: list[str] = []
        prober = threading.Thread(target=probe, args=(server.url, time.monotonic() + args.seconds, result), daemon=True)
        prober.start()
        asyncio.run(flood(server.url, args, result, acknowledged))
        prober.join()
        sampling.set()
        sampler.join()
        result.rss_peak_mb = peak[0]
        result.acknowledged_samples = len(acknowledged)
    finally:
        result.server_exit = server.stop()
    stored = set(CacheReader(cache).read(("ids",))["ids"].tolist())
    result.lost = sum(sample_id not in stored for sample_id in acknowledged)
    # The checks
    unexpected = {s: n for s, n in result.statuses.items() if s not in ("200", "429", "503")}
    if unexpected:
        result.problems.append(f"unexpected statuses {unexpected}")
    if result.refusals_without_retry_after:
        result.problems.append(f"{result.refusals_without_retry_after} refusals without Retry-After")
    if result.transport_errors:
        result.problems.append(f"{result.transport_errors} requests failed at the transport")
    if result.health_failures:
        result.problems.append(f"{result.health_failures} health probes failed")
    if result.lost:
        result.problems.append(f"{result.lost} acknowledged samples missing from the cache")
    if result.rss_peak_mb - result.rss_before_mb > args.max_growth_mb:
        result.problems.append(f"RSS grew {result.rss_peak_mb - result.rss_before_mb:.0f} MB (limit {args.max_growth_mb})")
    if result.server_exit != 0:
        result.problems.append(f"the server exited {result.server_exit} on SIGTERM")
    if not result.statuses.get("503") and not result.statuses.get("429"):
        result.problems.append("nothing was refused: the flood did not exceed the queue")
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = harness.parser(__doc__)
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--batch", type=int, default=2048, help="samples per request (8x8 uint8: 64 bytes each)")
    p.add_argument("--queue-mb", type=float, default=1.0, help="the server's --max-queue-mb")
    p.add_argument("--inflight-mb", type=float, default=32.0, help="the server's --max-inflight-mb")
    p.add_argument("--max-growth-mb", type=float, default=256.0, help="peak RSS growth allowed during the flood")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", help="keep the cache and log here (default: a new temporary directory)")
    return p.parse_args(argv)


def print_report(result: dict[str, Any]) -> None:
    print(f"clients {result['clients']}  seconds {result['seconds']:g}  batch {result['batch']}  queue {result['queue_mb']:g} MB  "
          f"in flight {result['inflight_mb']:g} MB")  # fmt: skip
    print(f"requests {result['requests']}  statuses {result['statuses']}  rejection rate {result['rejection_rate']:.1%}")
    print(f"samples offered {result['offered_samples']}  acknowledged {result['acknowledged_samples']}  lost {result['lost']}")
    print(f"RSS before {result['rss_before_mb']:.0f} MB  peak {result['rss_peak_mb']:.0f} MB")
    print(f"health probes {result['health_probes']}  failed {result['health_failures']}  slowest {result['health_max_ms']:.0f} ms")
    print("ok" if result["ok"] else "FAIL: " + "; ".join(result["problems"]))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    result = run(args)
    harness.emit({**asdict(result), "rejection_rate": result.rejection_rate, "ok": not result.problems}, args.json, print_report)
    return 0 if not result.problems else 1


if __name__ == "__main__":
    sys.exit(main())
