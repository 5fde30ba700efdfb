"""Service benchmark: how close does ``teacher-serve`` come to the teacher's raw forward pass?

P1: samples/s of a real ``teacher-serve`` (``--ack durable``, and ``--ack buffered`` beside it)
driven by pre-encoded binary requests from ``--clients`` threads, ÷ samples/s of
``teacher.forward`` in this process at the same batch size, dtype and device; target >= 0.9.
``--sweep`` repeats it at batch sizes 16, 64 and 256 (``--plot PATH`` draws them); ``--ingest``
measures only the MB/s of request body the service takes in against a bare route. How the
windows, rounds, CPU shares, the thread-naming shim and the GPU runs work: docs/benchmarks.md,
"P1: teacher service against raw forward".

    .venv/bin/python -m bench.service --quick            # < 90 s on 2 cores
    .venv/bin/python -m bench.service                    # a few minutes on 2 cores
    .venv/bin/python -m bench.service --sweep --json
    .venv/bin/python -m bench.service --lm --targets topk:16     # a GPT-2 teacher, tokens/s

``--lm`` serves a random-weight ``transformers`` GPT-2 (``--lm-config``) with ``--teacher
hf:DIR``: requests of ``--batch-size`` sequences of ``--seq-len`` token ids, a server batch of
``--batch-size`` x ``--seq-len`` tokens (``--max-batch-tokens``); samples are sequences, so the
ratios are the tokens/s ratios. ``--targets`` is the server's layout; the encoding, on the
teacher's device, is part of the service side.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import math
import os
import shlex
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch

from bench import harness
from kdcache.offline.cache import CacheReader, normalize_ids
from kdcache.offline.journal import JOURNAL_NAME
from kdcache.service.launch import LaunchError, ServeProcess
from kdcache.service.protocol import HEADER_LENGTH, RequestedOutput, encode_request, serialize_bytes
from kdcache.service.teacher import WARMUP_PASSES

P1 = "p1_service_vs_forward"
SWEEP_BATCHES = (16, 64, 256)
POOL = 4  # distinct input batches; requests differ from each other by their ids
ID_WIDTH = 8  # request number digits; ids are f"{run}-{request:08d}-{row:06d}"
# One measurement at two sizes: the same warm-up and order of rounds (see the module doc).
FULL = {"seconds": 20.0, "min_requests": 8, "warmup_requests": 3, "repeats": 3}
QUICK = {**FULL, "seconds": 6.0, "repeats": 2}
SWEEP = {"seconds": 6.0, "min_requests": 6, "warmup_requests": 3}
CLK_TCK = os.sysconf("SC_CLK_TCK")
INFER = "/v2/models/teacher/infer"
STOP_TIMEOUT = 120.0


def pool_of(args: argparse.Namespace, batch: int) -> list[np.ndarray]:
    """The distinct input batches: uint8 samples, or a language model's token ids."""
    if args.lm:
        rng = np.random.default_rng(args.seed)
        return [rng.integers(0, args.lm_config[3], (batch, args.seq_len), dtype=np.int64) for _ in range(POOL)]
    return input_pool(tuple(args.input_shape), batch, args.seed)


def input_pool(shape: tuple[int, ...], batch: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (batch, *shape), dtype=np.uint8) for _ in range(POOL)]


# ---------------------------------------------------------------------------------------------
# Raw forward passes


def raw_forward(
    teacher_path: Path, args: argparse.Namespace, batch_size: int, warmup: int, seconds: float, min_batches: int
) -> dict[str, Any]:
    """``teacher.forward`` in a loop at ``batch_size``, on a one-thread executor as the server's
    batcher runs it (not on the main thread: glibc gives the main thread its own malloc arena,
    which with the default settings page-faults several times more per batch than a thread
    arena, see docs/benchmarks.md). The number of timed batches is sized from the warm-up to
    last about ``seconds``."""
    from kdcache.service.teacher import load_teacher

    teacher = load_teacher([str(teacher_path)], device=args.device, dtype=args.dtype)
    pool = pool_of(args, batch_size)
    sync = harness.synchronizer(teacher.device)

    def run() -> dict[str, Any]:
        started = time.perf_counter()
        for i in range(max(1, warmup)):
            teacher.forward(pool[i % POOL])  # forward returns numpy: it has synchronised already
        per_batch = (time.perf_counter() - started) / max(1, warmup)
        batches = max(min_batches, math.ceil(seconds / max(per_batch, 1e-6)))
        meter = harness.CpuMeter()
        timed = harness.time_epochs(lambda _: (pool[i % POOL] for i in range(batches)), teacher.forward, sync, 0, count=len)
        wall = timed["seconds"]
        return {
            "batches": batches, "samples": timed["samples"], "seconds": wall, "samples_per_s": timed["samples"] / wall,
            "forward_s_per_batch": wall / batches,
            "faults_per_batch": timed["faults_per_step"],  # minor page faults of this process (nothing else runs in it)
            "cpu_s": timed["cpu_s_per_epoch"], "cpu_share": timed["cpu_s_per_epoch"] / (wall * (os.cpu_count() or 1)), **meter.stop(),
        }  # fmt: skip

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="teacher") as executor:
        return executor.submit(run).result()


# ---------------------------------------------------------------------------------------------
# The server subprocess, and what /proc says about it


