"""Reader benchmark: does training from the shards cost anything, and does memory stay flat?

Two measurements on a synthetic cache written with ``CacheWriter`` in a temporary directory:

1. **Throughput ratio.** The same student, batch size and training step
   (``preprocessing.apply`` → model → ``distillation_loss`` → AdamW step) fed two ways:

   * *shards*: ``ShardStream`` (shuffling, default shuffle buffer) behind a
     ``DataLoader(batch_size=None, persistent_workers=True)`` built as ``offline/train.py``
     builds it, ``set_epoch`` before each epoch;
   * *memory*: the same rows held as torch tensors, a fresh random permutation per epoch and
     batches gathered by slicing it.

   With ``--device cuda`` the student trains on the GPU and each batch is copied there in the
   step (``non_blocking``): pinned on the shard side, as ``offline-distill``'s DataLoader pins
   it, and from pageable host memory on the memory side, as bench/online.py does. Each epoch
   ends with a synchronize. A student far cheaper than a GPU step (the default ``cnn-small``)
   measures launch overhead rather than the reader: pass a larger one (``--student resnet``).

   Each side runs in its own child process (``--side``, driven over a pipe), and the parent
   alternates whole epochs between them, so the two never compete for the CPU and each
   process has its own malloc heap, as a real trainer does. (Running both sides in one
   process couples them through glibc's heap: the ratio then swung between 0.67 and 1.13
   depending on which side ran first, see docs/benchmarks.md.) After a warm-up epoch of each,
   ``--repeats`` rounds are timed in ABBA order; the median of each side is taken and
   ``ratio = shards / memory`` (target >= 0.95). Throughput is counted in samples/s and shown
   as full-batch steps/s (samples/s ÷ batch size), so that the partial last batch of each
   worker does not flatter the shard side. One row uses ``--workers`` (default 2), a second
   row 0 workers, which is what the trainer picks for caches under 256 MiB.

   Both sides set glibc malloc up as ``offline-distill`` does (``offline.malloc.tune_malloc``:
   freed memory is kept for the next step). ``--malloc glibc`` (and ``both``, the default of a
   full run) repeats the rows with glibc's own defaults (``GLIBC_DEFAULTS``), under which a
   training step page-faults tens of MB of zero-filled memory back in per step, an allocator
   effect that varies from run to run and dwarfs the reader's own cost. Every row reports the trainer process's minor page faults per step, and the
   share of the machine that other processes took while it was timed ("other CPU"): on a
   2-core machine a busy neighbour decides the result, and the report says so.

2. **Peak memory growth.** A real ``offline-distill --epochs 1`` subprocess on a cache of S
   samples and on one of 10·S, with ``--workers 2`` and with the default worker count;
   ``growth = peak(10·S) / peak(S)`` (target < 1.2). How the peak is measured, and why, is
   explained at ``TreeMemory``.

``--quick`` runs a smaller configuration (< 90 s on 2 cores); ``--json`` prints one JSON
object instead of the tables. Only the project and its dependencies are imported.

    .venv/bin/python bench/reader.py --quick
    .venv/bin/python bench/reader.py            # a few minutes on 2 cores
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

try:
    import kdcache.offline  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kdcache.offline import models
from kdcache.offline.cache import CacheMeta, CacheReader, CacheWriter, Preprocessing
from kdcache.offline.dataset import DEFAULT_SHUFFLE_BUFFER, ShardStream
from kdcache.offline.losses import distillation_loss
from kdcache.offline.malloc import tune_malloc
from kdcache.offline.train import AUTO_WORKERS_BYTES

NOISE_LIMIT = 0.05  # share of the machine taken by other processes above which a figure is flagged
RATIO_TARGET = 0.95
# Any MALLOC_* variable turns offline.malloc.tune_malloc off (the environment wins), and an arena
# limit of 0 is glibc's own default: a side started with this runs on glibc's defaults.
GLIBC_DEFAULTS = {"MALLOC_ARENA_MAX": "0"}
RSS_TARGET = 1.2
TEMPERATURE, ALPHA, LR = 4.0, 0.9, 1e-3
QUICK = {"samples": 4096, "rss_samples": 2048, "repeats": 5, "epochs_per_repeat": 2, "malloc": "trainer"}
FULL = {"samples": 12000, "rss_samples": 10000, "repeats": 6, "epochs_per_repeat": 1, "malloc": "both"}


# ---------------------------------------------------------------------------------------------
# Synthetic cache


def write_cache(directory: Path, samples: int, shape: tuple[int, ...], classes: int, seed: int, shard_samples: int | None) -> CacheReader:
    """``samples`` CIFAR-like rows: uint8 inputs, float32 logits that favour the (known) label."""
    meta = CacheMeta(
        teacher_fingerprint=f"synthetic-bench-reader-{classes}-{'x'.join(map(str, shape))}",
        teacher_name="synthetic",
        num_classes=classes,
        input_shape=shape,
        input_dtype="uint8",
        preprocessing=Preprocessing(scale=1 / 255),
    )
    rng = np.random.default_rng(seed)
    kwargs = {"max_samples": shard_samples} if shard_samples else {}
    with CacheWriter(directory, meta, **kwargs) as writer:
        for start in range(0, samples, 8192):
            n = min(8192, samples - start)
            labels = rng.integers(0, classes, n)
            logits = rng.normal(size=(n, classes)).astype(np.float32)
            logits[np.arange(n), labels] += 3.0
            inputs = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
            writer.append(np.arange(start, start + n), inputs, logits, labels)
    return CacheReader(directory)


# ---------------------------------------------------------------------------------------------
# /proc helpers: process trees, and CPU time used by other processes while we measure


def process_tree(root: int) -> list[int]:
    """``root`` and its live descendants, from the ppid links in /proc/PID/stat."""
    children: dict[int, list[int]] = defaultdict(list)
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat", encoding="ascii", errors="replace") as fh:
                    ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children[ppid].append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, ()))
    return tree


def _tree_ticks(root: int) -> int:
    """CPU ticks of the tree: each member's utime+stime plus its reaped children's, so a child
    reaped between two readings moves from its own line to its parent's and is counted once."""
    total = 0
    for pid in process_tree(root):
        try:
            with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(v) for v in fields[11:15])  # utime stime cutime cstime
    return total


