"""Row keys: which stored row holds a sample's targets.

A cache stores each sample id once, so the key of a row is its id, and rows are numbered
globally: across the published shards in manifest order, then the open shard. The service asks
the writer's ``RowIndex`` whether ids are known and where, to answer cache hits without
scanning. A cache with several augmented views per id keeps one row per id, with the views
inside it, so a view is addressed as (row, view index) and this index stays per id. Numpy only.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np


class RowIndex:
    """id → global row, for the published shards and the open one."""

    def __init__(self) -> None:
        self._rows: dict[str, int] = {}
        self.published = 0  # rows in published shards; rows from here on are in the open shard
        self._open: list[list[str]] = []  # the open shard's ids, so that they can be dropped

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, sample_id: str) -> bool:
        return sample_id in self._rows

    def contains(self, ids: Sequence[str]) -> np.ndarray:
        rows = self._rows
        return np.fromiter((sample_id in rows for sample_id in ids), dtype=bool, count=len(ids))

    def lookup(self, ids: Sequence[str]) -> np.ndarray:
        """Global row of each id, -1 where the id is absent."""
        get = self._rows.get
        return np.fromiter((get(sample_id, -1) for sample_id in ids), dtype=np.int64, count=len(ids))

    def add(self, ids: Iterable[str]) -> None:
        """Give ``ids`` the next rows, in order (the caller has checked they are new)."""
        ids = list(ids)
        start = len(self._rows)
        self._rows.update(zip(ids, range(start, start + len(ids)), strict=True))
        self._open.append(ids)

    def publish(self, rows: int) -> None:
        """The open shard's ``rows`` rows are now in a published shard."""
        self.published += rows
        self._open = []

    def seal(self) -> None:
        """Everything added so far is published (rows read back from existing shards)."""
        self.publish(len(self._rows) - self.published)

    def drop_open(self) -> None:
        """Forget the open shard's ids (it is being rewritten)."""
        for ids in self._open:
            for sample_id in ids:
                del self._rows[sample_id]
        self._open = []
