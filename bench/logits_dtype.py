"""Logits dtype benchmark: what does ``teacher-serve --logits-dtype float16`` save, and what does it cost?

Bytes per sample of the same rows written with float32 and with float16 logits (three cases),
and the digits demo's test accuracy (``distill-demo --json --seeds N``) with each, with a
row-by-row comparison of the two caches' logits. No target: the figures are reported. The
method: docs/benchmarks.md, "Logits dtype".

    .venv/bin/python -m bench.logits_dtype                # about 3 minutes on 2 cores
    .venv/bin/python -m bench.logits_dtype --bytes-only   # a few seconds
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench import harness
from kdcache.offline.cache import CacheReader

DTYPES = ("float32", "float16")
# (name, input shape, classes, samples)
CASES = (
    ("digits (demo transfer set)", (8, 8), 10, 1257),
    ("synthetic, CIFAR-sized inputs", (3, 32, 32), 1000, 4096),
    ("synthetic, digits-sized inputs", (8, 8), 1000, 4096),
)


def bytes_per_sample(directory: Path, shape: tuple[int, ...], classes: int, samples: int, logits_dtype: str, seed: int) -> dict[str, Any]:
    """The published cache's bytes per sample, for rows written with ``logits_dtype``, and the
    logits as stored (float32 stores them exactly: the reference of the error)."""
    meta = harness.synthetic_meta(shape, classes, levels=17, teacher_fingerprint="bench-logits-dtype", logits_dtype=logits_dtype)
    reader = harness.synthetic_cache(directory, meta, samples, seed=seed, logit_scale=5.0, unlabelled=True)
    stored = reader.read(("logits",))["logits"]
    return {
        "samples": reader.num_samples,
        "bytes": reader.total_bytes,
        "bytes_per_sample": reader.total_bytes / reader.num_samples,
        "row_bytes_without_id": meta.row_bytes(),
        "logits_bytes_per_sample": classes * np.dtype(logits_dtype).itemsize,
        "stored_dtype": str(stored.dtype),
        "logits": stored.astype(np.float32),
    }


def bytes_table(root: Path, seed: int) -> list[dict[str, Any]]:
    rows = []
    for name, shape, classes, samples in CASES:
        row: dict[str, Any] = {"case": name, "input_shape": list(shape), "classes": classes, "samples": samples}
        for dtype in DTYPES:
            tag = f"{name.split()[0]}-{classes}-{'x'.join(map(str, shape))}-{dtype}"
            row[dtype] = bytes_per_sample(root / f"bytes-{tag}", shape, classes, samples, dtype, seed)
        written = row["float32"]["logits"]  # the same rows each time (same seed), and float32 stores them exactly
        for dtype in DTYPES:
            row[dtype]["max_abs_logit_error"] = float(np.abs(row[dtype].pop("logits") - written).max())
        row["ratio_float16_vs_float32"] = row["float16"]["bytes_per_sample"] / row["float32"]["bytes_per_sample"]
        rows.append(row)
        harness.say(f"{name}: {row['float32']['bytes_per_sample']:.1f} -> {row['float16']['bytes_per_sample']:.1f} bytes/sample")
    return rows


# ---------------------------------------------------------------------------------------------
# Accuracy: the digits demo, both ways


def run_demo(out: Path, logits_dtype: str, seeds: int) -> dict[str, Any]:
    env = {**os.environ, "TEACHER_SERVE_LOGITS_DTYPE": logits_dtype}
    command = [str(harness.BIN / "distill-demo"), "--json", "--seeds", str(seeds), "--out", str(out)]
    harness.say(f"TEACHER_SERVE_LOGITS_DTYPE={logits_dtype} {shlex.join(command)} ...")
    started = time.perf_counter()
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"distill-demo exited with {proc.returncode}:\n{proc.stderr[-3000:]}")
    summary = json.loads(proc.stdout)
    summary["wall_s"] = time.perf_counter() - started
    reader = CacheReader(out / "cache")
    if reader.meta.logits_dtype != logits_dtype:
        raise SystemExit(f"{out / 'cache'}: logits_dtype is {reader.meta.logits_dtype}, expected {logits_dtype}")
    return summary


def cache_logits(out: Path) -> tuple[np.ndarray, np.ndarray]:
    """(ids as int, logits as float32) of the demo's cache, sorted by id."""
    fields = CacheReader(out / "cache").read(("ids", "logits"))
    ids = np.array([int(i) for i in fields["ids"]])
    order = np.argsort(ids)
    return ids[order], fields["logits"][order].astype(np.float32)


