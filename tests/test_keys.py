"""RowIndex (offline/cache/keys.py) against a dict of the ids, which it replaced: the same rows for
every id, through adds, publications, dropped open shards and many merges."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from kdcache.offline.cache.keys import MERGE_RATIO, RowIndex, id_digests


class DictIndex:
    """The reference: id -> row in a dict, as RowIndex was before it held digests."""

    def __init__(self) -> None:
        self.rows: dict[str, int] = {}
        self.published = 0
        self.open: list[str] = []

    def add(self, ids: list[str]) -> None:
        self.rows.update(zip(ids, range(len(self.rows), len(self.rows) + len(ids)), strict=True))
        self.open += ids

    def publish(self, rows: int) -> None:
        self.published += rows
        self.open = []

    def drop_open(self) -> None:
        for sample_id in self.open:
            del self.rows[sample_id]
        self.open = []


ALPHABET = list("abcXYZ019-_/.") + ["é", "ß", "中", "文", "🙂", "\u0301", " ", "\ud800"]  # a lone surrogate too


def random_ids(rng: np.random.Generator, count: int) -> list[str]:
    lengths = rng.integers(1, 12, count)
    return ["".join(rng.choice(ALPHABET, length)) for length in lengths]


def check_same(index: RowIndex, reference: DictIndex, absent: list[str]) -> None:
    known = list(reference.rows)
    assert len(index) == len(reference.rows) and index.published == reference.published
    np.testing.assert_array_equal(index.lookup(known), list(reference.rows.values()))
    np.testing.assert_array_equal(index.lookup(absent), np.full(len(absent), -1))
    np.testing.assert_array_equal(index.contains(known + absent), [True] * len(known) + [False] * len(absent))


def test_rows_match_a_dict_through_adds_publications_and_drops():
    rng = np.random.default_rng(0)
    pool = list(dict.fromkeys(random_ids(rng, 6000)))  # unique, in a random order
    absent, pool = pool[:500], pool[500:]
    index, reference = RowIndex(), DictIndex()
    taken = 0
    for step in range(300):
        action = rng.choice(["add", "add", "add", "publish", "drop", "seal"], p=[0.3, 0.3, 0.2, 0.1, 0.05, 0.05])
        if action == "add":
            size = int(rng.choice([0, 1, 2, 7, 64, 300]))
            batch = pool[taken : taken + size]
            taken += len(batch)
            index.add(batch)
            reference.add(batch)
        elif action == "publish":
            index.publish(len(reference.open))
            reference.publish(len(reference.open))
        elif action == "drop":
            index.drop_open()
            reference.drop_open()  # the dropped ids are not added again, and must answer -1
        else:
            index.seal()
            reference.publish(len(reference.rows) - reference.published)
        if step % 10 == 0:
            check_same(index, reference, absent)
    check_same(index, reference, absent)
    dropped = [sample_id for sample_id in pool[:taken] if sample_id not in reference.rows]
    assert dropped, "the random walk should have dropped an open shard"
    assert not index.contains(dropped).any()
    assert all(sample_id in index for sample_id in list(reference.rows)[:50])
    assert "never added" not in index


def test_ids_added_one_at_a_time_stay_in_few_runs_and_keep_their_rows():
    index = RowIndex()
    ids = [f"id-{i}" for i in range(3000)]
    for i, sample_id in enumerate(ids):
        index.add([sample_id])
        if i == 1999:
            index.publish(2000)
    published, open_runs = index._runs
    assert len(published) + len(open_runs) <= 2 * (np.log(3000) / np.log(MERGE_RATIO) + 1)
    np.testing.assert_array_equal(index.lookup(ids), np.arange(3000))
    index.drop_open()
    np.testing.assert_array_equal(index.lookup(ids[1990:2010]), [*range(1990, 2000)] + [-1] * 10)
    index.add(["again"])
    assert index.lookup(["again"])[0] == 2000 and len(index) == 2001


def test_digests_that_share_their_key_are_told_apart_by_their_check():
    index = RowIndex()
    # Four digests with one key and different checks, spread over several runs and merged.
    shared = [[7, 40], [7, 10], [7, 30], [7, 20]]
    index.add_digests(np.array([[1, 1], shared[0], [9, 9]], dtype=np.uint64))
    index.add_digests(np.array(shared[1:3], dtype=np.uint64))
    index.publish(5)
    index.add_digests(np.array([shared[3]], dtype=np.uint64))
    queries = np.array([*shared, [7, 99], [8, 40], [0, 0], [9, 9]], dtype=np.uint64)
    np.testing.assert_array_equal(index.lookup_digests(queries), [1, 3, 4, 5, -1, -1, -1, 2])
    index.seal()
    np.testing.assert_array_equal(index.lookup_digests(queries), [1, 3, 4, 5, -1, -1, -1, 2])
    with pytest.raises(ValueError, match=r"digests must be \[n, 2\] uint64"):
        index.add_digests(np.zeros((3, 16), dtype=np.uint8))


def test_a_digest_is_blake2b_of_the_utf8_in_two_little_endian_words():
    ids = ["a", "中文🙂", "x" * 300]
    expected = [hashlib.blake2b(s.encode("utf-8"), digest_size=16).digest() for s in ids]
    for given in (ids, np.array(ids, dtype=object), np.array(ids), iter(ids)):
        digests = id_digests(given)
        assert digests.shape == (3, 2) and digests.dtype == np.dtype("<u8")
        assert [row.tobytes() for row in digests] == expected
    assert id_digests([]).shape == (0, 2)
    index = RowIndex()
    index.add(ids)
    np.testing.assert_array_equal(index.lookup_digests(id_digests(ids[::-1])), [2, 1, 0])
    assert index.lookup([]).shape == (0,) and RowIndex().lookup(["a"]).tolist() == [-1]
