"""What every benchmark shares, so that each script in bench/ holds only its own figure.

* **Targets:** ``TARGETS``, the figures the project promises; ``target`` and ``met`` read it.
* **Output:** ``say`` (progress on stderr, so that ``--json`` prints one object and nothing
  else), ``environment``, ``print_header``, ``table``, ``emit`` (JSON or the tables),
  ``workdir`` (a temporary directory, kept with ``--keep``), ``parser`` and ``parse`` (presets).
* **Meters** (Linux /proc): ``CpuMeter`` (the share of the machine that other processes took
  while we timed), ``process_tree``, ``thread_ticks`` and ``TreeMemory`` (peak PSS of a process
  tree). ``ServeProcess.memory()`` (kdcache.service.launch) reads a server's RSS.
* **Fixtures:** ``synthetic_cache`` (random rows through ``CacheWriter``) and ``write_teacher``
  (a random-weight model saved as the student record that ``teacher-serve`` loads).
* **Training:** ``Student`` steps with ``offline-distill``'s own ``train_step``;
  ``memory_batches``, ``shard_batches`` (the DataLoader as the trainer builds it), ``time_epochs``.
* **Processes:** ``side_processes`` and ``serve_epochs`` (children that time epochs on request,
  over a pipe), ``offline_distill`` (a real trainer run), ``ClientPool`` (HTTP client threads).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import json
import os
import platform
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import httpx
import numpy as np
import torch
from torch import nn

from kdcache.offline import models
from kdcache.offline.cache import CacheMeta, CacheReader, CacheWriter, Preprocessing
from kdcache.offline.dataset import ShardStream
from kdcache.offline.train import EpochStats, TrainConfig, step_on_inputs, train_step

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]  # bench/ is not installed: children find it on PYTHONPATH
TARGETS: dict[str, tuple[str, float]] = {
    "p1_service_vs_forward": (">=", 0.9),  # bench.service: teacher-serve durable ÷ raw forward
    "p2_reader_vs_memory": (">=", 0.95),  # bench.reader: steps/s from the shards ÷ from memory
    "p3_offline_speedup_vs_ideal": (">=", 0.9),  # bench.online: measured ÷ ideal speed-up
    "p4_rss_growth_10x": ("<", 1.2),  # bench.reader: offline-distill's peak memory, 10x cache ÷ 1x
    "views_offline_minus_online": (">=", -0.003),  # bench.views: accuracy from E cached views - online KD (3-seed means)
    "views_serving_vs_raw": (">=", 0.9),  # bench.views: views made on the device ÷ raw forward, inputs/s
    "views_training_vs_memory": (">=", 0.9),  # bench.views: train_step on replayed views ÷ in-memory augmentation
    "targets_bytes_vs_full": ("<=", 0.1),  # bench.targets: a layout's target bytes per sample ÷ full float32's (100 classes)
    "targets_accuracy_minus_full": (">=", -0.003),  # bench.targets: its test accuracy - full float32's (3-seed means)
    "targets_ece_minus_full": ("<=", 0.01),  # bench.targets: its test ECE - full float32's (3-seed means)
    "targets_training_vs_full": (">=", 0.95),  # bench.targets: train_step steps/s on a sparse cache ÷ on a full one
    "targets_serving_vs_full": (">=", 0.95),  # bench.targets --service: teacher-serve --targets topk:5 / sampled:16 ÷ full
}
YES = {True: "yes", False: "NO", None: "-"}  # a target met, missed, or not measured
NOISE_LIMIT = 0.05  # share of the machine taken by other processes above which a figure is flagged
# Any MALLOC_* variable turns kdcache.offline.malloc.tune_malloc off (the environment wins), and an
# arena limit of 0 is glibc's own default: a process started with this runs on glibc's defaults.
GLIBC_DEFAULTS = {"MALLOC_ARENA_MAX": "0"}
# offline-distill's defaults: lr, weight decay, temperature, alpha, loss (the recipe's, whatever the sample count).
TRAINER = TrainConfig(caches=[]).for_caches(()).with_recipe(0)[0]


def target(key: str) -> str:
    op, bound = TARGETS[key]
    return f"{op} {bound}"


def met(key: str, value: float | None) -> bool | None:
    if value is None:
        return None
    op, bound = TARGETS[key]
    return {">=": value >= bound, "<=": value <= bound, "<": value < bound}[op]


# ---------------------------------------------------------------------------------------------
# Output


def say(message: str) -> None:
    """Progress, on stderr: with ``--json`` stdout holds one JSON object."""
    print(message, file=sys.stderr, flush=True)


def cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as fh:
        for line in fh:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def environment(device: str = "cpu") -> dict[str, Any]:
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
        "h5py": h5py.__version__,
        "httpx": httpx.__version__,
        "platform": platform.platform(),
    }


def print_header(title: str, env: dict[str, Any], *lines: str) -> None:
    """The title, the command, the date, the machine and versions, then ``lines``."""
    print(title)
    print(f"command    {env['command']}")
    print(f"date       {env['date']}")
    print(f"hardware   {env['cpu']}, {env['cpus']} CPUs, device {env['device']}; torch {env['torch']} ({env['torch_threads']} threads), "
          f"python {env['python']}, numpy {env['numpy']}, h5py {env['h5py']}, httpx {env['httpx']}")  # fmt: skip
    for line in lines:
        print(line)


def table(columns: Sequence[tuple[str, str]], rows: Sequence[Sequence[Any]]) -> None:
    """``columns`` are (title, format spec such as ",.0f" or ".1%"); each column is as wide as its
    title or its widest value, right-aligned but for the first. None prints as "-"."""
    cells = [["-" if v is None else format(v, spec) for v, (_, spec) in zip(row, columns, strict=True)] for row in rows]
    widths = [max([len(title)] + [len(row[i]) for row in cells]) for i, (title, _) in enumerate(columns)]
    for row in [[title for title, _ in columns], *cells]:
        print("  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths, strict=True))).rstrip())


def noise_warning(max_foreign_cpu: float) -> None:
    if max_foreign_cpu > NOISE_LIMIT:
        print(f"\nWARNING: other processes took up to {max_foreign_cpu:.0%} of the machine while figures were timed "
              f"('other CPU'); figures above {NOISE_LIMIT:.0%} are not trustworthy: rerun on a quiet machine")  # fmt: skip


def _jsonable(value: Any) -> Any:
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else str(value)


def emit(result: dict[str, Any], as_json: bool, report: Callable[[dict[str, Any]], None]) -> None:
    """One JSON object on stdout with ``--json``, else ``report``'s tables."""
    if as_json:
        print(json.dumps(result, indent=1, default=_jsonable))
    else:
        report(result)