def _machine_ticks() -> tuple[int, int]:
    """(busy, steal) ticks of all CPUs since boot, from the first line of /proc/stat."""
    with open("/proc/stat", encoding="ascii") as fh:
        values = [int(v) for v in fh.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (values + [0] * 8)[:8]
    return user + nice + system + irq + softirq, steal


class CpuMeter:
    """How much of the machine other processes took while we timed something.

    On a 2-core machine one busy neighbour halves the throughput of whatever we time, and a
    ratio of two such timings means nothing. So each timed section records the CPU ticks the
    whole machine spent busy minus those spent by this benchmark's own process tree, as a
    share of (wall time x CPUs), plus the hypervisor's steal time. Shares over a few percent
    are flagged in the report: the figures then say more about the neighbours than the reader.
    """

    def __init__(self, root: int | None = None) -> None:
        self.root = root or os.getpid()
        self.started = time.perf_counter()
        self.busy0, self.steal0 = _machine_ticks()
        self.ours0 = _tree_ticks(self.root)

    def stop(self) -> dict[str, float]:
        wall = time.perf_counter() - self.started
        busy, steal = _machine_ticks()
        ours = _tree_ticks(self.root)  # children reaped meanwhile are in our cutime
        capacity = max(wall, 1e-9) * os.sysconf("SC_CLK_TCK") * (os.cpu_count() or 1)
        return {
            "foreign_cpu": max(0.0, (busy - self.busy0) - (ours - self.ours0)) / capacity,
            "steal": (steal - self.steal0) / capacity,
        }


# ---------------------------------------------------------------------------------------------
# Throughput: shards vs memory


def make_step(student: str, meta: CacheMeta, seed: int, device: torch.device | None = None) -> Callable[[dict[str, torch.Tensor]], None]:
    """One optimiser step as ``offline/train.py`` takes it: the batch is copied to the device
    (``non_blocking``: the shard side's batches are pinned, as the trainer's DataLoader pins them)."""
    device = device or torch.device("cpu")
    torch.manual_seed(seed)
    model = models.build(student, meta.input_shape, meta.num_classes).to(device)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)

    def step(batch: dict[str, torch.Tensor]) -> None:
        inputs = meta.preprocessing.apply(batch["inputs"].to(device, non_blocking=True))
        logits = batch["logits"].to(device, non_blocking=True)
        labels = batch["labels"].to(device, non_blocking=True)
        loss = distillation_loss(model(inputs), logits, labels, TEMPERATURE, ALPHA)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def memory_epoch(data: dict[str, torch.Tensor], batch_size: int, generator: torch.Generator) -> Iterator[dict[str, torch.Tensor]]:
    perm = torch.randperm(len(data["labels"]), generator=generator)
    for start in range(0, len(perm), batch_size):
        index = perm[start : start + batch_size]
        yield {name: values[index] for name, values in data.items()}


