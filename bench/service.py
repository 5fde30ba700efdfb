"""Service benchmark: how close does ``teacher-serve`` come to the teacher's raw forward pass?

One run measures, side by side on the same device, at the same batch size and compute dtype:

* **raw**: ``service.teacher.load_teacher`` in this process and ``teacher.forward(batch)`` on a
  uint8 batch of ``--batch-size`` samples, called in a loop for N batches; samples/s =
  N x batch / seconds. It runs on a one-thread executor, as the server's batcher does, after as
  many untimed forwards as the server runs before its window (3 warm-up passes + the warm-up
  requests). No server runs meanwhile, so nothing competes for the CPU. Torch runs with this process's default thread count, which is also what
  the server gets (same environment; ``--torch-threads N`` sets ``OMP_NUM_THREADS`` for both).
* **durable** and **buffered**: a real ``teacher-serve`` subprocess (``--ack durable``, then
  ``--ack buffered``; ``--max-batch`` = the batch size; a fresh cache directory each), awaited on
  ``/v2/health/ready`` (its own warm-up of three forwards at ``--max-batch`` happens before
  that), driven by ``--clients`` threads with one ``httpx.Client`` each, every client keeping one
  request in flight. A request carries ``--request-size`` samples (default: the batch size, as
  ``teacher-push`` sends by default with ``--batch-size 256 --concurrency 4``): then one request
  is one forward pass, acknowledgements arrive one per batch, and 4 clients keep 4 batches
  queued, twice what the batcher needs to have the next batch formed while one runs. With a
  smaller request size the batcher joins requests (it waits ``--max-delay-ms``, default 5 ms).
  Requests are **pre-encoded**: ``service.protocol.encode_request`` runs once per distinct input
  batch (a pool of 4), with fixed-width ids, and each request sends that body as three chunks
  (header and inputs, its own ids, labels) with an explicit Content-Length, so the timed part
  costs the client no encoding and no copy. Ids are unique across the run, so every sample is a
  cache miss, goes through the teacher and is stored. The client asks for ``soft_targets`` in
  binary, as ``teacher-push`` does, and counts samples acknowledged with HTTP 200.
  The window: acknowledgements are recorded in completion order; the first ``--warmup-requests``
  are untimed (pipeline fill), and samples/s = samples acknowledged after ack #w up to the last
  one / (time of the last ack - time of ack #w). No request is sent after the last timed one, so
  the queue drains at the end and the window ends on a batch boundary, as raw's does; the last
  write's latency is inside it (a real cost, paid once). Then the server gets SIGTERM, and the
  cache is opened and must hold exactly the acknowledged ids (the durable shards really were
  written): its size and bytes/sample are reported.

The timed count of requests is sized from the raw throughput to last ``--seconds`` (at least
``--min-requests``). With ``--repeats R`` the three sides run R rounds in the order raw, durable,
buffered, and each figure is the median over rounds. Ratios: ``durable / raw``, ``buffered / raw``
(target >= 0.9 for a compute-bound teacher) and ``durable / buffered``.

**On a 2-core machine the load generator shares the CPU with the server.** So each service
window also reports the CPU seconds of this process (the clients: ``time.process_time``) and of
the server (``/proc/PID/stat``), per thread (``/proc/PID/task/*/stat``), and the share of the
machine other processes took ("other CPU", as in bench/reader.py). It also scrapes the server's
``/metrics`` at both ends of the window: forward seconds per batch *inside* the server (compared
with raw's, this says whether the model itself ran slower, e.g. because threads competed for the
cores) and the teacher's busy share of the window (bubbles between batches). Python 3.11 does not
name OS threads, so the per-thread table says "tid N" unless ``--name-threads`` starts the server
through a shim (this file with ``--serve-named``) that calls ``prctl(PR_SET_NAME)`` with each
Python thread's name and then runs ``service.cli.serve_main`` exactly as the console script does.

The teacher: ``--teacher-arch`` (default ``resnet``, the CIFAR ResNet-20 of offline.models, 0.27 M
parameters; ``cnn-large`` is similar in cost) with random weights, built by
``offline.models.build`` for uint8 ``--input-shape`` (default 3 32 32) with preprocessing scale
1/255, and saved as a ``student.pt`` record (format "kd-student", as ``offline/train.py`` writes
it) in a temporary directory, which is what ``teacher-serve --teacher`` and ``load_teacher`` load.

``--sweep`` adds raw vs durable vs buffered at batch sizes 16, 64 and 256 (``--max-batch`` and
request size = batch size), one round each; ``--plot PATH`` draws them (samples/s against batch
size, raw, durable and buffered, with durable / raw written at each point) with matplotlib's Agg
backend, e.g. ``--sweep --plot docs/bench.png``. ``--switch-interval S`` starts the server through
the shim with ``sys.setswitchinterval(S)`` (Python's default is 0.005 s); it, ``--torch-threads 1`` and
``--no-store`` (requests say ``store: false``, so the cache writer never runs) are the tests of
the small-batch gap in docs/benchmarks.md.

``--ingest`` measures something else, on its own (< 20 s): how many MB/s of request body the
service's protocol layer takes in, against a bare route on the same server stack that only reads
the body and throws it away (``DISCARD_APP``: FastAPI on ``uvicorn.run`` with the same settings as
teacher-serve, so uvloop and httptools, and the same malloc tuning). The same client threads
post the same pre-encoded binary bodies (256 uint8 [3,32,32] samples with ids and labels, about
0.8 MB) to both, round-robin, one request in flight per client, for 2 s after 4 warm-up
acknowledgements. The service side keeps the teacher out of the figure two ways: ``miss``, a tiny
teacher (``mlp-small``) with ``store: false``, whose forward time and busy share are reported;
and ``hit``, every id already in the cache (primed once, untimed), so no forward runs and the
writer thread's lookup answers. Ratios: service / discard.

Runs (``--quick``: < 90 s on 2 cores; ``--json``: one JSON object instead of the tables):

    .venv/bin/python bench/service.py --quick
    .venv/bin/python bench/service.py                  # a few minutes on 2 cores
    .venv/bin/python bench/service.py --sweep --json

On a GPU: ``--device cuda`` (the compute dtype is then bfloat16 on both sides, or pass
``--dtype``) and a larger teacher, so that the forward pass, not HTTP, is what the service must
keep up with, e.g. a ResNet-50-class teacher on 224x224 images. ``--teacher-arch`` takes an
offline.models registry name or ``package.module:factory``, called as
``factory(input_shape, num_classes)`` and returning an ``nn.Module``; the bench saves the model
as a student.pt with that ``arch`` string, which ``teacher-serve`` resolves the same way (so the
module must be importable by the server too: run from the directory that holds it, or set
PYTHONPATH). torchvision's constructors take keyword-only arguments, so wrap one:

    # mybench.py
    import torchvision
    def resnet50(input_shape, num_classes):
        return torchvision.models.resnet50(num_classes=num_classes)

    PYTHONPATH=. .venv/bin/python bench/service.py --device cuda --teacher-arch mybench:resnet50 \
        --input-shape 3 224 224 --classes 1000 --batch-size 256 --clients 4

Without torchvision, any factory of yours works the same way (for instance a deeper
``offline.models.CifarResNet``: ``CifarResNet(input_shape, num_classes, 9, "resnet-56")``).
Requests are pre-encoded from 4 input batches, so client memory stays at 4 batches whatever the
window length.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime as dt
import importlib.util
import json
import math
import os
import platform
import resource
import shlex
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Run as a script, this file's directory comes first on sys.path, and this file is called
# service.py: it would shadow the `service` package. Drop the directory, put the repo root there.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from kdcache.offline import models  # noqa: E402
from kdcache.offline.cache import CacheReader, Preprocessing, normalize_ids  # noqa: E402
from kdcache.offline.journal import JOURNAL_NAME  # noqa: E402
from kdcache.service.launch import LaunchError, ServeProcess  # noqa: E402
from kdcache.service.protocol import HEADER_LENGTH, RequestedOutput, encode_request, serialize_bytes  # noqa: E402
from kdcache.service.teacher import WARMUP_PASSES  # noqa: E402


def _load_reader_helpers() -> Any:
    """bench/reader.py's CpuMeter and cpu_model (one home for them), imported by path."""
    spec = importlib.util.spec_from_file_location("bench_reader", _HERE / "reader.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


_reader = _load_reader_helpers()
CpuMeter, cpu_model, GLIBC_DEFAULTS = _reader.CpuMeter, _reader.cpu_model, _reader.GLIBC_DEFAULTS

RATIO_TARGET = 0.9
NOISE_LIMIT = 0.05
SWEEP_BATCHES = (16, 64, 256)
POOL = 4  # distinct input batches; requests differ from each other by their ids
ID_WIDTH = 8  # request number digits; ids are f"{run}-{request:08d}-{row:06d}"
BIN = Path(sys.executable).parent
QUICK = {"seconds": 6.0, "min_requests": 4, "warmup_requests": 2, "repeats": 1}
FULL = {"seconds": 20.0, "min_requests": 8, "warmup_requests": 3, "repeats": 3}
SWEEP = {"seconds": 6.0, "min_requests": 6, "warmup_requests": 3}
CLK_TCK = os.sysconf("SC_CLK_TCK")


def say(message: str) -> None:  # progress on stderr, so that --json output stays one object
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# The teacher


def write_teacher(directory: Path, arch: str, shape: tuple[int, ...], classes: int, seed: int) -> tuple[Path, int]:
    """A random-weight ``arch`` saved as offline/train.py's student.pt record (format kd-student)."""
    torch.manual_seed(seed)
    model = models.build(arch, shape, classes)
    record = {
        "format": "kd-student",
        "version": 1,
        "arch": arch,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "num_classes": classes,
        "input_shape": list(shape),
        "input_dtype": "uint8",
        "preprocessing": Preprocessing(scale=1 / 255).to_dict(),
        "teacher_fingerprint": "bench-service-random-weights",
        "temperature": 4.0,
        "alpha": 0.9,
    }
    path = directory / "student.pt"
    torch.save(record, path)
    return path, models.count_parameters(model)


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
    pool = input_pool(tuple(args.input_shape), batch_size, args.seed)
    sync = torch.cuda.synchronize if teacher.device.type == "cuda" else (lambda: None)

    def run() -> dict[str, Any]:
        started = time.perf_counter()
        for i in range(max(1, warmup)):
            teacher.forward(pool[i % POOL])  # forward returns numpy: it has synchronised already
        per_batch = (time.perf_counter() - started) / max(1, warmup)
        batches = max(min_batches, math.ceil(seconds / max(per_batch, 1e-6)))
        meter = CpuMeter()
        cpu0 = time.process_time()
        faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        sync()
        started = time.perf_counter()
        for i in range(batches):
            teacher.forward(pool[i % POOL])
        wall = time.perf_counter() - started
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0
        cpu = time.process_time() - cpu0
        return {
            "batches": batches,
            "samples": batches * batch_size,
            "seconds": wall,
            "samples_per_s": batches * batch_size / wall,
            "forward_s_per_batch": wall / batches,
            "faults_per_batch": faults / batches,  # minor page faults of this process (nothing else runs in it)
            "cpu_s": cpu,
            "cpu_share": cpu / (wall * (os.cpu_count() or 1)),
            **meter.stop(),
        }

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="teacher") as executor:
        return executor.submit(run).result()