def metric_sums(text: str) -> dict[str, float]:
    """The few /metrics series this benchmark reads, from the Prometheus text format."""
    wanted = ("kd_teacher_seconds_sum", "kd_teacher_seconds_count", "kd_batch_size_sum", "kd_batch_size_count",
              "kd_write_seconds_sum", "kd_write_seconds_count")  # fmt: skip
    out = dict.fromkeys(wanted, 0.0)
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in out:
            out[name] = float(value)
    return out


def child_env(args: argparse.Namespace) -> dict[str, str]:
    """The servers' environment: ``--torch-threads`` as OMP_NUM_THREADS, bench/ on PYTHONPATH (the shim)."""
    return harness.child_env({"OMP_NUM_THREADS": str(args.torch_threads)} if args.torch_threads else None)


class Server(ServeProcess):
    """A ``teacher-serve`` subprocess (or the naming shim around the same ``serve_main``)."""

    def __init__(self, teacher: Path, cache: Path, log_path: Path, args: argparse.Namespace, batch_size: int, ack: str) -> None:
        serve_args = [
            "--teacher", str(teacher), "--cache", str(cache), "--device", args.device, "--dtype", args.dtype,
            "--max-batch", str(args.server_max_batch or batch_size), "--max-delay-ms", str(args.max_delay_ms), "--ack", ack,
            "--log-level", "warning", "--targets", args.targets,
        ]  # fmt: skip
        if args.lm:
            tokens = (args.server_max_batch or batch_size) * args.seq_len
            serve_args += ["--input-shape", str(args.seq_len), "--max-batch-tokens", str(tokens)]
        command = None  # teacher-serve
        if args.name_threads or args.switch_interval is not None:
            interval = [] if args.switch_interval is None else ["--switch-interval", str(args.switch_interval)]
            command = harness.module("service", "--serve-named", *interval, "--")
        super().__init__(serve_args, log_path, command=command, env=child_env(args))

    def metrics(self) -> dict[str, float]:
        return metric_sums(httpx.get(f"{self.url}/metrics", timeout=30).text)


def ready(server: ServeProcess, timeout: float) -> None:
    """Wait for /v2/health/ready; a server that does not get there ends the run, with its log."""
    try:
        server.wait_ready(timeout)
    except LaunchError as exc:
        raise SystemExit(f"{exc}\n{server.output(3000)}") from None


# ---------------------------------------------------------------------------------------------
# Pre-encoded requests


@dataclass
class RequestPlan:
    """Every request of one service run: body chunks per request, ids per request."""

    bodies: list[list[bytes]]  # [prefix (header + inputs), ids, labels]; joined, exactly encode_request's body
    headers: list[dict[str, str]]
    ids: list[np.ndarray]
    samples: int

    def send(self, path: str) -> Any:
        """A ``ClientPool`` sender: request n posts body n (modulo the plan's length) to ``path``."""
        return lambda http, n: http.post(path, content=self.bodies[n % len(self.bodies)], headers=self.headers[n % len(self.bodies)])


def plan_requests(
    run: str, pool: list[np.ndarray], request_size: int, count: int, classes: int, seed: int, store: bool = True, tokens: bool = False
) -> RequestPlan:
    """Pre-encoded requests; ``tokens``: a language model's (``input_ids``, no labels)."""
    rng = np.random.default_rng(seed)
    labels = [rng.integers(0, classes, request_size).astype(np.int64) for _ in range(POOL)]
    name = "input_ids" if tokens else "input"

    def tensors_of(k: int, ids: np.ndarray) -> list[tuple[str, np.ndarray]]:
        return [(name, pool[k][:request_size]), ("id", ids)] + ([] if tokens else [("label", labels[k])])

    outputs: list[RequestedOutput] = []  # teacher-push asks for no output
    parameters = {"store": store, "no_outputs": True}

    def ids_of(request: int) -> np.ndarray:
        return normalize_ids([f"{run}-{request:0{ID_WIDTH}d}-{row:06d}" for row in range(request_size)], request_size)

    templates = []
    for k in range(POOL):
        body, headers = encode_request(tensors_of(k, ids_of(k)), parameters=parameters, outputs=outputs, binary=True)
        id_bytes = serialize_bytes(ids_of(k))
        label_bytes = b"" if tokens else labels[k].astype("<i8").tobytes()
        cut = len(body) - len(label_bytes) - len(id_bytes)
        # The binary tensors follow the JSON header in input, id, label order; fixed-width ids
        # keep every size in the header the same, so only the id chunk changes per request.
        assert body[cut : cut + len(id_bytes)] == id_bytes and body[cut + len(id_bytes) :] == label_bytes
        templates.append((body[:cut], label_bytes, headers))
    bodies, all_headers, all_ids = [], [], []
    for request in range(count):
        prefix, label_bytes, headers = templates[request % POOL]
        ids = ids_of(request)
        chunks = [prefix, serialize_bytes(ids), label_bytes]
        bodies.append(chunks)
        all_headers.append({**headers, "Content-Length": str(sum(map(len, chunks)))})
        all_ids.append(ids)
    # One exact check that a patched body is the body the client would have sent.
    check = encode_request(
        tensors_of(1 % POOL, all_ids[min(1, count - 1)]), parameters=parameters, outputs=outputs, binary=True,
    )[0] if count > 1 else b"".join(bodies[0])  # fmt: skip
    assert b"".join(bodies[min(1, count - 1)]) == check, "pre-encoded body differs from encode_request's"
    return RequestPlan(bodies, all_headers, all_ids, request_size)


# ---------------------------------------------------------------------------------------------
# Driving the server


