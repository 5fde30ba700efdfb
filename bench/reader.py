"""Reader benchmark: does training from the shards cost anything, and does memory stay flat?

P2: training steps/s of ``offline-distill``'s own ``train_step`` fed from the shards
(``ShardStream`` behind the trainer's DataLoader) ÷ fed from the same rows in memory, each side
in its own child process, epochs alternating; target >= 0.95. P4: peak memory (Σ PSS of the
process tree, ``harness.TreeMemory``) of a real ``offline-distill --epochs 1`` on a cache of
10·S samples ÷ on S samples; target < 1.2. Both on synthetic caches in a temporary directory.
The method, and why each side has a process of its own: docs/benchmarks.md, "P2 and P4".

    .venv/bin/python -m bench.reader --quick      # < 90 s on 2 cores
    .venv/bin/python -m bench.reader              # a few minutes on 2 cores
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from bench import harness
from kdcache.offline import models
from kdcache.offline.cache import CacheReader
from kdcache.offline.dataset import DEFAULT_SHUFFLE_BUFFER
from kdcache.offline.malloc import tune_malloc
from kdcache.offline.train import default_workers

QUICK = {"samples": 4096, "rss_samples": 2048, "repeats": 5, "epochs_per_repeat": 2, "malloc": "trainer"}
FULL = {"samples": 12000, "rss_samples": 10000, "repeats": 6, "epochs_per_repeat": 1, "malloc": "both"}
SIDE_OPTIONS = ("workers", "student", "batch_size", "seed", "shuffle_buffer", "device", "epochs_per_repeat")


def side_main(args: argparse.Namespace) -> int:
    """A child that trains one side (memory or shards) on request (``harness.serve_epochs``)."""
    tune_malloc()  # as offline-distill does; a no-op under --malloc glibc (GLIBC_DEFAULTS in the environment)
    reader = CacheReader(args.side_cache)
    device = torch.device(args.device)
    student = harness.Student(args.student, reader.meta, seed=args.seed, device=device)
    if args.side == "memory":
        batches = harness.memory_batches(reader, args.batch_size, args.seed)
    else:
        batches = harness.shard_batches(reader, args.batch_size, args.seed, args.shuffle_buffer, args.workers, device)
    return harness.serve_epochs(batches, student.step, harness.synchronizer(device), epochs=args.epochs_per_repeat)


def compare(reader: CacheReader, args: argparse.Namespace, workers: int, malloc: str) -> dict[str, Any]:
    """Alternate whole epochs of the two sides, each in its own process (see the module doc)."""
    side_args = argparse.Namespace(**{**vars(args), "workers": workers})
    commands = {kind: harness.side_command("reader", kind, reader.directory, side_args, SIDE_OPTIONS) for kind in ("memory", "shards")}
    with harness.side_processes(commands, harness.GLIBC_DEFAULTS if malloc == "glibc" else None) as sides:
        epoch = 1

        def run(kind: str) -> dict[str, Any]:
            nonlocal epoch
            figures = sides[kind].epoch(epoch)
            epoch += figures["epochs"]
            figures["samples_per_s"] = figures["samples"] / figures["seconds"]
            figures["steps_per_s"] = figures["samples_per_s"] / args.batch_size  # full-batch equivalent
            figures["raw_steps_per_s"] = figures["steps"] / figures["seconds"]
            return figures

        run("memory"), run("shards")  # warm-up: worker start-up, allocator, first touch of pages
        repeats = harness.alternate(("memory", "shards"), args.repeats, run)
    median = {kind: statistics.median(r["samples_per_s"] for r in runs) for kind, runs in repeats.items()}
    return {
        "workers": workers, "malloc": malloc,
        **{f"{kind}_steps_per_s": median[kind] / args.batch_size for kind in repeats},
        **{f"{kind}_samples_per_s": median[kind] for kind in repeats},
        "ratio": median["shards"] / median["memory"],
        "ratio_per_repeat": [s["samples_per_s"] / m["samples_per_s"] for s, m in zip(repeats["shards"], repeats["memory"], strict=True)],
        **{f"{kind}_faults_per_step": statistics.median(r["faults_per_step"] for r in runs) for kind, runs in repeats.items()},
        "max_foreign_cpu": max(r["foreign_cpu"] for side in repeats.values() for r in side),
        "max_steal": max(r["steal"] for side in repeats.values() for r in side),
        "repeats": repeats,
    }  # fmt: skip


def reader_alone(reader: CacheReader, args: argparse.Namespace, repeats: int = 7) -> dict[str, Any]:
    """The reader with no training step: epochs of ``ShardStream`` batches (0 workers, shuffled)
    against epochs of the same batches gathered from in-memory tensors, alternating in this
    process. What the reader costs per batch, before a step hides it."""
    memory = harness.memory_batches(reader, args.batch_size, args.seed)
    stream = harness.shard_stream(reader, args.batch_size, args.seed, args.shuffle_buffer)

    def rate(batches: Any) -> float:
        started = time.perf_counter()
        count = sum(1 for _ in batches)
        return count / (time.perf_counter() - started)

    rates: dict[str, list[float]] = {"shards": [], "memory": []}
    for epoch in range(repeats + 1):  # the first round warms up, untimed
        stream.set_epoch(epoch)
        shards, gathered = rate(iter(stream)), rate(memory(epoch))
        if epoch:
            rates["shards"].append(shards)
            rates["memory"].append(gathered)
    ratios = [s / m for s, m in zip(rates["shards"], rates["memory"], strict=True)]
    return {
        "shards_batches_per_s": statistics.median(rates["shards"]),
        "memory_batches_per_s": statistics.median(rates["memory"]),
        "ratio": statistics.median(ratios),
        "ratio_per_repeat": ratios,
    }


def distill_peak(cache: CacheReader, out: Path, args: argparse.Namespace, workers: int | None) -> dict[str, Any]:
    """Peak memory of one ``offline-distill --epochs 1`` process tree (``harness.TreeMemory``)."""
    memory = harness.TreeMemory(interval=args.poll_interval)
    extra = ["--batch-size", str(args.batch_size), "--seed", str(args.seed), "--device", args.device]
    extra += [] if workers is None else ["--workers", str(workers)]
    meter = harness.CpuMeter()
    run = harness.offline_distill(cache.directory, out, args.student, extra=extra, memory=memory)
    return {
        "samples": cache.num_samples, "workers_arg": "default" if workers is None else workers,
        "workers_used": default_workers(cache.total_bytes) if workers is None else workers, "cache_mib": cache.total_bytes / 2**20,
        "peak_pss_mib": memory.peak_pss_kib / 1024, "sum_hwm_mib": sum(memory.hwm_kib.values()) / 1024,
        "peak_sum_rss_mib": memory.peak_rss_kib / 1024, "main_hwm_mib": memory.hwm_kib.get(run["pid"], 0) / 1024,
        "processes": memory.max_processes, "polls": memory.samples, "wall_s": run["seconds"], **meter.stop(),
        "train_samples_per_s": run["metrics"].get("train_samples_per_s"), "command": run["command"],
    }  # fmt: skip


def print_tables(result: dict[str, Any]) -> None:
    env, cfg, trainer = result["env"], result["config"], harness.TRAINER
    harness.print_header(
        "bench.reader: ShardStream vs in-memory tensors; offline-distill peak memory vs cache size", env,
        f"data       {cfg['samples']:,} samples, uint8 {cfg['input_shape']}, {cfg['classes']} classes, float32 logits, "
        f"{cfg['shards']} shard(s), {cfg['cache_bytes'] / 2**20:.1f} MiB",
        f"student    {cfg['student']} ({cfg['student_params']:,} parameters), batch {cfg['batch_size']}, shuffle buffer "
        f"{cfg['shuffle_buffer']}, loss {trainer.loss} T={trainer.temperature} alpha={trainer.alpha}, AdamW (offline-distill's train_step)",
    )  # fmt: skip
    rows = result["throughput"]
    if rows:
        print(f"\nTraining throughput, median of {cfg['repeats']} alternating repeats of {cfg['epochs_per_repeat']} epoch(s) each "
              "(steps/s = samples/s / batch size)")  # fmt: skip
        harness.table(
            [("malloc", ""), ("workers", ""), ("memory steps/s", ".2f"), ("shards steps/s", ".2f"), ("ratio", ".3f"), ("target", ""),
             ("met", ""), ("faults/step mem|shards", ""), ("other CPU", ".1%"), ("per-repeat ratios", "")],
            [[r["malloc"], r["workers"], r["memory_steps_per_s"], r["shards_steps_per_s"], r["ratio"], harness.target("p2_reader_vs_memory"),
              harness.YES[harness.met("p2_reader_vs_memory", r["ratio"])], f"{r['memory_faults_per_step']:,.0f} | {r['shards_faults_per_step']:,.0f}",
              r["max_foreign_cpu"], " ".join(f"{v:.3f}" for v in r["ratio_per_repeat"])] for r in rows],
        )  # fmt: skip
    alone = result["reader_alone"]
    if alone:
        per = " ".join(f"{r:.2f}" for r in alone["ratio_per_repeat"])
        print(f"\nThe reader alone (no step, 0 workers): {alone['shards_batches_per_s']:,.0f} batches/s from the shards, "
              f"{alone['memory_batches_per_s']:,.0f} gathered from memory: {alone['ratio']:.2f}x (per repeat {per})")  # fmt: skip
    rss = result["rss"]
    if rss:
        print("\nPeak memory of `offline-distill --epochs 1 --no-export`, process tree (trainer + DataLoader workers)")
        print(f"  peak Σ PSS: polled every {cfg['poll_interval']} s (primary); Σ VmHWM: per-process high-water marks summed (upper bound)")
        harness.table(
            [("--workers", ""), ("used", ""), ("samples", ","), ("cache MiB", ".1f"), ("procs", ""), ("peak Σ PSS MiB", ".1f"),
             ("Σ VmHWM MiB", ".1f"), ("trainer VmHWM MiB", ".1f"), ("epoch samples/s", ",.0f"), ("wall s", ".1f"), ("other CPU", ".1%")],
            [[g["workers_arg"], run["workers_used"], run["samples"], run["cache_mib"], run["processes"], run["peak_pss_mib"], run["sum_hwm_mib"],
              run["main_hwm_mib"], run["train_samples_per_s"], run["wall_s"], run["foreign_cpu"]] for g in rss for run in (g["1x"], g["10x"])],
        )  # fmt: skip
        print()
        harness.table(
            [("--workers", ""), ("growth 10x (Σ PSS)", ".3f"), ("growth 10x (Σ VmHWM)", ".3f"), ("target", ""), ("met", "")],
            [[g["workers_arg"], g["growth_pss"], g["growth_hwm"], harness.target("p4_rss_growth_10x"),
              harness.YES[harness.met("p4_rss_growth_10x", g["growth_pss"])]] for g in rss],
        )  # fmt: skip
    harness.noise_warning(result["max_foreign_cpu"] or 0.0)
    print()
    print("  ".join(f"{k}={v}" for k, v in result.items() if k.startswith(("reader_vs_memory", "rss_growth"))))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = harness.parser(__doc__, workdir_of="the caches")
    p.add_argument("--quick", action="store_true", help=f"small run, < 90 s on 2 cores (defaults become {QUICK})")
    p.add_argument(
        "--samples", type=int, default=None, help=f"cache size for the throughput runs and S for memory (default {FULL['samples']})"
    )
    p.add_argument("--rss-samples", type=int, default=None,
                   help=f"S for the memory runs (default {FULL['rss_samples']}; --quick: {QUICK['rss_samples']}); the second run uses 10·S")  # fmt: skip
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
    p.add_argument("--epochs-per-repeat", type=int, default=None,
                   help=f"epochs per timed repeat (default {FULL['epochs_per_repeat']}; --quick {QUICK['epochs_per_repeat']})")  # fmt: skip
    p.add_argument(
        "--malloc", choices=("trainer", "glibc", "both"), default=None,
        help="glibc malloc settings of the throughput runs: offline-distill's (offline.malloc.tune_malloc), "
        "glibc's own defaults, or both (default: both; --quick: trainer)",
    )  # fmt: skip
    p.add_argument("--poll-interval", type=float, default=0.05, help="seconds between /proc samples of the memory runs")
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--skip-rss", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    harness.add_side_options(p, ("memory", "shards"))
    return harness.parse(p, argv, QUICK, FULL)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.side:
        return side_main(args)
    shape = tuple(args.input_shape)
    with harness.workdir("bench-reader-", args.tmpdir, args.keep) as root:

        def write_cache(name: str, samples: int, seed: int) -> CacheReader:
            harness.say(f"writing a {samples:,}-sample cache in {root} ...")
            meta = harness.synthetic_meta(shape, args.classes)
            options = {"max_samples": args.shard_samples} if args.shard_samples else {}
            return harness.synthetic_cache(root / name, meta, samples, seed=seed, label_margin=3.0, append_rows=8192, **options)

        reader = write_cache("cache-1x", args.samples, args.seed)
        throughput, alone, rss = [], None, []
        if not args.skip_throughput:
            for malloc in ("trainer", "glibc") if args.malloc == "both" else (args.malloc,):
                for workers in dict.fromkeys([args.workers, 0]):
                    harness.say(f"throughput: shards with {workers} worker(s) vs memory, {malloc} malloc, {args.repeats} repeats ...")
                    throughput.append(compare(reader, args, workers, malloc))
            harness.say("the reader alone: ShardStream vs gathering from memory, no training step ...")
            alone = reader_alone(reader, args)
        if not args.skip_rss:
            small = reader if args.rss_samples == args.samples else write_cache("cache-rss-1x", args.rss_samples, args.seed)
            large = write_cache("cache-rss-10x", 10 * args.rss_samples, args.seed + 1)
            for workers in (2, None):
                group: dict[str, Any] = {"workers_arg": "default" if workers is None else workers}
                for label, cache in (("1x", small), ("10x", large)):
                    harness.say(f"memory: offline-distill --workers {group['workers_arg']} on {cache.num_samples:,} samples ...")
                    group[label] = distill_peak(cache, root / f"run-{group['workers_arg']}-{label}", args, workers)
                group["growth_pss"] = group["10x"]["peak_pss_mib"] / group["1x"]["peak_pss_mib"]
                group["growth_hwm"] = group["10x"]["sum_hwm_mib"] / group["1x"]["sum_hwm_mib"]
                rss.append(group)

        def pick(rows: list[dict[str, Any]], key: str, **match: Any) -> float | None:
            found = [row[key] for row in rows if all(row[k] == v for k, v in match.items())]
            return round(found[0], 4) if found else None

        result = {
            "reader_vs_memory": pick(throughput, "ratio", workers=args.workers, malloc="trainer"),
            "reader_vs_memory_workers0": pick(throughput, "ratio", workers=0, malloc="trainer"),
            "reader_vs_memory_glibc_malloc": pick(throughput, "ratio", workers=args.workers, malloc="glibc"),
            "reader_vs_memory_workers0_glibc_malloc": pick(throughput, "ratio", workers=0, malloc="glibc"),
            "reader_alone_vs_memory_gather": round(alone["ratio"], 4) if alone else None,
            "reader_alone": alone,
            "rss_growth_10x": pick(rss, "growth_pss", workers_arg=2),
            "rss_growth_10x_default": pick(rss, "growth_pss", workers_arg="default"),
            "targets": {"reader_vs_memory": harness.target("p2_reader_vs_memory"), "rss_growth_10x": harness.target("p4_rss_growth_10x")},
            "max_foreign_cpu": max(
                [r["max_foreign_cpu"] for r in throughput] + [g[k]["foreign_cpu"] for g in rss for k in ("1x", "10x")], default=None
            ),  # fmt: skip
            "env": harness.environment(args.device),
            "config": {
                **{k: v for k, v in vars(args).items() if k not in ("json", "tmpdir", "keep")},
                "input_shape": list(shape),
                "shards": len(reader.shards),
                "cache_bytes": reader.total_bytes,
                "student_params": models.count_parameters(models.build(args.student, shape, args.classes)),
            },
            "throughput": throughput,
            "rss": rss,
        }
        harness.emit(result, args.json, print_tables)
    return 0


if __name__ == "__main__":
    sys.exit(main())