def timed_main(
    args: argparse.Namespace, run: Callable[[argparse.Namespace], dict[str, Any]], report: Callable[[dict[str, Any]], None]
) -> int:
    """A benchmark's main after parsing: ``run(args)``, its wall seconds added as ``seconds``,
    then ``emit``."""
    started = time.perf_counter()
    result = run(args)
    result["seconds"] = time.perf_counter() - started
    emit(result, args.json, report)
    return 0


@contextlib.contextmanager
def workdir(prefix: str, tmpdir: str | None = None, keep: bool = False) -> Iterator[Path]:
    """A fresh temporary directory, removed afterwards unless ``keep``."""
    root = Path(tempfile.mkdtemp(prefix=prefix, dir=tmpdir))
    try:
        yield root
    finally:
        if keep:
            say(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


def parser(doc: str, *, workdir_of: str | None = None) -> argparse.ArgumentParser:
    """The module docstring's first paragraph as the description, ``--json``, and with
    ``workdir_of`` (what the directory holds) ``--tmpdir`` and ``--keep``."""
    spec = getattr(sys.modules["__main__"], "__spec__", None)  # usage: python -m bench.NAME, not NAME.py
    prog = f"python -m {spec.name}" if spec is not None and spec.name.startswith("bench.") else None
    p = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the tables")
    if workdir_of:
        p.add_argument("--tmpdir", default=None, help=f"where {workdir_of} go (default: the system's temporary directory)")
        p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    return p


def parse(p: argparse.ArgumentParser, argv: Sequence[str] | None, quick: dict[str, Any], full: dict[str, Any]) -> argparse.Namespace:
    """``argv`` parsed; options left at None take the preset of ``--quick`` or of the full run.
    A CUDA device asked for with ``--device cuda`` must be there."""
    args = p.parse_args(argv)
    if getattr(args, "device", "cpu") == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for, but torch sees no CUDA device")
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return args


def alternate(kinds: Sequence[str], repeats: int, run: Callable[[str], dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """``repeats`` rounds of ``run(kind)`` for each kind, the order reversed every second round
    (ABBA), so that a drift of the machine over the run does not favour one kind."""
    rounds: dict[str, list[dict[str, Any]]] = {kind: [] for kind in kinds}
    for i in range(repeats):
        for kind in kinds if i % 2 == 0 else tuple(reversed(kinds)):
            rounds[kind].append(run(kind))
    return rounds


# ---------------------------------------------------------------------------------------------
# Meters: process trees, CPU taken by other processes, per-thread CPU, peak memory


def _stat(path: str) -> list[str] | None:
    """The fields of a /proc stat line after the command name (which may hold spaces)."""
    try:
        with open(path, encoding="ascii", errors="replace") as fh:
            return fh.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def process_tree(root: int) -> list[int]:
    """``root`` and its live descendants, from the ppid links in /proc/PID/stat."""
    children: dict[int, list[int]] = defaultdict(list)
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and (fields := _stat(f"/proc/{entry.name}/stat")):
            children[int(fields[1])].append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, ()))
    return tree


def tree_ticks(root: int) -> int:
    """CPU ticks of the tree: each member's utime+stime plus its reaped children's, so a child
    reaped between two readings moves from its own line to its parent's and is counted once."""
    return sum(sum(int(v) for v in fields[11:15]) for pid in process_tree(root) if (fields := _stat(f"/proc/{pid}/stat")))


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
    are flagged in the reports: the figures then say more about the neighbours.
    """

    def __init__(self, root: int | None = None) -> None:
        self.root = root or os.getpid()
        self.started = time.perf_counter()
        self.busy0, self.steal0 = _machine_ticks()
        self.ours0 = tree_ticks(self.root)

    def stop(self) -> dict[str, float]:
        wall = time.perf_counter() - self.started
        busy, steal = _machine_ticks()
        ours = tree_ticks(self.root)  # children reaped meanwhile are in our cutime
        capacity = max(wall, 1e-9) * os.sysconf("SC_CLK_TCK") * (os.cpu_count() or 1)
        return {"foreign_cpu": max(0.0, (busy - self.busy0) - (ours - self.ours0)) / capacity, "steal": (steal - self.steal0) / capacity}


def thread_ticks(pid: int) -> dict[int, tuple[str, int, int]]:
    """tid -> (name, utime + stime ticks, minor page faults) for every thread of ``pid``."""
    out: dict[int, tuple[str, int, int]] = {}
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError, ValueError):
                text = Path(f"/proc/{pid}/task/{tid}/stat").read_text(encoding="ascii", errors="replace")
                fields = text.rsplit(")", 1)[1].split()
                out[int(tid)] = (text[text.index("(") + 1 : text.rindex(")")], int(fields[11]) + int(fields[12]), int(fields[7]))
    return out


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


# ---------------------------------------------------------------------------------------------
# Fixtures: a synthetic cache and a teacher file


def synthetic_meta(shape: Sequence[int], classes: int, *, levels: int = 256, **fields: Any) -> CacheMeta:
    """A uint8 cache's metadata: inputs in [0, ``levels``), preprocessing scales them to [0, 1]."""
    fields.setdefault("teacher_fingerprint", f"synthetic-{classes}-{'x'.join(map(str, shape))}")
    fields.setdefault("teacher_name", "synthetic")
    return CacheMeta(
        num_classes=classes, input_shape=tuple(shape), input_dtype="uint8", preprocessing=Preprocessing(scale=1 / (levels - 1)), **fields
    )


def synthetic_cache(
    directory: Path, meta: CacheMeta, samples: int, *, seed: int = 0, logit_scale: float = 1.0, label_margin: float = 0.0,
    unlabelled: bool = False, append_rows: int = 256, **writer_options: Any,
) -> CacheReader:  # fmt: skip
    """``samples`` random rows written with ``CacheWriter`` (``append_rows`` per append, integer
    ids from 0): uint8 inputs over the levels ``meta`` scales, normal logits (sd ``logit_scale``)
    raised by ``label_margin`` at the label, labels in [0, C), or in [-1, C) with ``unlabelled``
    (-1: no label). The same seed gives the same rows."""
    levels = round(1 / meta.preprocessing.scale) + 1
    rng = np.random.default_rng(seed)
    inputs = rng.integers(0, levels, (samples, *meta.input_shape), dtype=np.uint8)
    logits = rng.normal(scale=logit_scale, size=(samples, meta.num_classes)).astype(np.float32)
    labels = rng.integers(-1 if unlabelled else 0, meta.num_classes, samples)
    if label_margin:
        labelled = np.flatnonzero(labels >= 0)
        logits[labelled, labels[labelled]] += label_margin
    with CacheWriter(directory, meta, **writer_options) as writer:
        for start in range(0, samples, append_rows):
            stop = min(start + append_rows, samples)
            writer.append(np.arange(start, stop), inputs[start:stop], logits[start:stop], labels[start:stop])
    return CacheReader(directory)


@dataclass
class Teacher:
    path: Path
    model: nn.Module
    preprocessing: Preprocessing

    @property
    def params(self) -> int:
        return models.count_parameters(self.model)

    @torch.no_grad()
    def logits(self, inputs: np.ndarray) -> np.ndarray:
        return self.model(self.preprocessing.apply(torch.from_numpy(inputs))).numpy()


def write_teacher(path: Path, arch: str, shape: Sequence[int], classes: int, *, seed: int = 0, levels: int = 256) -> Teacher:
    """A random-weight ``arch`` for uint8 inputs in [0, ``levels``), in eval mode, saved at
    ``path`` as the student record that ``offline-distill`` writes and ``teacher-serve`` loads."""
    torch.manual_seed(seed)
    model = models.build(arch, tuple(shape), classes).eval()
    meta = synthetic_meta(shape, classes, levels=levels, teacher_fingerprint="bench-random-weights")
    torch.save(models.student_record(arch, model, meta, temperature=TRAINER.temperature, alpha=TRAINER.alpha), path)
    return Teacher(path, model, meta.preprocessing)


def write_lm_teacher(directory: Path, vocab: int, context: int, *, layers: int, dim: int, heads: int, seed: int = 0) -> Teacher:
    """A random-weight ``transformers`` GPT-2 saved in ``directory`` (``save_pretrained``), which
    ``teacher-serve --teacher hf:DIR`` loads; its ``path`` is that spec."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=vocab, n_positions=context, n_embd=dim, n_layer=layers, n_head=heads,
                                     bos_token_id=0, eos_token_id=0)  # fmt: skip
    model = transformers.GPT2LMHeadModel(config).eval()
    model.save_pretrained(directory)
    return Teacher(Path(f"hf:{directory}"), model, Preprocessing())


# ---------------------------------------------------------------------------------------------
# Training as offline-distill trains


Batches = Callable[[int], Iterator[dict[str, torch.Tensor]]]  # epoch -> that epoch's batches


class Student:
    """A student built by the model registry with AdamW at the trainer's defaults (or the
    given lr, alpha and temperature, which a sparse cache allows only at its serving
    temperature), stepped by ``offline-distill``'s ``train_step`` (or ``step_on_inputs`` for
    batches already preprocessed on the device) with the trainer's objective and running totals."""

    def __init__(
        self, arch: str, meta: CacheMeta, *, seed: int, device: torch.device, topk_tail: str = "bucket",
        temperature: float | None = None, alpha: float = TRAINER.alpha, lr: float = TRAINER.lr,
    ) -> None:  # fmt: skip
        torch.manual_seed(seed)
        self.model = models.build(arch, meta.input_shape, meta.num_classes).to(device).train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=lr, weight_decay=TRAINER.weight_decay)
        # the trainer's temperature for this cache: ``temperature``, its default, or a sparse cache's serving one
        config = TrainConfig(caches=[], topk_tail=topk_tail, temperature=temperature, alpha=alpha)
        self.objective = config.for_caches([meta]).objective(meta)
        self.stats = EpochStats(device)
        self.meta, self.device = meta, device

    def step(self, batch: dict[str, torch.Tensor]) -> None:
        train_step(self.model, self.optimizer, batch, meta=self.meta, objective=self.objective, device=self.device, stats=self.stats)

    def step_on_inputs(self, inputs: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor) -> None:
        step_on_inputs(self.model, self.optimizer, inputs, teacher_logits, labels, objective=self.objective, stats=self.stats)