@dataclass
class Window:
    """A snapshot at one end of a timed window: wall clock, the clients' CPU, the server's threads."""

    wall: float = 0.0
    client_cpu: float = 0.0
    server_threads: dict[int, tuple[str, int, int]] = field(default_factory=dict)
    server_ticks: int = 0
    server_faults: int = 0


def snapshot(pid: int) -> Window:
    threads = harness.thread_ticks(pid)
    ticks, faults = sum(t for _, t, _ in threads.values()), sum(f for _, _, f in threads.values())
    return Window(time.perf_counter(), time.process_time(), threads, ticks, faults)


def cpu_shares(start: Window, end: Window, wall: float) -> dict[str, float]:
    """CPU of the server and of the clients (this process) over the window, as shares of the machine."""
    server_cpu, client_cpu = (end.server_ticks - start.server_ticks) / CLK_TCK, end.client_cpu - start.client_cpu
    capacity = wall * (os.cpu_count() or 1)
    return {"client_cpu_s": client_cpu, "server_cpu_s": server_cpu, "client_cpu_share": client_cpu / capacity,
            "server_cpu_share": server_cpu / capacity, "client_share_of_used": client_cpu / max(1e-9, client_cpu + server_cpu)}  # fmt: skip


def drive(
    server: ServeProcess,
    path: str,
    plan: RequestPlan,
    clients: int,
    warmup_requests: int,
    seconds: float | None = None,
    scrape: bool = True,
) -> dict[str, Any]:
    """``clients`` threads post the plan's requests to ``path``, one in flight each: every request
    once, in order, or with ``seconds``, round-robin until ``seconds`` after ack #``warmup_requests``.
    The window runs from that ack to the last; with ``scrape``, the server's /metrics are read at
    both ends of it. See the module doc."""
    acks: list[tuple[float, int]] = []  # (completion time, body bytes), in completion order
    hits = 0
    marks: dict[str, Any] = {}
    window_started = threading.Event()
    total = None if seconds else len(plan.bodies)

    def on_ack(number: int, response: httpx.Response, now: float) -> None:
        nonlocal hits
        if HEADER_LENGTH in response.headers:
            hits += int(json.loads(response.content[: int(response.headers[HEADER_LENGTH])]).get("parameters", {}).get("cache_hits", 0))
        acks.append((now, sum(map(len, plan.bodies[number % len(plan.bodies)]))))
        if len(acks) == warmup_requests:
            marks["start"], marks["meter"], marks["stop_at"] = snapshot(server.pid), harness.CpuMeter(), now + (seconds or math.inf)
            window_started.set()
        if len(acks) == total:
            marks["end"], marks["noise"] = snapshot(server.pid), marks["meter"].stop()

    def scrape_start() -> None:  # off the clients' path; lands well before the next batch ends
        window_started.wait()
        with contextlib.suppress(httpx.HTTPError):
            marks["metrics"] = server.metrics()

    if scrape:
        threading.Thread(target=scrape_start, daemon=True).start()
    first_sent = time.perf_counter()
    error = harness.ClientPool(server.url, clients, timeout=120 if seconds else 600).run(
        plan.send(path), on_ack, total=total, until=lambda: time.perf_counter() >= marks.get("stop_at", math.inf)
    )
    if error:
        raise SystemExit(f"{server.url}{path} failed a request: {error}\n{server.output(3000)}")
    window_started.set()
    if "end" not in marks:
        marks["end"], marks["noise"] = snapshot(server.pid), marks["meter"].stop()
    acks.sort()
    t0, t1 = acks[warmup_requests - 1][0], acks[-1][0]
    wall, timed = t1 - t0, len(acks) - warmup_requests
    body_bytes = sum(n for _, n in acks[warmup_requests:])
    w0, w1 = marks["start"], marks["end"]
    figures = {
        "requests": len(acks), "warmup_requests": warmup_requests, "timed_requests": timed, "request_size": plan.samples,
        "acknowledged_samples": len(acks) * plan.samples, "timed_samples": timed * plan.samples, "seconds": wall,
        "samples_per_s": timed * plan.samples / wall, "requests_per_s": timed / wall, "body_bytes": body_bytes, "mb_per_s": body_bytes / wall / 1e6,
        "first_send_to_last_ack_s": t1 - first_sent, "cache_hits_answered": hits, **cpu_shares(w0, w1, wall), **marks["noise"],
    }  # fmt: skip
    if not scrape:
        return figures
    per_thread = []
    for tid, (name, ticks, faults) in w1.server_threads.items():
        _, ticks0, faults0 = w0.server_threads.get(tid, (name, 0, 0))
        cpu_s = (ticks - ticks0) / CLK_TCK
        label = "event-loop (main)" if tid == server.pid and name in ("teacher-serve", "python", "python3") else name
        per_thread.append({"tid": tid, "name": label, "cpu_s": cpu_s, "share_of_window": cpu_s / wall, "minor_faults": faults - faults0})
    m0, m1, server_side = marks.get("metrics"), server.metrics(), {}
    if m0 is not None:
        batches = m1["kd_teacher_seconds_count"] - m0["kd_teacher_seconds_count"]
        forward = m1["kd_teacher_seconds_sum"] - m0["kd_teacher_seconds_sum"]
        writes = m1["kd_write_seconds_count"] - m0["kd_write_seconds_count"]
        server_side = {
            "batches": batches,
            "mean_batch": (m1["kd_batch_size_sum"] - m0["kd_batch_size_sum"]) / max(1, batches),
            "forward_s_per_batch": forward / max(1, batches),
            "teacher_busy_share": forward / wall,
            "faults_per_batch": (w1.server_faults - w0.server_faults) / max(1, batches),  # whole server process
            "write_groups": writes,
            "write_s_per_group": (m1["kd_write_seconds_sum"] - m0["kd_write_seconds_sum"]) / max(1, writes),
        }
    return {**figures, "server_threads": sorted(per_thread, key=lambda row: -row["cpu_s"]), "server_side": server_side}