# ---------------------------------------------------------------------------------------------
# The server subprocess, and what /proc says about it


def thread_ticks(pid: int) -> dict[int, tuple[str, int, int]]:
    """tid -> (name, utime + stime ticks, minor page faults) for every thread of ``pid``."""
    out: dict[int, tuple[str, int, int]] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat", encoding="ascii", errors="replace") as fh:
                text = fh.read()
        except OSError:
            continue
        name = text[text.index("(") + 1 : text.rindex(")")]
        fields = text.rsplit(")", 1)[1].split()
        out[int(tid)] = (name, int(fields[11]) + int(fields[12]), int(fields[7]))
    return out


def metric_sums(text: str) -> dict[str, float]:
    """The few /metrics series this benchmark reads, from the Prometheus text format."""
    wanted = ("kd_teacher_seconds_sum", "kd_teacher_seconds_count", "kd_batch_size_sum", "kd_batch_size_count",
              "kd_write_seconds_sum", "kd_write_seconds_count", "kd_stored_samples_total")  # fmt: skip
    out = dict.fromkeys(wanted, 0.0)
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in out:
            out[name] = float(value)
    return out


class Server(ServeProcess):
    """A ``teacher-serve`` subprocess (or the naming shim around the same ``serve_main``)."""

    def __init__(self, teacher: Path, cache: Path, log_path: Path, args: argparse.Namespace, batch_size: int, ack: str) -> None:
        serve_args = [
            "--teacher", str(teacher), "--cache", str(cache), "--device", args.device, "--dtype", args.dtype,
            "--max-batch", str(batch_size), "--max-delay-ms", str(args.max_delay_ms), "--ack", ack, "--log-level", "warning",
        ]  # fmt: skip
        if args.switch_interval is not None:
            command = [sys.executable, str(Path(__file__).resolve()), "--serve-named", "--switch-interval", str(args.switch_interval), "--"]
        elif args.name_threads:
            command = [sys.executable, str(Path(__file__).resolve()), "--serve-named", "--"]
        else:
            command = [str(BIN / "teacher-serve")]
        super().__init__(serve_args, log_path, command=command, env=child_env(args))

    def output(self, tail: int | None = 3000) -> str:
        return super().output(tail)

    def wait_ready(self, timeout: float = 300.0) -> Server:
        try:
            super().wait_ready(timeout)
        except LaunchError as exc:
            raise SystemExit(f"{exc}\n{self.output()}") from None
        return self

    def metrics(self) -> dict[str, float]:
        return metric_sums(httpx.get(f"{self.url}/metrics", timeout=30).text)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 120.0) -> int:
        return super().stop(sig, timeout)