def memory_batches(reader: CacheReader, batch_size: int, seed: int, fields: Sequence[str] = ("inputs", "logits", "labels")) -> Batches:
    """The cache's rows held as torch tensors; each epoch a fresh random permutation, batches
    gathered by slicing it."""
    data = {name: torch.from_numpy(np.ascontiguousarray(values)) for name, values in reader.read(tuple(fields)).items()}
    generator = torch.Generator().manual_seed(seed)

    def epoch(_: int) -> Iterator[dict[str, torch.Tensor]]:
        order = torch.randperm(len(data["labels"]), generator=generator)
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size]
            yield {name: values[index] for name, values in data.items()}

    return epoch


def shard_stream(reader: CacheReader, batch_size: int, seed: int, shuffle_buffer: int) -> ShardStream:
    return ShardStream.from_readers(
        [reader], reader.meta, batch_size=batch_size, seed=seed, shuffle=True, shuffle_buffer=shuffle_buffer, rank=0, world_size=1
    )


def shard_batches(reader: CacheReader, batch_size: int, seed: int, shuffle_buffer: int, workers: int, device: torch.device) -> Batches:
    """``ShardStream.loader``, as offline/train.py reads the cache (pinned for CUDA), with
    ``set_epoch`` before each epoch."""
    stream = shard_stream(reader, batch_size, seed, shuffle_buffer)
    loader = stream.loader(workers, pin_memory=device.type == "cuda")

    def epoch(number: int) -> Iterator[dict[str, torch.Tensor]]:
        stream.set_epoch(number)
        return iter(loader)

    return epoch