def check_cache(cache: Path, plan: RequestPlan, acknowledged: int, stored_expected: bool = True) -> dict[str, Any]:
    """After SIGTERM: the cache must hold exactly the acknowledged ids (none with --no-store), and no journal."""
    reader = CacheReader(cache)
    stored = {str(i) for i in reader.read(("ids",))["ids"]}
    expected = {str(i) for ids in plan.ids for i in ids} if stored_expected else set()
    acknowledged = acknowledged if stored_expected else 0
    return {
        "cache_samples": reader.num_samples,
        "cache_bytes": reader.total_bytes,
        "bytes_per_sample": reader.total_bytes / max(1, reader.num_samples),
        "shards": len(reader.shards),
        "cache_matches_acks": reader.num_samples == acknowledged == len(stored) and stored == expected,
        "journal_left": (cache / JOURNAL_NAME).exists() and (cache / JOURNAL_NAME).stat().st_size > 0,
    }


def service_run(
    teacher: Path, root: Path, args: argparse.Namespace, batch_size: int, ack: str, raw_rate: float, preset: dict[str, Any], tag: str
) -> dict[str, Any]:
    request_size = args.request_size or batch_size
    timed = max(preset["min_requests"], math.ceil(preset["seconds"] * raw_rate / request_size))
    pool = pool_of(args, max(request_size, 1))
    plan = plan_requests(
        tag, pool, request_size, preset["warmup_requests"] + timed, args.classes, args.seed, store=not args.no_store, tokens=args.lm
    )
    cache = root / f"cache-{tag}"
    server = Server(teacher, cache, root / f"serve-{tag}.log", args, batch_size, ack)
    try:
        ready_from = time.perf_counter()
        ready(server, args.ready_timeout)
        ready_s = time.perf_counter() - ready_from
        figures = drive(server, INFER, plan, args.clients, preset["warmup_requests"])
    except BaseException:
        server.stop(timeout=STOP_TIMEOUT)
        raise
    code = server.stop(timeout=STOP_TIMEOUT)
    if code != 0:
        raise SystemExit(f"teacher-serve exited with {code} after SIGTERM:\n{server.output(3000)}")
    return {"ack": ack, "batch_size": batch_size, "start_to_ready_s": ready_s, **figures,
            **check_cache(cache, plan, figures["acknowledged_samples"], not args.no_store), "command": shlex.join(server.command)}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Rounds


def compare(
    teacher: Path, root: Path, args: argparse.Namespace, batch_size: int, preset: dict[str, Any], repeats: int, label: str = "main"
) -> dict[str, Any]:
    raw_rate = 0.0
    done = dict.fromkeys(("raw", "durable", "buffered"), 0)

    def run(side: str) -> dict[str, Any]:
        nonlocal raw_rate
        r, done[side] = done[side], done[side] + 1
        harness.say(f"batch {batch_size}, round {r + 1}/{repeats}: {'raw forward' if side == 'raw' else f'teacher-serve --ack {side}'} ...")
        if side == "raw":
            # As many untimed forwards as the server runs before its window: its warm-up passes
            # plus the warm-up requests (glibc's malloc thresholds adapt to that history).
            raw = raw_forward(
                teacher, args, batch_size, WARMUP_PASSES + preset["warmup_requests"], preset["seconds"], preset["min_requests"]
            )
            raw_rate = raw["samples_per_s"]
            harness.say(f"  raw {raw_rate:.1f} samples/s ({raw['batches']} batches, {raw['seconds']:.1f} s)")
            return raw
        # A reversed round times the service before raw: its window is sized from the last raw rate.
        served = service_run(teacher, root, args, batch_size, side, raw_rate, preset, f"{label}-b{batch_size}-r{r}-{side}")
        harness.say(f"  {side} {served['samples_per_s']:.1f} samples/s ({served['timed_requests']} timed requests, {served['seconds']:.1f} s; "
                    f"client CPU {served['client_cpu_share']:.1%}, server CPU {served['server_cpu_share']:.1%} of the machine)")  # fmt: skip
        return served

    rounds = harness.alternate(("raw", "durable", "buffered"), repeats, run)
    median = {side: statistics.median(r["samples_per_s"] for r in runs) for side, runs in rounds.items()}

    def per_round(side: str) -> list[float]:
        return [s["samples_per_s"] / w["samples_per_s"] for s, w in zip(rounds[side], rounds["raw"], strict=True)]

    return {
        "batch_size": batch_size,
        **{f"{side}_samples_per_s": median[side] for side in rounds},
        "ratio_durable_vs_raw": median["durable"] / median["raw"],
        "ratio_buffered_vs_raw": median["buffered"] / median["raw"],
        "ratio_durable_vs_buffered": median["durable"] / median["buffered"],
        "max_foreign_cpu": max(r["foreign_cpu"] for runs in rounds.values() for r in runs),
        "max_steal": max(r["steal"] for runs in rounds.values() for r in runs),
        "ratio_durable_vs_raw_per_round": per_round("durable"),
        "ratio_buffered_vs_raw_per_round": per_round("buffered"),
        "rounds": rounds,
    }


