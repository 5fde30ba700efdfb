"""Writing a cache: the only code that writes shards.

Rows go into an open shard held in memory. When it reaches ``max_samples`` rows or
``max_bytes`` (or on ``flush_shard()`` / ``close()``), its image is published through the
storage (temporary file, fsync, rename, directory fsync) and only then the manifest replaced
atomically. A reader therefore only ever sees complete shards, and a full disk fails a
publication cleanly, to be retried.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from . import faults
from .contract import FORMAT_NAME, WRITER_FIELDS, CacheError, CacheMeta
from .ids import normalize_ids
from .keys import RowIndex, id_digests
from .label_names import check_label_names, merge_label_names
from .manifest import SHARD_PATTERN, ShardInfo, check_writer_id, ids_name, index_name, load_manifest, manifest_bytes, now, shard_name
from .reader import open_storage, read_digests, read_rows
from .rng import view_seeds
from .shard import STRING_DTYPE, ShardHandle, decode_ids, encode_attrs, read_shard_meta
from .storage import Storage

DEFAULT_SHARD_SAMPLES = 65536
DEFAULT_SHARD_BYTES = 512 << 20
STAGE_ROWS = 1024
IMAGE_BLOCK_BYTES = 4 << 20  # the in-memory open shard grows in steps of this many bytes
Rows = dict[str, np.ndarray]  # one array per column (CacheMeta.columns), the same number of rows each


class CacheWriter:
    """Appends teacher outputs to a cache; see the module docstring for how shards are published.

    Opening takes the storage's writer lease, removes temporary files left by a crashed writer
    (their rows were never published), adopts complete shards that a crash left out of the
    manifest, and loads the ids already present so that ``append`` stores each id once.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str] | Storage,
        meta: CacheMeta,
        *,
        max_samples: int = DEFAULT_SHARD_SAMPLES,
        max_bytes: int = DEFAULT_SHARD_BYTES,
        compression: str | None = None,
        provenance: dict[str, Any] | None = None,
        label_names: list[str] | None = None,
        writer_id: str | None = None,
        lease_token: str | None = None,
    ) -> None:
        if max_samples < 1 or max_bytes < 1:
            raise ValueError("max_samples and max_bytes must be >= 1")
        self.storage = open_storage(directory)
        self.directory: Path | str = getattr(self.storage, "directory", self.storage.location)
        # This writer's files: its shards and its manifest are named by its id (manifest.py), so
        # that several writers share one cache and none ever writes another's files.
        self.writer_id = check_writer_id(writer_id)
        self.manifest_name = index_name(writer_id)
        self.meta = meta
        self.layout = meta.layout
        self.max_samples = max_samples
        self.max_bytes = max_bytes
        self.compression = compression
        # Where the rows came from, when not from a teacher (manifest.py); kept from an existing
        # manifest unless given.
        self.provenance = provenance
        # The name of each label index (manifest.py); merged with an existing manifest's.
        self.label_names = None if label_names is None else self._checked_label_names(label_names)
        self._shards: list[ShardInfo] = []
        # Rows are numbered across the published shards in manifest order, then the open shard,
        # so that a cache hit can be read back without scanning.
        self._rows = RowIndex()
        self._h5: h5py.File | None = None
        self._open_name: str | None = None
        self._open_rows = 0  # rows of the open shard: written to HDF5, then staged
        self._written_rows = 0
        self._staged: list[Rows] = []
        self._chunk_rows = meta.chunk_rows()
        # Appends are staged and written to HDF5 in pieces of at least this many rows: each h5py
        # call holds the GIL, and four resize-and-write calls per small batch stalled the
        # service's teacher thread (docs/benchmarks.md). A crash loses staged rows exactly as it
        # loses the rows of the unpublished open shard.
        self._stage_rows = max(1, min(self._chunk_rows, STAGE_ROWS))
        self._handles: dict[int, ShardHandle] = {}
        self._lease = self.storage.lease(writer_id, lease_token)
        try:
            self._recover()
        except BaseException:
            self._lease.release()
            raise

    # -- start-up ---------------------------------------------------------------------------
    def _recover(self) -> None:
        storage = self.storage
        recorded_names = None
        if storage.exists(self.manifest_name):
            manifest = load_manifest(storage, self.manifest_name)
            self._check_compatible(manifest.meta, storage.where(self.manifest_name))
            listed = manifest.shards
            if self.provenance is None:
                self.provenance = manifest.provenance
            recorded_names = manifest.label_names
            if recorded_names is not None:
                self.label_names = merge_label_names(recorded_names, self.label_names or [], storage.where(self.manifest_name))
        else:
            listed = []
        # Recovery touches this writer's files only: another writer may be writing its own.
        for name in storage.partial_puts():
            if self._owns(name) or name == self.manifest_name:
                storage.discard_partial(name)
        listed_names = {s.name for s in listed}
        adopted = []
        for name in sorted(storage.list()):
            if self._owns(name) and name not in listed_names:  # published, then a crash before the manifest
                digest, size = storage.sha256(name), storage.size(name)
                meta, n = read_shard_meta(storage.fetch(name, digest, size))
                self._check_compatible(meta, name)
                adopted.append(ShardInfo(storage, name, n, digest, size))
        self._shards = listed + adopted
        if self._shards:  # a named writer's shards have their digests beside them: no ids to read and hash
            load = read_digests if self.writer_id is not None else (lambda info: id_digests(read_rows(info, ("ids",))["ids"]))
            self._rows.add_digests(np.concatenate([load(info) for info in self._shards]))
        self._rows.seal()
        if adopted or not storage.exists(self.manifest_name) or self.label_names != recorded_names:
            self._write_manifest()

    def _owns(self, name: str) -> bool:
        match = SHARD_PATTERN.match(name)
        return match is not None and match.group("writer") == self.writer_id

    def _check_compatible(self, existing: CacheMeta, where: str) -> None:
        problem = self.meta.mismatch(existing, WRITER_FIELDS)
        if problem:
            raise CacheError(f"{where}: this cache was written by another teacher or input contract: {problem}")

    # -- public API -------------------------------------------------------------------------
    @property
    def shards(self) -> list[ShardInfo]:
        return list(self._shards)

    @property
    def pending_rows(self) -> int:
        """Rows appended to the open shard but not yet published."""
        return self._open_rows

    @property
    def capacity(self) -> int:
        """Rows per shard: max_samples, or as many whole rows as fit in max_bytes (at least one)."""
        return min(self.max_samples, max(1, self.max_bytes // max(1, self.meta.row_bytes())))

    def __contains__(self, sample_id: str) -> bool:
        return sample_id in self._rows

    def __len__(self) -> int:
        return len(self._rows)

    def lookup(self, ids: Any) -> np.ndarray:
        """Global row of each id (published or in the open shard), -1 where the id is absent."""
        return self._rows.lookup(ids)

    def record_label_names(self, names: list[str]) -> bool:
        """Merge ``names`` (label ``i`` is ``names[i]``) into the manifest's ``label_names``, and
        replace the manifest when that changed them. A CacheError when they conflict with the
        recorded ones (``merge_label_names``) or name more labels than the cache has classes;
        an OSError when the manifest cannot be written. Returns whether the manifest changed."""
        merged = merge_label_names(self.label_names, self._checked_label_names(names), self.storage.where(self.manifest_name))
        if merged == self.label_names:
            return False
        previous, self.label_names = self.label_names, merged
        try:
            self._write_manifest()
        except BaseException:
            self.label_names = previous
            raise
        return True

    def _checked_label_names(self, names: Any) -> list[str]:
        return check_label_names(names, self.meta.num_classes)

    def read_logits(self, rows: np.ndarray) -> np.ndarray:
        """The stored targets of global ``rows`` (from ``lookup``), decoded by the layout into
        float32 logits [len(rows), C] ([len(rows), V, C] with views, [.., L, C] for tokens)."""
        return self.layout.decode(self.read_fields(rows))

    def read_fields(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """The stored target fields of global ``rows`` (from ``lookup``), as the layout keeps
        them. Rows still in the open shard are read from it, so a sample answers as a cache hit
        as soon as it is appended, before its shard is published."""
        rows = np.asarray(rows, dtype=np.int64)
        spec = self.layout.fields(self.meta.num_classes)
        out = {name: np.zeros((len(rows), *shape), dtype=dtype) for name, (shape, dtype) in spec.items()}
        if len(rows) == 0:
            return out
        published = self._rows.published
        if rows.min() < 0 or rows.max() >= published + self._open_rows:
            raise ValueError("read_fields: row out of range")
        names = list(spec)
        starts = np.array([0] + [s.num_samples for s in self._shards], dtype=np.int64).cumsum()
        shard_of = np.searchsorted(starts, rows, side="right") - 1
        for shard in np.unique(shard_of):
            where = np.flatnonzero(shard_of == shard)
            local = rows[where] - starts[shard]
            part = self._published_targets(int(shard), local, names) if shard < len(self._shards) else self._open_targets(local, names)
            for name in names:
                out[name][where] = part[name]
        return out

    def append(
        self, ids: Any, inputs: np.ndarray, logits: np.ndarray, labels: np.ndarray | None = None, lengths: np.ndarray | None = None
    ) -> int:
        """Append a batch of the teacher's float32 ``logits`` ([B, C]; [B, V, C] for the V views
        of a cache with views; [B, L, C] for token sequences, with their ``lengths``), encoded
        here by the cache's layout. ``inputs`` are the raw samples (a cache with views stores
        them once, with the seeds of their views). Ids already in the cache are skipped.
        Returns the rows written. The service encodes on the teacher's device instead and
        calls ``append_encoded``."""
        inputs = np.asarray(inputs)
        norm_ids = normalize_ids(ids, len(inputs))
        logits = np.asarray(logits)
        if logits.shape != (len(inputs), *self.meta.teacher_output_shape()):
            raise ValueError(f"logits have shape {list(logits.shape)}, expected {[len(inputs), *self.meta.teacher_output_shape()]}")
        if not np.isfinite(logits).all():
            raise ValueError("logits contain NaN or Inf")
        fields = self.layout.encode(logits, self.meta.draw_seeds(norm_ids), lengths)
        return self.append_encoded(norm_ids, inputs, fields, labels)

    def append_encoded(self, ids: Any, inputs: np.ndarray, fields: dict[str, np.ndarray], labels: np.ndarray | None = None) -> int:
        """Append a batch whose targets the layout has encoded already (``fields``: each of
        ``layout.fields``, B rows): what the service's teacher computes on its device, and
        what its journal holds. Ids already in the cache are skipped. Returns the rows written."""
        inputs = np.asarray(inputs)
        n = len(inputs)
        norm_ids = normalize_ids(ids, n)
        labels = np.full(n, -1, dtype=np.int64) if labels is None else np.asarray(labels)
        self._validate_batch(norm_ids, inputs, fields, labels)
        keep = ~self._rows.contains(norm_ids)
        if not keep.any():
            return 0
        rows: Rows = {"ids": norm_ids, "inputs": inputs, "labels": labels.astype(np.int64)}
        if self.meta.has_views:
            rows["view_seeds"] = view_seeds(self.meta.view_salt, norm_ids, self.meta.views_per_id)
        rows.update(fields)
        if not keep.all():
            rows = {name: values[keep] for name, values in rows.items()}
        total, written = len(rows["ids"]), 0
        while written < total:
            if self._open_rows >= self.capacity:
                self.flush_shard()  # full, and its publication failed before (a full disk): retry first
            take = slice(written, written + max(1, self.capacity - self._open_rows))
            piece = {name: values[take] for name, values in rows.items()}
            self._stage(piece)
            written += len(piece["ids"])
            if self._open_rows >= self.capacity:
                self.flush_shard()
        return written

    def flush(self) -> None:
        """Write the staged rows into the open shard, which is in memory (not a durability point)."""
        if self._h5 is not None:
            self._drain()
            self._h5.flush()

    def flush_shard(self) -> ShardInfo | None:
        """Publish the open shard, however full: write its image, fsync, rename, manifest.

        On an OSError (a full disk) nothing is published and the shard stays open with all its
        rows, so a later call (or the next ``append``) tries again."""
        if self._h5 is None:
            return None
        name = self._open_name
        assert name is not None
        self._drain()
        if 0 < self._open_rows < self._chunk_rows:
            self._compact()
            self._drain()
        self._h5.flush()
        image = self._h5.id.get_file_image()
        ids_sha256 = None
        if self.writer_id is not None:  # several writers: readers read each id once by these
            digests = id_digests(decode_ids(self._h5["ids"][: self._open_rows])).tobytes()
            self.storage.put(ids_name(name), digests)
            ids_sha256 = hashlib.sha256(digests).hexdigest()
        self.storage.put(name, image, crash_points=(faults.SHARD_CLOSED, faults.SHARD_RENAMED))
        info = ShardInfo(self.storage, name, self._open_rows, hashlib.sha256(image).hexdigest(), len(image), ids_sha256)
        del image
        self._h5.close()
        self._h5, self._open_name, self._open_rows, self._written_rows = None, None, 0, 0
        self._shards.append(info)
        self._rows.publish(info.num_samples)
        self._write_manifest()
        return info

    def close(self) -> None:
        """Publish the open shard and release the cache."""
        try:
            self.flush_shard()
        finally:
            self._release()

    def abort(self) -> None:
        """Drop the open shard's unpublished rows and release the cache."""
        if self._h5 is not None:
            with contextlib.suppress(Exception):
                self._h5.close()
            self._h5 = None
        self._staged = []
        self._release()

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    # -- internals --------------------------------------------------------------------------
    def _release(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles = {}
        self._lease.release()

    def _published_targets(self, shard: int, local: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
        handle = self._handles.get(shard)
        if handle is None:
            handle = self._handles[shard] = ShardHandle(self._shards[shard].path)
        lo, hi = int(local.min()), int(local.max()) + 1
        block = handle.read(lo, hi, names)
        return {name: values[local - lo] for name, values in block.items()}

    def _open_targets(self, local: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
        assert self._h5 is not None
        spec = self.layout.fields(self.meta.num_classes)
        out = {name: np.empty((len(local), *spec[name][0]), dtype=spec[name][1]) for name in names}
        written = local < self._written_rows
        if written.any():
            part = local[written]
            lo, hi = int(part.min()), int(part.max()) + 1
            for name in names:
                out[name][written] = self._h5[name][lo:hi][part - lo]
        if not written.all():
            index = local[~written] - self._written_rows
            for name in names:
                out[name][~written] = np.concatenate([rows[name] for rows in self._staged])[index]
        return out

    def _validate_batch(self, ids: np.ndarray, inputs: np.ndarray, fields: dict[str, np.ndarray], labels: np.ndarray) -> None:
        n, meta = len(ids), self.meta
        if tuple(inputs.shape[1:]) != meta.input_shape:
            raise ValueError(f"inputs have sample shape {list(inputs.shape[1:])}, cache expects {list(meta.input_shape)}")
        if inputs.dtype != np.dtype(meta.input_dtype):
            raise ValueError(f"inputs are {inputs.dtype}, cache expects {meta.input_dtype}")
        expected = self.layout.fields(meta.num_classes)
        if set(fields) != set(expected):
            raise ValueError(f"targets have fields {sorted(fields)}, the {meta.logits_layout} layout stores {sorted(expected)}")
        for name, (shape, dtype) in expected.items():
            values = fields[name]
            if values.shape != (n, *shape) or values.dtype != dtype:
                raise ValueError(f"{name} is {list(values.shape)} {values.dtype}, expected {[n, *shape]} {dtype}")
        problem = self.layout.problem(fields)
        if problem is not None:
            raise ValueError(f"targets hold {problem}")
        if labels.shape != (n,) or labels.dtype.kind not in "iu":
            raise ValueError(f"labels must be {n} integers, got shape {list(labels.shape)} of {labels.dtype}")
        if ((labels < -1) | (labels >= meta.num_classes)).any():
            raise ValueError(f"labels must lie in [-1, {meta.num_classes - 1}]")
        if len(set(ids.tolist())) != n:
            raise ValueError("ids must be unique within a batch")

    def _next_index(self) -> int:
        indices = [
            int(m.group("index"))
            for name in self.storage.list()
            if (m := SHARD_PATTERN.match(name)) and m.group("writer") == self.writer_id
        ]
        return max(indices, default=-1) + 1

    def _open_shard(self, name: str | None = None, rows: int | None = None) -> None:
        meta = self.meta
        self._open_name = name or shard_name(self._next_index(), self.writer_id)
        # The open shard lives in memory (HDF5's core driver) and reaches the storage as one
        # plain write when it is published. HDF5 itself never writes to the disk, so a full disk
        # is a clean OSError in flush_shard, never a failed write inside HDF5, which left h5py's
        # file unusable and crashed the process at close (docs/reliability.md). Unpublished rows
        # are lost in a crash either way; the service's journal holds them.
        h5 = h5py.File(
            self.storage.where(f".{self._open_name}.tmp"), "w", libver="latest", driver="core", backing_store=False,
            block_size=IMAGE_BLOCK_BYTES,
        )  # fmt: skip
        rows = rows or self._chunk_rows
        for key, value in encode_attrs({**meta.to_dict(), "format": FORMAT_NAME, "chunk_rows": rows, "created_at": now()}).items():
            h5.attrs[key] = value
        for column, (row_shape, dtype) in meta.columns().items():
            h5.create_dataset(
                column, shape=(0, *row_shape), maxshape=(None, *row_shape), dtype=STRING_DTYPE if column == "ids" else dtype,
                chunks=(rows, *row_shape), compression=self.compression,
            )  # fmt: skip
        self._h5, self._open_rows, self._written_rows, self._staged = h5, 0, 0, []

    def _compact(self) -> None:
        """Rewrite a shard smaller than one chunk with chunks of its own size: HDF5 allocates
        whole chunks, so a 100-row shard in 16384-row chunks would be mostly empty space."""
        assert self._h5 is not None
        rows = self._open_rows
        columns = {name: self._h5[name][:rows] for name in self.meta.columns()}
        columns["ids"] = decode_ids(columns["ids"])
        self._h5.close()
        self._open_shard(self._open_name, rows)
        self._rows.drop_open()
        self._stage(columns)

    def _stage(self, rows: Rows) -> None:
        """Assign the rows to the open shard; they reach HDF5 in ``_drain``."""
        if self._h5 is None:
            self._open_shard()
        self._staged.append(rows)
        self._rows.add(rows["ids"].tolist())
        self._open_rows += len(rows["ids"])
        if self._open_rows - self._written_rows >= self._stage_rows:
            self._drain()

    def _drain(self) -> None:
        """Write the staged rows to the open shard: one resize and one write per dataset."""
        if not self._staged:
            return
        assert self._h5 is not None
        staged, self._staged = self._staged, []
        start, stop = self._written_rows, self._open_rows
        for name in self.meta.columns():
            values = np.concatenate([rows[name] for rows in staged]) if len(staged) > 1 else staged[0][name]
            dataset = self._h5[name]
            dataset.resize(stop, axis=0)
            dataset[start:stop] = values
            if name == "inputs":
                faults.crash_point(faults.SHARD_PARTLY_WRITTEN)
        self._written_rows = stop

    def _write_manifest(self) -> None:
        self.storage.put(
            self.manifest_name,
            manifest_bytes(self.meta, self._shards, self.provenance, self.label_names),
            crash_points=(faults.MANIFEST_TMP_WRITTEN, faults.MANIFEST_REPLACED),
        )
