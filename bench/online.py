"""Offline against online distillation: how much of the ideal speed-up does the cache deliver?

Four timings per round, each a kind in its own child process, epochs over the same samples:
``t_online`` (teacher forward + ``offline-distill``'s student step), ``t_offline`` (the step on
logits read from the cache through ``ShardStream``), ``t_teacher`` and ``t_student`` (each alone,
in memory). P3 = (t_online / t_offline) ÷ ((t_teacher + t_student) / t_student), the median of
the rounds' paired ratios; target >= 0.9. The cache is filled once beforehand by the same
teacher (``fill_s``, ``break_even_epochs``). The method: docs/benchmarks.md, "P3".

    .venv/bin/python -m bench.online --quick          # < 60 s on 2 cores
    .venv/bin/python -m bench.online --json           # a few minutes on 2 cores
    .venv/bin/python -m bench.online --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench import harness
from kdcache.offline import models
from kdcache.offline.cache import CacheReader, CacheWriter
from kdcache.offline.dataset import DEFAULT_SHUFFLE_BUFFER
from kdcache.offline.malloc import tune_malloc
from kdcache.offline.train import default_workers

KINDS = ("online", "offline", "teacher", "student")
QUICK = {"samples": 2048, "repeats": 5, "min_seconds": 0.8, "warmup_batches": 2}
FULL = {"samples": 6144, "repeats": 9, "min_seconds": 2.0, "warmup_batches": 3}
SIDE_OPTIONS = ("workers", "student", "teacher", "batch_size", "seed", "shuffle_buffer", "device", "min_seconds", "warmup_batches",
                "input_shape", "classes")  # fmt: skip


def build_teacher(args: argparse.Namespace, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(args.seed + 1)  # the same random weights in every process
    return models.build(args.teacher, tuple(args.input_shape), args.classes).to(device).eval()


def fill_cache(directory: Path, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """The one-time cost: run the teacher over the data once and write its logits with CacheWriter."""
    meta = harness.synthetic_meta(args.input_shape, args.classes, teacher_fingerprint=f"bench-online-{args.teacher}-seed{args.seed}",
                                  teacher_name=args.teacher, serving_temperature=harness.TRAINER.temperature)  # fmt: skip
    rng = np.random.default_rng(args.seed)
    inputs = rng.integers(0, 256, (args.samples, *args.input_shape), dtype=np.uint8)
    labels = rng.integers(0, args.classes, args.samples)
    teacher = build_teacher(args, device)
    sync = harness.synchronizer(device)

    def forward(rows: slice) -> torch.Tensor:
        with torch.no_grad():
            return teacher(meta.preprocessing.apply(torch.from_numpy(inputs[rows]).to(device)))

    forward(slice(0, args.batch_size))  # untimed warm-up, as the timed sides get
    sync()
    forward_s = 0.0
    started = time.perf_counter()
    with CacheWriter(directory, meta) as writer:
        for start in range(0, args.samples, args.batch_size):
            rows = slice(start, min(start + args.batch_size, args.samples))
            forward_started = time.perf_counter()
            logits = forward(rows).float().cpu().numpy()
            forward_s += time.perf_counter() - forward_started
            writer.append(np.arange(args.samples)[rows], inputs[rows], logits, labels[rows])
    seconds = time.perf_counter() - started  # includes publishing the shard (fsync, checksum, manifest)
    return {
        "fill_s": seconds,
        "fill_forward_s": forward_s,
        "fill_write_s": seconds - forward_s,
        "cache_bytes": CacheReader(directory).total_bytes,
    }


def side_main(args: argparse.Namespace) -> int:
    """One kind's child (``harness.serve_epochs``): warms up on ``--warmup-batches`` batches,
    then times whole epochs until ``--min-seconds`` have passed, per request."""
    tune_malloc()  # as offline-distill does; a no-op under --malloc glibc (GLIBC_DEFAULTS in the environment)
    device = torch.device(args.device)
    reader = CacheReader(args.side_cache)
    meta = reader.meta
    student = harness.Student(args.student, meta, seed=args.seed, device=device)
    teacher = build_teacher(args, device) if args.side in ("online", "teacher") else None
    if args.side == "offline":
        batches = harness.shard_batches(reader, args.batch_size, args.seed, args.shuffle_buffer, args.workers, device)
    else:  # the online and teacher sides read only inputs and labels; the logits are the student side's
        fields = ("inputs", "logits", "labels") if args.side == "student" else ("inputs", "labels")
        batches = harness.memory_batches(reader, args.batch_size, args.seed, fields)

    def teacher_step(batch: dict[str, torch.Tensor]) -> None:
        assert teacher is not None
        inputs = meta.preprocessing.apply(batch["inputs"].to(device, non_blocking=True))
        with torch.no_grad():
            teacher_logits = teacher(inputs)
        if args.side == "online":  # the teacher's logits stay on the device
            student.step_on_inputs(inputs, teacher_logits, batch["labels"].to(device, non_blocking=True))

    step = teacher_step if teacher is not None else student.step
    return harness.serve_epochs(
        batches, step, harness.synchronizer(device), min_seconds=args.min_seconds, warmup_batches=args.warmup_batches
    )


def speedups(t: dict[str, float]) -> dict[str, float]:
    ideal = (t["teacher"] + t["student"]) / t["student"]
    measured = t["online"] / t["offline"]
    return {"ideal": ideal, "measured": measured, "ratio": measured / ideal}


def measure(cache: Path, args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    commands = {kind: harness.side_command("online", kind, cache, args, SIDE_OPTIONS) for kind in KINDS}
    with harness.side_processes(commands, harness.GLIBC_DEFAULTS if args.malloc == "glibc" else None) as sides:
        harness.say(f"  sides started and warmed up in {time.perf_counter() - started:.1f} s")
        epoch = 0

        def run(kind: str) -> dict[str, Any]:
            nonlocal epoch
            figures = sides[kind].epoch(epoch)
            epoch += figures["epochs"]
            harness.say(f"  {kind} {figures['epoch_s']:.3f} s")
            return figures

        for kind in KINDS:  # one untimed round: the first timings of each side ran up to 20% slow
            run(kind)
        rounds = harness.alternate(KINDS, args.repeats, run)
    per_round = [speedups({kind: rounds[kind][i]["epoch_s"] for kind in KINDS}) for i in range(args.repeats)]

    def medians(key: str) -> dict[str, float]:
        return {f"{k}_{key}": statistics.median(r[key] for r in rounds[k]) for k in KINDS}

    return {
        "median_epoch_s": {kind: statistics.median(r["epoch_s"] for r in rounds[kind]) for kind in KINDS},
        **medians("faults_per_epoch"),
        **medians("cpu_s_per_epoch"),
        **medians("fetch_s_per_epoch"),
        "ratio_per_round": [r["ratio"] for r in per_round],
        "ratio_median_of_rounds": statistics.median(r["ratio"] for r in per_round),
        "measured_per_round": [r["measured"] for r in per_round],
        "ideal_per_round": [r["ideal"] for r in per_round],
        "max_foreign_cpu": max(r["foreign_cpu"] for rs in rounds.values() for r in rs),
        "max_steal": max(r["steal"] for rs in rounds.values() for r in rs),
        "rounds": rounds,
    }


def print_tables(result: dict[str, Any]) -> None:
    cfg, detail, trainer = result["config"], result["detail"], harness.TRAINER
    harness.print_header(
        "bench.online: offline KD (teacher logits from the cache) vs online KD (teacher in the loop)", result["env"],
        f"data       {cfg['samples']:,} synthetic uint8 {cfg['input_shape']} samples, {cfg['classes']} classes; "
        f"cache {cfg['cache_bytes'] / 2**20:.1f} MiB, read with {cfg['workers']} DataLoader worker(s)",
        f"models     teacher {cfg['teacher']} ({cfg['teacher_params']:,} parameters, eval, no_grad), student {cfg['student']} "
        f"({cfg['student_params']:,} parameters), batch {cfg['batch_size']}, {trainer.loss} T={trainer.temperature} alpha={trainer.alpha}, "
        f"AdamW lr {trainer.lr}",
    )  # fmt: skip
    print(f"\nSeconds per epoch, median of {cfg['repeats']} alternating rounds (each timing >= {cfg['min_seconds']} s of whole epochs)")
    harness.table(
        [("", ""), ("s/epoch", ".3f"), ("samples/s", ",.0f"), ("fetch s/epoch", ".4f"), ("faults/epoch", ",.0f"), ("CPU s/epoch", ".2f")],
        [[f"t_{kind}", result[f"t_{kind}_s"], cfg["samples"] / result[f"t_{kind}_s"], detail[f"{kind}_fetch_s_per_epoch"],
          detail[f"{kind}_faults_per_epoch"], detail[f"{kind}_cpu_s_per_epoch"]] for kind in KINDS],
    )  # fmt: skip
    print(f"fill       {result['fill_s']:.3f} s once: teacher {result['fill_forward_s']:.3f} s + write {result['fill_write_s']:.3f} s\n")
    p3 = "p3_offline_speedup_vs_ideal"
    harness.table(
        [("figure", ""), ("value", ".3f"), ("target", ""), ("met", ""), ("per round", "")],
        [["speed-up ideal (t_teacher+t_student)/t_student", result["speedup_ideal"], None, None, None],
         ["speed-up measured t_online/t_offline", result["speedup_measured"], None, None, None],
         ["measured / ideal, median of rounds", result[p3], harness.target(p3), harness.YES[result["target_met"]],
          " ".join(f"{r:.3f}" for r in detail["ratio_per_round"])],
         ["measured / ideal, from the medians", result["ratio_of_medians"], None, None, None],
         ["break-even, epochs (fill / saved per epoch)", result["break_even_epochs"], None, None, None]],
    )  # fmt: skip
    harness.noise_warning(result["max_foreign_cpu"])
    print()
    print("  ".join(f"{k}={result[k]}" for k in (p3, "speedup_measured", "speedup_ideal", "break_even_epochs")))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = harness.parser(__doc__, workdir_of="the cache")
    p.add_argument("--quick", action="store_true", help=f"small run, < 60 s on 2 cores (defaults become {QUICK})")
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
    p.add_argument("--warmup-batches", type=int, default=None,
                   help=f"untimed batches per side before the rounds (default {FULL['warmup_batches']})")  # fmt: skip
    p.add_argument(
        "--malloc", choices=("trainer", "glibc"), default="trainer",
        help="glibc malloc of the timed sides: offline-distill's settings (offline.malloc.tune_malloc), or glibc's own defaults",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    harness.add_side_options(p, KINDS)
    return harness.parse(p, argv, QUICK, FULL)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.side:
        return side_main(args)
    if args.malloc == "trainer":
        tune_malloc()  # the fill stands for teacher-serve, which tunes malloc at start
    with harness.workdir("bench-online-", args.tmpdir, args.keep) as root:
        harness.say(f"filling a {args.samples:,}-sample cache with {args.teacher} in {root} ...")
        fill = fill_cache(root / "cache", args, torch.device(args.device))
        harness.say(f"  filled in {fill['fill_s']:.1f} s")
        if args.workers is None:
            args.workers = default_workers(fill["cache_bytes"])
        shape = tuple(args.input_shape)
        harness.say(f"timing online, offline ({args.workers} workers), teacher, student: {args.repeats} rounds ...")
        detail = measure(root / "cache", args)
        t = detail["median_epoch_s"]
        ratios = speedups(t)  # from the medians of the four timings: reported beside the P3 figure
        saved = t["online"] - t["offline"]
        env = harness.environment(args.device)
        p3 = detail["ratio_median_of_rounds"]
        result = {
            # Each round's four timings are taken within seconds of each other, so a round's ratio
            # cancels the machine's drift (±10% over a minute on a shared 2-core VM); the figure is
            # the median of those paired ratios. The ratio of the four medians is kept beside it.
            "p3_offline_speedup_vs_ideal": round(p3, 4), "ratio_of_medians": round(ratios["ratio"], 4),
            "speedup_measured": round(ratios["measured"], 3), "speedup_ideal": round(ratios["ideal"], 3),
            **{f"t_{kind}_s": round(t[kind], 4) for kind in KINDS},
            **{key: round(fill[key], 4) for key in ("fill_s", "fill_forward_s", "fill_write_s")},
            "break_even_epochs": round(fill["fill_s"] / saved, 3) if saved > 0 else None,
            "online_vs_sum": round(t["online"] / (t["teacher"] + t["student"]), 4),  # > 1: the shared loop costs extra
            "student_vs_offline": round(t["student"] / t["offline"], 4),  # < 1: the reader costs extra
            "target": f"{harness.target('p3_offline_speedup_vs_ideal')} (measured / ideal speed-up)",
            "target_met": harness.met("p3_offline_speedup_vs_ideal", p3),
            "max_foreign_cpu": detail["max_foreign_cpu"], "device": env["device"], "torch": env["torch"], "env": env,
            "config": {
                **{k: v for k, v in vars(args).items() if k not in ("json", "tmpdir", "keep", "side", "side_cache")},
                "cache_bytes": fill["cache_bytes"],
                "teacher_params": models.count_parameters(models.build(args.teacher, shape, args.classes)),
                "student_params": models.count_parameters(models.build(args.student, shape, args.classes)),
            },
            "detail": detail,
        }  # fmt: skip
        harness.emit(result, args.json, print_tables)
    return 0


if __name__ == "__main__":
    sys.exit(main())