def synchronizer(device: torch.device) -> Callable[[], None]:
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


def time_epochs(
    batches: Callable[[int], Iterator[Any]], step: Callable[[Any], Any], sync: Callable[[], None], first: int, *,
    epochs: int = 1, min_seconds: float = 0.0, count: Callable[[Any], int] = lambda batch: len(batch["labels"]),
) -> dict[str, float]:  # fmt: skip
    """Whole epochs from epoch ``first`` on, at least ``epochs`` of them and until ``min_seconds``
    have passed; ``count(batch)`` is its samples. The clock runs from the request for the first
    batch (the reader's start-up is a real cost) to ``sync`` after the last step. "fetch" is the
    time spent waiting for the next batch (reading, gathering); page faults and CPU are this
    process's own, all threads."""
    before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    done = steps = samples = 0
    fetch_s = 0.0
    while done < epochs or time.perf_counter() - started < min_seconds:
        iterator = batches(first + done)
        while True:
            fetch_started = time.perf_counter()
            batch = next(iterator, None)
            fetch_s += time.perf_counter() - fetch_started
            if batch is None:
                break
            step(batch)
            steps += 1
            samples += count(batch)
        sync()
        done += 1
    seconds = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_SELF)
    faults = after.ru_minflt - before.ru_minflt
    cpu_s = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return {
        "epochs": done, "steps": steps, "samples": samples, "seconds": seconds, "epoch_s": seconds / done,
        "fetch_s_per_epoch": fetch_s / done, "minor_faults": faults, "faults_per_epoch": faults / done,
        "faults_per_step": faults / max(1, steps), "sys_s": after.ru_stime - before.ru_stime, "cpu_s_per_epoch": cpu_s / done,
    }  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Side processes: each measured side in a child of its own, timing epochs on request