def accuracy_comparison(root: Path, seeds: int) -> dict[str, Any]:
    summaries = {dtype: run_demo(root / f"demo-{dtype}", dtype, seeds) for dtype in DTYPES}
    ids32, logits32 = cache_logits(root / "demo-float32")
    ids16, logits16 = cache_logits(root / "demo-float16")
    same_ids = bool(np.array_equal(ids32, ids16))
    temperature = summaries["float32"]["settings"]["temperature"]
    out: dict[str, Any] = {
        "seeds": seeds,
        "same_teacher_accuracy": summaries["float32"]["teacher"]["test_accuracy"] == summaries["float16"]["teacher"]["test_accuracy"],
        "teacher_accuracy": {dtype: s["teacher"]["test_accuracy"] for dtype, s in summaries.items()},
        "same_ids": same_ids,
    }
    if same_ids:
        out["max_abs_logit_difference"] = float(np.abs(logits32 - logits16).max())
        out["argmax_agreement"] = float((logits32.argmax(1) == logits16.argmax(1)).mean())
        soft32, soft16 = (torch.softmax(torch.from_numpy(logits) / temperature, dim=1) for logits in (logits32, logits16))
        out["max_abs_soft_target_difference"] = float((soft32 - soft16).abs().max())
    for dtype, s in summaries.items():
        for arm in ("distilled", "labels_only"):
            out[f"{arm}_{dtype}"] = {"mean": s["arms"][arm]["mean"], "std": s["arms"][arm]["std"], "per_seed": s["arms"][arm]["accuracies"]}
        out[f"demo_cache_bytes_per_sample_{dtype}"] = s["cache"]["bytes_per_sample"]
        out[f"demo_wall_s_{dtype}"] = s["wall_s"]
        out["settings"] = s["settings"]
    return out


# ---------------------------------------------------------------------------------------------
# Report


def print_report(result: dict[str, Any]) -> None:
    harness.print_header("bench.logits_dtype: float32 vs float16 cached logits", result["env"])
    print("\nBytes per sample of the published cache (CacheWriter, uncompressed shards, manifest bytes / samples)")
    harness.table(
        [("case", ""), ("input", ""), ("classes", ""), ("samples", ""), ("float32", ".1f"), ("float16", ".1f"), ("float16/float32", ".3f")],
        [[row["case"], "x".join(map(str, row["input_shape"])), row["classes"], row["samples"], row["float32"]["bytes_per_sample"],
          row["float16"]["bytes_per_sample"], row["ratio_float16_vs_float32"]] for row in result["bytes"]],
    )  # fmt: skip
    acc = result.get("accuracy")
    if not acc:
        return
    print(
        f"\ndistill-demo --json --seeds {acc['seeds']}, once per TEACHER_SERVE_LOGITS_DTYPE (test accuracy, mean ± sample std over seeds)"
    )
    harness.table(
        [("logits", ""), ("distilled", ""), ("labels only (control)", ""), ("demo cache B/sample", ".1f"), ("teacher acc", ".4f"),
         ("distilled per seed; control per seed", "")],
        [[dtype, f"{d['mean']:.4f} ± {d['std']:.4f}", f"{c['mean']:.4f} ± {c['std']:.4f}", acc[f"demo_cache_bytes_per_sample_{dtype}"],
          acc["teacher_accuracy"][dtype], f"{', '.join(f'{v:.4f}' for v in d['per_seed'])}; {', '.join(f'{v:.4f}' for v in c['per_seed'])}"]
         for dtype in DTYPES for d, c in [(acc[f"distilled_{dtype}"], acc[f"labels_only_{dtype}"])]],
    )  # fmt: skip
    if "max_abs_logit_difference" in acc:
        print(f"same teacher: {acc['same_teacher_accuracy']}; cached logits float16 vs float32: max abs difference "
              f"{acc['max_abs_logit_difference']:.2e}, argmax agreement {acc['argmax_agreement']:.4f}, "
              f"max abs soft-target difference at T={acc['settings']['temperature']:g} {acc['max_abs_soft_target_difference']:.2e}")  # fmt: skip
    keys = (
        "bytes_per_sample_float32",
        "bytes_per_sample_float16",
        "acc_float32_mean",
        "acc_float32_std",
        "acc_float16_mean",
        "acc_float16_std",
    )
    print("\n" + "  ".join(f"{k}={result[k]}" for k in keys if k in result))


def main(argv: list[str] | None = None) -> int:
    p = harness.parser(__doc__, workdir_of="the caches and demo runs")
    p.add_argument("--seeds", type=int, default=3, help="student seeds per demo run")
    p.add_argument("--bytes-only", action="store_true", help="skip the two demo runs (bytes per sample only, a few seconds)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic rows")
    args = p.parse_args(argv)
    with harness.workdir("bench-logits-dtype-", args.tmpdir, args.keep) as root:
        table = bytes_table(root, args.seed)
        result: dict[str, Any] = {
            # The headline bytes: the digits demo's cache.
            "bytes_per_sample_float32": round(table[0]["float32"]["bytes_per_sample"], 2),
            "bytes_per_sample_float16": round(table[0]["float16"]["bytes_per_sample"], 2),
            "bytes_per_sample_1000_classes_float32": round(table[1]["float32"]["bytes_per_sample"], 2),
            "bytes_per_sample_1000_classes_float16": round(table[1]["float16"]["bytes_per_sample"], 2),
            "bytes": table,
        }
        if not args.bytes_only:
            acc = accuracy_comparison(root, args.seeds)
            for dtype in DTYPES:
                result[f"acc_{dtype}_mean"] = round(acc[f"distilled_{dtype}"]["mean"], 4)
                result[f"acc_{dtype}_std"] = round(acc[f"distilled_{dtype}"]["std"], 4)
            result["acc_difference_float16_minus_float32"] = round(result["acc_float16_mean"] - result["acc_float32_mean"], 4)
            result["accuracy"] = acc
        result["env"] = harness.environment()
        harness.emit(result, args.json, print_report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
