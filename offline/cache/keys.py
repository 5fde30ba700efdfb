"""Row keys: which stored row holds a sample's targets.

A cache stores each sample id once, so the key of a row is its id, and rows are numbered
globally: across the published shards in manifest order, then the open shard. The service asks
the writer's ``RowIndex`` whether ids are known and where, to answer cache hits without
scanning. A cache with several augmented views per id keeps one row per id, with the views
inside it, so a view is addressed as (row, view index) and this index stays per id. Numpy only.

The index holds no strings, so that its memory is bounded at any size: an id is known by its
digest (``id_digests``: blake2b of its UTF-8, 16 bytes, as two uint64: a sort key and a check),
kept with its row in runs sorted by key. That is 24 bytes per id, and about twice that for an
instant while the largest runs merge: 52 at the peak of a build of 10 million ids, against 176
for the dict of the strings it replaced (``python -m bench.ids``).

Why 128 bits: two ids with the same digest are one id here, and a new sample would be answered
with another sample's targets, silently. Among n ids the chance of any such pair is about
n²/2¹²⁹: 1.5e-25 at 10 million. A 64-bit digest would save 8 bytes per id but make it n²/2⁶⁵,
3e-6 at 10 million and 3e-4 at 100 million, too likely for a silent wrong answer; and blake2b
is a cryptographic hash, so ids chosen to collide are no easier to find than random ones.

The runs are a log-structured merge: each ``add`` sorts its batch into a new run, and a run is
merged into the one below it while that one is at most ``MERGE_RATIO`` times larger. Sizes
then fall by more than that factor from the oldest run to the newest, so a lookup searches at
most log₄(n) + 1 runs (``np.searchsorted`` on each), and each id is copied O(log n) times in all.
The open shard's ids have runs of their own, so that ``drop_open`` drops them whole; ``publish``
moves them onto the published runs.

The service asks ``lookup`` from its request threads while the writer's thread adds: the runs
are replaced, never changed in place, and a lookup reads them once, so it searches one
consistent snapshot.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import numpy as np

DIGEST_BYTES = 16
DIGEST_DTYPE = np.dtype("<u8")  # digests are [n, 2] of these: the sort key, then the check
MERGE_RATIO = 4
_HASH_CHUNK = 65536  # ids hashed per join, so that only this many digest bytes objects live at once


def id_digests(ids: Iterable[str]) -> np.ndarray:
    """Each id's digest, [n, 2] little-endian uint64: blake2b (16 bytes) of the id's UTF-8.
    Lone surrogates are encoded as such, so that any str has a digest. What ``RowIndex`` keys
    rows by, and what a shard can store beside its ids (``RowIndex.add_digests``). About
    0.3-0.4 µs per id: hashlib's own cost, as numpy has no vectorised cryptographic hash."""
    if isinstance(ids, np.ndarray):
        ids = ids.tolist()  # Python str, not np.str_: faster to encode
    elif not isinstance(ids, Sequence):
        ids = list(ids)
    fresh = hashlib.blake2b(digest_size=DIGEST_BYTES).copy  # copying a hasher beats building one

    def digest(sample_id: str) -> bytes:
        hasher = fresh()
        hasher.update(sample_id.encode("utf-8", "surrogatepass"))
        return hasher.digest()

    out = np.empty((len(ids), 2), dtype=DIGEST_DTYPE)
    for start in range(0, len(ids), _HASH_CHUNK):
        chunk = ids[start : start + _HASH_CHUNK]
        out[start : start + len(chunk)] = np.frombuffer(b"".join(map(digest, chunk)), dtype=DIGEST_DTYPE).reshape(-1, 2)
    return out


class _Run(NamedTuple):
    """Ids sorted by key, one entry each in three arrays; never changed once built."""

    keys: np.ndarray  # uint64, sorted: the digest's first half
    checks: np.ndarray  # uint64: its second half
    rows: np.ndarray  # int64


def _sorted_run(digests: np.ndarray, first_row: int) -> _Run:
    order = np.argsort(digests[:, 0])
    return _Run(digests[order, 0], digests[order, 1], order.astype(np.int64, copy=False) + first_row)


def _merged(older: _Run, newer: _Run) -> _Run:
    """One run holding both, each newer entry after the older entries with its key."""
    size = len(older.keys) + len(newer.keys)
    at = np.searchsorted(older.keys, newer.keys, side="right") + np.arange(len(newer.keys))
    from_older = np.ones(size, dtype=bool)
    from_older[at] = False
    columns = []
    for old, new in zip(older, newer, strict=True):
        column = np.empty(size, dtype=old.dtype)
        column[at] = new
        column[from_older] = old
        columns.append(column)
    return _Run(*columns)


