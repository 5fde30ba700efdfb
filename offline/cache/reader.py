"""Reading a published cache: its manifest, its shards, their verification."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .contract import SHARD_FIELDS, CacheError
from .diagnostics import SoftTargetAccumulator, sample_size
from .keys import DIGEST_BYTES, DIGEST_DTYPE, id_digests
from .manifest import MANIFEST_NAME, SHARD_PATTERN, TMP_PATTERN, ShardInfo, ids_name, load_namespace
from .remote import FsspecStorage, is_url
from .shard import ShardHandle, read_shard_meta
from .storage import LocalStorage, Storage


def open_storage(location: str | os.PathLike[str] | Storage) -> Storage:
    """A cache's storage from a directory, an fsspec URL (``s3://bucket/prefix``: ``remote``),
    or an existing ``Storage``."""
    if isinstance(location, Storage):
        return location
    if is_url(location):
        return FsspecStorage(str(location))
    return LocalStorage(location)


REMOTE_SAMPLE_SHARDS = 4  # shards a summary of a remote cache downloads (sampled_shards)


def read_digests(info: ShardInfo) -> np.ndarray:
    """The id digests of a shard's rows ([N, 2] uint64): its ``.ids`` sidecar when the manifest
    vouches for it (``ids_sha256``), else digests of the ids read from the shard itself (a shard
    written without a writer id, or a sidecar missing or damaged)."""
    if info.ids_sha256 is not None:
        try:
            raw = info.storage.read_bytes(ids_name(info.name))
            if hashlib.sha256(raw).hexdigest() == info.ids_sha256 and len(raw) == DIGEST_BYTES * info.num_samples:
                return np.frombuffer(raw, dtype=DIGEST_DTYPE).reshape(-1, 2)
        except FileNotFoundError:
            pass
    return id_digests(read_rows(info, ("ids",))["ids"])


def duplicate_rows(shards: Sequence[ShardInfo]) -> dict[int, np.ndarray]:
    """Rows to skip so that each id is read once: for each shard with any, a boolean mask of
    its rows whose id an earlier shard (in the namespace's order) or an earlier row holds. Two
    writers of one cache can both store an id; the first in that order wins, always."""
    parts = [read_digests(info) for info in shards]
    if not parts:
        return {}
    everything = np.concatenate(parts)
    keys = everything.view([("hi", np.uint64), ("lo", np.uint64)]).ravel()
    _, first = np.unique(keys, return_index=True)
    keep = np.zeros(len(keys), dtype=bool)
    keep[first] = True
    out, offset = {}, 0
    for shard, part in enumerate(parts):
        skip = ~keep[offset : offset + len(part)]
        offset += len(part)
        if skip.any():
            out[shard] = skip
    return out


def read_rows(info: ShardInfo, fields: Sequence[str]) -> dict[str, np.ndarray]:
    """All rows of one shard, for the given fields."""
    handle = ShardHandle(info.path)
    try:
        return handle.read(0, info.num_samples, fields)
    finally:
        handle.close()


def checksum_problem(info: ShardInfo, progress: Any = None) -> str | None:
    """What is wrong with the shard's bytes, or None. Presence and size first, so that a missing
    or truncated shard is described as such, not as a checksum mismatch."""
    try:
        size = info.storage.size(info.name)
        if size != info.bytes:
            return f"{size} bytes on disk, manifest says {info.bytes} (truncated or replaced?)"
        actual = info.storage.sha256(info.name, progress)
    except FileNotFoundError:
        return "listed in the manifest but missing"
    except OSError as exc:
        return f"unreadable ({exc})"
    if actual != info.sha256:
        return f"sha256 {actual[:12]}… does not match the manifest's {info.sha256[:12]}…"
    return None


class CacheReader:
    """A published cache: its manifest, its shards, their verification, and block reads.

    Opening checks each listed shard's size and HDF5 structure against the manifest (cheap);
    ``verify()`` also checks the sha256 checksums. With ``skip_corrupt`` a bad shard is dropped
    and recorded in ``skipped`` instead of raising; with ``report_bad_label_names`` the manifest's
    label names, when they break the rules (label_names.py), are described in
    ``label_names_problem`` instead of raising (``cache-inspect`` shows what it can).

    The cheap checks cannot see damage that keeps a shard's size (flipped or zeroed bytes): such
    a shard opens, and its rows read as garbage, fail in HDF5 (a ``CacheError``), or, when the
    damage hits a global heap (where the ids and string attributes live), can make HDF5 itself
    loop forever (a libhdf5 bug, 2.0.0 included: an all-zero heap object never advances its
    parser; see bench/corrupt.py). ``verify_checksums=True`` checks each shard's sha256 *before*
    HDF5 parses it, which rules all of that out at the cost of one read of the cache.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str] | Storage,
        *,
        skip_corrupt: bool = False,
        check_files: bool = True,
        verify_checksums: bool = False,
        progress: Any = None,
        report_bad_label_names: bool = False,
    ) -> None:
        self.storage = open_storage(directory)
        self.directory: Path | str = getattr(self.storage, "directory", self.storage.location)  # a URL for a remote cache
        manifest = load_namespace(self.storage, report_bad_label_names=report_bad_label_names)
        self.writers = manifest.writers
        self.meta = manifest.meta
        self.manifest_sha256 = manifest.etag  # of the manifest this reader opened
        self.provenance = manifest.provenance
        self.label_names = manifest.label_names  # label i is label_names[i]; None when the manifest names none
        self.label_names_problem = manifest.label_names_problem  # why they were set aside (report_bad_label_names)
        self.skipped: list[tuple[str, str]] = []
        self.shards: list[ShardInfo] = []
        for info in manifest.shards:
            try:
                if verify_checksums:
                    problem = checksum_problem(info, progress)
                    if problem:
                        raise CacheError(f"{info.where}: {problem}")
                if check_files and not self.storage.remote:  # a remote shard is checked when it is fetched
                    self._check_shard(info)
                self.shards.append(info)
            except CacheError as exc:
                if not skip_corrupt:
                    raise
                self.skipped.append((info.name, str(exc)))
        self._duplicates: dict[int, np.ndarray] | None = None if self.writers > 1 else {}

    def duplicates(self) -> dict[int, np.ndarray]:
        """``duplicate_rows`` of this cache's shards (by position in ``shards``): empty for a
        cache with one writer, which stores each id once; else read from the ``.ids`` sidecars
        once, on first use."""
        if self._duplicates is None:
            self._duplicates = duplicate_rows(self.shards)
        return self._duplicates

    def _check_shard(self, info: ShardInfo) -> None:
        try:
            size = info.storage.size(info.name)
        except FileNotFoundError:
            raise CacheError(f"{info.where}: listed in the manifest but missing") from None
        if size != info.bytes:
            raise CacheError(f"{info.where}: {size} bytes on disk, manifest says {info.bytes} (truncated or replaced?)")
        meta, n = read_shard_meta(info.path)
        if n != info.num_samples:
            raise CacheError(f"{info.where}: holds {n} samples, manifest says {info.num_samples}")
        problem = self.meta.mismatch(meta, SHARD_FIELDS)
        if problem:
            raise CacheError(f"{info.where}: {problem} (from the manifest)")

    @property
    def num_samples(self) -> int:
        """Rows in the shards; a sample two writers both stored counts twice (``duplicates``)."""
        return sum(s.num_samples for s in self.shards)

    @property
    def total_bytes(self) -> int:
        return sum(s.bytes for s in self.shards)

    def verify(self, progress: Any = None) -> list[tuple[str, str]]:
        """Checksum every shard. Returns [(file, problem)], empty when all match."""
        problems = []
        for info in self.shards:
            problem = checksum_problem(info, progress)
            if problem:
                problems.append((info.where, problem))
        return problems

    def unlisted_files(self) -> list[str]:
        """Shard-like files that the manifest does not list: leftovers of an interrupted writer."""
        listed = {s.name for s in self.shards} | {name for name, _ in self.skipped}
        return sorted(name for name in self.storage.list() if (SHARD_PATTERN.match(name) and name not in listed) or TMP_PATTERN.match(name))

    def read(self, fields: Sequence[str] = ("ids", "inputs", "labels", "logits")) -> dict[str, np.ndarray]:
        """Everything, in shard order. For small caches and tests; training streams instead."""
        parts: dict[str, list[np.ndarray]] = {name: [] for name in fields}
        duplicates = self.duplicates()
        for position, info in enumerate(self.shards):
            block = read_rows(info, fields)
            skip = duplicates.get(position)
            for name in fields:
                parts[name].append(block[name] if skip is None else block[name][~skip])
        columns = self.meta.columns()
        empty = {name: np.empty((0, *shape), dtype=dtype) for name, (shape, dtype) in columns.items()}
        return {name: np.concatenate(parts[name]) if parts[name] else empty[name] for name in fields}

    def iter_ids(self) -> Iterator[tuple[ShardInfo, np.ndarray]]:
        for info in self.shards:
            yield info, read_rows(info, ("ids",))["ids"]

    def sampled_shards(self) -> list[ShardInfo]:
        """The shards that ``sample_rows`` and ``label_coverage`` read: all of a local cache's;
        of a remote one, at most ``REMOTE_SAMPLE_SHARDS`` spread evenly, since each is a whole
        download (``cache-inspect`` on a bucket then reads a bounded part of it)."""
        if not self.storage.remote or len(self.shards) <= REMOTE_SAMPLE_SHARDS:
            return list(self.shards)
        picks = np.linspace(0, len(self.shards) - 1, REMOTE_SAMPLE_SHARDS).round().astype(int)
        return [self.shards[i] for i in sorted(set(picks.tolist()))]

    def label_coverage(self) -> float:
        """The share of rows with a label, over ``sampled_shards`` (every shard of a local cache)."""
        total = labelled = 0
        for info in self.sampled_shards():
            labels = read_rows(info, ("labels",))["labels"]
            total += len(labels)
            labelled += int((labels >= 0).sum())
        return labelled / total if total else 0.0

    def sample_rows(
        self, fields: Sequence[str], samples: int, blocks_per_shard: int = 8
    ) -> Iterator[tuple[ShardInfo, int, dict[str, np.ndarray]]]:
        """About ``samples`` rows of the given fields, in blocks (shard, first row, rows): each
        shard's share, read as a few evenly spaced runs of rows (so a cache written class by class
        is sampled across its classes), never the whole cache."""
        left = max(0, int(samples))
        shards = sorted(self.sampled_shards(), key=lambda info: info.num_samples)  # small shards first: their unused share moves on
        for position, info in enumerate(shards):
            share = min(info.num_samples, left // (len(shards) - position))
            if share <= 0:
                continue
            left -= share
            blocks = min(blocks_per_shard, share)
            sizes = np.full(blocks, share // blocks) + (np.arange(blocks) < share % blocks)
            starts = np.cumsum(sizes) - sizes + np.arange(blocks) * (info.num_samples - share) // blocks  # gaps spread evenly
            handle = ShardHandle(info.path)
            try:
                for start, size in zip(starts, sizes, strict=True):
                    yield info, int(start), handle.read(int(start), int(start + size), fields)
            finally:
                handle.close()

    def soft_target_stats(
        self, temperature: float | None = None, samples: int | None = None, skip_corrupt: bool = False
    ) -> SoftTargetAccumulator:
        """Soft-target statistics (``diagnostics``) over a bounded sample of the published rows,
        at ``temperature`` (default: the serving temperature, the only one a sparse layout's
        targets hold at). Returns the accumulator, which more rows (a journal's) may join.
        Damaged rows raise ``CacheError``; with ``skip_corrupt`` they are left out (and an
        unreadable block ends the sample)."""
        meta = self.meta
        samples = sample_size(meta.views_per_id, meta.num_classes) if samples is None else samples
        accumulator = SoftTargetAccumulator(meta.serving_temperature if temperature is None else temperature, limit=samples)
        fields = list(meta.layout.fields(meta.num_classes))
        try:
            for info, start, block in self.sample_rows([*fields, "labels"], samples):
                targets = {name: block[name] for name in fields}
                problem = meta.layout.problem(targets)  # damage the cheap checks at open cannot see; decoding it could fail
                if problem and not skip_corrupt:
                    raise CacheError(
                        f"{info.where}: {problem} in rows {start}:{start + len(block['labels'])} (cache-inspect --verify checks the shard)"
                    )
                if not problem:
                    accumulator.add_stored(meta.layout, targets, block["labels"])
        except CacheError:
            if not skip_corrupt:
                raise
        return accumulator


__all__ = ["CacheReader", "MANIFEST_NAME", "checksum_problem", "open_storage", "read_rows"]
