"""Logits dtype benchmark: what does ``teacher-serve --logits-dtype float16`` save, and what does it cost?

Two questions, answered side by side in one run:

* **Bytes per sample.** The same rows (ids, inputs, labels, logits) are written twice with
  ``offline.cache.CacheWriter`` (the one writer the service uses too), once with float32 logits
  and once with float16, and the published cache's bytes (shards as listed in the manifest) are
  divided by its samples. Three cases: the digits demo's transfer set (1,257 uint8 8x8 samples,
  10 classes), a CIFAR-sized synthetic case with 1000 classes (uint8 [3,32,32], 4,096 samples),
  and a 1000-class case with digits-sized inputs (uint8 [8,8]), where the logits are nearly the
  whole row. Shards are written uncompressed (the service's default), so the byte counts do not
  depend on the logits' values; they are drawn from a normal distribution (sd 5).
* **Accuracy.** ``distill-demo --json --seeds 3`` runs twice, with ``TEACHER_SERVE_LOGITS_DTYPE``
  set to float32 and then float16 (every ``teacher-serve`` option is also an environment
  variable, and the demo's server inherits the environment, so the demo needs no flag). The
  demo's teacher is trained with fixed seeds, so both runs should serve the same teacher: the
  benchmark checks that the two teachers' test accuracies agree and compares the two caches'
  logits row by row (max abs difference, and whether the argmax and the soft targets at the
  serving temperature agree). Reported: the distilled student's and the labels-only student's
  test accuracy, mean and sample std over the 3 seeds, both ways. The labels-only arm
  (``--alpha 0``) never reads the logits, so it must come out identical: a control.

    .venv/bin/python bench/logits_dtype.py                # about 3 minutes on 2 cores
    .venv/bin/python bench/logits_dtype.py --json
    .venv/bin/python bench/logits_dtype.py --bytes-only   # a few seconds
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import numpy as np  # noqa: E402
from kdcache.offline.cache import CacheMeta, CacheReader, CacheWriter, Preprocessing  # noqa: E402

BIN = Path(sys.executable).parent
DTYPES = ("float32", "float16")
# (name, input shape, classes, samples)
CASES = (
    ("digits (demo transfer set)", (8, 8), 10, 1257),
    ("synthetic, CIFAR-sized inputs", (3, 32, 32), 1000, 4096),
    ("synthetic, digits-sized inputs", (8, 8), 1000, 4096),
)


def say(message: str) -> None:  # progress on stderr, so that --json output stays one object
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Bytes per sample


def write_cache(directory: Path, shape: tuple[int, ...], classes: int, samples: int, logits_dtype: str, seed: int) -> dict[str, Any]:
    """``samples`` rows, as teacher-push would send them (integer ids, 10% labelled), through
    CacheWriter with ``logits_dtype``; the published cache's bytes per sample."""
    rng = np.random.default_rng(seed)
    inputs = rng.integers(0, 17, (samples, *shape), dtype=np.uint8)
    logits = (rng.standard_normal((samples, classes)) * 5).astype(np.float32)
    labels = np.where(rng.random(samples) < 0.1, rng.integers(0, classes, samples), -1).astype(np.int64)
    meta = CacheMeta(
        teacher_fingerprint="bench-logits-dtype", teacher_name="synthetic", num_classes=classes, input_shape=shape,
        input_dtype="uint8", preprocessing=Preprocessing(scale=1 / 16), temperature=4.0, logits_dtype=logits_dtype,
    )  # fmt: skip
    with CacheWriter(directory, meta) as writer:
        for start in range(0, samples, 256):  # the service appends one batch at a time
            stop = start + 256
            writer.append(np.arange(start, min(stop, samples)), inputs[start:stop], logits[start:stop], labels[start:stop])
    reader = CacheReader(directory)
    stored = reader.read(("logits",))["logits"]
    return {
        "samples": reader.num_samples,
        "bytes": reader.total_bytes,
        "bytes_per_sample": reader.total_bytes / reader.num_samples,
        "row_bytes_without_id": meta.row_bytes(),
        "logits_bytes_per_sample": classes * np.dtype(logits_dtype).itemsize,
        "stored_dtype": str(stored.dtype),
        "max_abs_logit_error": float(np.abs(stored.astype(np.float32) - logits).max()),
    }


def bytes_table(root: Path, seed: int) -> list[dict[str, Any]]:
    rows = []
    for name, shape, classes, samples in CASES:
        row: dict[str, Any] = {"case": name, "input_shape": list(shape), "classes": classes, "samples": samples}
        for dtype in DTYPES:
            tag = f"{name.split()[0]}-{classes}-{'x'.join(map(str, shape))}-{dtype}"
            row[dtype] = write_cache(root / f"bytes-{tag}", shape, classes, samples, dtype, seed)
        row["ratio_float16_vs_float32"] = row["float16"]["bytes_per_sample"] / row["float32"]["bytes_per_sample"]
        rows.append(row)
        say(f"{name}: {row['float32']['bytes_per_sample']:.1f} -> {row['float16']['bytes_per_sample']:.1f} bytes/sample")
    return rows


# ---------------------------------------------------------------------------------------------
# Accuracy: the digits demo, both ways


