"""Does ``offline-distill``'s malloc setting pay? The same training run, with and without it.

Real ``offline-distill`` runs on one synthetic cache, ``--rounds`` pairs per student alternating
the trainer's setting with glibc's defaults: samples/s and peak RSS, tuned ÷ glibc. The method:
docs/benchmarks.md, "The allocator setting".

    .venv/bin/python -m bench.malloc                 # about 2 minutes on 2 cores
    .venv/bin/python -m bench.malloc --json --students cnn-small --rounds 5
"""

from __future__ import annotations

import statistics
import sys
from typing import Any

from bench import harness

SETTINGS = {"trainer": {}, "glibc": harness.GLIBC_DEFAULTS}


def print_report(result: dict[str, Any]) -> None:
    for student, row in result["students"].items():
        per = ", ".join(f"{r:.2f}" for r in row["ratio_per_round"])
        print(f"{student}: offline-distill samples/s, trainer malloc ÷ glibc defaults: median {row['ratio_median']:.2f} "
              f"(per round {per}); peak RSS ratio {row['rss_ratio_median']:.2f}")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = harness.parser(__doc__)
    p.add_argument("--students", nargs="+", default=["cnn-small", "mlp"])
    p.add_argument("--samples", type=int, default=12000)
    p.add_argument("--input-shape", type=int, nargs="+", default=[3, 16, 16])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3, help="pairs (trainer, glibc) per student, order alternating")
    args = p.parse_args(argv)
    result: dict[str, Any] = {
        "command": " ".join(["python -m bench.malloc", *(argv if argv is not None else sys.argv[1:])]),
        "students": {},
    }
    with harness.workdir("bench-malloc-") as root:
        meta = harness.synthetic_meta(args.input_shape, 10)
        cache = harness.synthetic_cache(root / "cache", meta, args.samples, label_margin=3.0, append_rows=8192).directory
        for student in args.students:
            runs: dict[str, list[float]] = {"trainer": [], "glibc": []}
            rss: dict[str, list[float]] = {"trainer": [], "glibc": []}
            for i in range(args.rounds):
                for kind in ("trainer", "glibc") if i % 2 == 0 else ("glibc", "trainer"):
                    # The trainer process's own peak RSS (0 workers here).
                    run = harness.offline_distill(
                        cache, root / f"run-{student}-{kind}-{i}", student, epochs=args.epochs, env=SETTINGS[kind]
                    )
                    runs[kind].append(float(run["metrics"]["train_samples_per_s"]))
                    rss[kind].append(run["max_rss_mib"])
                    harness.say(
                        f"{student:>10}  round {i}  {kind:>7}  {runs[kind][-1]:>9,.0f} samples/s  peak RSS {rss[kind][-1]:,.0f} MiB"
                    )
            ratios = [t / g for t, g in zip(runs["trainer"], runs["glibc"], strict=True)]
            result["students"][student] = {
                **runs, "ratio_per_round": ratios, "ratio_median": statistics.median(ratios),
                "peak_rss_mib": rss, "rss_ratio_median": statistics.median(rss["trainer"]) / statistics.median(rss["glibc"]),
            }  # fmt: skip
    harness.emit(result, args.json, print_report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