def _stacked(runs: tuple[_Run, ...], run: _Run) -> tuple[_Run, ...]:
    """``runs`` (oldest first) with ``run`` on top, merged down while the run below is at most
    ``MERGE_RATIO`` times larger."""
    below = list(runs)
    while below and len(below[-1].keys) <= MERGE_RATIO * len(run.keys):
        run = _merged(below.pop(), run)
    return (*below, run)


def _find(runs: Sequence[_Run], digests: np.ndarray) -> np.ndarray:
    # Sorted queries walk each run in one direction: half the cache misses in a run of millions.
    order = np.argsort(digests[:, 0])
    keys, checks = digests[order, 0], digests[order, 1]
    rows = np.full(len(digests), -1, dtype=np.int64)
    for run in runs:
        at = np.searchsorted(run.keys, keys)
        np.minimum(at, len(run.keys) - 1, out=at)
        hit = np.flatnonzero(run.keys[at] == keys)
        if not len(hit):
            continue
        at = at[hit]
        found = run.checks[at] == checks[hit]
        rows[hit[found]] = run.rows[at[found]]
        # Another digest shares this one's key and sorts first among the entries with it: look at
        # all of them. Two of 10 million ids share a key with a chance of about 3e-6.
        for i, first in zip(hit[~found].tolist(), at[~found].tolist(), strict=True):
            stop = int(np.searchsorted(run.keys, keys[i], side="right"))
            match = np.flatnonzero(run.checks[first:stop] == checks[i])
            if len(match):
                rows[i] = run.rows[first + match[0]]
    rows_by_query = np.empty_like(rows)
    rows_by_query[order] = rows
    return rows_by_query


class RowIndex:
    """id → global row, for the published shards and the open one (see the module docstring).

    ``add`` gives ids the next rows in order; the caller has checked that they are new."""

    def __init__(self) -> None:
        self.published = 0  # rows in published shards; rows from here on are in the open shard
        self._count = 0  # rows given so far
        # (published runs, the open shard's runs), each oldest first; replaced, never changed in place
        self._runs: tuple[tuple[_Run, ...], tuple[_Run, ...]] = ((), ())

    def __len__(self) -> int:
        return self._count

    def __contains__(self, sample_id: str) -> bool:
        return bool(self.lookup([sample_id])[0] >= 0)

    def contains(self, ids: Sequence[str]) -> np.ndarray:
        return self.lookup(ids) >= 0

    def lookup(self, ids: Sequence[str]) -> np.ndarray:
        """Global row of each id, -1 where the id is absent."""
        published, open_runs = self._runs
        if not published and not open_runs:
            return np.full(len(ids), -1, dtype=np.int64)
        return _find((*published, *open_runs), id_digests(ids))

    def lookup_digests(self, digests: np.ndarray) -> np.ndarray:
        """``lookup`` of ids given by their ``id_digests``."""
        published, open_runs = self._runs
        return _find((*published, *open_runs), _checked_digests(digests))

    def add(self, ids: Iterable[str]) -> None:
        """Give ``ids`` the next rows, in order (the caller has checked they are new)."""
        self.add_digests(id_digests(ids))

    def add_digests(self, digests: np.ndarray) -> None:
        """``add`` of ids given by their ``id_digests``: a shard's stored digests, say."""
        digests = _checked_digests(digests)
        if not len(digests):
            return
        published, open_runs = self._runs
        self._runs = (published, _stacked(open_runs, _sorted_run(digests, self._count)))
        self._count += len(digests)

    def publish(self, rows: int) -> None:
        """The open shard's ``rows`` rows are now in a published shard."""
        self.published += rows
        published, open_runs = self._runs
        for run in open_runs:
            published = _stacked(published, run)
        self._runs = (published, ())

    def seal(self) -> None:
        """Everything added so far is published (rows read back from existing shards)."""
        self.publish(self._count - self.published)

    def drop_open(self) -> None:
        """Forget the open shard's ids (it is being rewritten)."""
        published, open_runs = self._runs
        self._runs = (published, ())
        self._count -= sum(len(run.keys) for run in open_runs)

    def nbytes(self) -> int:
        """Bytes held by the index's arrays."""
        return sum(column.nbytes for runs in self._runs for run in runs for column in run)


def _checked_digests(digests: np.ndarray) -> np.ndarray:
    digests = np.asarray(digests)
    if digests.ndim != 2 or digests.shape[1] != 2 or digests.dtype.kind not in "iu" or digests.dtype.itemsize != 8:
        raise ValueError(f"digests must be [n, 2] uint64 (id_digests), got {list(digests.shape)} {digests.dtype}")
    return digests.astype(DIGEST_DTYPE, copy=False)
