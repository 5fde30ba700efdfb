"""Every benchmark, one after another, and one table of the figures the project promises.

    .venv/bin/python bench/run.py [--quick] [--device cpu|cuda] [--json]

Runs ``python -m bench.service``, ``bench.reader`` and ``bench.online`` one at a time, so that
they never compete for the machine, with ``--json`` (``--quick`` and ``--device`` passed on), and
reads from their JSON P1 (service ÷ raw forward), P2 and P4 (for the worker count that
``offline-distill`` picks by itself, ``default_workers``) and P3; the targets are
``harness.TARGETS``, the methods in docs/benchmarks.md. Progress, one line per benchmark, goes
to stderr. A benchmark that fails, or whose JSON lacks a figure, does not stop the others: the
table says so and the exit status is 1. ``--json`` prints the four figures
(``p1_service_vs_forward``, ``p2_reader_vs_memory``, ``p3_offline_speedup_vs_ideal``,
``p4_rss_growth_10x``), ``targets``, ``met``, ``errors``, ``device``, ``torch``, the seconds per
benchmark and each benchmark's JSON under ``details``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if not __package__:  # run as a file (python bench/run.py): import bench from the repository root, as -m does
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch

from bench import harness
from kdcache.offline.train import default_workers

BENCHMARKS = ("service", "reader", "online")  # python -m bench.NAME, each takes --json, --quick and --device
# Under --quick, extra arguments that keep the whole run under 3 minutes on 2 cores: the
# reader's quick cache is far below the trainer's worker threshold, so offline-distill reads
# it with 0 workers, and its throughput row with 2 workers (about 25 s) is not needed for P2.
QUICK_EXTRA = {"reader": ["--workers", "0"]}
DESCRIPTIONS = {
    "p1_service_vs_forward": "P1 teacher-serve durable ÷ raw forward",
    "p2_reader_vs_memory": "P2 steps/s shards ÷ memory (default workers)",
    "p3_offline_speedup_vs_ideal": "P3 offline speed-up ÷ ideal",
    "p4_rss_growth_10x": "P4 peak RSS 10x cache ÷ 1x (default workers)",
}


def p2(reader: dict[str, Any]) -> float:
    workers = default_workers(reader["config"]["cache_bytes"])
    rows = [r for r in reader["throughput"] if r["workers"] == workers and r["malloc"] == "trainer"]
    if not rows:
        raise KeyError(f"no throughput row for {workers} workers with the trainer's malloc settings")
    return round(rows[0]["ratio"], 4)


# figure -> (benchmark, how to read it from that benchmark's JSON)
FIGURES: dict[str, tuple[str, Callable[[dict[str, Any]], float]]] = {
    "p1_service_vs_forward": ("service", lambda r: r["ratio_durable_vs_raw"]),
    "p2_reader_vs_memory": ("reader", p2),
    "p3_offline_speedup_vs_ideal": ("online", lambda r: r["p3_offline_speedup_vs_ideal"]),
    "p4_rss_growth_10x": ("reader", lambda r: r["rss_growth_10x_default"]),
}


def run_benchmark(name: str, args: argparse.Namespace) -> tuple[dict[str, Any] | None, str | None, float]:
    """(its JSON, None) or (None, a one-line error), and the seconds it took."""
    cmd = harness.module(name, "--json", "--device", args.device)
    if args.quick:
        cmd += ["--quick", *QUICK_EXTRA.get(name, [])]
    started = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=harness.child_env())
    except subprocess.TimeoutExpired:
        return None, f"{shlex.join(cmd)}: no result after {args.timeout:.0f} s", time.perf_counter() - started
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        last = next((line for line in reversed(proc.stderr.splitlines()) if line.strip()), "no output on stderr")
        return None, f"{shlex.join(cmd)} exited with {proc.returncode}: {last.strip()}", seconds
    try:
        return json.loads(proc.stdout), None, seconds
    except json.JSONDecodeError as exc:
        return None, f"{shlex.join(cmd)}: its stdout is not one JSON object ({exc})", seconds


def print_table(result: dict[str, Any]) -> None:
    print(f"bench/run.py{' --quick' if result['quick'] else ''}, device {result['device']}, torch {result['torch']}, {result['date']}")
    harness.table(
        [("figure", ""), ("measured", ""), ("target", ""), ("met", "")],
        [[DESCRIPTIONS[key], "error" if value is None else format(value, ".3f"), harness.target(key),
          harness.YES[result["met"][key]]] for key, value in result.items() if key in DESCRIPTIONS],
    )  # fmt: skip
    print("seconds: " + ", ".join(f"{k} {v}" for k, v in result["seconds"].items()))
    for key, error in result["errors"].items():
        print(f"error ({key}): {error}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="each benchmark's --quick (under 3 minutes in all on 2 cores)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="passed to the benchmarks that take it")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds one benchmark may take before it counts as failed")
    args = p.parse_args(argv)

    started = time.perf_counter()
    details: dict[str, Any] = {}
    errors: dict[str, str] = {}
    seconds: dict[str, float] = {}
    for i, name in enumerate(BENCHMARKS, 1):
        harness.say(f"[{i}/{len(BENCHMARKS)}] bench.{name} ...")
        result, error, seconds[name] = run_benchmark(name, args)
        if error:
            errors[name] = error
            harness.say(f"[{i}/{len(BENCHMARKS)}] bench.{name} FAILED after {seconds[name]:.1f} s: {error}")
        else:
            details[name] = result
            harness.say(f"[{i}/{len(BENCHMARKS)}] bench.{name} done in {seconds[name]:.1f} s")

    figures: dict[str, float | None] = dict.fromkeys(FIGURES)
    for key, (name, read) in FIGURES.items():
        if name in details:
            try:
                figures[key] = float(read(details[name]))
            except (KeyError, TypeError, ValueError, IndexError) as exc:
                errors[key] = f"bench.{name}'s JSON has no {key} ({type(exc).__name__}: {exc})"
    device = next((details[name]["device"] for name in ("online", "service") if details.get(name, {}).get("device")), args.device)
    result = {
        **figures,
        "targets": {key: harness.target(key) for key in harness.TARGETS},
        "met": {key: harness.met(key, value) for key, value in figures.items()},
        "errors": errors,
        "device": device,
        "torch": torch.__version__,
        "quick": args.quick,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "seconds": {**{k: round(v, 1) for k, v in seconds.items()}, "total": round(time.perf_counter() - started, 1)},
        "details": details,
    }
    harness.emit(result, args.json, print_table)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