def child_env(args: argparse.Namespace) -> dict[str, str]:
    env = dict(os.environ)
    if args.torch_threads:
        env["OMP_NUM_THREADS"] = str(args.torch_threads)
    return env


# ---------------------------------------------------------------------------------------------
# Pre-encoded requests


@dataclass
class RequestPlan:
    """Every request of one service run: body chunks per request, ids per request."""

    bodies: list[list[bytes]]  # [prefix (header + inputs), ids, labels]; joined, exactly encode_request's body
    headers: list[dict[str, str]]
    ids: list[np.ndarray]
    samples: int


def plan_requests(
    run: str, pool: list[np.ndarray], request_size: int, count: int, classes: int, seed: int, store: bool = True
) -> RequestPlan:
    rng = np.random.default_rng(seed)
    labels = [rng.integers(0, classes, request_size).astype(np.int64) for _ in range(POOL)]
    outputs = [RequestedOutput("soft_targets", True)]  # what teacher-push asks for
    parameters = {"store": store}

    def ids_of(request: int) -> np.ndarray:
        return normalize_ids([f"{run}-{request:0{ID_WIDTH}d}-{row:06d}" for row in range(request_size)], request_size)

    templates = []
    for k in range(POOL):
        tensors = [("input", pool[k][:request_size]), ("id", ids_of(k)), ("label", labels[k])]
        body, headers = encode_request(tensors, parameters=parameters, outputs=outputs, binary=True)
        id_bytes = serialize_bytes(ids_of(k))
        label_bytes = labels[k].astype("<i8").tobytes()
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
        [("input", pool[1 % POOL][:request_size]), ("id", all_ids[min(1, count - 1)]), ("label", labels[1 % POOL])],
        parameters=parameters, outputs=outputs, binary=True,
    )[0] if count > 1 else b"".join(bodies[0])  # fmt: skip
    assert b"".join(bodies[min(1, count - 1)]) == check, "pre-encoded body differs from encode_request's"
    return RequestPlan(bodies, all_headers, all_ids, request_size)


# ---------------------------------------------------------------------------------------------
# Driving the server


@dataclass
class Window:
    """Snapshots taken at ack #w (start) and at the last ack (end)."""

    wall: float = 0.0
    client_cpu: float = 0.0
    server_threads: dict[int, tuple[str, int, int]] = field(default_factory=dict)
    server_ticks: int = 0
    server_faults: int = 0


def snapshot(pid: int) -> Window:
    threads = thread_ticks(pid)
    ticks, faults = sum(t for _, t, _ in threads.values()), sum(f for _, _, f in threads.values())
    return Window(time.perf_counter(), time.process_time(), threads, ticks, faults)


