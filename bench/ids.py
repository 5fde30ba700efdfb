"""The writer's index of known ids at scale: memory per id, build time, lookups, and start time.

1. **Index**: a ``RowIndex`` of ``--ids`` ids (64-character hex strings, like content ids) added
   in batches of ``--batch`` (one shard's worth, as the writer's start adds them), then sealed.
   Build time split into hashing (``id_digests``) and the index itself (``add_digests``); bytes
   per id as the arrays' nbytes, as tracemalloc's peak over the build (the batch being added
   included), and as the process's RSS growth. Lookups: ids/s in batches of 1024 (half absent),
   and the latency of a one-id lookup (what the service's ``known`` asks per request).
2. **The dict it replaced** (id -> row, the strings kept alive by it), at ``--dict-ids``: the
   same figures, beside a ``RowIndex`` of the same size.
3. **Start**: ``--start-ids`` rows written with ``CacheWriter`` in shards of ``--batch``, then
   the time to open a writer on them (``_recover``: every shard's ids read, hashed and added),
   split into reading the ids column, hashing and indexing; and the time to start from a column
   of stored digests instead (a [n, 2] uint64 dataset per shard, written here beside the shards:
   what the writer could store at publication), added shard by shard or all in one call. Below
   10 million ids the figures are also extrapolated linearly to 10 million, and marked so.

    .venv/bin/python -m bench.ids      # 10M ids everywhere: about 2 minutes on 2 cores, 1.5 GiB of memory, 1 GB of shards
    .venv/bin/python -m bench.ids --ids 100000 --dict-ids 100000 --start-ids 100000 --json
"""

from __future__ import annotations

import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from bench import harness
from kdcache.offline.cache import CacheReader, CacheWriter
from kdcache.offline.cache.keys import RowIndex, id_digests
from kdcache.offline.cache.reader import read_rows

SCALE = 10_000_000  # the size the goal names: at most 64 bytes per id, a start in seconds
QUERY_BATCH = 1024
INDEX_COLUMNS = [
    ("kind", "index", ""), ("ids", "ids", ",d"), ("runs", "runs", "d"), ("bytes_per_id", "arrays B/id", ".1f"),
    ("traced_bytes_per_id", "traced B/id", ".1f"), ("traced_peak_bytes_per_id", "peak B/id", ".1f"),
    ("rss_growth_bytes_per_id", "RSS B/id", ".1f"), ("hash_s", "hash s", ".2f"), ("index_s", "index s", ".2f"),
    ("build_s", "build s", ".2f"), ("lookup_ids_per_s", "lookup ids/s", ",.0f"), ("lookup_one_us", "1-id lookup µs", ".1f"),
    ("foreign_cpu", "other CPU", ".0%"),
]  # fmt: skip


class DictRowIndex:
    """The index before digests (offline/cache/keys.py until issue 23): a dict of the strings."""

    def __init__(self) -> None:
        self._rows: dict[str, int] = {}

    def add(self, ids: list[str]) -> None:
        start = len(self._rows)
        self._rows.update(zip(ids, range(start, start + len(ids)), strict=True))

    def lookup(self, ids: list[str]) -> np.ndarray:
        get = self._rows.get
        return np.fromiter((get(sample_id, -1) for sample_id in ids), dtype=np.int64, count=len(ids))


def sample_id(number: int) -> str:
    """Id ``number``: 64 hex digits, like a content id. Built in order, id i gets row i."""
    return f"{number:064x}"


def sample_ids(start: int, stop: int) -> list[str]:
    return [sample_id(i) for i in range(start, stop)]


def batches(count: int, batch: int) -> Iterator[list[str]]:
    for start in range(0, count, batch):
        yield sample_ids(start, min(start + batch, count))


def rss_bytes() -> int:
    with open("/proc/self/statm", encoding="ascii") as fh:
        return int(fh.read().split()[1]) * 4096


def traced(build: Callable[[], Any]) -> tuple[Any, int, int]:
    """``build()`` under tracemalloc: its result, the bytes still held, and the peak."""
    tracemalloc.start()
    try:
        result = build()
        held, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return result, held, peak


def build_digests(count: int, batch: int) -> tuple[RowIndex, float, float]:
    index, hash_s, index_s = RowIndex(), 0.0, 0.0
    for ids in batches(count, batch):
        started = time.perf_counter()
        digests = id_digests(ids)
        hashed = time.perf_counter()
        index.add_digests(digests)
        hash_s, index_s = hash_s + hashed - started, index_s + time.perf_counter() - hashed
    started = time.perf_counter()
    index.seal()
    return index, hash_s, index_s + time.perf_counter() - started


def build_dict(count: int, batch: int) -> tuple[DictRowIndex, float]:
    index, seconds = DictRowIndex(), 0.0
    for ids in batches(count, batch):
        started = time.perf_counter()
        index.add(ids)
        seconds += time.perf_counter() - started
    return index, seconds