def run_demo(out: Path, logits_dtype: str, seeds: int) -> dict[str, Any]:
    env = {**os.environ, "TEACHER_SERVE_LOGITS_DTYPE": logits_dtype}
    command = [str(BIN / "distill-demo"), "--json", "--seeds", str(seeds), "--out", str(out)]
    say(f"TEACHER_SERVE_LOGITS_DTYPE={logits_dtype} {shlex.join(command)} ...")
    started = time.perf_counter()
    proc = subprocess.run(command, env=env, capture_output=True, text=True, cwd=_HERE.parent)
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


def softmax(logits: np.ndarray, temperature: float) -> np.ndarray:
    z = logits / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


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
        out["max_abs_soft_target_difference"] = float(np.abs(softmax(logits32, temperature) - softmax(logits16, temperature)).max())
    for dtype, s in summaries.items():
        for arm in ("distilled", "labels_only"):
            out[f"{arm}_{dtype}"] = {"mean": s["arms"][arm]["mean"], "std": s["arms"][arm]["std"], "per_seed": s["arms"][arm]["accuracies"]}
        out[f"demo_cache_bytes_per_sample_{dtype}"] = s["cache"]["bytes_per_sample"]
        out[f"demo_wall_s_{dtype}"] = s["wall_s"]
        out["settings"] = s["settings"]
    return out


# ---------------------------------------------------------------------------------------------
# Report


def environment(cpu: str) -> dict[str, Any]:
    import h5py
    import torch

    return {
        "command": shlex.join(getattr(sys, "orig_argv", [sys.executable, *sys.argv])),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "h5py": h5py.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def print_report(result: dict[str, Any]) -> None:
    env = result["env"]
    print("bench/logits_dtype.py: float32 vs float16 cached logits")
    print(f"command    {env['command']}")
    print(f"date       {env['date']}")
    print(
        f"hardware   {env['cpu']}, {env['cpus']} CPUs; torch {env['torch']}, h5py {env['h5py']}, numpy {env['numpy']}, python {env['python']}"
    )
    print()
    print("Bytes per sample of the published cache (CacheWriter, uncompressed shards, manifest bytes / samples)")
    print(f"{'case':<32}  {'input':>9}  {'classes':>7}  {'samples':>7}  {'float32':>9}  {'float16':>9}  {'float16/float32':>15}")
    for row in result["bytes"]:
        shape = "x".join(map(str, row["input_shape"]))
        print(f"{row['case']:<32}  {shape:>9}  {row['classes']:>7}  {row['samples']:>7}  {row['float32']['bytes_per_sample']:>9.1f}  "
              f"{row['float16']['bytes_per_sample']:>9.1f}  {row['ratio_float16_vs_float32']:>15.3f}")  # fmt: skip
    acc = result.get("accuracy")
    if not acc:
        return
    print()
    print(f"distill-demo --json --seeds {acc['seeds']}, once per TEACHER_SERVE_LOGITS_DTYPE (test accuracy, mean ± sample std over seeds)")
    print(f"{'logits':>8}  {'distilled':>24}  {'labels only (control)':>24}  {'demo cache B/sample':>19}  {'teacher acc':>11}")
    for dtype in DTYPES:
        d, c = acc[f"distilled_{dtype}"], acc[f"labels_only_{dtype}"]
        print(f"{dtype:>8}  {d['mean']:.4f} ± {d['std']:.4f}{'':>9}  {c['mean']:.4f} ± {c['std']:.4f}{'':>9}  "
              f"{acc[f'demo_cache_bytes_per_sample_{dtype}']:>19.1f}  {acc['teacher_accuracy'][dtype]:>11.4f}")  # fmt: skip
        print(f"{'':>8}  per seed: {', '.join(f'{v:.4f}' for v in d['per_seed'])}; control: {', '.join(f'{v:.4f}' for v in c['per_seed'])}")
    if "max_abs_logit_difference" in acc:
        print(f"same teacher: {acc['same_teacher_accuracy']}; cached logits float16 vs float32: max abs difference "
              f"{acc['max_abs_logit_difference']:.2e}, argmax agreement {acc['argmax_agreement']:.4f}, "
              f"max abs soft-target difference at T={acc['settings']['temperature']:g} {acc['max_abs_soft_target_difference']:.2e}")  # fmt: skip
    print()
    keys = (
        "bytes_per_sample_float32",
        "bytes_per_sample_float16",
        "acc_float32_mean",
        "acc_float32_std",
        "acc_float16_mean",
        "acc_float16_std",
    )
    print("  ".join(f"{k}={result[k]}" for k in keys if k in result))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the tables")
    p.add_argument("--seeds", type=int, default=3, help="student seeds per demo run")
    p.add_argument("--bytes-only", action="store_true", help="skip the two demo runs (bytes per sample only, a few seconds)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic rows")
    p.add_argument("--tmpdir", default=None, help="where the caches and demo runs go (default: the system's temporary directory)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = p.parse_args(argv)

    spec = importlib.util.spec_from_file_location("bench_reader", _HERE / "reader.py")  # cpu_model's one home
    assert spec is not None and spec.loader is not None
    helpers = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = helpers  # its dataclasses look their module up there
    spec.loader.exec_module(helpers)

    root = Path(tempfile.mkdtemp(prefix="bench-logits-dtype-", dir=args.tmpdir))
    try:
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
        result["env"] = environment(helpers.cpu_model())
        if args.json:
            print(json.dumps(result, indent=1, default=str))
        else:
            print_report(result)
        return 0
    finally:
        if args.keep:
            say(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