# ---------------------------------------------------------------------------------------------
# Report


def both_met(row: dict[str, Any]) -> bool:
    return bool(harness.met(P1, row["ratio_durable_vs_raw"]) and harness.met(P1, row["ratio_buffered_vs_raw"]))


def print_tables(result: dict[str, Any]) -> None:
    cfg, rows, main = result["config"], [result["main"], *result.get("sweep", [])], result["main"]
    harness.print_header(
        "bench.service: teacher-serve end to end vs raw teacher.forward, same batch size, dtype and device", result["env"],
        f"teacher    {cfg['teacher_arch']} ({cfg['teacher_params']:,} parameters, random weights), uint8 {cfg['input_shape']}, "
        f"{cfg['classes']} classes, dtype {cfg['dtype']}",
        f"load       {cfg['clients']} clients x 1 request in flight, {cfg['request_size'] or 'batch-size'} samples per request, "
        f"pre-encoded; median of {cfg['repeats']} round(s); malloc {cfg['malloc']}; server via "
        f"{'the thread-naming shim' if cfg['name_threads'] else 'teacher-serve'}",
    )  # fmt: skip
    print()
    harness.table(
        [("batch", ""), ("raw samples/s", ".1f"), ("durable", ".1f"), ("buffered", ".1f"), ("durable/raw", ".3f"), ("buffered/raw", ".3f"),
         ("durable/buffered", ".3f"), ("target", ""), ("met", ""), ("other CPU", ".1%")],
        [[f"{row['batch_size']}{' (sweep)' if i else ''}", row["raw_samples_per_s"], row["durable_samples_per_s"], row["buffered_samples_per_s"],
          row["ratio_durable_vs_raw"], row["ratio_buffered_vs_raw"], row["ratio_durable_vs_buffered"], harness.target(P1), harness.YES[both_met(row)],
          row["max_foreign_cpu"]] for i, row in enumerate(rows)],
    )  # fmt: skip
    print("\nPer service run (timed window): CPU as a share of the machine, forward time per batch inside the server vs raw,")
    print("and the cache the run left after SIGTERM")
    runs = [(row, raw, run) for row in rows for raw, *served in zip(*(row["rounds"][s] for s in ("raw", "durable", "buffered")), strict=True)
            for run in served]  # fmt: skip
    harness.table(
        [("batch", ""), ("ack", ""), ("samples/s", ".1f"), ("client CPU", ".1%"), ("server CPU", ".1%"), ("client/used", ".1%"),
         ("mean batch", ".1f"), ("fwd s/batch", ".4f"), ("raw s/batch", ".4f"), ("faults/batch srv|raw", ""), ("teacher busy", ".1%"),
         ("write s/group", ".4f"), ("cache samples", ","), ("B/sample", ".0f"), ("exact", "")],
        [[row["batch_size"], run["ack"], run["samples_per_s"], run["client_cpu_share"], run["server_cpu_share"], run["client_share_of_used"],
          run["server_side"].get("mean_batch"), run["server_side"].get("forward_s_per_batch"), raw["forward_s_per_batch"],
          f"{run['server_side'].get('faults_per_batch', float('nan')):,.0f} | {raw['faults_per_batch']:,.0f}",
          run["server_side"].get("teacher_busy_share"), run["server_side"].get("write_s_per_group"), run["cache_samples"],
          run["bytes_per_sample"], harness.YES[run["cache_matches_acks"]]] for row, raw, run in runs],
    )  # fmt: skip
    print()
    print("per-round ratios, durable/raw: " + " ".join(f"{v:.3f}" for v in main["ratio_durable_vs_raw_per_round"])
          + "; buffered/raw: " + " ".join(f"{v:.3f}" for v in main["ratio_buffered_vs_raw_per_round"]))  # fmt: skip
    print(f"Server threads, batch {main['batch_size']}, round 1 (CPU seconds in the timed window; names need --name-threads)")
    for ack in ("durable", "buffered"):
        run = main["rounds"][ack][0]
        top = ", ".join(f"{t['name']}:{t['cpu_s']:.2f}s/{t['minor_faults']:,}flt" for t in run["server_threads"][:8] if t["cpu_s"] > 0)
        print(f"  {ack:>8} ({run['seconds']:.1f} s): {top}")
    hits = sum(run["cache_hits_answered"] for _, _, run in runs)
    if hits:
        print(f"\nWARNING: {hits} samples were answered from the cache; the service figures did not all go through the teacher")
    harness.noise_warning(result["max_foreign_cpu"])
    print()
    keys = ("raw_samples_per_s", "durable_samples_per_s", "buffered_samples_per_s", "ratio_durable_vs_raw", "ratio_buffered_vs_raw",
            "ratio_durable_vs_buffered")  # fmt: skip
    print("  ".join(f"{k}={result[k]}" for k in keys))


# ---------------------------------------------------------------------------------------------
# The plot (--plot, with --sweep)