def time_lookups(index: RowIndex | DictRowIndex, count: int, seed: int) -> dict[str, float]:
    """ids/s of lookups in batches of QUERY_BATCH (half present, half absent), checked against
    the rows they must give, and µs per one-id lookup."""
    rng = np.random.default_rng(seed)
    numbers = np.concatenate([rng.integers(0, count, (64, QUERY_BATCH // 2)), rng.integers(count, 2 * count, (64, QUERY_BATCH // 2))], 1)
    queries = [[sample_id(i) for i in row] for row in numbers.tolist()]
    expected = np.where(numbers < count, numbers, -1)
    started = time.perf_counter()
    for query, rows in zip(queries, expected, strict=True):
        if not np.array_equal(index.lookup(query), rows):
            raise SystemExit(f"{type(index).__name__}: a lookup gave wrong rows")
    batch_s = time.perf_counter() - started
    singles = [[query[0]] for query in queries] * 16
    started = time.perf_counter()
    for query in singles:
        index.lookup(query)
    single_s = time.perf_counter() - started
    return {"lookup_ids_per_s": numbers.size / batch_s, "lookup_one_us": single_s / len(singles) * 1e6}


def measure_digests(count: int, batch: int, seed: int) -> dict[str, Any]:
    harness.say(f"RowIndex of {count:,} ids: build ...")
    meter = harness.CpuMeter()
    rss_before = rss_bytes()
    index, hash_s, index_s = build_digests(count, batch)
    rss_growth = rss_bytes() - rss_before
    lookups = time_lookups(index, count, seed)
    foreign = meter.stop()["foreign_cpu"]
    runs = len(index._runs[0])
    array_bytes = index.nbytes()
    del index
    harness.say(f"RowIndex of {count:,} ids: build again under tracemalloc ...")
    _, held, peak = traced(lambda: build_digests(count, batch)[0])
    return {
        "kind": "RowIndex (digests)", "ids": count, "runs": runs, "bytes_per_id": array_bytes / count,
        "traced_bytes_per_id": held / count, "traced_peak_bytes_per_id": peak / count, "rss_growth_bytes_per_id": rss_growth / count,
        "hash_s": hash_s, "index_s": index_s, "build_s": hash_s + index_s, **lookups, "foreign_cpu": foreign,
    }  # fmt: skip


def measure_dict(count: int, batch: int, seed: int) -> dict[str, Any]:
    harness.say(f"dict of {count:,} ids: build ...")
    meter = harness.CpuMeter()
    rss_before = rss_bytes()
    index, build_s = build_dict(count, batch)
    rss_growth = rss_bytes() - rss_before
    lookups = time_lookups(index, count, seed)
    foreign = meter.stop()["foreign_cpu"]
    del index
    harness.say(f"dict of {count:,} ids: build again under tracemalloc (the strings are the dict's: nothing else holds them) ...")
    _, held, peak = traced(lambda: build_dict(count, batch)[0])
    return {
        "kind": "dict (before)", "ids": count, "runs": None, "bytes_per_id": None, "traced_bytes_per_id": held / count,
        "traced_peak_bytes_per_id": peak / count, "rss_growth_bytes_per_id": rss_growth / count, "hash_s": None, "index_s": build_s,
        "build_s": build_s, **lookups, "foreign_cpu": foreign,
    }  # fmt: skip


def write_cache(directory: Path, count: int, batch: int) -> None:
    """``count`` rows of one uint8 and two logits each, ``batch`` rows per shard."""
    meta = harness.synthetic_meta((1,), 2)
    with CacheWriter(directory, meta, max_samples=batch) as writer:
        for ids in batches(count, batch):
            writer.append(ids, np.zeros((len(ids), 1), dtype=np.uint8), np.zeros((len(ids), 2), dtype=np.float32))


def measure_start(root: Path, count: int, batch: int) -> dict[str, Any]:
    cache = root / "cache"
    harness.say(f"start: writing {count:,} rows in shards of {batch:,} ...")
    write_cache(cache, count, batch)
    meta = harness.synthetic_meta((1,), 2)
    harness.say("start: opening a writer on them ...")
    meter = harness.CpuMeter()
    started = time.perf_counter()
    writer = CacheWriter(cache, meta)
    writer_open_s = time.perf_counter() - started
    known = len(writer)
    writer.close()
    shards = CacheReader(cache).shards
    digests_dir = root / "digests"
    digests_dir.mkdir()
    times = dict.fromkeys(("read_ids_s", "hash_s", "index_s", "read_digests_s", "index_digests_s", "index_digests_at_once_s"), 0.0)
    index = RowIndex()
    for info in shards:  # what _recover does, step by step; each shard's digests kept beside it
        started = time.perf_counter()
        ids = read_rows(info, ("ids",))["ids"].tolist()
        read = time.perf_counter()
        digests = id_digests(ids)
        hashed = time.perf_counter()
        index.add_digests(digests)
        times["read_ids_s"] += read - started
        times["hash_s"] += hashed - read
        times["index_s"] += time.perf_counter() - hashed
        with h5py.File(digests_dir / info.name, "w") as h5:
            h5.create_dataset("id_digests", data=digests)
    started = time.perf_counter()
    index.seal()
    times["index_s"] += time.perf_counter() - started
    del index
    stored = []
    for info in shards:
        started = time.perf_counter()
        with h5py.File(digests_dir / info.name, "r") as h5:
            stored.append(h5["id_digests"][:])
        times["read_digests_s"] += time.perf_counter() - started
    started = time.perf_counter()
    per_shard = RowIndex()
    for digests in stored:
        per_shard.add_digests(digests)
    per_shard.seal()
    times["index_digests_s"] = time.perf_counter() - started
    del per_shard
    started = time.perf_counter()
    at_once = RowIndex()
    at_once.add_digests(np.concatenate(stored))
    at_once.seal()
    times["index_digests_at_once_s"] = time.perf_counter() - started
    if known != count or len(at_once) != count:
        raise SystemExit(f"start: {count} ids written, the writer knows {known}, the index of their digests {len(at_once)}")
    result = {
        "ids": count,
        "shards": len(shards),
        "cache_bytes": sum(info.bytes for info in shards),
        "writer_open_s": writer_open_s,
        **times,
        "foreign_cpu": meter.stop()["foreign_cpu"],
    }
    result["from_digests_s"] = times["read_digests_s"] + times["index_digests_at_once_s"]
    scale = SCALE / count
    result["at_10m"] = {"extrapolated": count != SCALE, **{key: result[key] * scale for key in (*times, "writer_open_s", "from_digests_s")}}
    return result


def report(result: dict[str, Any]) -> None:
    config = result["config"]
    harness.print_header(
        "bench.ids: the writer's index of known ids (RowIndex) at scale", result["env"],
        f"ids        64 hex characters each, added in batches of {config['batch']:,} then sealed; lookups of {QUERY_BATCH} ids, "
        "half absent, and of one id",
    )  # fmt: skip
    print()
    harness.table(
        [(title, spec) for _, title, spec in INDEX_COLUMNS], [[row[key] for key, _, _ in INDEX_COLUMNS] for row in result["index"]]
    )
    start = result.get("start")
    if start is None:
        harness.noise_warning(max(row["foreign_cpu"] for row in result["index"]))
        return
    print(f"\nstart: a writer opened on {start['ids']:,} ids in {start['shards']} shards ({start['cache_bytes'] / 2**20:,.0f} MiB)")
    at_10m = "10M ids, s" + (" (extrapolated)" if start["at_10m"]["extrapolated"] else "")
    columns = [("step", ""), (f"{start['ids']:,} ids, s", ".2f"), (at_10m, ".1f")]
    steps = [
        ("CacheWriter(...) open, all of it", "writer_open_s"), ("  read the ids column", "read_ids_s"), ("  hash (id_digests)", "hash_s"),
        ("  index (add_digests per shard, seal)", "index_s"), ("from stored digests: read them", "read_digests_s"),
        ("  index (add_digests per shard, seal)", "index_digests_s"), ("  index (one add_digests of all, seal)", "index_digests_at_once_s"),
        ("  in all: read, one add_digests", "from_digests_s"),
    ]  # fmt: skip
    harness.table(columns, [(label, start[key], start["at_10m"][key]) for label, key in steps])
    harness.noise_warning(max([row["foreign_cpu"] for row in result["index"]] + [start["foreign_cpu"]]))


def main(argv: list[str] | None = None) -> int:
    p = harness.parser(__doc__, workdir_of="the shards")
    p.add_argument("--ids", type=int, default=SCALE, help="ids in the RowIndex measured")
    p.add_argument("--dict-ids", type=int, default=1_000_000, help="ids in the dict it replaced, and in a RowIndex beside it (0: skip)")
    p.add_argument("--start-ids", type=int, default=SCALE, help="rows written to shards to time a writer's start (0: skip)")
    p.add_argument("--batch", type=int, default=65536, help="ids per add, and rows per shard")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    rows = [measure_digests(args.ids, args.batch, args.seed)]
    if args.dict_ids:
        if args.dict_ids != args.ids:
            rows.append(measure_digests(args.dict_ids, args.batch, args.seed))
        rows.append(measure_dict(args.dict_ids, args.batch, args.seed))
    result: dict[str, Any] = {"env": harness.environment(), "config": vars(args), "index": rows}
    if args.start_ids:
        with harness.workdir("bench-ids-", args.tmpdir, args.keep) as root:
            result["start"] = measure_start(root, args.start_ids, args.batch)
    harness.emit(result, args.json, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