def drive(server: Server, plan: RequestPlan, clients: int, warmup_requests: int) -> dict[str, Any]:
    """``clients`` threads send the planned requests in order, one in flight each; see the module doc."""
    total = len(plan.bodies)
    lock = threading.Lock()
    next_request = 0
    acks: list[tuple[float, int, int]] = []  # (time, request, samples)
    errors: list[str] = []
    hits = 0
    start_window: dict[str, Any] = {}
    end_window: dict[str, Any] = {}
    metrics_at: dict[str, dict[str, float]] = {}
    window_started = threading.Event()
    path = "/v2/models/teacher/infer"

    def client() -> None:
        nonlocal next_request, hits
        with httpx.Client(base_url=server.url, timeout=600) as http:
            while True:
                with lock:
                    if errors or next_request >= total:
                        return
                    request = next_request
                    next_request += 1
                try:
                    response = http.post(path, content=plan.bodies[request], headers=plan.headers[request])
                except httpx.HTTPError as exc:
                    with lock:
                        errors.append(f"request {request}: {type(exc).__name__}: {exc}")
                    return
                now = time.perf_counter()
                if response.status_code != 200:
                    with lock:
                        errors.append(f"request {request}: HTTP {response.status_code}: {response.text[:300]}")
                    return
                length = int(response.headers.get(HEADER_LENGTH, len(response.content)))
                parameters = json.loads(response.content[:length]).get("parameters", {})
                with lock:
                    acks.append((now, request, plan.samples))
                    hits += int(parameters.get("cache_hits", 0))
                    if len(acks) == warmup_requests:
                        start_window["window"] = snapshot(server.proc.pid)
                        start_window["meter"] = CpuMeter()
                        window_started.set()
                    if len(acks) == total:
                        end_window["window"] = snapshot(server.proc.pid)
                        end_window["noise"] = start_window["meter"].stop()

    def scrape_start() -> None:  # off the clients' path; lands well before the next batch ends
        window_started.wait()
        with contextlib.suppress(httpx.HTTPError):
            metrics_at["start"] = server.metrics()

    scraper = threading.Thread(target=scrape_start, daemon=True)
    scraper.start()
    threads = [threading.Thread(target=client, name=f"client-{i}") for i in range(clients)]
    first_sent = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise SystemExit(f"the service failed a request: {errors[0]}\n{server.output()}")
    window_started.set()
    scraper.join(30)
    metrics_at["end"] = server.metrics()

    acks.sort()
    t0, t1 = acks[warmup_requests - 1][0], acks[-1][0]
    timed = sum(n for _, _, n in acks[warmup_requests:])
    wall = t1 - t0
    w0, w1 = start_window["window"], end_window["window"]
    cpus = os.cpu_count() or 1
    server_cpu = (w1.server_ticks - w0.server_ticks) / CLK_TCK
    client_cpu = w1.client_cpu - w0.client_cpu
    per_thread = []
    for tid, (name, ticks, faults) in w1.server_threads.items():
        _, ticks0, faults0 = w0.server_threads.get(tid, (name, 0, 0))
        seconds = (ticks - ticks0) / CLK_TCK
        label = "event-loop (main)" if tid == server.proc.pid and name in ("teacher-serve", "python", "python3") else name
        per_thread.append(
            {"tid": tid, "name": label, "cpu_s": seconds, "share_of_window": seconds / wall, "minor_faults": faults - faults0}
        )
    per_thread.sort(key=lambda row: -row["cpu_s"])
    m0, m1 = metrics_at.get("start"), metrics_at["end"]
    server_side: dict[str, Any] = {}
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
    return {
        "requests": total,
        "warmup_requests": warmup_requests,
        "timed_requests": len(acks) - warmup_requests,
        "request_size": plan.samples,
        "acknowledged_samples": sum(n for _, _, n in acks),
        "timed_samples": timed,
        "seconds": wall,
        "samples_per_s": timed / wall,
        "first_send_to_last_ack_s": t1 - first_sent,
        "cache_hits_answered": hits,
        "client_cpu_s": client_cpu,
        "server_cpu_s": server_cpu,
        "client_cpu_share": client_cpu / (wall * cpus),  # of the machine
        "server_cpu_share": server_cpu / (wall * cpus),
        "client_share_of_used": client_cpu / max(1e-9, client_cpu + server_cpu),
        "server_threads": per_thread,
        "server_side": server_side,
        **end_window["noise"],
    }


def check_cache(cache: Path, plan: RequestPlan, acknowledged: int, stored_expected: bool = True) -> dict[str, Any]:
    """After SIGTERM: the cache must hold exactly the acknowledged ids (none with --no-store), and no journal."""
    reader = CacheReader(cache)
    stored = reader.read(("ids",))["ids"]
    expected = {str(i) for ids in plan.ids for i in ids} if stored_expected else set()
    acknowledged = acknowledged if stored_expected else 0
    stored_set = {str(i) for i in stored}
    return {
        "cache_samples": reader.num_samples,
        "cache_bytes": reader.total_bytes,
        "bytes_per_sample": reader.total_bytes / max(1, reader.num_samples),
        "shards": len(reader.shards),
        "cache_matches_acks": reader.num_samples == acknowledged == len(stored_set) and stored_set == expected,
        "journal_left": (cache / JOURNAL_NAME).exists() and (cache / JOURNAL_NAME).stat().st_size > 0,
    }


def service_run(
    teacher: Path, root: Path, args: argparse.Namespace, batch_size: int, ack: str, raw_rate: float, preset: dict[str, Any], tag: str
) -> dict[str, Any]:
    request_size = args.request_size or batch_size
    timed = max(preset["min_requests"], math.ceil(preset["seconds"] * raw_rate / request_size))
    count = preset["warmup_requests"] + timed
    pool = input_pool(tuple(args.input_shape), max(request_size, 1), args.seed)
    plan = plan_requests(tag, pool, request_size, count, args.classes, args.seed, store=not args.no_store)
    cache = root / f"cache-{tag}"
    server = Server(teacher, cache, root / f"serve-{tag}.log", args, batch_size, ack)
    try:
        ready_from = time.perf_counter()
        server.wait_ready(args.ready_timeout)
        ready_s = time.perf_counter() - ready_from
        figures = drive(server, plan, args.clients, preset["warmup_requests"])
    except BaseException:
        server.stop()
        raise
    code = server.stop()
    if code != 0:
        raise SystemExit(f"teacher-serve exited with {code} after SIGTERM:\n{server.output()}")
    return {"ack": ack, "batch_size": batch_size, "start_to_ready_s": ready_s, **figures,
            **check_cache(cache, plan, figures["acknowledged_samples"], not args.no_store), "command": shlex.join(server.command)}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Rounds


