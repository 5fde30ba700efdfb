"""Offline against online distillation: how much of the ideal speed-up does the cache deliver?

**Online KD** (as in labml's ``distill`` experiment): each step runs the teacher forward under
``torch.no_grad()`` on the batch, then the student step. **Offline KD** (kdcache): the same
student step, with the teacher's logits read from a cache through ``ShardStream`` (shuffled,
``DataLoader(batch_size=None)`` with the trainer's default worker count, which is 0 for a cache
under 256 MiB), as ``offline-distill`` reads them. Nothing else differs.

The student step is the body of ``offline/train.py``'s loop (which has no step function to
import): ``preprocessing.apply(inputs.to(device))`` → student → ``distillation_loss`` (KL,
T=4, alpha=0.9) → ``zero_grad`` / ``backward`` / AdamW ``step``. Online, the teacher sees the
same preprocessed batch; its logits stay on the device.

Four timings, each an epoch over the same N samples at the same batch size on the same device:

* ``t_online``: teacher forward + student step per batch, batches from in-memory tensors
  (a random permutation per epoch);
* ``t_offline``: student step per batch, batches (inputs, logits, labels) from the shards;
* ``t_teacher``: the teacher forward alone (preprocessing included, < 1% of it), in-memory;
* ``t_student``: the student step alone, in-memory inputs and in-memory cached logits.

``speedup_ideal = (t_teacher + t_student) / t_student`` is what dropping the teacher could give
at best; ``speedup_measured = t_online / t_offline`` is what the cache gave;
``p3_offline_speedup_vs_ideal = measured / ideal`` (target >= 0.9). Note that
``measured / ideal = [t_online / (t_teacher + t_student)] x [t_student / t_offline]``: the
second factor is the reader's cost against in-memory data, the first how much running the
teacher and student in one loop costs beyond the sum of their parts.

The cache is filled once, before the timings, by the same teacher in this process
(``CacheWriter``: forward at the batch size, append, publish): ``fill_s`` is that one-time cost,
and ``break_even_epochs = fill_s / (t_online - t_offline)`` the epochs after which it has paid
for itself (it is about 1 on the same device, since filling is one teacher epoch plus writes).

Method. Each of the four kinds runs in its own child process (``--side``, driven over a pipe,
as in bench/reader.py), so that each has its own malloc heap and the idle ones cost nothing;
a child warms up on ``--warmup-batches`` batches before it reports ready, and one untimed round
of all four follows. A timing runs whole epochs until at least ``--min-seconds`` have passed and
reports seconds per epoch (so the cheap kinds, a fraction of a second an epoch, are not timed
on one short epoch). ``--repeats`` rounds alternate the order (online, offline, teacher,
student, then reversed: ABBA). Each round gives its own measured ÷ ideal from its four timings,
taken within seconds of each other, and ``p3_offline_speedup_vs_ideal`` is the median of those
paired ratios: the machine drifts by ±10% over a minute, which a ratio of per-kind medians
(``ratio_of_medians``, reported beside it) does not cancel. The times shown are the per-kind
medians. Each timing records the
child's minor page faults per epoch and the share of the machine other processes took ("other
CPU"): on a 2-core machine a busy neighbour decides the result. It also records the time spent
waiting for the next batch ("fetch": reading and gathering; on the CPU the rest of the epoch is
the steps, on CUDA the split is blurred by asynchronous kernels), which splits the offline
side's extra cost into the reader's own and a slower step. On CUDA every epoch ends with a
synchronize; in-memory tensors stay on the host, as the trainer's do, and every batch is
copied to the device (pinned for the shards, as the trainer's DataLoader does).

Data: synthetic uint8 [3,32,32] (CIFAR-sized) images with random labels, 10 classes, scale
1/255, float32 logits. Teacher: ``--teacher`` (default ``resnet``, the CIFAR ResNet-20 of
offline.models, random weights, eval mode), student ``--student`` (default ``mlp``, one hidden
layer of 128: a student far cheaper than its teacher, which is where distillation pays, and
where the reader's overhead shows most).

    .venv/bin/python bench/online.py --quick          # < 60 s on 2 cores
    .venv/bin/python bench/online.py --json           # a few minutes on 2 cores
    .venv/bin/python bench/online.py --device cuda
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import platform
import resource
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

_HERE = Path(__file__).resolve().parent
try:
    import kdcache.offline  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(_HERE.parent))

from kdcache.offline import models  # noqa: E402
from kdcache.offline.cache import CacheMeta, CacheReader, CacheWriter, Preprocessing  # noqa: E402
from kdcache.offline.dataset import DEFAULT_SHUFFLE_BUFFER, ShardStream  # noqa: E402
from kdcache.offline.losses import distillation_loss  # noqa: E402
from kdcache.offline.malloc import tune_malloc  # noqa: E402
from kdcache.offline.train import AUTO_WORKERS_BYTES  # noqa: E402


def _load_reader_helpers() -> Any:
    """bench/reader.py's CpuMeter, memory_epoch, cpu_model and GLIBC_DEFAULTS (one home), by path."""
    spec = importlib.util.spec_from_file_location("bench_reader", _HERE / "reader.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


_reader = _load_reader_helpers()
CpuMeter, cpu_model, memory_epoch, GLIBC_DEFAULTS = _reader.CpuMeter, _reader.cpu_model, _reader.memory_epoch, _reader.GLIBC_DEFAULTS

KINDS = ("online", "offline", "teacher", "student")
RATIO_TARGET = 0.9
NOISE_LIMIT = 0.05
TEMPERATURE, ALPHA, LR = 4.0, 0.9, 1e-3
QUICK = {"samples": 2048, "repeats": 5, "min_seconds": 0.8, "warmup_batches": 2}
FULL = {"samples": 6144, "repeats": 9, "min_seconds": 2.0, "warmup_batches": 3}


def say(message: str) -> None:  # progress on stderr, so that --json output stays one object
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# The teacher, the data, and the one-time cache fill


def cache_meta(args: argparse.Namespace) -> CacheMeta:
    return CacheMeta(
        teacher_fingerprint=f"bench-online-{args.teacher}-seed{args.seed}",
        teacher_name=args.teacher,
        num_classes=args.classes,
        input_shape=tuple(args.input_shape),
        input_dtype="uint8",
        preprocessing=Preprocessing(scale=1 / 255),
        temperature=TEMPERATURE,
    )


def build_teacher(args: argparse.Namespace, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(args.seed + 1)  # the same random weights in every process
    return models.build(args.teacher, tuple(args.input_shape), args.classes).to(device).eval()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fill_cache(directory: Path, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """The one-time cost: run the teacher over the data once and write its logits with CacheWriter."""
    meta = cache_meta(args)
    rng = np.random.default_rng(args.seed)
    inputs = rng.integers(0, 256, (args.samples, *args.input_shape), dtype=np.uint8)
    labels = rng.integers(0, args.classes, args.samples)
    teacher = build_teacher(args, device)
    with torch.no_grad():  # untimed warm-up, as the timed sides get
        teacher(meta.preprocessing.apply(torch.from_numpy(inputs[: args.batch_size]).to(device)))
    synchronize(device)
    forward_s = 0.0
    started = time.perf_counter()
    with CacheWriter(directory, meta) as writer:
        for start in range(0, args.samples, args.batch_size):
            stop = min(start + args.batch_size, args.samples)
            forward_started = time.perf_counter()
            with torch.no_grad():
                logits = teacher(meta.preprocessing.apply(torch.from_numpy(inputs[start:stop]).to(device))).float().cpu().numpy()
            forward_s += time.perf_counter() - forward_started
            writer.append(np.arange(start, stop), inputs[start:stop], logits, labels[start:stop])
    seconds = time.perf_counter() - started  # includes publishing the shard (fsync, checksum, manifest)
    reader = CacheReader(directory)
    return {"fill_s": seconds, "fill_forward_s": forward_s, "fill_write_s": seconds - forward_s, "cache_bytes": reader.total_bytes}


def default_workers(reader: CacheReader) -> int:
    """What offline-distill picks without --workers (offline/train.py)."""
    return 0 if reader.total_bytes < AUTO_WORKERS_BYTES else 2


# ---------------------------------------------------------------------------------------------
# One kind's child process


def side_main(args: argparse.Namespace) -> int:
    """Runs one kind an epoch at a time on request (protocol as bench/reader.py's side_main).

    Prints ``{"ready": ...}`` after the warm-up, then for each JSON line ``{"epoch": N}`` runs
    whole epochs from N on until ``--min-seconds`` have passed and prints one JSON line with the
    seconds per epoch; ``{"quit": true}`` or EOF ends it.
    """
    tune_malloc()  # as offline-distill does; a no-op under --malloc glibc (GLIBC_DEFAULTS in the environment)
    device = torch.device(args.device)
    reader = CacheReader(args.side_cache)
    meta = reader.meta
    torch.manual_seed(args.seed)
    student = models.build(args.student, meta.input_shape, meta.num_classes).to(device)
    student.train()
    optimizer = torch.optim.AdamW(student.parameters(), lr=LR)
    teacher = build_teacher(args, device) if args.side in ("online", "teacher") else None

    def student_step(inputs: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor) -> None:
        # offline/train.py's step, less its progress bar and running totals
        loss = distillation_loss(student(inputs), teacher_logits, labels, TEMPERATURE, ALPHA)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def step(batch: dict[str, torch.Tensor]) -> None:
        inputs = meta.preprocessing.apply(batch["inputs"].to(device, non_blocking=True))
        if args.side == "teacher":
            assert teacher is not None
            with torch.no_grad():
                teacher(inputs)
            return
        labels = batch["labels"].to(device, non_blocking=True)
        if args.side == "online":
            assert teacher is not None
            with torch.no_grad():
                teacher_logits = teacher(inputs)
        else:
            teacher_logits = batch["logits"].to(device, non_blocking=True)
        student_step(inputs, teacher_logits, labels)

    if args.side == "offline":
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

    else:
        # The online side reads only inputs and labels; logits are there for the student side.
        arrays = reader.read(("inputs", "logits", "labels"))
        data = {name: torch.from_numpy(np.ascontiguousarray(values)) for name, values in arrays.items()}
        if args.side != "student":
            del data["logits"]
        generator = torch.Generator().manual_seed(args.seed)

        def batches(epoch: int) -> Iterator[dict[str, torch.Tensor]]:
            return memory_epoch(data, args.batch_size, generator)

    for i, batch in enumerate(batches(1 << 20)):  # warm-up: allocator, first touch, kernels
        if i >= args.warmup_batches:
            break
        step(batch)
    synchronize(device)
    print(json.dumps({"ready": True, "pid": os.getpid()}), flush=True)

    for line in sys.stdin:
        request = json.loads(line)
        if request.get("quit"):
            break
        epoch = int(request["epoch"])
        before = resource.getrusage(resource.RUSAGE_SELF)
        started = time.perf_counter()
        epochs = steps = samples = 0
        fetch_s = 0.0  # waiting for the next batch (reading, gathering); the rest of the epoch is the steps
        while True:
            iterator = batches(epoch + epochs)
            while True:
                fetch_started = time.perf_counter()
                batch = next(iterator, None)
                fetch_s += time.perf_counter() - fetch_started
                if batch is None:
                    break
                step(batch)
                steps += 1
                samples += len(batch["labels"])
            synchronize(device)
            epochs += 1
            if time.perf_counter() - started >= args.min_seconds:
                break
        seconds = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_SELF)
        print(json.dumps({
            "epoch_s": seconds / epochs, "fetch_s_per_epoch": fetch_s / epochs, "epochs": epochs, "steps": steps, "samples": samples, "seconds": seconds,
            "faults_per_epoch": (after.ru_minflt - before.ru_minflt) / epochs,
            "cpu_s_per_epoch": (after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime) / epochs,
        }), flush=True)  # fmt: skip
    return 0


class Side(_reader.SideProcess):
    """The parent's handle on a ``side_main`` child (the line protocol is bench/reader.py's)."""

    def __init__(self, kind: str, cache: Path, args: argparse.Namespace) -> None:
        cmd = [
            sys.executable, str(Path(__file__).resolve()), "--side", kind, "--side-cache", str(cache),
            "--workers", str(args.workers), "--student", args.student, "--teacher", args.teacher, "--batch-size", str(args.batch_size),
            "--seed", str(args.seed), "--shuffle-buffer", str(args.shuffle_buffer), "--device", args.device,
            "--min-seconds", str(args.min_seconds), "--warmup-batches", str(args.warmup_batches),
            "--input-shape", *map(str, args.input_shape), "--classes", str(args.classes),
        ]  # fmt: skip
        super().__init__(kind, cmd, GLIBC_DEFAULTS if args.malloc == "glibc" else None)


def speedups(t: dict[str, float]) -> dict[str, float]:
    ideal = (t["teacher"] + t["student"]) / t["student"]
    measured = t["online"] / t["offline"]
    return {"ideal": ideal, "measured": measured, "ratio": measured / ideal}


def measure(cache: Path, args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    sides = {kind: Side(kind, cache, args) for kind in KINDS}  # they start (and warm up) together, untimed
    rounds: dict[str, list[dict[str, Any]]] = {kind: [] for kind in KINDS}
    try:
        for side in sides.values():
            side.ready()
        say(f"  sides started and warmed up in {time.perf_counter() - started:.1f} s")
        epoch = 0
        for kind in KINDS:  # one untimed round: the first timings of each side ran up to 20% slow
            epoch += sides[kind].epoch(epoch)["epochs"]
        for i in range(args.repeats):
            for kind in KINDS if i % 2 == 0 else tuple(reversed(KINDS)):
                figures = sides[kind].epoch(epoch)
                epoch += figures["epochs"]
                rounds[kind].append(figures)
            say(f"  round {i + 1}/{args.repeats}: " + ", ".join(f"{k} {rounds[k][-1]['epoch_s']:.3f} s" for k in KINDS))
    finally:
        for side in sides.values():
            side.close()
    median = {kind: statistics.median(r["epoch_s"] for r in rounds[kind]) for kind in KINDS}
    per_round = [speedups({kind: rounds[kind][i]["epoch_s"] for kind in KINDS}) for i in range(args.repeats)]
    return {
        "median_epoch_s": median,
        **{f"{k}_faults_per_epoch": statistics.median(r["faults_per_epoch"] for r in rounds[k]) for k in KINDS},
        **{f"{k}_cpu_s_per_epoch": statistics.median(r["cpu_s_per_epoch"] for r in rounds[k]) for k in KINDS},
        **{f"{k}_fetch_s_per_epoch": statistics.median(r["fetch_s_per_epoch"] for r in rounds[k]) for k in KINDS},
        "ratio_per_round": [r["ratio"] for r in per_round],
        "ratio_median_of_rounds": statistics.median(r["ratio"] for r in per_round),
        "measured_per_round": [r["measured"] for r in per_round],
        "ideal_per_round": [r["ideal"] for r in per_round],
        "max_foreign_cpu": max(r["foreign_cpu"] for rs in rounds.values() for r in rs),
        "max_steal": max(r["steal"] for rs in rounds.values() for r in rs),
        "rounds": rounds,
    }


# ---------------------------------------------------------------------------------------------
# Report


def environment(args: argparse.Namespace) -> dict[str, Any]:
    device = args.device
    if device == "cuda":
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
    }


def print_tables(result: dict[str, Any]) -> None:
    env, cfg = result["env"], result["config"]
    print("bench/online.py: offline KD (teacher logits from the cache) vs online KD (teacher in the loop)")
    print(f"command    {env['command']}")
    print(f"date       {env['date']}")
    print(f"hardware   {env['cpu']}, {env['cpus']} CPUs, device {env['device']}; torch {env['torch']} ({env['torch_threads']} threads), "
          f"python {env['python']}, numpy {env['numpy']}, h5py {env['h5py']}")  # fmt: skip
    print(f"data       {cfg['samples']:,} synthetic uint8 {cfg['input_shape']} samples, {cfg['classes']} classes; "
          f"cache {cfg['cache_bytes'] / 2**20:.1f} MiB, read with {cfg['workers']} DataLoader worker(s)")  # fmt: skip
    print(f"models     teacher {cfg['teacher']} ({cfg['teacher_params']:,} parameters, eval, no_grad), student {cfg['student']} "
          f"({cfg['student_params']:,} parameters), batch {cfg['batch_size']}, KL T={TEMPERATURE} alpha={ALPHA}, AdamW lr {LR}")  # fmt: skip
    print()
    print(f"Seconds per epoch, median of {cfg['repeats']} alternating rounds (each timing >= {cfg['min_seconds']} s of whole epochs)")
    print(f"{'':>10}  {'s/epoch':>8}  {'samples/s':>9}  {'fetch s/epoch':>13}  {'faults/epoch':>12}  {'CPU s/epoch':>11}")
    for kind, label in (("online", "t_online"), ("offline", "t_offline"), ("teacher", "t_teacher"), ("student", "t_student")):
        seconds = result[f"{label}_s"]
        print(f"{label:>10}  {seconds:>8.3f}  {cfg['samples'] / seconds:>9,.0f}  {result['detail'][f'{kind}_fetch_s_per_epoch']:>13.4f}  "
              f"{result['detail'][f'{kind}_faults_per_epoch']:>12,.0f}  "
              f"{result['detail'][f'{kind}_cpu_s_per_epoch']:>11.2f}")  # fmt: skip
    print(
        f"{'fill':>10}  {result['fill_s']:>8.3f}  (one time: teacher {result['fill_forward_s']:.3f} s + write {result['fill_write_s']:.3f} s)"
    )
    print()
    ok = {True: "yes", False: "NO"}
    per = " ".join(f"{r:.3f}" for r in result["detail"]["ratio_per_round"])
    print(f"{'figure':<42}  {'value':>8}  {'target':>7}  met")
    print(f"{'speed-up ideal (t_teacher+t_student)/t_student':<42}  {result['speedup_ideal']:>8.2f}")
    print(f"{'speed-up measured t_online/t_offline':<42}  {result['speedup_measured']:>8.2f}")
    print(f"{'measured / ideal, median of rounds':<42}  {result['p3_offline_speedup_vs_ideal']:>8.3f}  {'>= ' + str(RATIO_TARGET):>7}  "
          f"{ok[result['target_met']]}   per round: {per}")  # fmt: skip
    print(f"{'measured / ideal, from the medians':<42}  {result['ratio_of_medians']:>8.3f}")
    be = result["break_even_epochs"]
    print(f"{'break-even, epochs (fill / saved per epoch)':<42}  {be if be is None else f'{be:.2f}':>8}")
    if result["max_foreign_cpu"] > NOISE_LIMIT:
        print()
        print(
            f"WARNING: other processes took up to {result['max_foreign_cpu']:.0%} of the machine while figures were timed: rerun on a quiet machine"
        )
    print()
    print("  ".join(f"{k}={result[k]}" for k in ("p3_offline_speedup_vs_ideal", "speedup_measured", "speedup_ideal", "break_even_epochs")))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help=f"small run, < 60 s on 2 cores (defaults become {QUICK})")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the tables")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--samples", type=int, default=None, help=f"samples per epoch (default {FULL['samples']})")
    p.add_argument("--input-shape", type=int, nargs="+", default=[3, 32, 32], metavar="D", help="uint8 sample shape")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--teacher", default="resnet", help="an offline.models registry name, or module:factory")
    p.add_argument("--student", default="mlp", help="an offline.models registry name, or module:factory")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers of the offline side (default: offline-distill's choice)")
    p.add_argument("--shuffle-buffer", type=int, default=DEFAULT_SHUFFLE_BUFFER)
    p.add_argument("--repeats", type=int, default=None, help=f"alternating rounds (default {FULL['repeats']})")
    p.add_argument(
        "--min-seconds", type=float, default=None, help=f"whole epochs per timing until this long (default {FULL['min_seconds']})"
    )
    p.add_argument(
        "--warmup-batches", type=int, default=None, help=f"untimed batches per side before the rounds (default {FULL['warmup_batches']})"
    )
    p.add_argument(
        "--malloc", choices=("trainer", "glibc"), default="trainer",
        help="glibc malloc of the timed sides: offline-distill's settings (offline.malloc.tune_malloc), or glibc's own defaults"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tmpdir", default=None, help="where the cache goes (default: the system's temporary directory)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    p.add_argument("--side", choices=KINDS, help=argparse.SUPPRESS)  # internal: run as one kind's child
    p.add_argument("--side-cache", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for, but torch sees no CUDA device")
    if args.side:
        return side_main(args)
    if args.malloc == "trainer":
        tune_malloc()  # the fill stands for teacher-serve, which tunes malloc at start
    device = torch.device(args.device)
    root = Path(tempfile.mkdtemp(prefix="bench-online-", dir=args.tmpdir))
    try:
        say(f"filling a {args.samples:,}-sample cache with {args.teacher} in {root} ...")
        fill = fill_cache(root / "cache", args, device)
        say(f"  filled in {fill['fill_s']:.1f} s")
        reader = CacheReader(root / "cache")
        if args.workers is None:
            args.workers = default_workers(reader)
        shape = tuple(args.input_shape)
        teacher_params = models.count_parameters(models.build(args.teacher, shape, args.classes))
        student_params = models.count_parameters(models.build(args.student, shape, args.classes))
        say(f"timing online, offline ({args.workers} workers), teacher, student: {args.repeats} rounds ...")
        detail = measure(reader.directory, args)
        t = detail["median_epoch_s"]
        ratios = speedups(t)  # from the medians of the four timings: reported beside the P3 figure
        saved = t["online"] - t["offline"]
        env = environment(args)
        result = {
            # Each round's four timings are taken within seconds of each other, so a round's ratio
            # cancels the machine's drift (±10% over a minute on a shared 2-core VM); the figure is
            # the median of those paired ratios. The ratio of the four medians is kept beside it.
            "p3_offline_speedup_vs_ideal": round(detail["ratio_median_of_rounds"], 4),
            "ratio_of_medians": round(ratios["ratio"], 4),
            "speedup_measured": round(ratios["measured"], 3),
            "speedup_ideal": round(ratios["ideal"], 3),
            "t_online_s": round(t["online"], 4),
            "t_offline_s": round(t["offline"], 4),
            "t_teacher_s": round(t["teacher"], 4),
            "t_student_s": round(t["student"], 4),
            "fill_s": round(fill["fill_s"], 4),
            "fill_forward_s": round(fill["fill_forward_s"], 4),
            "fill_write_s": round(fill["fill_write_s"], 4),
            "break_even_epochs": round(fill["fill_s"] / saved, 3) if saved > 0 else None,
            "online_vs_sum": round(t["online"] / (t["teacher"] + t["student"]), 4),  # > 1: the shared loop costs extra
            "student_vs_offline": round(t["student"] / t["offline"], 4),  # < 1: the reader costs extra
            "target": f">= {RATIO_TARGET} (measured / ideal speed-up)",
            "target_met": detail["ratio_median_of_rounds"] >= RATIO_TARGET,
            "max_foreign_cpu": detail["max_foreign_cpu"],
            "device": env["device"],
            "torch": env["torch"],
            "env": env,
            "config": {
                **{k: v for k, v in vars(args).items() if k not in ("json", "tmpdir", "keep", "side", "side_cache")},
                "cache_bytes": fill["cache_bytes"],
                "teacher_params": teacher_params,
                "student_params": student_params,
            },
            "detail": detail,
        }
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
