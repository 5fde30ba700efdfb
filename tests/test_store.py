"""The service's writer thread (service/store.py) and its journal: shard sizes when groups do not
end on a shard boundary, and what a crash at any point between groups leaves to replay."""

from __future__ import annotations

import shutil

import numpy as np

from kdcache.offline.cache import CacheMeta, CacheReader
from kdcache.offline.journal import JOURNAL_NAME, Journal, encode_record, read_journal
from kdcache.service.store import CacheStore

META = CacheMeta("e" * 64, "store-teacher", 5, (4,), "float32")


def batch(start: int, n: int) -> tuple:
    rng = np.random.default_rng(start)
    ids = np.array([f"s{i}" for i in range(start, start + n)], dtype=object)
    return ids, rng.random((n, 4), dtype=np.float32), {"logits": rng.normal(size=(n, 5)).astype(np.float32)}, np.full(n, -1)


def test_a_full_journal_publishes_a_full_shard_not_a_full_shard_and_a_splinter(tmp_path):
    """Issue 20: with shards of 256 and batches of 100, every full shard was followed by a
    splinter ([256, 44, 256, 44, ...]) because a journal holding a shard's worth was emptied by
    publishing the rows that had begun the next shard. Now the journal keeps only those rows, and
    a kill between any two groups still loses nothing."""
    cache, start = tmp_path / "cache", 0
    store = CacheStore(cache, META, max_shard_samples=256)
    for group in range(12):
        assert store.write(*batch(start, 100)).result(10) == 100
        start += 100
        # The journal holds exactly the open shard's rows: the newest, not yet published.
        records, _, torn = read_journal(cache / JOURNAL_NAME, META)
        journal_ids = [sample_id for record in records for sample_id in record.ids]
        assert torn == 0 and journal_ids == [f"s{i}" for i in range(start - store.writer.pending_rows, start)], group
        if group in (2, 5, 10):  # a kill now: a copy of the directory, restarted, holds every sample written
            crashed = tmp_path / f"crashed-{group}"
            shutil.copytree(cache, crashed, ignore=shutil.ignore_patterns(".lock*"))
            restarted = CacheStore(crashed, META, max_shard_samples=256)
            assert restarted.recovery.journal_samples == store.writer.pending_rows
            restarted.close()
            assert sorted(CacheReader(crashed).read(("ids",))["ids"]) == sorted(f"s{i}" for i in range(start))
    store.close()
    reader = CacheReader(cache)
    assert [info.num_samples for info in reader.shards] == [256, 256, 256, 256, 176]
    assert sorted(reader.read(("ids",))["ids"]) == sorted(f"s{i}" for i in range(1200))


def test_keep_last_cuts_a_record_and_keeps_the_ones_after_it(tmp_path):
    journal = Journal(tmp_path)
    for start, n in ((0, 10), (10, 7), (17, 5)):
        ids, inputs, logits, labels = batch(start, n)
        journal.append(encode_record(META, list(ids), inputs, logits, labels), n)
    assert journal.keep_last(META, 9)
    journal.append(encode_record(META, ["s22"], *batch(22, 1)[1:]), 1)
    journal.close()
    records, _, torn = read_journal(tmp_path / JOURNAL_NAME, META)
    assert torn == 0 and [r.ids for r in records] == [["s13", "s14", "s15", "s16"], [f"s{i}" for i in range(17, 22)], ["s22"]]
    np.testing.assert_array_equal(records[0].inputs, batch(10, 7)[1][3:])
    # A journal this object did not write is left as it is (the store then publishes, as before).
    assert not Journal(tmp_path).keep_last(META, 1)
