"""The cache's write-ahead journal: how the service acknowledges samples before their shard is
published.

A shard is published only when it is full (see ``offline.cache.writer``), which can be
tens of thousands of samples later than the request that brought a sample in. So that the
service can answer "stored" at once and still lose nothing to a ``kill -9``, every batch it
stores is first appended to ``DIR/.journal`` and fsynced (one fsync per group of batches:
group commit), and only then written to the open shard. On the next start the writer replays
the journal into the cache (``CacheWriter.append`` skips ids already present, so replay is
idempotent), publishes the result, and empties the journal. The journal is emptied, too, each
time everything it holds has been published.

Record layout, little-endian::

    magic   4 bytes   b"KDJ2"
    crc32   uint32    of the payload
    length  uint64    payload bytes
    payload           uint32 header length, a JSON header {"n", "ids"}, then the raw bytes of
                      inputs [n, *input_shape] (cache input dtype), each field of the cache's
                      target layout in ``layout.fields`` order (its row shape and dtype) and
                      labels [n] (int64)

The journal holds the targets as the shard will, encoded (on the teacher's device, by the
service): a sample costs the journal what it costs the cache, plus its id (top-k of 50,000
classes: 16 values, not 50,000 float32 logits), and replay appends the fields as they are
(``CacheWriter.append_encoded``). A journal of an earlier version (b"KDJ1", float32 logits
[n, C] in place of the fields) is still replayed, encoded then.

A record is valid only if it is complete and its checksum matches. A crash can tear only the
last record (records are appended by one thread, in order), and that record was never
acknowledged, since acknowledgement waits for the fsync; replay stops there and the torn tail
is cut off.

When a group fills the open shard, the shard is published mid-group and the journal then holds
the published rows and the few that began the next shard. ``Journal.keep_last`` rewrites it to
hold only those (a new file, fsynced, renamed over the journal), so that the next shard fills
up too: publishing the few rows to empty the journal would follow every full shard with a
splinter (``[256, 4, 256, 35, ...]``, issue 20).

Readers of the cache (``offline-distill``) never read the journal: its samples are not in the
cache until the service, restarted, folds them into a published shard. ``cache-inspect``
counts the journal's samples that no published shard holds yet (``unpublished``).
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from .cache import CacheError, CacheMeta
from .cache.storage import fsync_path

JOURNAL_NAME = ".journal"


def journal_name(writer: str | None = None) -> str:
    """The journal of writer id ``writer`` in its spool (the cache's unnamed writer: ``.journal``)."""
    return JOURNAL_NAME if writer is None else f".journal-{writer}"


COMPACTING_NAME = ".journal.compacting"  # keep_last's new journal, before it is renamed over the old
MAGIC = b"KDJ2"
LEGACY_MAGIC = b"KDJ1"  # float32 logits in place of the encoded fields
_HEAD = struct.Struct("<4sIQ")
_LEN = struct.Struct("<I")


class JournalRecord(NamedTuple):
    ids: list[str]
    inputs: np.ndarray
    fields: dict[str, np.ndarray]  # the target layout's fields, encoded
    labels: np.ndarray


def encode_record(meta: CacheMeta, ids: list[str], inputs: np.ndarray, fields: dict[str, np.ndarray], labels: np.ndarray) -> bytes:
    n = len(ids)
    header = json.dumps({"n": n, "ids": ids}, separators=(",", ":")).encode()
    spec = meta.layout.fields(meta.num_classes)
    payload = b"".join(
        (
            _LEN.pack(len(header)),
            header,
            np.ascontiguousarray(inputs, dtype=meta.input_dtype).tobytes(),
            *(np.ascontiguousarray(fields[name], dtype=dtype).tobytes() for name, (_, dtype) in spec.items()),
            np.ascontiguousarray(labels, dtype=np.int64).tobytes(),
        )
    )
    return _HEAD.pack(MAGIC, zlib.crc32(payload), len(payload)) + payload


def _take(payload: memoryview, offset: int, dtype: Any, shape: tuple[int, ...]) -> tuple[np.ndarray, int]:
    count = int(np.prod(shape, dtype=np.int64))
    array = np.frombuffer(payload, dtype=dtype, count=count, offset=offset).reshape(shape)
    return array, offset + array.nbytes


def _decode_payload(meta: CacheMeta, payload: memoryview, legacy: bool = False) -> JournalRecord:
    (header_len,) = _LEN.unpack_from(payload, 0)
    header = json.loads(bytes(payload[_LEN.size : _LEN.size + header_len]))
    n, ids = int(header["n"]), [str(v) for v in header["ids"]]
    inputs, offset = _take(payload, _LEN.size + header_len, meta.input_dtype, (n, *meta.input_shape))
    if legacy:
        logits, offset = _take(payload, offset, np.float32, (n, *meta.teacher_output_shape()))
    else:
        fields = {}
        for name, (shape, dtype) in meta.layout.fields(meta.num_classes).items():
            fields[name], offset = _take(payload, offset, dtype, (n, *shape))
    labels, offset = _take(payload, offset, np.int64, (n,))
    if offset != len(payload) or len(ids) != n:
        raise ValueError("record size does not match its header")
    if legacy:
        fields = meta.layout.encode(logits, meta.draw_seeds(ids))
    return JournalRecord(ids, inputs, fields, labels)


def read_journal(path: Path, meta: CacheMeta) -> tuple[list[JournalRecord], int, int]:
    """The valid records of a journal, the byte length they span, and the bytes after them (a
    torn tail, or 0)."""
    if not path.exists():
        return [], 0, 0
    data = memoryview(path.read_bytes())
    records, offset = [], 0
    while offset + _HEAD.size <= len(data):
        magic, crc, length = _HEAD.unpack_from(data, offset)
        end = offset + _HEAD.size + length
        if magic not in (MAGIC, LEGACY_MAGIC) or end > len(data):
            break
        payload = data[offset + _HEAD.size : end]
        if zlib.crc32(payload) != crc:
            break
        try:
            records.append(_decode_payload(meta, payload, legacy=magic == LEGACY_MAGIC))
        except (ValueError, KeyError, TypeError) as exc:
            raise CacheError(f"{path}: journal record at byte {offset} does not match the cache ({exc})") from None
        offset = end
    return records, offset, len(data) - offset


def pending_samples(directory: Path, meta: CacheMeta) -> int:
    """Samples in a journal not yet folded into shards (some may already be published)."""
    records, _, _ = read_journal(Path(directory) / JOURNAL_NAME, meta)
    return sum(len(r.ids) for r in records)


class Unpublished(NamedTuple):
    ids: list[str]
    fields: dict[str, np.ndarray]  # the target layout's fields, as the service stored them
    labels: np.ndarray


def unpublished(directory: Path, meta: CacheMeta, published_ids: Iterable[np.ndarray]) -> Unpublished:
    """The journal's samples that no published shard holds yet, each id once. ``published_ids``
    yields the ids of the published shards, newest first. The journal is emptied whenever
    everything in it is published, so the samples of it that are published fill the newest
    shards: the scan stops at the first shard that holds none of them."""
    records, _, _ = read_journal(Path(directory) / JOURNAL_NAME, meta)
    if not records:
        return Unpublished([], meta.layout.empty(meta.num_classes), np.empty(0, np.int64))
    ids = np.array([sample_id for record in records for sample_id in record.ids], dtype=str)
    keep = np.zeros(len(ids), dtype=bool)
    keep[np.unique(ids, return_index=True)[1]] = True
    for shard_ids in published_ids:
        published = np.isin(ids, np.asarray(shard_ids).astype(str))
        if not published.any():
            break
        keep &= ~published
    return Unpublished(
        ids[keep].tolist(),
        {name: np.concatenate([record.fields[name] for record in records])[keep] for name in records[0].fields},
        np.concatenate([record.labels for record in records])[keep],
    )


class Journal:
    """Append-only, owned by one thread. ``append`` buffers nothing: each record is one
    ``write``; ``sync`` makes everything written so far durable. It knows where each record it
    appended starts, so that ``keep_last`` can drop the samples published since."""

    def __init__(self, directory: Path, name: str = JOURNAL_NAME) -> None:
        self.path = Path(directory) / name
        (self.path.parent / COMPACTING_NAME).unlink(missing_ok=True)  # a keep_last a crash cut short
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.bytes = os.fstat(self._fd).st_size
        self.samples = 0
        self._records: list[tuple[int, int]] = []  # (offset, samples) of each record appended
        self._untracked = self.bytes > 0  # records written before this object: not in _records

    def append(self, record: bytes, samples: int) -> None:
        view = memoryview(record)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        self._records.append((self.bytes, samples))
        self.bytes += len(record)
        self.samples += samples

    def sync(self) -> None:
        os.fdatasync(self._fd)

    def truncate(self, length: int = 0) -> None:
        """Cut the journal to ``length`` bytes (0: everything in it is published) and sync."""
        os.ftruncate(self._fd, length)
        os.fsync(self._fd)
        self.bytes = length
        self._records = [(offset, n) for offset, n in self._records if offset < length]
        self.samples = sum(n for _, n in self._records)
        if length == 0:
            self._untracked = False

    def keep_last(self, meta: CacheMeta, samples: int) -> bool:
        """Rewrite the journal to hold only its last ``samples`` samples, durably: a new file,
        fsynced and renamed over the journal, so that a crash leaves the old journal (whose
        replay skips the ids already published) or the new one. Returns False, changing
        nothing, when the journal holds records this object did not append."""
        if self._untracked or not 0 < samples <= self.samples:
            return False
        skip = self.samples - samples
        first = 0
        while skip >= self._records[first][1]:
            skip -= self._records[first][1]
            first += 1
        start = self._records[first][0]
        with open(self.path, "rb") as journal:
            journal.seek(start)
            tail = memoryview(journal.read(self.bytes - start))
        _, _, length = _HEAD.unpack_from(tail, 0)
        end = _HEAD.size + length
        if skip:
            record = _decode_payload(meta, tail[_HEAD.size : end])
            fields = {name: values[skip:] for name, values in record.fields.items()}
            head = encode_record(meta, record.ids[skip:], record.inputs[skip:], fields, record.labels[skip:])
        else:
            head = bytes(tail[:end])
        compacting = self.path.parent / COMPACTING_NAME
        with open(compacting, "wb") as new:
            new.write(head)
            new.write(tail[end:])
            new.flush()
            os.fsync(new.fileno())
        fd = os.open(compacting, os.O_WRONLY | os.O_APPEND)  # before the rename: appends never go to the old file
        try:
            os.replace(compacting, self.path)
        except OSError:
            os.close(fd)
            raise
        os.close(self._fd)
        self._fd = fd
        shift = len(head) - end - start
        self._records = [(0, self._records[first][1] - skip)] + [(offset + shift, n) for offset, n in self._records[first + 1 :]]
        self.bytes, self.samples = len(head) + len(tail) - end, samples
        fsync_path(self.path.parent)
        return True

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
