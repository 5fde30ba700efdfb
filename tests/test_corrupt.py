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

import numpy as np
import pytest
from digits import write_cache

from offline.cache import MANIFEST_NAME, CacheError, CacheReader

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


DAMAGES = {
    "truncate": truncate,
    "flip": flip_bytes,
    "no-manifest": delete_manifest,
    "no-shard": delete_shard,
    "garbled-manifest": garble_manifest,
    "stray-tmp": stray_tmp,
    "foreign": foreign_shard,
}
# (damage, extra arguments) for offline-distill; all run at once to keep the module fast.
DISTILL_RUNS = {
    "truncate": ("truncate", []),
    "truncate-skip": ("truncate", ["--skip-corrupt"]),
    "no-manifest": ("no-manifest", []),
    "foreign": ("foreign", []),
}


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
def distill_results(caches, tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    runs_root = tmp_path_factory.mktemp("runs")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    procs = {}
    for run, (damage, extra) in DISTILL_RUNS.items():
        args = [
            str(OFFLINE_DISTILL), "--cache", str(caches[damage][0]), "--student", "mlp-small", "--epochs", "1",
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


@pytest.mark.parametrize(("run", "damage"), [("truncate", "truncate"), ("no-manifest", "no-manifest"), ("foreign", "foreign")])
def test_distill_stops_with_one_line(caches, distill_results, run, damage):
    result, out = distill_results[run]
    _, damaged = caches[damage]
    assert result.returncode == 2, describe(result)
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
    from offline.dataset import open_caches

    directory, damaged = caches["flip"]
    open_caches([str(directory)])  # the cheap checks pass
    with pytest.raises(CacheError, match=re.escape(str(damaged)) + ".*sha256"):
        open_caches([str(directory)], verify_checksums=True)
    readers, _ = open_caches([str(directory)], verify_checksums=True, skip_corrupt=True)
    assert damaged.name not in [s.name for s in readers[0].shards] and len(readers[0].shards) == 4
    assert [name for name, _ in readers[0].skipped] == [damaged.name]
