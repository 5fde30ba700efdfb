"""The writer thread: the one owner of the cache directory while the service runs.

Every cache operation of the service goes through ``CacheStore``'s single thread, in order:

* ``write`` appends a batch's new samples to the journal (``offline.journal``), and, once a
  group of such batches is in it, makes them durable with one ``fdatasync`` (group commit)
  before writing them to the open shard with ``CacheWriter.append``. The returned future
  resolves after that, so a request acknowledged in ``durable`` mode survives ``kill -9``.
* ``lookup`` finds which ids the cache already has and reads their stored target fields back.
* ``record_label_names`` merges a request's label names into the manifest's ``label_names``
  (``CacheWriter.record_label_names``); the future resolves once the manifest holding them is
  durable, or fails with ``CacheError`` when they conflict with the recorded ones.

Whenever everything in the journal is in published shards, the journal is emptied; when a group
fills a shard and begins the next, the journal is cut down to the rows of the new open shard
(``Journal.keep_last``), so every shard but the last fills up. On start, the journal a crash left
behind is replayed into the cache and published first.

Errors: a full disk fails the writes of that group with ``StoreError`` (status 507) and the
service goes on; it recovers as soon as space is freed. Usually the free-space check refuses
the group before anything is written and the journal is cut back; when the disk fills later
(another process), the group stays in the journal and the open shard, which stays in memory
until a publication succeeds. Either way nothing acknowledged is lost.
"""

from __future__ import annotations

import contextlib
import errno
import os
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..offline.cache import CacheMeta, CacheWriter, faults, normalize_ids
from ..offline.cache.reader import open_storage
from ..offline.cache.storage import Storage
from ..offline.journal import Journal, encode_record, journal_name, read_journal
from .spool import Spool


