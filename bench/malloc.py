"""Does ``offline-distill``'s malloc setting pay? The same training run, with and without it.

``offline-distill`` calls ``offline.malloc.tune_malloc`` at start (glibc keeps freed memory for
the next step). This runs real ``offline-distill`` subprocesses on one synthetic cache (bench/
reader.py's ``write_cache``), alternating the trainer's setting with glibc's own defaults
(``MALLOC_ARENA_MAX=0`` in the environment, which turns ``tune_malloc`` off), ``--rounds`` pairs
per student in ABAB order, and prints the ``train_samples_per_s`` that each run writes to its
``metrics.json`` and the ratio tuned ÷ glibc of each pair.

    .venv/bin/python bench/malloc.py                 # about 2 minutes on 2 cores
    .venv/bin/python bench/malloc.py --json --students cnn-small --rounds 5
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

_HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("bench_reader", _HERE / "reader.py")
assert _spec is not None and _spec.loader is not None
_reader = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = _reader
_spec.loader.exec_module(_reader)

SETTINGS = {"trainer": {}, "glibc": _reader.GLIBC_DEFAULTS}


def distill(cache: Path, out: Path, student: str, epochs: int, env: dict[str, str]) -> tuple[float, float]:
    """One offline-distill run: its samples/s and its peak RSS in MiB (the trainer process; 0 workers here)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    cmd = [
        sys.executable, "-m", "kdcache.offline.cli", "--cache", str(cache), "--student", student, "--epochs", str(epochs),
        "--out", str(out), "--no-export", "--no-progress",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, env={**clean, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=_HERE.parent)
    assert proc.stderr is not None
    stderr = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"offline-distill failed ({proc.returncode}): {stderr.strip()[-500:]}")
    rate = float(json.loads((out / "metrics.json").read_text())["train_samples_per_s"])
    return rate, usage.ru_maxrss / 1024  # Linux: KiB


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--students", nargs="+", default=["cnn-small", "mlp"])
    p.add_argument("--samples", type=int, default=12000)
    p.add_argument("--input-shape", type=int, nargs="+", default=[3, 16, 16])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3, help="pairs (trainer, glibc) per student, order alternating")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    result: dict[str, Any] = {"command": " ".join(["bench/malloc.py", *(argv if argv is not None else sys.argv[1:])]), "students": {}}
    with tempfile.TemporaryDirectory(prefix="bench-malloc-") as tmp:
        cache = Path(tmp) / "cache"
        _reader.write_cache(cache, args.samples, tuple(args.input_shape), 10, 0, None)
        for student in args.students:
            runs: dict[str, list[float]] = {"trainer": [], "glibc": []}
            rss: dict[str, list[float]] = {"trainer": [], "glibc": []}
            for i in range(args.rounds):
                for kind in ("trainer", "glibc") if i % 2 == 0 else ("glibc", "trainer"):
                    out = Path(tmp) / f"run-{student}-{kind}-{i}"
                    rate, peak = distill(cache, out, student, args.epochs, SETTINGS[kind])
                    runs[kind].append(rate)
                    rss[kind].append(peak)
                    if not args.json:
                        print(f"{student:>10}  round {i}  {kind:>7}  {rate:>9,.0f} samples/s  peak RSS {peak:,.0f} MiB", flush=True)
            ratios = [t / g for t, g in zip(runs["trainer"], runs["glibc"], strict=True)]
            result["students"][student] = {
                **runs, "ratio_per_round": ratios, "ratio_median": statistics.median(ratios),
                "peak_rss_mib": rss, "rss_ratio_median": statistics.median(rss["trainer"]) / statistics.median(rss["glibc"]),
            }  # fmt: skip
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        for student, row in result["students"].items():
            per = ", ".join(f"{r:.2f}" for r in row["ratio_per_round"])
            print(
                f"{student}: offline-distill samples/s, trainer malloc ÷ glibc defaults: median {row['ratio_median']:.2f} "
                f"(per round {per}); peak RSS ratio {row['rss_ratio_median']:.2f}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