def compare(
    teacher: Path, root: Path, args: argparse.Namespace, batch_size: int, preset: dict[str, Any], repeats: int, label: str = "main"
) -> dict[str, Any]:
    rounds: dict[str, list[dict[str, Any]]] = {"raw": [], "durable": [], "buffered": []}
    raw_rate = 0.0
    for r in range(repeats):
        # Odd rounds run in reverse order, so that a drift of the machine over the run does not
        # favour one side.
        for side in ("raw", "durable", "buffered") if r % 2 == 0 else ("buffered", "durable", "raw"):
            if side == "raw":
                say(f"batch {batch_size}, round {r + 1}/{repeats}: raw forward ...")
                # As many untimed forwards as the server runs before its window: its warm-up passes
                # plus the warm-up requests (glibc's malloc thresholds adapt to that history).
                warmup = WARMUP_PASSES + preset["warmup_requests"]
                raw = raw_forward(teacher, args, batch_size, warmup, preset["seconds"], preset["min_requests"])
                rounds["raw"].append(raw)
                raw_rate = raw["samples_per_s"]
                say(f"  raw {raw_rate:.1f} samples/s ({raw['batches']} batches, {raw['seconds']:.1f} s)")
                continue
            say(f"batch {batch_size}, round {r + 1}/{repeats}: teacher-serve --ack {side} ...")
            run = service_run(teacher, root, args, batch_size, side, raw_rate, preset, f"{label}-b{batch_size}-r{r}-{side}")
            rounds[side].append(run)
            say(f"  {side} {run['samples_per_s']:.1f} samples/s ({run['timed_requests']} timed requests, {run['seconds']:.1f} s; "
                f"client CPU {run['client_cpu_share']:.1%}, server CPU {run['server_cpu_share']:.1%} of the machine)")  # fmt: skip
    median = {side: statistics.median(r["samples_per_s"] for r in runs) for side, runs in rounds.items()}
    return {
        "batch_size": batch_size,
        "raw_samples_per_s": median["raw"],
        "durable_samples_per_s": median["durable"],
        "buffered_samples_per_s": median["buffered"],
        "ratio_durable_vs_raw": median["durable"] / median["raw"],
        "ratio_buffered_vs_raw": median["buffered"] / median["raw"],
        "ratio_durable_vs_buffered": median["durable"] / median["buffered"],
        "max_foreign_cpu": max(r["foreign_cpu"] for runs in rounds.values() for r in runs),
        "max_steal": max(r["steal"] for runs in rounds.values() for r in runs),
        "ratio_durable_vs_raw_per_round": [
            d["samples_per_s"] / w["samples_per_s"] for d, w in zip(rounds["durable"], rounds["raw"], strict=True)
        ],
        "ratio_buffered_vs_raw_per_round": [
            b["samples_per_s"] / w["samples_per_s"] for b, w in zip(rounds["buffered"], rounds["raw"], strict=True)
        ],
        "rounds": rounds,
    }


# ---------------------------------------------------------------------------------------------
# Report


def environment(args: argparse.Namespace) -> dict[str, Any]:
    device = args.device
    if device == "cuda" and torch.cuda.is_available():
        device = f"cuda ({torch.cuda.get_device_name(0)})"
    return {
        "command": shlex.join(getattr(sys, "orig_argv", [sys.executable, *sys.argv])),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "device": device,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "httpx": httpx.__version__,
    }


