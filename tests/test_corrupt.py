"""Damaged caches, seen through the command lines: ``cache-inspect --verify`` names the damaged
file and fails; ``offline-distill`` stops with one line (exit 2), or with ``--skip-corrupt``
trains on what is left."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from digits import write_cache

from bench import corrupt as corrupt_bench  # the randomised damages and their checks, run at scale there
from kdcache.offline.cache import MANIFEST_NAME, CacheError, CacheReader

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
CACHE_INSPECT = BIN / "cache-inspect"
OFFLINE_DISTILL = BIN / "offline-distill"
NUM_SAMPLES = 300
MAX_SAMPLES = 64  # five shards: 4 x 64 + 44
VICTIM = "shard-000002.h5"
FOREIGN_FINGERPRINT = "f" * 64


def random_cache(directory: Path, seed: int, fingerprint: str = "0" * 64) -> Path:
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 17, size=(NUM_SAMPLES, 8, 8), dtype=np.uint8)
    logits = rng.normal(size=(NUM_SAMPLES, 10)).astype(np.float32)
    labels = rng.integers(0, 10, size=NUM_SAMPLES).astype(np.int64)
    return write_cache(directory, x, logits, labels, teacher_fingerprint=fingerprint, max_samples=MAX_SAMPLES)


def edit_manifest_entry(directory: Path, name: str, path: Path, num_samples: int) -> None:
    """Make the manifest describe ``path`` as shard ``name`` (what a careless copy would do)."""
    manifest = json.loads((directory / MANIFEST_NAME).read_text())
    for entry in manifest["shards"]:
        if entry["name"] == name:
            entry.update(sha256=hashlib.sha256(path.read_bytes()).hexdigest(), bytes=path.stat().st_size, num_samples=num_samples)
    (directory / MANIFEST_NAME).write_text(json.dumps(manifest))


# Each damage takes a fresh copy of the pristine cache and returns the file it damaged.


def truncate(directory: Path, _: Path) -> Path:
    path = directory / VICTIM
    size = path.stat().st_size
    with open(path, "r+b") as fh:
        fh.truncate(size // 2)
    return path


def flip_bytes(directory: Path, _: Path) -> Path:
    path = directory / VICTIM
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    for i in range(middle, middle + 64):
        data[i] ^= 0xA5
    path.write_bytes(bytes(data))
    return path


def delete_manifest(directory: Path, _: Path) -> Path:
    path = directory / MANIFEST_NAME
    path.unlink()
    return path


def delete_shard(directory: Path, _: Path) -> Path:
    path = directory / VICTIM
    path.unlink()
    return path


def garble_manifest(directory: Path, _: Path) -> Path:
    path = directory / MANIFEST_NAME
    path.write_text(path.read_text()[:100])
    return path


def stray_tmp(directory: Path, _: Path) -> Path:
    path = directory / ".shard-000005.h5.tmp"
    path.write_bytes(os.urandom(4096))
    return path


def foreign_shard(directory: Path, foreign: Path) -> Path:
    path = directory / "shard-000001.h5"
    shutil.copyfile(foreign / "shard-000001.h5", path)
    edit_manifest_entry(directory, "shard-000001.h5", path, MAX_SAMPLES)
    return path


def rewrite_shard(directory: Path, change) -> Path:
    """Rewrite shard 2 with h5py, valid HDF5 with ``change(columns, attrs)`` applied, and make the
    manifest describe the new file (size and checksum) but keep its sample count: only the
    structure checks can tell."""
    path = directory / VICTIM
    with h5py.File(path, "r") as h5:
        columns = {name: h5[name][()] for name in h5}
        attrs = dict(h5.attrs)
    change(columns, attrs)
    path.unlink()
    with h5py.File(path, "w") as h5:
        h5.attrs.update(attrs)
        for name, values in columns.items():
            h5.create_dataset(name, data=values, dtype=h5py.string_dtype() if name == "ids" else values.dtype)
    edit_manifest_entry(directory, VICTIM, path, MAX_SAMPLES)
    return path


def fewer_rows(directory: Path, _: Path) -> Path:
    return rewrite_shard(directory, lambda columns, attrs: columns.update({k: v[:50] for k, v in columns.items()}))


def logits_11_classes(directory: Path, _: Path) -> Path:
    return rewrite_shard(directory, lambda columns, attrs: columns.update(logits=np.zeros((MAX_SAMPLES, 11), np.float32)))


def short_logits(directory: Path, _: Path) -> Path:
    return rewrite_shard(directory, lambda columns, attrs: columns.update(logits=columns["logits"][:60]))


def float_labels(directory: Path, _: Path) -> Path:
    return rewrite_shard(directory, lambda columns, attrs: columns.update(labels=columns["labels"].astype(np.float64)))


def float16_logits(directory: Path, _: Path) -> Path:
    return rewrite_shard(directory, lambda columns, attrs: columns.update(logits=columns["logits"].astype(np.float16)))


def logits_not_a_dataset(directory: Path, _: Path) -> Path:
    """A group where the logits dataset belongs: h5py raises AttributeError on .shape."""
    path = rewrite_shard(directory, lambda columns, attrs: columns.pop("logits"))
    with h5py.File(path, "a") as h5:
        h5.create_group("logits")
    edit_manifest_entry(directory, VICTIM, path, MAX_SAMPLES)
    return path


def bad_label(directory: Path, _: Path) -> Path:
    """Shapes and dtypes right, one label out of range: only a read of the rows can tell."""
    return rewrite_shard(directory, lambda columns, attrs: columns["labels"].__setitem__(7, 99))


def nan_logits(directory: Path, _: Path) -> Path:
    return rewrite_shard(directory, lambda columns, attrs: columns["logits"].__setitem__((5, 3), np.nan))


DAMAGES = {
    "truncate": truncate,
    "flip": flip_bytes,
    "no-manifest": delete_manifest,
    "no-shard": delete_shard,
    "garbled-manifest": garble_manifest,
    "stray-tmp": stray_tmp,
    "foreign": foreign_shard,
    "fewer-rows": fewer_rows,
    "logits-11": logits_11_classes,
    "short-logits": short_logits,
    "float-labels": float_labels,
    "float16-logits": float16_logits,
    "logits-group": logits_not_a_dataset,
    "bad-label": bad_label,
    "nan-logits": nan_logits,
}
# (damage, extra arguments) for offline-distill; all run at once to keep the module fast.
DISTILL_RUNS = {
    "truncate": ("truncate", []),
    "truncate-skip": ("truncate", ["--skip-corrupt"]),
    "no-manifest": ("no-manifest", []),
    "foreign": ("foreign", []),
    # Without checksums (verified by default: see random-15) a byte flip is not noticed:
    # documented, tested as such.
    "flip-no-verify": ("flip", ["--no-verify-checksums"]),
    "stray-tmp": ("stray-tmp", []),
    # A randomised damage (bench.corrupt) that keeps the shard's size: only the checksum,
    # verified by default before HDF5 reads the shard, can see it.
    "random-15": ("random-15", []),
    "random-15-skip": ("random-15", ["--skip-corrupt"]),
}
# Seeds of bench.corrupt's damages checked through the command lines: 15 flips bytes of one
# shard (same size), 1 swaps two shards, 19 truncates one, 5 cuts the manifest.
RANDOM_CLI_SEEDS = (15, 1, 19, 5)


@pytest.fixture(scope="module")
def caches(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """{damage: (cache directory, damaged file)}, plus "pristine"."""
    root = tmp_path_factory.mktemp("corrupt")
    pristine = random_cache(root / "pristine", seed=0)
    foreign = random_cache(root / "other-teacher", seed=1, fingerprint=FOREIGN_FINGERPRINT)
    assert len(CacheReader(pristine).shards) == 5
    out = {"pristine": (pristine, pristine)}
    for name, damage in DAMAGES.items():
        directory = root / name
        shutil.copytree(pristine, directory)
        out[name] = (directory, damage(directory, foreign))
    return out


@pytest.fixture(scope="module")
def random_cases(tmp_path_factory) -> dict[str, tuple[Path, object]]:
    """{"random-SEED": (cache directory, bench.corrupt Damage)} for RANDOM_CLI_SEEDS."""
    root = tmp_path_factory.mktemp("random")
    pristines = corrupt_bench.write_pristines(root / "pristine")
    out = {}
    for seed in RANDOM_CLI_SEEDS:
        directory = root / f"random-{seed}"
        out[f"random-{seed}"] = (directory, corrupt_bench.make_case(pristines, directory, seed))
    return out


@pytest.fixture(scope="module")
def distill_results(caches, random_cases, tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    runs_root = tmp_path_factory.mktemp("runs")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    directories = {name: directory for name, (directory, _) in {**caches, **random_cases}.items()}
    procs = {}
    for run, (damage, extra) in DISTILL_RUNS.items():
        args = [
            str(OFFLINE_DISTILL), "--cache", str(directories[damage]), "--student", "mlp-small", "--epochs", "1",
            "--out", str(runs_root / run), "--no-progress", "--no-export", *extra,
        ]  # fmt: skip
        procs[run] = (subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env), args)
    results = {}
    for run, (proc, args) in procs.items():
        stdout, stderr = proc.communicate(timeout=180)
        results[run] = (subprocess.CompletedProcess(args, proc.returncode, stdout, stderr), runs_root / run)
    return results


def inspect(directory: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(CACHE_INSPECT), str(directory), *extra], capture_output=True, text=True, timeout=60)


def describe(result: subprocess.CompletedProcess) -> str:
    return f"exit {result.returncode}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"


# ---------------------------------------------------------------------------------------------
# cache-inspect


def test_pristine_cache_verifies(caches):
    directory, _ = caches["pristine"]
    result = inspect(directory, "--verify")
    assert result.returncode == 0, describe(result)
    assert "all match" in result.stdout
    assert "not published" not in result.stdout
    assert f"samples          {NUM_SAMPLES}" in result.stdout


@pytest.mark.parametrize(
    ("damage", "why"),
    [
        ("truncate", "bytes on disk"),
        ("flip", "sha256"),
        ("no-manifest", "missing, but 5 shard file(s) are present"),
        ("no-shard", "listed in the manifest but missing"),
        ("garbled-manifest", "unreadable manifest"),
        ("foreign", "teacher_fingerprint"),
        # Valid HDF5 whose datasets disagree with the manifest or the shard's own attributes.
        ("fewer-rows", "holds 50 samples, manifest says 64"),
        ("logits-11", "logits has shape [64, 11], expected [64, 10]"),
        ("short-logits", "logits has shape [60, 10], expected [64, 10]"),
        ("float-labels", "labels are float64, expected int64"),
        ("float16-logits", "logits are float16, attributes say float32"),
        ("logits-group", "not a readable HDF5 shard (AttributeError"),
    ],
)
def test_inspect_verify_names_the_damaged_file(caches, damage, why):
    directory, damaged = caches[damage]
    result = inspect(directory, "--verify")
    assert result.returncode != 0, describe(result)
    assert "Traceback" not in result.stderr, describe(result)
    lines = [line for line in result.stderr.splitlines() if line.startswith("cache-inspect:")]
    assert len(lines) == 1, describe(result)
    assert str(damaged) in lines[0], describe(result)
    assert why in lines[0], describe(result)


def test_byte_flip_is_caught_by_the_checksum_only(caches):
    """Same size, intact HDF5 structure: opening the cache succeeds, the checksum does not."""
    directory, damaged = caches["flip"]
    assert damaged.stat().st_size == (caches["pristine"][0] / VICTIM).stat().st_size
    reader = CacheReader(directory)
    problems = reader.verify()
    assert [path for path, _ in problems] == [str(damaged)]
    assert "does not match the manifest" in problems[0][1]
    result = inspect(directory, "--verify")
    assert result.returncode == 1
    assert "1 shard(s) corrupt" in result.stdout
    assert f"cache-inspect: corrupt: {damaged}: sha256" in result.stderr
    # Without --verify only the cheap checks run, and they pass.
    assert inspect(directory).returncode == 0


def test_inspect_json_reports_problems(caches):
    result = inspect(caches["flip"][0], "--verify", "--json")
    assert result.returncode == 1
    summary = json.loads(result.stdout)
    assert summary["ok"] is False
    assert len(summary["problems"]) == 1 and str(caches["flip"][1]) in summary["problems"][0]
    result = inspect(caches["truncate"][0], "--verify", "--json")
    assert result.returncode == 1
    summary = json.loads(result.stdout)
    assert summary["ok"] is False and str(caches["truncate"][1]) in summary["problems"][0]


def test_stray_tmp_is_reported_but_not_an_error(caches):
    directory, stray = caches["stray-tmp"]
    result = inspect(directory, "--verify")
    assert result.returncode == 0, describe(result)
    assert "all match" in result.stdout
    not_published = [line for line in result.stdout.splitlines() if line.startswith("not published")]
    assert len(not_published) == 1 and stray.name in not_published[0], describe(result)
    summary = json.loads(inspect(directory, "--verify", "--json").stdout)
    assert summary["ok"] is True and summary["unlisted_files"] == [stray.name]
    assert [s.name for s in CacheReader(directory).shards] == [f"shard-{i:06d}.h5" for i in range(5)]


# ---------------------------------------------------------------------------------------------
# offline-distill


@pytest.mark.parametrize(
    ("run", "damage", "why"),
    [
        ("truncate", "truncate", "bytes on disk"),
        ("no-manifest", "no-manifest", "missing"),
        ("foreign", "foreign", "teacher_fingerprint"),
    ],
)
def test_distill_stops_with_one_line(caches, distill_results, run, damage, why):
    result, out = distill_results[run]
    _, damaged = caches[damage]
    assert result.returncode == 2, describe(result)
    assert why in result.stderr, describe(result)
    assert "Traceback" not in result.stderr, describe(result)
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, describe(result)
    assert errors[0].startswith("offline-distill: error: "), describe(result)
    assert str(damaged) in errors[0], describe(result)
    assert not (out / "checkpoint.pt").exists()


def test_distill_skip_corrupt_trains_on_the_rest(caches, distill_results):
    result, out = distill_results["truncate-skip"]
    _, damaged = caches["truncate"]
    assert result.returncode == 0, describe(result)
    assert "Traceback" not in result.stderr, describe(result)
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: skipping corrupt shard")]
    assert len(warnings) == 1 and str(damaged) in warnings[0], describe(result)
    assert f"on {NUM_SAMPLES - MAX_SAMPLES} samples from 4 shard(s)" in result.stdout, describe(result)
    assert (out / "metrics.json").exists() and (out / "student.pt").exists()


def test_verify_checksums_catches_a_byte_flip_before_training(caches):
    from kdcache.offline.dataset import open_caches

    directory, damaged = caches["flip"]
    open_caches([str(directory)])  # the cheap checks pass
    with pytest.raises(CacheError, match=re.escape(str(damaged)) + ".*sha256"):
        open_caches([str(directory)], verify_checksums=True)
    readers, _ = open_caches([str(directory)], verify_checksums=True, skip_corrupt=True)
    assert damaged.name not in [s.name for s in readers[0].shards] and len(readers[0].shards) == 4
    assert [name for name, _ in readers[0].skipped] == [damaged.name]


def test_distill_without_checksums_does_not_see_a_byte_flip(caches, distill_results):
    """--no-verify-checksums keeps only the cheap checks (sizes, HDF5 structure): 64 flipped
    bytes in a data chunk go unnoticed and the student trains on them. This is why checksums
    are verified by default (see the "flip" run above)."""
    result, out = distill_results["flip-no-verify"]
    assert result.returncode == 0, describe(result)
    assert "Traceback" not in result.stderr and "warning" not in result.stderr, describe(result)
    assert f"on {NUM_SAMPLES} samples from 5 shard(s)" in result.stdout, describe(result)


def test_distill_trains_past_a_stray_tmp(caches, distill_results):
    """A hidden temporary shard is a writer's unpublished work (a live teacher-serve has one
    open): training ignores it, without a warning, as cache-inspect reports it."""
    result, out = distill_results["stray-tmp"]
    assert result.returncode == 0, describe(result)
    assert "Traceback" not in result.stderr and "warning" not in result.stderr, describe(result)
    assert f"on {NUM_SAMPLES} samples from 5 shard(s)" in result.stdout, describe(result)
    assert (out / "student.pt").exists()


@pytest.mark.parametrize("damage", ["truncate", "flip", "no-shard", "foreign", "fewer-rows", "logits-11", "float-labels", "logits-group"])
def test_skip_corrupt_trains_on_the_other_shards(caches, damage):
    """offline-distill --skip-corrupt's path (checksums first, the default), in process: the
    damaged shard is skipped, every row of the other four is streamed."""
    directory, damaged = caches[damage]
    rows, skipped = corrupt_bench._epoch(directory, skip_corrupt=True, verify_checksums=True)
    assert skipped == [str(damaged)]
    assert rows == NUM_SAMPLES - MAX_SAMPLES


@pytest.mark.parametrize(
    ("damage", "why"), [("bad-label", "label 99 out of range in rows 0:64"), ("nan-logits", "non-finite teacher logits")]
)
def test_stream_names_rows_the_training_step_cannot_take(caches, damage, why):
    """Right shapes and dtypes, matching checksum, bad values: the stream names the shard
    instead of cross_entropy raising IndexError (bad label) or the loss turning NaN."""
    from kdcache.offline.dataset import open_caches

    directory, damaged = caches[damage]
    with pytest.raises(CacheError, match=re.escape(f"{damaged}: {why}")):
        corrupt_bench._epoch(directory, verify_checksums=True)
    readers, meta = open_caches([str(directory)], skip_corrupt=True)
    assert len(readers[0].shards) == 5  # nothing to see until the rows are read
    rows, _ = corrupt_bench._epoch(directory, skip_corrupt=True)  # warns, skips that shard's rows
    assert rows == NUM_SAMPLES - MAX_SAMPLES


# ---------------------------------------------------------------------------------------------
# Randomised damage (bench.corrupt)


@pytest.mark.parametrize("seed", RANDOM_CLI_SEEDS)
def test_random_damage_inspect_verify(random_cases, seed):
    directory, damage = random_cases[f"random-{seed}"]
    result = inspect(directory, "--verify")
    assert result.returncode != 0, describe(result)
    assert "Traceback" not in result.stderr, describe(result)
    lines = [line for line in result.stderr.splitlines() if line.startswith("cache-inspect:")]
    # One line per damaged file: a swap damages two.
    assert len(lines) == len(damage.files), describe(result)
    assert sorted(next(f for f in damage.files if f in line) for line in lines) == sorted(damage.files), describe(result)


def test_random_damage_distill_stops_with_one_line(random_cases, distill_results):
    result, out = distill_results["random-15"]
    _, damage = random_cases["random-15"]
    assert result.returncode == 2, describe(result)
    assert "sha256" in result.stderr, describe(result)
    assert "Traceback" not in result.stderr, describe(result)
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("offline-distill: error: "), describe(result)
    assert any(f in errors[0] for f in damage.files), describe(result)
    assert not (out / "checkpoint.pt").exists()


def test_random_damage_distill_skip_corrupt(random_cases, distill_results):
    result, out = distill_results["random-15-skip"]
    _, damage = random_cases["random-15"]
    (damaged,) = damage.files
    assert result.returncode == 0, describe(result)
    assert "Traceback" not in result.stderr, describe(result)
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: skipping corrupt shard")]
    assert len(warnings) == 1 and damaged in warnings[0], describe(result)
    lost = MAX_SAMPLES if Path(damaged).name != "shard-000004.h5" else NUM_SAMPLES - 4 * MAX_SAMPLES
    assert f"on {NUM_SAMPLES - lost} samples from 4 shard(s)" in result.stdout, describe(result)


def check_random_damages(seeds: list[int], jobs: int = 2) -> list[dict]:
    """bench.corrupt's property for ``seeds``, in child processes (each case in process
    there, under a watchdog): every damage is named by the checksum-first open, and by the
    cheap path's CacheError or verify(); --skip-corrupt trains on exactly the other shards; no
    other exception type, no crash, no hang outside the known libhdf5 loop (hdf5-hang)."""
    records = corrupt_bench.run_seeds(seeds, jobs=jobs, timeout=20)
    assert len(records) == len(seeds)
    failures = [r for r in records if r["result"]["outcome"] in corrupt_bench.FAILURES]
    assert not failures, json.dumps(failures[:5], indent=1)
    return records


def test_random_damages(tmp_path):
    records = check_random_damages(list(range(45)))
    assert {r["damage"]["kind"] for r in records} == set(corrupt_bench.KINDS)
    assert {r["result"]["outcome"] for r in records} >= {"open", "verify"}


@pytest.mark.soak
def test_random_damages_soak():
    """KD_CORRUPT_SEEDS cases (default 500) from KD_CORRUPT_FIRST_SEED (default 1000, past the
    seeds of the reduced form)."""
    first = int(os.environ.get("KD_CORRUPT_FIRST_SEED", "1000"))
    check_random_damages(list(range(first, first + int(os.environ.get("KD_CORRUPT_SEEDS", "500")))))