def timed_epoch(
    batches: Iterator[dict[str, torch.Tensor]], step: Callable[[dict[str, torch.Tensor]], None], sync: Callable[[], None] = lambda: None
) -> dict[str, float]:
    """Time one epoch, including the wait for the first batch (the reader's start-up is a real
    cost); ``sync`` waits for the device's queued work before the clock stops."""
    before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    steps = samples = 0
    for batch in batches:
        step(batch)
        steps += 1
        samples += len(batch["labels"])
    sync()
    seconds = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "seconds": seconds,
        "steps": steps,
        "samples": samples,
        "minor_faults": after.ru_minflt - before.ru_minflt,  # the trainer process's own, not its workers'
        "sys_s": after.ru_stime - before.ru_stime,
    }


def side_main(args: argparse.Namespace) -> int:
    """A child process that trains one side (memory or shards) an epoch at a time, on request.

    Protocol: prints ``{"ready": ...}``, then for each JSON line ``{"epoch": N}`` on stdin runs
    epoch N and prints its figures as one JSON line; ``{"quit": true}`` or EOF ends it.
    """
    tune_malloc()  # as offline-distill does; a no-op under --malloc glibc (GLIBC_DEFAULTS in the environment)
    reader = CacheReader(args.side_cache)
    meta = reader.meta
    device = torch.device(args.device)
    step = make_step(args.student, meta, args.seed, device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    if args.side == "memory":
        arrays = reader.read(("inputs", "logits", "labels"))
        data = {name: torch.from_numpy(np.ascontiguousarray(values)) for name, values in arrays.items()}
        generator = torch.Generator().manual_seed(args.seed)

        def batches(epoch: int) -> Iterator[dict[str, torch.Tensor]]:
            return memory_epoch(data, args.batch_size, generator)

    else:
        stream = ShardStream.from_readers(
            [reader], meta, batch_size=args.batch_size, seed=args.seed, shuffle=True, shuffle_buffer=args.shuffle_buffer,
            rank=0, world_size=1,
        )  # fmt: skip
        # As offline/train.py builds it.
        loader = torch.utils.data.DataLoader(
            stream, batch_size=None, num_workers=args.workers, pin_memory=device.type == "cuda",
            prefetch_factor=4 if args.workers else None, persistent_workers=args.workers > 0,
        )  # fmt: skip

        def batches(epoch: int) -> Iterator[dict[str, torch.Tensor]]:
            stream.set_epoch(epoch)
            return iter(loader)

    print(json.dumps({"ready": True, "pid": os.getpid()}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        if request.get("quit"):
            break
        print(json.dumps(timed_epoch(batches(int(request["epoch"])), step, sync)), flush=True)
    return 0


class SideProcess:
    """The parent's handle on a child that times epochs on request: one JSON line in ("epoch" or
    "quit"), one JSON line out. bench/online.py drives its children the same way."""

    def __init__(self, kind: str, cmd: list[str], env: dict[str, str] | None = None) -> None:
        self.kind = kind
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1, env={**os.environ, **(env or {})}
        )

    def _answer(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"the {self.kind} side exited with code {self.proc.wait()} (its error is above)")
        return json.loads(line)

    def ready(self) -> None:
        self._answer()

    def epoch(self, epoch: int) -> dict[str, Any]:
        assert self.proc.stdin is not None
        meter = CpuMeter()  # rooted at this process: all sides and their workers are "ours"
        self.proc.stdin.write(json.dumps({"epoch": epoch}) + "\n")
        self.proc.stdin.flush()
        figures = self._answer()
        return {**figures, **meter.stop()}

    def close(self) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps({"quit": True}) + "\n")
            self.proc.stdin.close()
        except BrokenPipeError:
            pass
        self.proc.wait()


class Side(SideProcess):
    """The parent's handle on a ``side_main`` child."""

    def __init__(self, kind: str, cache: Path, args: argparse.Namespace, workers: int, env: dict[str, str] | None = None) -> None:
        cmd = [
            sys.executable, str(Path(__file__).resolve()), "--side", kind, "--side-cache", str(cache), "--workers", str(workers),
            "--student", args.student, "--batch-size", str(args.batch_size), "--seed", str(args.seed),
            "--shuffle-buffer", str(args.shuffle_buffer), "--device", args.device,
        ]  # fmt: skip
        super().__init__(kind, cmd, env)

def compare(reader: CacheReader, args: argparse.Namespace, workers: int, malloc: str) -> dict[str, Any]:
    """Alternate whole epochs of the two sides, each in its own process (see the module doc)."""
    env = GLIBC_DEFAULTS if malloc == "glibc" else None
    sides = {kind: Side(kind, reader.directory, args, workers, env) for kind in ("memory", "shards")}
    try:
        for side in sides.values():
            side.ready()
        epoch = 0

        def run(kind: str) -> dict[str, float]:
            nonlocal epoch
            totals = {"seconds": 0.0, "steps": 0, "samples": 0, "minor_faults": 0, "sys_s": 0.0, "foreign_cpu": 0.0, "steal": 0.0}
            for _ in range(args.epochs_per_repeat):
                epoch += 1
                figures = sides[kind].epoch(epoch)
                for key in ("seconds", "steps", "samples", "minor_faults", "sys_s"):
                    totals[key] += figures[key]
                for key in ("foreign_cpu", "steal"):
                    totals[key] = max(totals[key], figures[key])
            totals["samples_per_s"] = totals["samples"] / totals["seconds"]
            totals["steps_per_s"] = totals["samples_per_s"] / args.batch_size  # full-batch equivalent
            totals["raw_steps_per_s"] = totals["steps"] / totals["seconds"]
            totals["faults_per_step"] = totals["minor_faults"] / max(1, totals["steps"])
            return totals

        run("memory"), run("shards")  # warm-up: worker start-up, allocator, first touch of pages
        repeats: dict[str, list[dict[str, float]]] = {"memory": [], "shards": []}
        for i in range(args.repeats):
            for kind in ("memory", "shards") if i % 2 == 0 else ("shards", "memory"):
                repeats[kind].append(run(kind))
    finally:
        for side in sides.values():
            side.close()
    memory = statistics.median(r["samples_per_s"] for r in repeats["memory"])
    shards = statistics.median(r["samples_per_s"] for r in repeats["shards"])
    return {
        "workers": workers,
        "malloc": malloc,
        "memory_steps_per_s": memory / args.batch_size,
        "shards_steps_per_s": shards / args.batch_size,
        "memory_samples_per_s": memory,
        "shards_samples_per_s": shards,
        "ratio": shards / memory,
        "ratio_per_repeat": [s["samples_per_s"] / m["samples_per_s"] for s, m in zip(repeats["shards"], repeats["memory"], strict=True)],
        "memory_faults_per_step": statistics.median(r["faults_per_step"] for r in repeats["memory"]),
        "shards_faults_per_step": statistics.median(r["faults_per_step"] for r in repeats["shards"]),
        "max_foreign_cpu": max(r["foreign_cpu"] for side in repeats.values() for r in side),
        "max_steal": max(r["steal"] for side in repeats.values() for r in side),
        "repeats": repeats,
    }


def reader_alone(reader: CacheReader, args: argparse.Namespace, repeats: int = 7) -> dict[str, Any]:
    """The reader with no training step: epochs of ``ShardStream`` batches (0 workers, shuffled)
    against epochs of the same batches gathered from in-memory tensors, alternating in this
    process. What the reader costs per batch, before a step hides it."""
    arrays = reader.read(("inputs", "logits", "labels"))
    data = {name: torch.from_numpy(np.ascontiguousarray(values)) for name, values in arrays.items()}
    generator = torch.Generator().manual_seed(args.seed)
    stream = ShardStream.from_readers(
        [reader], reader.meta, batch_size=args.batch_size, seed=args.seed, shuffle=True, shuffle_buffer=args.shuffle_buffer,
        rank=0, world_size=1,
    )  # fmt: skip

    def rate(batches: Iterator[dict[str, torch.Tensor]]) -> float:
        started = time.perf_counter()
        count = sum(1 for _ in batches)
        return count / (time.perf_counter() - started)

    rates: dict[str, list[float]] = {"shards": [], "memory": []}
    for epoch in range(repeats + 1):  # the first round warms up, untimed
        stream.set_epoch(epoch)
        shards, memory = rate(iter(stream)), rate(memory_epoch(data, args.batch_size, generator))
        if epoch:
            rates["shards"].append(shards)
            rates["memory"].append(memory)
    ratios = [s / m for s, m in zip(rates["shards"], rates["memory"], strict=True)]
    return {
        "shards_batches_per_s": statistics.median(rates["shards"]),
        "memory_batches_per_s": statistics.median(rates["memory"]),
        "ratio": statistics.median(ratios),
        "ratio_per_repeat": ratios,
    }


# ---------------------------------------------------------------------------------------------
# Peak memory of a real offline-distill process tree


def _kib(path: str, keys: tuple[str, ...]) -> dict[str, int]:
    out = dict.fromkeys(keys, 0)
    with open(path, encoding="ascii", errors="replace") as fh:
        for line in fh:
            key, _, rest = line.partition(":")
            if key in out:
                out[key] = int(rest.split()[0])
    return out


@dataclass
class TreeMemory:
    """Peak memory of a process and all its descendants (DataLoader workers included), polled.

    Why not the simpler tools: ``/usr/bin/time -v`` and ``getrusage(RUSAGE_CHILDREN)`` report
    ``ru_maxrss``, which the kernel combines over a process tree by taking the *maximum* of the
    members' peaks, not their sum, so two DataLoader workers holding a shuffle buffer each would
    be invisible behind the main process. And RUSAGE_CHILDREN is a running maximum over every
    child this benchmark ever waited for, so its deltas across several runs mean nothing.

    What this does instead: every ``interval`` seconds, walk /proc to find the tree (ppid
    links; forked workers are children of the trainer), and for each member read

    * ``Pss`` from /proc/PID/smaps_rollup: resident memory with each shared page divided among
      the processes sharing it. Forked workers share the parent's copy-on-write pages (the
      torch libraries alone are a few hundred MiB), so summing RSS would count those pages
      once per worker; summing PSS counts them once. **The peak over samples of Σ PSS is the
      primary figure**: the physical memory the run needed. Being sampled, it can miss a spike
      shorter than ``interval``; memory that grows with the cache would persist, not spike.
    * ``VmHWM`` from /proc/PID/status: that process's own high-water mark, which the kernel
      keeps, so no spike is missed. Σ over members of their last-seen VmHWM is an upper bound
      (peaks need not coincide, shared pages are counted per process), reported alongside.

    The trainer's own VmHWM is reported too. (Its ``ru_maxrss`` from ``wait4`` is not: Linux
    folds the high-water mark of the pre-exec image into it, and with ``vfork``/``fork`` that
    image is this benchmark process, so every run would read at least this process's size.)
    """

    interval: float = 0.05
    peak_pss_kib: int = 0
    peak_rss_kib: int = 0
    hwm_kib: dict[int, int] = field(default_factory=dict)
    max_processes: int = 0
    samples: int = 0

    def sample(self, root: int) -> None:
        tree = process_tree(root)
        pss = rss = 0
        for pid in tree:
            try:
                status = _kib(f"/proc/{pid}/status", ("VmRSS", "VmHWM"))
                pss += _kib(f"/proc/{pid}/smaps_rollup", ("Pss",))["Pss"]
            except (OSError, ValueError):  # exited between the listing and the read, or a zombie
                continue
            rss += status["VmRSS"]
            if status["VmHWM"]:
                self.hwm_kib[pid] = max(self.hwm_kib.get(pid, 0), status["VmHWM"])
        self.peak_pss_kib = max(self.peak_pss_kib, pss)
        self.peak_rss_kib = max(self.peak_rss_kib, rss)
        self.max_processes = max(self.max_processes, len(tree))
        self.samples += 1


def distill_peak(cache: Path, out: Path, args: argparse.Namespace, workers: int | None, samples: int) -> dict[str, Any]:
    exe = Path(sys.executable).parent / "offline-distill"
    cmd = [
        str(exe), "--cache", str(cache), "--student", args.student, "--epochs", "1", "--batch-size", str(args.batch_size),
        "--out", str(out), "--seed", str(args.seed), "--device", args.device, "--no-progress", "--no-export",
    ]  # fmt: skip
    if workers is not None:
        cmd += ["--workers", str(workers)]
    memory = TreeMemory(interval=args.poll_interval)
    log = out.with_suffix(".log")
    meter = CpuMeter()
    started = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
        while True:
            pid, status = os.waitpid(proc.pid, os.WNOHANG)
            if pid:
                proc.returncode = os.waitstatus_to_exitcode(status)
                break
            memory.sample(proc.pid)
            time.sleep(memory.interval)
    seconds = time.perf_counter() - started
    noise = meter.stop()
    if proc.returncode != 0:
        raise SystemExit(f"{shlex.join(cmd)} failed with exit code {proc.returncode}:\n{log.read_text()[-3000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    return {
        "samples": samples,
        "workers_arg": "default" if workers is None else workers,
        "peak_pss_mib": memory.peak_pss_kib / 1024,
        "sum_hwm_mib": sum(memory.hwm_kib.values()) / 1024,
        "peak_sum_rss_mib": memory.peak_rss_kib / 1024,
        "main_hwm_mib": memory.hwm_kib.get(proc.pid, 0) / 1024,
        "processes": memory.max_processes,
        "polls": memory.samples,
        "wall_s": seconds,
        **noise,
        "train_samples_per_s": metrics.get("train_samples_per_s"),
        "command": shlex.join(cmd),
    }


def resolved_workers(reader: CacheReader) -> int:
    """What offline-distill picks without --workers (see offline/train.py)."""
    return 0 if reader.total_bytes < AUTO_WORKERS_BYTES else 2


# ---------------------------------------------------------------------------------------------
# Report


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: str = "cpu") -> dict[str, Any]:
    return {
        "command": shlex.join(getattr(sys, "orig_argv", [sys.executable, *sys.argv])),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": f"cuda ({torch.cuda.get_device_name(0)})" if device == "cuda" else "cpu",
        "python": platform.python_version(),
        "numpy": np.__version__,
        "h5py": h5py.__version__,
        "platform": platform.platform(),
    }