class StoreError(Exception):
    """A write the cache could not take. ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 500) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Recovery:
    """What start-up found: journal samples replayed, how many were new, torn bytes cut."""

    journal_samples: int = 0
    restored_samples: int = 0
    torn_bytes: int = 0


@dataclass
class _Task:
    kind: str  # "write", "lookup", "label_names" or "stop"
    args: tuple[Any, ...] = ()
    future: Future = field(default_factory=Future)


def _replay(writer: CacheWriter, journal: Path, meta: CacheMeta) -> Recovery:
    records, _, torn = read_journal(journal, meta)
    recovery = Recovery(journal_samples=sum(len(record.ids) for record in records), torn_bytes=torn)
    for record in records:
        recovery.restored_samples += writer.append_encoded(np.array(record.ids, dtype=object), record.inputs, record.fields, record.labels)
    writer.flush_shard()
    return recovery


class CacheStore:
    def __init__(
        self,
        cache: str | Path | Storage,
        meta: CacheMeta,
        *,
        spool: Path | None = None,
        writer_id: str | None = None,
        durable: bool = True,
        max_shard_samples: int = 65536,
        max_shard_bytes: int = 512 << 20,
        max_pending: int = 64,
        on_write: Callable[[int, float, int], None] | None = None,
    ) -> None:
        """Opens the cache (taking its lock; raises ``CacheError`` for a cache of another
        teacher) and folds in what a crash left in the journal. ``on_write(stored, seconds,
        cache_samples)`` is called from the writer thread after each group, for metrics: the
        samples newly stored, the group's time, the samples the cache now holds.

        ``spool`` is the local directory of the journal (and of nothing else: the open shard is
        in memory): by default a local cache's own directory; a cache on object storage needs
        one (``Spool``). ``writer_id`` names this writer's files in the cache (manifest.py)."""
        self.storage = open_storage(cache)
        local = self.storage.local_path("")
        if spool is None and local is None:
            raise ValueError("a cache on object storage needs a local spool directory")
        self.spool = Spool(Path(spool if spool is not None else local), writer_id)
        self.directory = self.spool.directory  # where the journal is, for messages
        self._space_paths = [self.spool.directory] + ([local] if local is not None else [])
        self.meta = meta
        self.durable = durable
        self._writer_options = {"max_samples": max_shard_samples, "max_bytes": max_shard_bytes, "writer_id": writer_id}
        self._journal_path = self.spool.directory / journal_name(writer_id)
        try:
            self.writer = CacheWriter(self.storage, meta, lease_token=self.spool.token, **self._writer_options)
        except BaseException:
            self.spool.release()
            raise
        try:
            self.recovery = _replay(self.writer, self._journal_path, meta)
            self.journal = Journal(self.spool.directory, journal_name(writer_id))
            self.journal.truncate(0)
        except BaseException:
            self.writer.abort()
            self.spool.release()
            raise
        self._tasks: queue.Queue[_Task] = queue.Queue()
        self._write_slots = threading.BoundedSemaphore(max_pending)
        self.broken: BaseException | None = None
        self.close_error: BaseException | None = None  # why close() could not publish, if it could not
        self._closed = False
        self._on_write = on_write
        self._thread = threading.Thread(target=self._run, name="cache-writer", daemon=True)
        self._thread.start()

    # -- called from any thread -------------------------------------------------------------
    def write(self, ids: np.ndarray, inputs: np.ndarray, fields: dict[str, np.ndarray], labels: np.ndarray) -> Future:
        """Queue a batch for the cache; the future gives the rows newly stored. Blocks while
        ``max_pending`` batches wait, which pushes back on the batcher and so on clients."""
        if self._closed or self.broken is not None:
            raise StoreError(f"the cache writer is {'stopped' if self._closed else 'broken: ' + str(self.broken)}", status=503)
        task = _Task("write", (ids, inputs, fields, labels))
        self._write_slots.acquire()
        self._tasks.put(task)
        return task.future

    def lookup(self, ids: np.ndarray) -> Future:
        """The future gives (rows, the target fields of the rows >= 0): rows[i] is -1 for a miss. Never
        blocks, so the event loop may call it."""
        task = _Task("lookup", (ids,))
        self._tasks.put(task)
        return task.future

    def record_label_names(self, names: list[str]) -> Future:
        """Queue ``names`` for the manifest; the future gives whether the manifest changed. The
        writer thread merges them, so two requests racing with conflicting names cannot both be
        recorded. Never blocks."""
        if self._closed or self.broken is not None:
            raise StoreError(f"the cache writer is {'stopped' if self._closed else 'broken: ' + str(self.broken)}", status=503)
        task = _Task("label_names", (names,))
        self._tasks.put(task)
        return task.future

    @property
    def label_names(self) -> list[str] | None:
        """The label names the manifest records now (read on any thread)."""
        return self.writer.label_names

    def known(self, ids: np.ndarray) -> bool:
        """Whether any of ``ids`` may be in the cache, answered on the caller's thread (a search
        of the id index's sorted runs, which are replaced, never changed, so any thread sees one
        consistent set), so that requests of new samples skip the writer thread's queue. A True
        answer is confirmed by ``lookup`` on the writer thread."""
        return bool((self.writer.lookup(ids) >= 0).any())

    @property
    def num_samples(self) -> int:
        return len(self.writer)

    def close(self) -> None:
        """Finish queued work, publish the open shard, empty the journal, release the cache."""
        if self._closed:
            return
        self._closed = True
        if not self._thread.is_alive():
            return
        stop = _Task("stop")
        self._tasks.put(stop)
        try:
            stop.future.result()
        except BaseException as exc:
            self.close_error = exc
            raise
        finally:
            self._thread.join()

    # -- the writer thread ------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            group = [self._tasks.get()]
            while len(group) < 256:
                try:
                    group.append(self._tasks.get_nowait())
                except queue.Empty:
                    break
            writes = [t for t in group if t.kind == "write"]
            if writes:
                try:
                    self._write_group(writes)
                except Exception as exc:  # noqa: BLE001 - a bug must fail requests, not hang them
                    self._fail(writes, exc, None)
                finally:
                    for _ in writes:
                        self._write_slots.release()
            for task in group:
                if task.kind == "lookup":
                    self._lookup(task)
                elif task.kind == "label_names":
                    self._record_label_names(task)
            stop = next((t for t in group if t.kind == "stop"), None)
            if stop is not None:
                self._shutdown(stop)
                return

    def _lookup(self, task: _Task) -> None:
        try:
            (ids,) = task.args
            rows = self.writer.lookup(ids)
            task.future.set_result((rows, self.writer.read_fields(rows[rows >= 0])))
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting request
            task.future.set_exception(exc)

    def _record_label_names(self, task: _Task) -> None:
        try:
            task.future.set_result(self.writer.record_label_names(*task.args))
        except OSError as exc:
            status = 507 if exc.errno in (errno.ENOSPC, errno.EDQUOT) else 500
            task.future.set_exception(StoreError(f"cannot record label_names in the cache's manifest ({exc})", status=status))
        except BaseException as exc:  # noqa: BLE001 - a CacheError (a conflict) or a bug, handed to the waiting request
            task.future.set_exception(exc)

    def _write_group(self, writes: list[_Task]) -> None:
        started = time.perf_counter()
        journal_start = self.journal.bytes
        batches = []
        seen: set[str] = set()  # concurrent requests may bring the same new id in one group
        try:
            self._check_space(sum(len(t.args[0]) for t in writes))
            for task in writes:
                ids, inputs, fields, labels = task.args
                ids = normalize_ids(ids, len(inputs))
                new = np.zeros(len(ids), dtype=bool)
                for i, sample_id in enumerate(ids):
                    if sample_id not in seen and sample_id not in self.writer:
                        seen.add(sample_id)
                        new[i] = True
                if new.any():
                    if not new.all():
                        ids, inputs, labels = ids[new], inputs[new], labels[new]
                        fields = {name: values[new] for name, values in fields.items()}
                    self.journal.append(encode_record(self.meta, ids.tolist(), inputs, fields, labels), len(ids))
                batches.append((ids, inputs, fields, labels) if new.any() else None)
            if self.durable:
                self.journal.sync()
                faults.crash_point(faults.JOURNAL_SYNCED)
        except OSError as exc:
            self._fail(writes, exc, journal_start)
            return
        stored = 0
        try:
            for batch in batches:
                if batch is not None:
                    stored += self.writer.append_encoded(*batch)
            self._checkpoint()
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                # A shard could not be published (the disk filled after the free-space check,
                # from another process). The writer keeps it open in memory and retries on the
                # next write; the journal keeps these batches, so nothing here is lost.
                self._fail(writes, exc, None)
                return
            # The journal holds these batches; rebuild the open shard from it, which stores them.
            try:
                self._reopen()
            except Exception as reopen_exc:  # noqa: BLE001
                self.broken = reopen_exc
                self._fail(writes, reopen_exc, None)
                return
        for task, batch in zip(writes, batches, strict=True):
            task.future.set_result(0 if batch is None else len(batch[0]))
        if self._on_write is not None:
            self._on_write(stored, time.perf_counter() - started, self.num_samples)

    def _check_space(self, samples: int) -> None:
        """Refuse a group before writing anything when the disk cannot take it: its rows go to
        the journal and to the shard, and HDF5 allocates whole chunks. HDF5 must never meet a
        full disk itself: a failed write leaves its file handle unusable (seen: a crash at
        close), while a refusal here leaves the cache as it was and the service recovers as
        soon as space is freed."""
        meta = self.meta
        chunk = meta.chunk_rows() * meta.row_bytes()
        needed = 2 * samples * (meta.row_bytes() + 64) + 2 * chunk + (1 << 20)
        for path in self._space_paths:
            stats = os.statvfs(path)
            if stats.f_bavail * stats.f_frsize < needed:
                raise OSError(
                    errno.ENOSPC, f"{path}: {stats.f_bavail * stats.f_frsize} bytes free, a group of {samples} samples needs {needed}"
                )

    def _checkpoint(self) -> None:
        if self.journal.bytes == 0:
            return
        pending = self.writer.pending_rows
        if pending == 0:
            self.journal.truncate(0)  # a shard rolled over exactly at a batch boundary
        elif self.journal.samples > pending and not self.journal.keep_last(self.meta, pending):
            # A shard was published in this group: the journal keeps only the open shard's rows
            # (keep_last), which go on filling it. Publishing them instead left a splinter after
            # every full shard (issue 20); that stays the fallback for a journal this store did
            # not write.
            self.writer.flush_shard()
            self.journal.truncate(0)

    def _reopen(self) -> None:
        self.writer.abort()
        self.writer = CacheWriter(self.storage, self.meta, lease_token=self.spool.token, **self._writer_options)
        _replay(self.writer, self._journal_path, self.meta)
        self.journal.truncate(0)

    def _fail(self, writes: list[_Task], exc: BaseException, journal_start: int | None) -> None:
        if journal_start is not None:
            with contextlib.suppress(OSError):
                self.journal.truncate(journal_start)
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            # Cut back, the journal holds nothing of these requests; otherwise it keeps them.
            outcome = "nothing from this request was stored" if journal_start is not None else "retry later"
            error = StoreError(f"cache disk is full ({self.directory}): {outcome}", status=507)
        else:
            error = StoreError(f"cache write failed ({type(exc).__name__}: {exc})", status=500)
        for task in writes:
            if not task.future.done():
                task.future.set_exception(error)

    def _shutdown(self, stop: _Task) -> None:
        try:
            self.writer.close()
            self.journal.truncate(0)
            self.journal.close()
            self._journal_path.unlink(missing_ok=True)
            self.spool.release()
            stop.future.set_result(None)
        except BaseException as exc:  # noqa: BLE001
            stop.future.set_exception(exc)