def print_tables(result: dict[str, Any]) -> None:
    env, cfg = result["env"], result["config"]
    ok = {True: "yes", False: "NO"}
    print("bench/service.py: teacher-serve end to end vs raw teacher.forward, same batch size, dtype and device")
    print(f"command    {env['command']}")
    print(f"date       {env['date']}")
    print(f"hardware   {env['cpu']}, {env['cpus']} CPUs; device {env['device']}; torch {env['torch']} ({env['torch_threads']} threads), "
          f"python {env['python']}, numpy {env['numpy']}, httpx {env['httpx']}")  # fmt: skip
    print(f"teacher    {cfg['teacher_arch']} ({cfg['teacher_params']:,} parameters, random weights), uint8 {cfg['input_shape']}, "
          f"{cfg['classes']} classes, dtype {cfg['dtype']}")  # fmt: skip
    print(f"load       {cfg['clients']} clients x 1 request in flight, {cfg['request_size'] or 'batch-size'} samples per request, "
          f"pre-encoded; median of {cfg['repeats']} round(s); malloc {cfg['malloc']}; server via "
          f"{'the thread-naming shim' if cfg['name_threads'] else 'teacher-serve'}")  # fmt: skip
    rows = [result["main"], *result.get("sweep", [])]
    print()
    print(f"{'batch':>5}  {'raw samples/s':>13}  {'durable':>9}  {'buffered':>9}  {'durable/raw':>11}  {'buffered/raw':>12}  "
          f"{'durable/buffered':>16}  {'target':>6}  {'met':>3}  {'other CPU':>9}")  # fmt: skip
    for i, row in enumerate(rows):
        if i == 1:
            print("sweep:")
        met = row["ratio_durable_vs_raw"] >= RATIO_TARGET and row["ratio_buffered_vs_raw"] >= RATIO_TARGET
        print(f"{row['batch_size']:>5}  {row['raw_samples_per_s']:>13.1f}  {row['durable_samples_per_s']:>9.1f}  {row['buffered_samples_per_s']:>9.1f}  "
              f"{row['ratio_durable_vs_raw']:>11.3f}  {row['ratio_buffered_vs_raw']:>12.3f}  {row['ratio_durable_vs_buffered']:>16.3f}  "
              f"{'>= ' + str(RATIO_TARGET):>6}  {ok[met]:>3}  {row['max_foreign_cpu']:>9.1%}")  # fmt: skip
    print()
    print("Per service run (timed window): CPU as a share of the machine, forward time per batch inside the server vs raw,")
    print("and the cache the run left after SIGTERM")
    print(f"{'batch':>5}  {'ack':>8}  {'samples/s':>9}  {'client CPU':>10}  {'server CPU':>10}  {'client/used':>11}  {'mean batch':>10}  "
          f"{'fwd s/batch':>11}  {'raw s/batch':>11}  {'faults/batch srv|raw':>20}  {'teacher busy':>12}  {'write s/group':>13}  {'cache samples':>13}  {'B/sample':>8}  {'exact':>5}")  # fmt: skip
    for row in rows:
        for raw, durable, buffered in zip(row["rounds"]["raw"], row["rounds"]["durable"], row["rounds"]["buffered"], strict=True):
            for run in (durable, buffered):
                s = run["server_side"]
                print(f"{row['batch_size']:>5}  {run['ack']:>8}  {run['samples_per_s']:>9.1f}  {run['client_cpu_share']:>10.1%}  {run['server_cpu_share']:>10.1%}  "
                      f"{run['client_share_of_used']:>11.1%}  {s.get('mean_batch', float('nan')):>10.1f}  {s.get('forward_s_per_batch', float('nan')):>11.4f}  "
                      f"{raw['forward_s_per_batch']:>11.4f}  {s.get('faults_per_batch', float('nan')):>9,.0f} | {raw['faults_per_batch']:>8,.0f}  {s.get('teacher_busy_share', float('nan')):>12.1%}  {s.get('write_s_per_group', float('nan')):>13.4f}  "
                      f"{run['cache_samples']:>13,}  {run['bytes_per_sample']:>8.0f}  {ok[run['cache_matches_acks']]:>5}")  # fmt: skip
    main = result["main"]
    print()
    print("per-round ratios, durable/raw: " + " ".join(f"{v:.3f}" for v in main["ratio_durable_vs_raw_per_round"])
          + "; buffered/raw: " + " ".join(f"{v:.3f}" for v in main["ratio_buffered_vs_raw_per_round"]))  # fmt: skip
    print(f"Server threads, batch {main['batch_size']}, round 1 (CPU seconds in the timed window; names need --name-threads)")
    for ack in ("durable", "buffered"):
        run = main["rounds"][ack][0]
        top = ", ".join(f"{t['name']}:{t['cpu_s']:.2f}s/{t['minor_faults']:,}flt" for t in run["server_threads"][:8] if t["cpu_s"] > 0)
        print(f"  {ack:>8} ({run['seconds']:.1f} s): {top}")
    hits = sum(run["cache_hits_answered"] for row in rows for ack in ("durable", "buffered") for run in row["rounds"][ack])
    if hits:
        print(f"\nWARNING: {hits} samples were answered from the cache; the service figures did not all go through the teacher")
    if result["max_foreign_cpu"] > NOISE_LIMIT:
        print()
        print(f"WARNING: other processes took up to {result['max_foreign_cpu']:.0%} of the machine while figures were timed; "
              f"figures with 'other CPU' above {NOISE_LIMIT:.0%} are not trustworthy: rerun on a quiet machine")  # fmt: skip
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
             f"{cfg['clients']} clients, 1 round per point; bench/service.py --sweep", fontsize=6, color="grey")  # fmt: skip
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


class DiscardServer(Server):
    def __init__(self, log_path: Path, args: argparse.Namespace) -> None:  # noqa: D107 - Server's stop/wait_ready/output
        ServeProcess.__init__(self, [], log_path, command=[sys.executable, "-c", DISCARD_APP], env=child_env(args), cwd=_HERE.parent)