def print_tables(result: dict[str, Any]) -> None:
    env, cfg = result["env"], result["config"]
    ok = {True: "yes", False: "NO"}
    print("bench/reader.py: ShardStream vs in-memory tensors; offline-distill peak memory vs cache size")
    print(f"command    {env['command']}")
    print(f"date       {env['date']}")
    print(f"hardware   {env['cpu']}, {env['cpus']} CPUs, device {env['device']}; torch {env['torch']} ({env['torch_threads']} threads), "
          f"python {env['python']}, numpy {env['numpy']}, h5py {env['h5py']}")  # fmt: skip
    print(f"data       {cfg['samples']:,} samples, uint8 {cfg['input_shape']}, {cfg['classes']} classes, float32 logits, "
          f"{cfg['shards']} shard(s), {cfg['cache_bytes'] / 2**20:.1f} MiB")  # fmt: skip
    print(f"student    {cfg['student']} ({cfg['student_params']:,} parameters), batch {cfg['batch_size']}, "
          f"shuffle buffer {cfg['shuffle_buffer']}, loss kl T={TEMPERATURE} alpha={ALPHA}, AdamW")  # fmt: skip
    rows = result["throughput"]
    if rows:
        print()
        print(f"Training throughput, median of {cfg['repeats']} alternating repeats of {cfg['epochs_per_repeat']} epoch(s) each "
              "(steps/s = samples/s / batch size)")  # fmt: skip
        print(
            f"{'malloc':>7}  {'workers':>7}  {'memory steps/s':>14}  {'shards steps/s':>14}  {'ratio':>6}  {'target':>7}  {'met':>3}  {'faults/step mem|shards':>22}  {'other CPU':>9}  per-repeat ratios"
        )
        for row in rows:
            per = " ".join(f"{r:.3f}" for r in row["ratio_per_repeat"])
            faults = f"{row['memory_faults_per_step']:,.0f} | {row['shards_faults_per_step']:,.0f}"
            print(f"{row['malloc']:>7}  {row['workers']:>7}  {row['memory_steps_per_s']:>14.2f}  {row['shards_steps_per_s']:>14.2f}  {row['ratio']:>6.3f}  "
                  f"{'>= ' + str(RATIO_TARGET):>7}  {ok[row['ratio'] >= RATIO_TARGET]:>3}  {faults:>22}  {row['max_foreign_cpu']:>9.1%}  {per}")  # fmt: skip
    alone = result["reader_alone"]
    if alone:
        per = " ".join(f"{r:.2f}" for r in alone["ratio_per_repeat"])
        print()
        print(f"The reader alone (no step, 0 workers): {alone['shards_batches_per_s']:,.0f} batches/s from the shards, "
              f"{alone['memory_batches_per_s']:,.0f} gathered from memory: {alone['ratio']:.2f}x (per repeat {per})")  # fmt: skip
    rss = result["rss"]
    if rss:
        print()
        print("Peak memory of `offline-distill --epochs 1 --no-export`, process tree (trainer + DataLoader workers)")
        print("  peak Σ PSS: polled every "
              f"{cfg['poll_interval']} s (primary); Σ VmHWM: per-process high-water marks summed (upper bound)")  # fmt: skip
        print(f"{'--workers':>9}  {'used':>4}  {'samples':>9}  {'cache MiB':>9}  {'procs':>5}  {'peak Σ PSS MiB':>14}  {'Σ VmHWM MiB':>11}  "
              f"{'trainer VmHWM MiB':>17}  {'epoch samples/s':>15}  {'wall s':>6}  {'other CPU':>9}")  # fmt: skip
        for group in rss:
            for run in (group["1x"], group["10x"]):
                print(f"{group['workers_arg']:>9}  {run['workers_used']:>4}  {run['samples']:>9,}  {run['cache_mib']:>9.1f}  {run['processes']:>5}  "
                      f"{run['peak_pss_mib']:>14.1f}  {run['sum_hwm_mib']:>11.1f}  {run['main_hwm_mib']:>17.1f}  "
                      f"{run['train_samples_per_s'] or 0:>15,.0f}  {run['wall_s']:>6.1f}  {run['foreign_cpu']:>9.1%}")  # fmt: skip
        print()
        print(f"{'--workers':>9}  {'growth 10x (Σ PSS)':>18}  {'growth 10x (Σ VmHWM)':>20}  {'target':>6}  met")
        for group in rss:
            print(f"{group['workers_arg']:>9}  {group['growth_pss']:>18.3f}  {group['growth_hwm']:>20.3f}  {'< ' + str(RSS_TARGET):>6}  "
                  f"{ok[group['growth_pss'] < RSS_TARGET]}")  # fmt: skip
    noisy = [r["max_foreign_cpu"] for r in rows] + [g[k]["foreign_cpu"] for g in rss for k in ("1x", "10x")]
    if noisy and max(noisy) > NOISE_LIMIT:
        print()
        print(f"WARNING: other processes took up to {max(noisy):.0%} of the machine while figures were timed "
              f"('other CPU', max per timed section); throughput figures above {NOISE_LIMIT:.0%} are not trustworthy: rerun on a quiet machine")  # fmt: skip
    print()
    keys = [k for k in result if k.startswith(("reader_vs_memory", "rss_growth"))]
    print("  ".join(f"{k}={result[k]}" for k in keys))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help=f"small run, < 90 s on 2 cores (defaults become {QUICK})")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the tables")
    p.add_argument(
        "--samples", type=int, default=None, help=f"cache size for the throughput runs and S for memory (default {FULL['samples']})"
    )
    p.add_argument(
        "--rss-samples",
        type=int,
        default=None,
        help=f"S for the memory runs (default {FULL['rss_samples']}; --quick: {QUICK['rss_samples']}); the second run uses 10·S",
    )
    p.add_argument("--input-shape", type=int, nargs="+", default=[3, 16, 16], metavar="D", help="uint8 sample shape")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--student", default="cnn-small", help="a registry name, or module:factory (on a GPU, pick one that keeps it busy)")
    p.add_argument(
        "--device", choices=("cpu", "cuda"), default="cpu",
        help="where the student trains; batches come from host memory either way, pinned on the shard side as offline-distill pins them",
    )  # fmt: skip
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers of the first throughput row; a second row uses 0")
    p.add_argument("--shuffle-buffer", type=int, default=DEFAULT_SHUFFLE_BUFFER)
    p.add_argument("--shard-samples", type=int, default=None, help="rows per shard (default: CacheWriter's)")
    p.add_argument("--repeats", type=int, default=None, help=f"alternating timed repeats per side (default {FULL['repeats']})")
    p.add_argument(
        "--epochs-per-repeat", type=int, default=None,
        help=f"epochs per timed repeat (default {FULL['epochs_per_repeat']}; --quick {QUICK['epochs_per_repeat']})",
    )
    p.add_argument(
        "--malloc", choices=("trainer", "glibc", "both"), default=None,
        help="glibc malloc settings of the throughput runs: offline-distill's (offline.malloc.tune_malloc), "
        "glibc's own defaults, or both (default: both; --quick: trainer)",
    )  # fmt: skip
    p.add_argument("--poll-interval", type=float, default=0.05, help="seconds between /proc samples of the memory runs")
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--skip-rss", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tmpdir", default=None, help="where to write the caches (default: the system's temporary directory)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    p.add_argument("--side", choices=("memory", "shards"), help=argparse.SUPPRESS)  # internal: run as one side's child
    p.add_argument("--side-cache", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    preset = QUICK if args.quick else FULL
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.rss_samples is None:
        args.rss_samples = preset.get("rss_samples", args.samples)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for, but torch sees no CUDA device")
    if args.side:
        return side_main(args)
    shape = tuple(args.input_shape)

    def say(message: str) -> None:  # progress goes to stderr, so --json output stays one object
        print(message, file=sys.stderr, flush=True)

    root = Path(tempfile.mkdtemp(prefix="bench-reader-", dir=args.tmpdir))
    try:
        say(f"writing a {args.samples:,}-sample cache in {root} ...")
        reader = write_cache(root / "cache-1x", args.samples, shape, args.classes, args.seed, args.shard_samples)
        meta = reader.meta
        student_params = models.count_parameters(models.build(args.student, meta.input_shape, meta.num_classes))
        throughput = []
        alone = None
        if not args.skip_throughput:
            for malloc in ("trainer", "glibc") if args.malloc == "both" else (args.malloc,):
                for workers in dict.fromkeys([args.workers, 0]):
                    say(f"throughput: shards with {workers} worker(s) vs memory, {malloc} malloc, {args.repeats} repeats ...")
                    throughput.append(compare(reader, args, workers, malloc))
            say("the reader alone: ShardStream vs gathering from memory, no training step ...")
            alone = reader_alone(reader, args)
        rss = []
        if not args.skip_rss:
            small = reader if args.rss_samples == args.samples else write_cache(
                root / "cache-rss-1x", args.rss_samples, shape, args.classes, args.seed, args.shard_samples
            )  # fmt: skip
            say(f"writing a {10 * args.rss_samples:,}-sample cache ...")
            large = write_cache(root / "cache-rss-10x", 10 * args.rss_samples, shape, args.classes, args.seed + 1, args.shard_samples)
            for workers in (2, None):
                group: dict[str, Any] = {"workers_arg": "default" if workers is None else workers}
                for label, cache in (("1x", small), ("10x", large)):
                    say(f"memory: offline-distill --workers {group['workers_arg']} on {cache.num_samples:,} samples ...")
                    run = distill_peak(cache.directory, root / f"run-{group['workers_arg']}-{label}", args, workers, cache.num_samples)
                    run["workers_used"] = resolved_workers(cache) if workers is None else workers
                    run["cache_mib"] = cache.total_bytes / 2**20
                    group[label] = run
                group["growth_pss"] = group["10x"]["peak_pss_mib"] / group["1x"]["peak_pss_mib"]
                group["growth_hwm"] = group["10x"]["sum_hwm_mib"] / group["1x"]["sum_hwm_mib"]
                rss.append(group)

        def pick(rows: list[dict[str, Any]], key: str, match: Callable[[dict[str, Any]], bool]) -> float | None:
            found = [row[key] for row in rows if match(row)]
            return round(found[0], 4) if found else None

        result = {
            "reader_vs_memory": pick(throughput, "ratio", lambda r: r["workers"] == args.workers and r["malloc"] == "trainer"),
            "reader_vs_memory_workers0": pick(throughput, "ratio", lambda r: r["workers"] == 0 and r["malloc"] == "trainer"),
            "reader_vs_memory_glibc_malloc": pick(throughput, "ratio", lambda r: r["workers"] == args.workers and r["malloc"] == "glibc"),
            "reader_vs_memory_workers0_glibc_malloc": pick(throughput, "ratio", lambda r: r["workers"] == 0 and r["malloc"] == "glibc"),
            "reader_alone_vs_memory_gather": round(alone["ratio"], 4) if alone else None,
            "reader_alone": alone,
            "rss_growth_10x": pick(rss, "growth_pss", lambda r: r["workers_arg"] == 2),
            "rss_growth_10x_default": pick(rss, "growth_pss", lambda r: r["workers_arg"] == "default"),
            "targets": {"reader_vs_memory": f">= {RATIO_TARGET}", "rss_growth_10x": f"< {RSS_TARGET}"},
            "max_foreign_cpu": max(
                [r["max_foreign_cpu"] for r in throughput] + [g[k]["foreign_cpu"] for g in rss for k in ("1x", "10x")], default=None
            ),
            "env": environment(args.device),
            "config": {
                **{k: v for k, v in vars(args).items() if k not in ("json", "tmpdir", "keep")},
                "input_shape": list(shape),
                "shards": len(reader.shards),
                "cache_bytes": reader.total_bytes,
                "student_params": student_params,
            },
            "throughput": throughput,
            "rss": rss,
        }
        if args.json:
            print(json.dumps(result, indent=1, default=lambda o: asdict(o) if hasattr(o, "__dataclass_fields__") else str(o)))
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
