"""A real crash: a writer process appending in a loop is killed with SIGKILL at random moments,
and the cache it leaves behind must be exactly its published shards, intact, and writable."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from kdcache.offline.cache import MANIFEST_NAME, CacheMeta, CacheReader, CacheWriter

pytestmark = pytest.mark.slow

CACHE_INSPECT = Path(sys.executable).parent / "cache-inspect"
MAX_SAMPLES = 50
TRIALS = 5
SEED = 20240611
META = CacheMeta(teacher_fingerprint="ab" * 32, teacher_name="crash-test", num_classes=10, input_shape=(8, 8), input_dtype="uint8")

# Appends batches of random size with ids 0, 1, 2, ... forever; after each batch prints how many
# shards it has published. Killed from outside; never exits on its own.
WRITER_SCRIPT = r"""
import sys
import numpy as np
from kdcache.offline.cache import CacheMeta, CacheWriter

directory, max_samples, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
meta = CacheMeta(teacher_fingerprint="ab" * 32, teacher_name="crash-test", num_classes=10, input_shape=(8, 8), input_dtype="uint8")
rng = np.random.default_rng(seed)
writer = CacheWriter(directory, meta, max_samples=max_samples)
next_id = 0
while True:
    n = int(rng.integers(1, 24))
    inputs = rng.integers(0, 256, size=(n, 8, 8), dtype=np.uint8)
    logits = rng.normal(size=(n, 10)).astype(np.float32)
    labels = rng.integers(-1, 10, size=n)
    writer.append(np.arange(next_id, next_id + n), inputs, logits, labels)
    next_id += n
    print(len(writer.shards), flush=True)
"""


def run_writer_until_killed(directory: Path, rng: random.Random) -> int:
    """Start the writer, wait for it to publish two shards, kill it after a random delay.
    Returns the number of shards it had reported when it was killed."""
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER_SCRIPT, str(directory), str(MAX_SAMPLES), str(rng.randrange(1 << 30))],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    reported = [0]
    two_published = threading.Event()

    def drain() -> None:  # keep reading so that the writer never blocks on a full pipe
        assert proc.stdout is not None
        for line in proc.stdout:
            reported[0] = int(line)
            if reported[0] >= 2:
                two_published.set()

    reader_thread = threading.Thread(target=drain, daemon=True)
    reader_thread.start()
    try:
        if not two_published.wait(timeout=30):
            proc.kill()
            _, err = proc.communicate(timeout=10)
            pytest.fail(f"the writer did not publish two shards (exit {proc.returncode}):\n{err}")
        time.sleep(rng.uniform(0.0, 0.25))
        if proc.poll() is not None:
            _, err = proc.communicate(timeout=10)
            pytest.fail(f"the writer exited on its own (exit {proc.returncode}):\n{err}")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader_thread.join(timeout=10)
    assert proc.returncode == -signal.SIGKILL
    assert proc.stderr is not None
    stderr = proc.stderr.read()
    proc.stderr.close()
    assert "Traceback" not in stderr, stderr
    return reported[0]


def shard_ids(path: Path) -> list[int]:
    with h5py.File(path, "r") as h5:
        return [int(v) for v in h5["ids"][:]]


def check_survivor(directory: Path, reported: int) -> None:
    # The reader sees published shards only, all of them intact.
    reader = CacheReader(directory)
    listed = [s.name for s in reader.shards]
    assert all(re.fullmatch(r"shard-\d{6}\.h5", name) for name in listed), listed
    assert not any(name.endswith(".tmp") for name in listed)
    assert len(listed) >= reported >= 2
    assert reader.verify() == []
    # A shard is only published full, and ids run 0, 1, 2, ... through the shards in order.
    assert [s.num_samples for s in reader.shards] == [MAX_SAMPLES] * len(listed)
    ids = [int(i) for i in reader.read(("ids",))["ids"]]
    assert ids == list(range(len(ids)))
    # Besides them: at most one open shard (.tmp) and at most one complete shard whose manifest
    # update the kill prevented.
    unlisted = reader.unlisted_files()
    tmp = [name for name in unlisted if name.endswith(".tmp")]
    complete = [name for name in unlisted if not name.endswith(".tmp")]
    assert len(tmp) <= 1 and len(complete) <= 1, unlisted
    on_disk_ids = list(ids)
    for name in complete:
        assert name == f"shard-{len(listed):06d}.h5"
        on_disk_ids += shard_ids(directory / name)
    assert len(set(on_disk_ids)) == len(on_disk_ids), "an id was published twice"

    result = subprocess.run([str(CACHE_INSPECT), str(directory), "--verify"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "all match" in result.stdout
    if unlisted:
        assert "not published" in result.stdout

    # A new writer cleans up, adopts the complete shard, and carries on from where the ids stop.
    with CacheWriter(directory, META, max_samples=MAX_SAMPLES) as writer:
        assert not list(directory.glob("*.tmp")), "leftover temporary files survived the writer start"
        assert len(writer) == len(on_disk_ids)
        total = len(on_disk_ids) + 120
        rng = np.random.default_rng(len(on_disk_ids))
        inputs = rng.integers(0, 256, size=(total, 8, 8), dtype=np.uint8)
        logits = rng.normal(size=(total, 10)).astype(np.float32)
        # Re-sending everything stores only what was never published.
        assert writer.append(np.arange(total), inputs, logits) == 120
    after = CacheReader(directory)
    assert after.verify() == []
    assert after.unlisted_files() == []
    assert not list(directory.glob("*.tmp"))
    assert sorted(int(i) for i in after.read(("ids",))["ids"]) == list(range(total))
    manifest = json.loads((directory / MANIFEST_NAME).read_text())
    assert manifest["num_samples"] == total
    assert [e["name"] for e in manifest["shards"]] == sorted(p.name for p in directory.glob("shard-*.h5"))


def test_sigkill_leaves_a_consistent_cache(tmp_path):
    rng = random.Random(SEED)
    for trial in range(TRIALS):
        directory = tmp_path / f"trial-{trial}"
        reported = run_writer_until_killed(directory, rng)
        check_survivor(directory, reported)


def test_sigkill_of_a_writer_resumed_on_an_existing_cache(tmp_path):
    """Kill, restart on the same directory, kill again: the crashes do not accumulate damage."""
    rng = random.Random(SEED + 1)
    directory = tmp_path / "cache"
    reported = run_writer_until_killed(directory, rng)
    reader = CacheReader(directory)
    assert len(reader.shards) >= reported
    # The second writer sees every published id and skips them; with ids restarting at 0 it
    # publishes only new rows.
    reported = run_writer_until_killed(directory, rng)
    check_survivor(directory, reported)