def module(name: str, *args: str) -> list[str]:
    """``python -m bench.NAME ARGS``; run it with ``child_env()``."""
    return [sys.executable, "-m", f"bench.{name}", *args]


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This environment, ``extra``, and the repository root first on PYTHONPATH, so that a
    ``module`` command finds bench/ from any working directory."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, **(extra or {}), "PYTHONPATH": path}


def add_side_options(p: argparse.ArgumentParser, kinds: Sequence[str]) -> None:
    p.add_argument("--side", choices=kinds, help=argparse.SUPPRESS)  # internal: run as one side's child
    p.add_argument("--side-cache", help=argparse.SUPPRESS)


def side_command(name: str, kind: str, cache: Path, args: argparse.Namespace, options: Sequence[str]) -> list[str]:
    """``python -m bench.NAME --side KIND --side-cache CACHE`` with the parent's values of
    ``options`` (argparse destinations), so that the child runs as the parent was configured."""
    cmd = module(name, "--side", kind, "--side-cache", str(cache))
    for name in options:
        value = getattr(args, name)
        cmd += [f"--{name.replace('_', '-')}", *map(str, value if isinstance(value, list | tuple) else [value])]
    return cmd


def serve_epochs(batches: Batches, step: Callable[[dict[str, torch.Tensor]], None], sync: Callable[[], None], *,
                 epochs: int = 1, min_seconds: float = 0.0, warmup_batches: int = 0) -> int:  # fmt: skip
    """The child's end of ``SideProcess``: ``warmup_batches`` untimed steps, then ``{"ready": ...}``;
    for each JSON line ``{"epoch": N}`` on stdin, ``time_epochs`` from N as one JSON line;
    ``{"quit": true}`` or EOF ends it."""
    if warmup_batches:  # allocator, first touch, kernels
        for i, batch in enumerate(batches(1 << 20)):
            if i >= warmup_batches:
                break
            step(batch)
        sync()
    print(json.dumps({"ready": True, "pid": os.getpid()}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        if request.get("quit"):
            break
        print(json.dumps(time_epochs(batches, step, sync, int(request["epoch"]), epochs=epochs, min_seconds=min_seconds)), flush=True)
    return 0


class SideProcess:
    """The parent's handle on a ``serve_epochs`` child: one JSON line in, one JSON line out."""

    def __init__(self, kind: str, cmd: list[str], env: dict[str, str] | None = None) -> None:
        self.kind = kind
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1, env=child_env(env))

    def _answer(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"the {self.kind} side exited with code {self.proc.wait()} (its error is above)")
        return json.loads(line)

    def epoch(self, epoch: int) -> dict[str, Any]:
        """The child's figures for epochs from ``epoch`` on, and the share of the machine that
        other processes took meanwhile (all sides and their workers count as ours)."""
        assert self.proc.stdin is not None
        meter = CpuMeter()
        self.proc.stdin.write(json.dumps({"epoch": epoch}) + "\n")
        self.proc.stdin.flush()
        return {**self._answer(), **meter.stop()}

    def close(self) -> None:
        assert self.proc.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            self.proc.stdin.write(json.dumps({"quit": True}) + "\n")
            self.proc.stdin.close()
        self.proc.wait()


@contextlib.contextmanager
def side_processes(commands: dict[str, list[str]], env: dict[str, str] | None = None) -> Iterator[dict[str, SideProcess]]:
    """Start every side at once (their start-up and warm-up are untimed), wait until each is
    ready, and end them all afterwards."""
    sides = {kind: SideProcess(kind, cmd, env) for kind, cmd in commands.items()}
    try:
        for side in sides.values():
            side._answer()
        yield sides
    finally:
        for side in sides.values():
            side.close()


def tool(name: str, *args: str, log: Path | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """One of the product's commands (``offline-distill``, ``cache-inspect``, ...), run to the end;
    its output goes to ``log`` when given, and a failure ends the benchmark with its last line."""
    proc = subprocess.run([str(BIN / name), *args], capture_output=True, text=True, timeout=3600)
    if log is not None:
        log.write_text(proc.stdout + proc.stderr)
    if check and proc.returncode != 0:
        raise SystemExit(f"{name} {' '.join(args)} exited with {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}")
    return proc


def offline_distill(
    cache: Path, out: Path, student: str, *, epochs: int = 1, extra: Sequence[str] = (), env: dict[str, str] | None = None,
    memory: TreeMemory | None = None,
) -> dict[str, Any]:  # fmt: skip
    """A real ``offline-distill --no-progress --no-export`` run, its output in ``out``.log, with
    ``memory`` polled while it runs. Returns its metrics.json, wall seconds, the trainer's
    ``ru_maxrss`` and pid. This process's MALLOC_* variables are not passed on: ``env`` decides."""
    cmd = [str(BIN / "offline-distill"), "--cache", str(cache), "--student", student, "--epochs", str(epochs), "--out", str(out),
           "--no-progress", "--no-export", *extra]  # fmt: skip
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    log = out.with_suffix(".log")
    started = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env={**clean, **(env or {})})
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                proc.returncode = os.waitstatus_to_exitcode(status)
                break
            if memory is not None:
                memory.sample(proc.pid)
            time.sleep(memory.interval if memory is not None else 0.05)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{shlex.join(cmd)} failed with exit code {proc.returncode}:\n{log.read_text()[-3000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    return {"metrics": metrics, "seconds": seconds, "max_rss_mib": usage.ru_maxrss / 1024, "pid": proc.pid, "command": shlex.join(cmd)}


# ---------------------------------------------------------------------------------------------
# HTTP clients


class ClientPool:
    """``clients`` threads, each with its own ``httpx.Client`` and one request in flight. Each
    thread takes the next request number, calls ``send(http, number)``, and on HTTP 200 calls
    ``on_ack(number, response, time)`` under ``lock``. Taking stops after ``total`` requests or
    once ``until()`` is true; the first failure stops every thread and ``run`` returns it."""

    def __init__(self, url: str, clients: int, timeout: float = 600.0) -> None:
        self.url, self.clients, self.timeout = url, clients, timeout
        self.lock = threading.Lock()

    def run(
        self, send: Callable[[httpx.Client, int], httpx.Response], on_ack: Callable[[int, httpx.Response, float], None], *,
        total: int | None = None, until: Callable[[], bool] = lambda: False,
    ) -> str | None:  # fmt: skip
        taken = 0
        errors: list[str] = []

        def client() -> None:
            nonlocal taken
            with httpx.Client(base_url=self.url, timeout=self.timeout) as http:
                while True:
                    with self.lock:
                        if errors or (total is not None and taken >= total) or until():
                            return
                        number, taken = taken, taken + 1
                    try:
                        response = send(http, number)
                    except httpx.HTTPError as exc:
                        with self.lock:
                            errors.append(f"request {number}: {type(exc).__name__}: {exc}")
                        return
                    now = time.perf_counter()
                    with self.lock:
                        if response.status_code != 200:
                            errors.append(f"request {number}: HTTP {response.status_code}: {response.text[:300]}")
                            return
                        on_ack(number, response, now)

        threads = [threading.Thread(target=client, name=f"client-{i}") for i in range(self.clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return errors[0] if errors else None