def plot_sweep(result: dict[str, Any], path: Path) -> None:
    """samples/s against batch size for raw forward and the service, from the sweep's rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(result["sweep"], key=lambda row: row["batch_size"])
    env, cfg = result["env"], result["config"]
    batches = [row["batch_size"] for row in rows]
    raw = [row["raw_samples_per_s"] for row in rows]
    durable = [row["durable_samples_per_s"] for row in rows]
    buffered = [row["buffered_samples_per_s"] for row in rows]
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    ax.plot(batches, raw, "o-", color="black", label="raw teacher.forward")
    ax.plot(batches, durable, "s-", color="tab:blue", label="teacher-serve --ack durable")
    ax.plot(batches, buffered, "^--", color="tab:orange", alpha=0.7, label="teacher-serve --ack buffered")
    for b, d, r in zip(batches, durable, raw, strict=True):
        ax.annotate(f"{d / r:.3f}× raw", (b, d), textcoords="offset points", xytext=(0, -15), ha="center", fontsize=8, color="tab:blue")
    ax.set_xscale("log", base=2)
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.set_xlim(batches[0] / 1.5, batches[-1] * 1.5)
    ax.set_ylim(0, max(raw + durable + buffered) * 1.15)
    ax.set_xlabel("batch size (= --max-batch = samples per request)")
    ax.set_ylabel("samples/s")
    ax.set_title(f"teacher-serve vs raw forward: {cfg['teacher_arch']}, uint8 {cfg['input_shape']}, {env['device']}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.text(0.01, 0.005, f"{env['date'][:10]}, {env['cpu']}, {env['cpus']} CPUs, torch {env['torch']}; "
             f"{cfg['clients']} clients, 1 round per point; bench.service --sweep", fontsize=6, color="grey")  # fmt: skip
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Ingest (--ingest): MB/s of request body the protocol layer takes in, against a bare endpoint

# The same server stack as teacher-serve (FastAPI on uvicorn.run with its defaults: uvloop and
# httptools when installed, the same malloc tuning), with one route that reads the body and
# throws it away: the most any route on this stack could ingest.
DISCARD_APP = """
import sys
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import Response
from kdcache.offline.malloc import tune_malloc

tune_malloc()
app = FastAPI()

@app.post("/discard")
async def discard(request: Request) -> Response:
    await request.body()
    return Response(b"")

@app.get("/v2/health/ready")
async def ready() -> Response:
    return Response(b'{"ready":true}')

uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[sys.argv.index("--port") + 1]), log_level="warning", access_log=False, timeout_graceful_shutdown=30)
"""
INGEST = {"arch": "mlp-small", "request_size": 256, "seconds": 2.0, "warmup_requests": 4}


def ingest(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    """``--ingest`` (see the module doc). Rounds: discard, miss, miss, discard, then (after
    priming the cache, untimed) hit, hit."""
    shape = tuple(args.input_shape)
    size = INGEST["request_size"]
    teacher = harness.write_teacher(root / "student.pt", INGEST["arch"], shape, args.classes, seed=args.seed)
    pool = input_pool(shape, size, args.seed)
    plan = plan_requests("ingest", pool, size, POOL, args.classes, args.seed, store=False)
    prime = plan_requests("ingest", pool, size, POOL, args.classes, args.seed, store=True)  # the same ids, stored
    service = Server(teacher.path, root / "cache-ingest", root / "serve-ingest.log", args, size, "durable")
    discard = ServeProcess([], root / "discard.log", command=[sys.executable, "-c", DISCARD_APP], env=child_env(args))
    rounds: dict[str, list[dict[str, Any]]] = {"discard": [], "miss": [], "hit": []}
    try:
        ready(discard, args.ready_timeout)
        ready(service, args.ready_timeout)
        for side in ("discard", "miss", "miss", "discard", "hit", "hit"):
            harness.say(f"ingest: {side} ...")
            if side == "hit" and not rounds["hit"]:
                with httpx.Client(base_url=service.url, timeout=120) as http:
                    for chunks, headers in zip(prime.bodies, prime.headers, strict=True):
                        http.post(INFER, content=chunks, headers=headers).raise_for_status()
            if side == "discard":
                run = drive(discard, "/discard", plan, args.clients, INGEST["warmup_requests"], INGEST["seconds"], scrape=False)
            else:  # miss or hit
                before = service.metrics()
                run = drive(service, INFER, plan, args.clients, INGEST["warmup_requests"], INGEST["seconds"], scrape=False)
                after = service.metrics()
                batches = after["kd_teacher_seconds_count"] - before["kd_teacher_seconds_count"]
                run["forward_s_per_batch"] = (after["kd_teacher_seconds_sum"] - before["kd_teacher_seconds_sum"]) / max(1, batches)
                run["teacher_batches"] = batches
            rounds[side].append(run)
            harness.say(f"  {run['mb_per_s']:.1f} MB/s, {run['requests_per_s']:.1f} requests/s; server CPU {run['server_cpu_share']:.1%}, "
                        f"client CPU {run['client_cpu_share']:.1%} of the machine")  # fmt: skip
    finally:
        for server in (service, discard):
            server.stop(timeout=STOP_TIMEOUT)
    rate = {side: statistics.mean(run["mb_per_s"] for run in runs) for side, runs in rounds.items()}
    if any(run["teacher_batches"] for run in rounds["hit"]):
        raise SystemExit("ingest: the teacher ran during the all-hit rounds; the cache did not answer them")
    return {
        "teacher": INGEST["arch"],
        "teacher_params": teacher.params,
        "request_size": size,
        "body_bytes_per_request": sum(map(len, plan.bodies[0])),
        "clients": args.clients,
        "discard_mb_per_s": rate["discard"],
        "service_miss_mb_per_s": rate["miss"],
        "service_hit_mb_per_s": rate["hit"],
        "ratio_miss_vs_discard": rate["miss"] / rate["discard"],
        "ratio_hit_vs_discard": rate["hit"] / rate["discard"],
        "miss_forward_s_per_request": statistics.mean(run["forward_s_per_batch"] for run in rounds["miss"]),
        "miss_teacher_busy_share": statistics.mean(
            run["forward_s_per_batch"] * run["teacher_batches"] / run["seconds"] for run in rounds["miss"]
        ),
        "rounds": rounds,
    }


def print_ingest(result: dict[str, Any]) -> None:
    ing = result["ingest"]
    harness.print_header(
        "bench.service --ingest: MB/s of request body, teacher-serve's infer route vs a bare route that discards the body", result["env"],
        f"load       {ing['clients']} clients x 1 request in flight; {ing['request_size']} uint8 samples per request, "
        f"{ing['body_bytes_per_request']:,} bytes per body (binary, pre-encoded, with ids and labels)",
        f"service    teacher {ing['teacher']} ({ing['teacher_params']:,} parameters), store=false, soft_targets in binary; miss: "
        f"forward {ing['miss_forward_s_per_request'] * 1e3:.2f} ms per request, teacher busy {ing['miss_teacher_busy_share']:.0%} "
        f"of the window; hit: every id in the cache, no forward",
    )  # fmt: skip
    print()
    rounds = ing["rounds"]
    harness.table(
        [("side", ""), ("MB/s", ".1f"), ("per round", ""), ("requests/s", ".1f"), ("server CPU", ".1%"), ("client CPU", ".1%"),
         ("other CPU", ".1%")],
        [[side, statistics.mean(r["mb_per_s"] for r in runs), ", ".join(f"{r['mb_per_s']:.0f}" for r in runs),
          statistics.mean(r["requests_per_s"] for r in runs), statistics.mean(r["server_cpu_share"] for r in runs),
          statistics.mean(r["client_cpu_share"] for r in runs), max(r["foreign_cpu"] for r in runs)] for side, runs in rounds.items()],
    )  # fmt: skip
    print(f"\nservice (miss) / discard = {ing['ratio_miss_vs_discard']:.3f}; service (hit) / discard = {ing['ratio_hit_vs_discard']:.3f}")


# ---------------------------------------------------------------------------------------------
# The naming shim (--serve-named): teacher-serve with OS thread names


def serve_named(argv: list[str]) -> int:
    """Run ``service.cli.serve_main(argv)`` with every Python thread's name given to the OS, so
    that /proc/PID/task/*/comm tells the event loop, ``teacher_0``, ``cache-writer`` and the
    thread pool apart. Torch's OpenMP threads keep the process name. ``--switch-interval S``
    before the ``--`` sets ``sys.setswitchinterval(S)`` first (the GIL hand-off test)."""
    if argv[:1] == ["--switch-interval"]:
        sys.setswitchinterval(float(argv[1]))
        argv = argv[2:]
    if argv[:1] == ["--"]:
        argv = argv[1:]
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_name = 15

    def set_name(name: str) -> None:
        libc.prctl(pr_set_name, name.encode()[:15], 0, 0, 0)

    original = threading.Thread._bootstrap_inner  # type: ignore[attr-defined]

    def bootstrap_inner(self: threading.Thread) -> None:
        set_name(self.name)
        original(self)

    threading.Thread._bootstrap_inner = bootstrap_inner  # type: ignore[attr-defined]
    set_name("event-loop")
    from kdcache.service.cli import serve_main

    return serve_main(argv)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = harness.parser(__doc__, workdir_of="the teacher, caches and server logs")
    p.add_argument("--quick", action="store_true", help=f"small run, < 90 s on 2 cores ({QUICK})")
    p.add_argument("--sweep", action="store_true", help=f"also compare at batch sizes {', '.join(map(str, SWEEP_BATCHES))} ({SWEEP})")
    p.add_argument("--teacher-arch", default="resnet",
                   help="an offline.models registry name, or package.module:factory(input_shape, num_classes)")  # fmt: skip
    p.add_argument("--input-shape", type=int, nargs="+", default=[3, 32, 32], metavar="D", help="uint8 sample shape")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=256, help="raw forward batch = the server's --max-batch (its default)")
    p.add_argument("--request-size", type=int, default=None, help="samples per request (default: the batch size, as teacher-push)")
    p.add_argument(
        "--server-max-batch", type=int, default=None,
        help="the server's --max-batch when it should differ from --batch-size: e.g. its default 256, with one client sending "
        "--batch-size samples per request (default: --batch-size)",
    )  # fmt: skip
    p.add_argument("--clients", type=int, default=4, help="client threads, one request in flight each (teacher-push's --concurrency)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto", help="compute dtype, both sides")
    p.add_argument("--max-delay-ms", type=float, default=5.0, help="the server's --max-delay-ms")
    p.add_argument("--torch-threads", type=int, default=None, help="OMP_NUM_THREADS for both sides (default: torch's default)")
    p.add_argument("--seconds", type=float, default=None,
                   help=f"timed seconds per side (default {FULL['seconds']}; --quick {QUICK['seconds']})")  # fmt: skip
    p.add_argument("--repeats", type=int, default=None,
                   help=f"rounds of raw, durable, buffered (default {FULL['repeats']}; --quick {QUICK['repeats']})")  # fmt: skip
    p.add_argument(
        "--malloc", choices=("service", "glibc"), default="service",
        help="service: the raw side applies the same mallopt settings that teacher-serve applies at start "
        "(offline.malloc.tune_malloc); glibc: rerun with glibc's own defaults on both sides (harness.GLIBC_DEFAULTS)",
    )  # fmt: skip
    p.add_argument("--name-threads", action="store_true", help="start the server through the thread-naming shim (per-thread CPU by name)")
    p.add_argument(
        "--switch-interval", type=float, default=None, metavar="S",
        help="sys.setswitchinterval(S) in the server (through the naming shim; Python's default is 0.005): the GIL hand-off test",
    )  # fmt: skip
    p.add_argument(
        "--no-store", action="store_true",
        help="requests say store: false, so the cache writer never runs (a diagnostic: the service without its write path)",
    )  # fmt: skip
    p.add_argument("--plot", metavar="PATH", default=None, help="with --sweep: samples/s against batch size, raw vs service, as a PNG")
    p.add_argument(
        "--ingest", action="store_true",
        help="only measure the protocol layer's ingest rate (MB/s of request body) against a bare endpoint that discards bodies (< 20 s)",
    )  # fmt: skip
    p.add_argument("--targets", default="full", help="the server's --targets: full, topk:K or sampled:N")
    p.add_argument("--lm", action="store_true", help="a transformers GPT-2 teacher (hf:DIR) and token requests instead of --teacher-arch")
    p.add_argument("--lm-config", type=int, nargs=4, default=[4, 256, 4, 8192], metavar=("LAYERS", "DIM", "HEADS", "VOCAB"),
                   help="with --lm: the GPT-2's layers, width, heads and vocabulary")  # fmt: skip
    p.add_argument("--seq-len", type=int, default=128, help="with --lm: tokens per sequence (all full length)")
    p.add_argument("--ready-timeout", type=float, default=300.0, help="seconds to wait for /v2/health/ready")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    preset = dict(QUICK if args.quick else FULL)
    if args.seconds is not None:
        preset["seconds"] = args.seconds
    if args.repeats is None:
        args.repeats = preset["repeats"]
    args.preset = preset
    if args.plot and not args.sweep:
        p.error("--plot needs --sweep (it plots the sweep's batch sizes)")
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--serve-named"]:
        return serve_named(argv[1:])
    args = parse_args(argv)
    if args.malloc == "glibc" and any(os.environ.get(k) != v for k, v in harness.GLIBC_DEFAULTS.items()):
        # glibc reads these once, at start-up: start again with them (the server inherits them).
        os.execve(sys.executable, harness.module("service", *argv), harness.child_env(harness.GLIBC_DEFAULTS))
    if args.malloc == "service":
        from kdcache.offline.malloc import tune_malloc

        tune_malloc()  # the raw side gets the allocator settings the server gives itself
    with harness.workdir("bench-service-", args.tmpdir, args.keep) as root:
        if args.ingest:
            harness.emit({"env": harness.environment(args.device), "ingest": ingest(root, args)}, args.json, print_ingest)
            return 0
        if args.lm:
            layers, dim, heads, vocab = args.lm_config
            teacher = harness.write_lm_teacher(root / "gpt2", vocab, args.seq_len, layers=layers, dim=dim, heads=heads, seed=args.seed)
            args.teacher_arch, args.classes, args.input_shape = f"gpt2 {layers}x{dim} V={vocab}", vocab, [args.seq_len]
        else:
            teacher = harness.write_teacher(root / "student.pt", args.teacher_arch, args.input_shape, args.classes, seed=args.seed)
        harness.say(
            f"teacher {args.teacher_arch} ({teacher.params:,} parameters) in {teacher.path}; torch {torch.get_num_threads()} threads"
        )
        main_row = compare(teacher.path, root, args, args.batch_size, args.preset, args.repeats)
        sweep_preset = {**SWEEP, "seconds": min(SWEEP["seconds"], args.preset["seconds"])}
        sweep = [compare(teacher.path, root, args, size, sweep_preset, 1, "sweep") for size in SWEEP_BATCHES] if args.sweep else []
        env = harness.environment(args.device)
        result = {
            **{key: round(main_row[key], 2) for key in ("raw_samples_per_s", "durable_samples_per_s", "buffered_samples_per_s")},
            **{key: round(main_row[key], 4) for key in ("ratio_durable_vs_raw", "ratio_buffered_vs_raw", "ratio_durable_vs_buffered")},
            "target": f"{harness.target(P1)} (service / raw)",
            "target_met": both_met(main_row),
            "device": env["device"],
            "torch": env["torch"],
            "teacher": args.teacher_arch,
            "teacher_params": teacher.params,
            "batch_size": args.batch_size,
            "clients": args.clients,
            "max_foreign_cpu": max([main_row["max_foreign_cpu"], *(row["max_foreign_cpu"] for row in sweep)]),
            "env": env,
            "config": {
                **{k: v for k, v in vars(args).items() if k not in ("json", "tmpdir", "keep", "preset")},
                **{f"preset_{k}": v for k, v in args.preset.items()},
                "teacher_params": teacher.params,
            },
            "main": main_row,
            "sweep": sweep,
        }
        if args.plot:
            plot_sweep(result, Path(args.plot))
            harness.say(f"wrote {args.plot}")
        harness.emit(result, args.json, print_tables)
    return 0


if __name__ == "__main__":
    sys.exit(main())