def drive_for(server: Server, path: str, plan: RequestPlan, clients: int, warmup_requests: int, seconds: float) -> dict[str, Any]:
    """``clients`` threads post the plan's bodies round-robin, one in flight each, until
    ``seconds`` after ack #``warmup_requests``; MB/s of request body acknowledged in that window."""
    lock = threading.Lock()
    sizes = [sum(map(len, chunks)) for chunks in plan.bodies]
    acks: list[tuple[float, int]] = []
    errors: list[str] = []
    marks: dict[str, Any] = {}
    counter = 0

    def client() -> None:
        nonlocal counter
        with httpx.Client(base_url=server.url, timeout=120) as http:
            while True:
                with lock:
                    if errors or ("stop_at" in marks and time.perf_counter() >= marks["stop_at"]):
                        return
                    request = counter % len(plan.bodies)
                    counter += 1
                try:
                    response = http.post(path, content=plan.bodies[request], headers=plan.headers[request])
                except httpx.HTTPError as exc:
                    with lock:
                        errors.append(f"{type(exc).__name__}: {exc}")
                    return
                now = time.perf_counter()
                with lock:
                    if response.status_code != 200:
                        errors.append(f"HTTP {response.status_code}: {response.text[:300]}")
                        return
                    acks.append((now, sizes[request]))
                    if len(acks) == warmup_requests:
                        marks["start"] = snapshot(server.proc.pid)
                        marks["meter"] = CpuMeter()
                        marks["stop_at"] = now + seconds

    threads = [threading.Thread(target=client, name=f"client-{i}") for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise SystemExit(f"{server.url}{path} failed a request: {errors[0]}\n{server.output()}")
    end = snapshot(server.proc.pid)
    noise = marks["meter"].stop()
    acks.sort()
    t0 = acks[warmup_requests - 1][0]
    wall = acks[-1][0] - t0
    body_bytes = sum(n for _, n in acks[warmup_requests:])
    start: Window = marks["start"]
    cpus = os.cpu_count() or 1
    return {
        "requests": len(acks) - warmup_requests,
        "seconds": wall,
        "body_bytes": body_bytes,
        "mb_per_s": body_bytes / wall / 1e6,
        "requests_per_s": (len(acks) - warmup_requests) / wall,
        "server_cpu_share": (end.server_ticks - start.server_ticks) / CLK_TCK / (wall * cpus),
        "client_cpu_share": (end.client_cpu - start.client_cpu) / (wall * cpus),
        **noise,  # foreign_cpu: the share of the machine other processes took
    }


def ingest(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The service's infer route against a bare discard route on the same stack, with the same
    pre-encoded binary bodies from the same client threads. The service runs two ways that
    keep the teacher out of the way: ``miss``, a tiny teacher (mlp-small) and ``store: false``
    (no write); ``hit``, every id already in the cache (primed once, untimed), so the teacher
    does not run and the logits come from the writer thread's lookup. Both send ids (no
    hashing) and ask for ``soft_targets`` in binary, as teacher-push does. Rounds: discard,
    miss, miss, discard, then (after priming) hit, hit."""
    shape = tuple(args.input_shape)
    size = INGEST["request_size"]
    teacher, params = write_teacher(root, INGEST["arch"], shape, args.classes, args.seed)
    pool = input_pool(shape, size, args.seed)
    plan = plan_requests("ingest", pool, size, POOL, args.classes, args.seed, store=False)
    prime = plan_requests("ingest", pool, size, POOL, args.classes, args.seed, store=True)  # the same ids, stored
    service = Server(teacher, root / "cache-ingest", root / "serve-ingest.log", args, size, "durable")
    discard = DiscardServer(root / "discard.log", args)
    rounds: dict[str, list[dict[str, Any]]] = {"discard": [], "miss": [], "hit": []}
    try:
        discard.wait_ready(args.ready_timeout)
        service.wait_ready(args.ready_timeout)
        for side in ("discard", "miss", "miss", "discard", "hit", "hit"):
            say(f"ingest: {side} ...")
            if side == "hit" and not rounds["hit"]:
                with httpx.Client(base_url=service.url, timeout=120) as http:
                    for chunks, headers in zip(prime.bodies, prime.headers, strict=True):
                        http.post("/v2/models/teacher/infer", content=chunks, headers=headers).raise_for_status()
            if side == "discard":
                run = drive_for(discard, "/discard", plan, args.clients, INGEST["warmup_requests"], INGEST["seconds"])
            else:  # miss or hit
                before = service.metrics()
                run = drive_for(service, "/v2/models/teacher/infer", plan, args.clients, INGEST["warmup_requests"], INGEST["seconds"])
                after = service.metrics()
                batches = after["kd_teacher_seconds_count"] - before["kd_teacher_seconds_count"]
                run["forward_s_per_batch"] = (after["kd_teacher_seconds_sum"] - before["kd_teacher_seconds_sum"]) / max(1, batches)
                run["teacher_batches"] = batches
            rounds[side].append(run)
            say(f"  {run['mb_per_s']:.1f} MB/s, {run['requests_per_s']:.1f} requests/s; server CPU {run['server_cpu_share']:.1%}, "
                f"client CPU {run['client_cpu_share']:.1%} of the machine")  # fmt: skip
    finally:
        for server in (service, discard):
            server.stop()
    rate = {side: statistics.mean(run["mb_per_s"] for run in runs) for side, runs in rounds.items()}
    if any(run["teacher_batches"] for run in rounds["hit"]):
        raise SystemExit("ingest: the teacher ran during the all-hit rounds; the cache did not answer them")
    return {
        "teacher": INGEST["arch"],
        "teacher_params": params,
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
    env, ing = result["env"], result["ingest"]
    print("bench/service.py --ingest: MB/s of request body, teacher-serve's infer route vs a bare route that discards the body")
    print(f"command    {env['command']}")
    print(f"date       {env['date']}")
    print(f"hardware   {env['cpu']}, {env['cpus']} CPUs; torch {env['torch']}, python {env['python']}, httpx {env['httpx']}")
    print(f"load       {ing['clients']} clients x 1 request in flight; {ing['request_size']} uint8 samples per request, "
          f"{ing['body_bytes_per_request']:,} bytes per body (binary, pre-encoded, with ids and labels)")  # fmt: skip
    print(f"service    teacher {ing['teacher']} ({ing['teacher_params']:,} parameters), store=false, soft_targets in binary; miss: "
          f"forward {ing['miss_forward_s_per_request'] * 1e3:.2f} ms per request, teacher busy {ing['miss_teacher_busy_share']:.0%} "
          f"of the window; hit: every id in the cache, no forward")  # fmt: skip
    print()
    print(f"{'side':>8}  {'MB/s (per round)':>24}  {'requests/s':>10}  {'server CPU':>10}  {'client CPU':>10}  {'other CPU':>9}")
    for side in ("discard", "miss", "hit"):
        runs = result["ingest"]["rounds"][side]
        per_round = ", ".join(f"{run['mb_per_s']:.0f}" for run in runs)
        print(f"{side:>8}  {statistics.mean(r['mb_per_s'] for r in runs):>8.1f} ({per_round:>12})  "
              f"{statistics.mean(r['requests_per_s'] for r in runs):>10.1f}  {statistics.mean(r['server_cpu_share'] for r in runs):>10.1%}  "
              f"{statistics.mean(r['client_cpu_share'] for r in runs):>10.1%}  {max(r['foreign_cpu'] for r in runs):>9.1%}")  # fmt: skip
    print()
    print(f"service (miss) / discard = {ing['ratio_miss_vs_discard']:.3f}; service (hit) / discard = {ing['ratio_hit_vs_discard']:.3f}")


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
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help=f"small run, < 90 s on 2 cores ({QUICK})")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the tables")
    p.add_argument("--sweep", action="store_true", help=f"also compare at batch sizes {', '.join(map(str, SWEEP_BATCHES))} ({SWEEP})")
    p.add_argument(
        "--teacher-arch", default="resnet", help="an offline.models registry name, or package.module:factory(input_shape, num_classes)"
    )
    p.add_argument("--input-shape", type=int, nargs="+", default=[3, 32, 32], metavar="D", help="uint8 sample shape")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=256, help="raw forward batch = the server's --max-batch (its default)")
    p.add_argument("--request-size", type=int, default=None, help="samples per request (default: the batch size, as teacher-push)")
    p.add_argument("--clients", type=int, default=4, help="client threads, one request in flight each (teacher-push's --concurrency)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto", help="compute dtype, both sides")
    p.add_argument("--max-delay-ms", type=float, default=5.0, help="the server's --max-delay-ms")
    p.add_argument("--torch-threads", type=int, default=None, help="OMP_NUM_THREADS for both sides (default: torch's default)")
    p.add_argument(
        "--seconds", type=float, default=None, help=f"timed seconds per side (default {FULL['seconds']}; --quick {QUICK['seconds']})"
    )
    p.add_argument("--repeats", type=int, default=None, help=f"rounds of raw, durable, buffered (default {FULL['repeats']})")
    p.add_argument(
        "--malloc", choices=("service", "glibc"), default="service",
        help="service: the raw side applies the same mallopt settings that teacher-serve applies at start "
        "(offline.malloc.tune_malloc); glibc: rerun with glibc's own defaults on both sides (bench/reader.py's GLIBC_DEFAULTS)",
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
    p.add_argument("--ready-timeout", type=float, default=300.0, help="seconds to wait for /v2/health/ready")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tmpdir", default=None, help="where the teacher and caches go (default: the system's temporary directory)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (caches, server logs)")
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
    if args.malloc == "glibc" and any(os.environ.get(k) != v for k, v in GLIBC_DEFAULTS.items()):
        # glibc reads these once, at start-up: start again with them (the server inherits them).
        os.execve(sys.executable, [sys.executable, str(Path(__file__).resolve()), *argv], {**os.environ, **GLIBC_DEFAULTS})
    if args.malloc == "service":
        from kdcache.offline.malloc import tune_malloc

        tune_malloc()  # the raw side gets the allocator settings the server gives itself
    shape = tuple(args.input_shape)
    root = Path(tempfile.mkdtemp(prefix="bench-service-", dir=args.tmpdir))
    try:
        if args.ingest:
            result = {"env": environment(args), "ingest": ingest(root, args)}
            if args.json:
                print(json.dumps(result, indent=1, default=str))
            else:
                print_ingest(result)
            return 0
        teacher, params = write_teacher(root, args.teacher_arch, shape, args.classes, args.seed)
        say(f"teacher {args.teacher_arch} ({params:,} parameters) in {teacher}; torch {torch.get_num_threads()} threads")
        main_row = compare(teacher, root, args, args.batch_size, args.preset, args.repeats)
        sweep = []
        if args.sweep:
            for batch_size in SWEEP_BATCHES:
                sweep.append(
                    compare(
                        teacher, root, args, batch_size, {**SWEEP, "seconds": min(SWEEP["seconds"], args.preset["seconds"])}, 1, "sweep"
                    )
                )
        env = environment(args)
        result = {
            "raw_samples_per_s": round(main_row["raw_samples_per_s"], 2),
            "durable_samples_per_s": round(main_row["durable_samples_per_s"], 2),
            "buffered_samples_per_s": round(main_row["buffered_samples_per_s"], 2),
            "ratio_durable_vs_raw": round(main_row["ratio_durable_vs_raw"], 4),
            "ratio_buffered_vs_raw": round(main_row["ratio_buffered_vs_raw"], 4),
            "ratio_durable_vs_buffered": round(main_row["ratio_durable_vs_buffered"], 4),
            "target": f">= {RATIO_TARGET} (service / raw)",
            "target_met": main_row["ratio_durable_vs_raw"] >= RATIO_TARGET and main_row["ratio_buffered_vs_raw"] >= RATIO_TARGET,
            "device": env["device"],
            "torch": env["torch"],
            "teacher": args.teacher_arch,
            "teacher_params": params,
            "batch_size": args.batch_size,
            "clients": args.clients,
            "max_foreign_cpu": max([main_row["max_foreign_cpu"], *(row["max_foreign_cpu"] for row in sweep)]),
            "env": env,
            "config": {
                **{k: v for k, v in vars(args).items() if k not in ("json", "tmpdir", "keep", "preset")},
                **{f"preset_{k}": v for k, v in args.preset.items()},
                "teacher_params": params,
            },
            "main": main_row,
            "sweep": sweep,
        }
        if args.plot:
            plot_sweep(result, Path(args.plot))
            say(f"wrote {args.plot}")
        if args.json:
            print(json.dumps(result, indent=1, default=str))
        else:
            print_tables(result)
        return 0
    finally:
        if args.keep:
            say(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
