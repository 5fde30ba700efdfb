"""The streaming dataset: one object that owns an epoch's order of samples and its split across
ranks and DataLoader workers.

The order of an epoch is global, a function of (seed, epoch, the caches' shards, the shuffle
window) alone, the same whatever the world size or the number of workers (``plan_epoch``):

1. Each shard is cut into chunk-aligned blocks, and the blocks of all shards are put in an order
   drawn from (seed, epoch). A block is one contiguous read.
2. Consecutive blocks form shuffle windows of at least ``shuffle_buffer`` samples. The bound is
   set in bytes (``shuffle_bytes``, default 64 MiB, turned into rows by the cache's bytes per
   row, ``CacheMeta.row_bytes``), so that a row of 128 tokens with their top-k targets and a
   row of one 8x8 image get the same memory; ``shuffle_buffer`` gives it in rows instead.
   Either way it holds at least one batch. The samples of window w take the positions
   [first_w, first_w + n_w) of the epoch in an order drawn from (seed, epoch, w). With
   ``repeats`` (``Repeats``), a row is as many samples as ``repeats.counts(shard, epoch)`` says
   (0: left out this epoch), a specialist's enrichment.
3. From position ``start`` on (0, or where a resumed run stopped), the positions are cut into
   global batches of ``batch_size × world_size`` samples, and rank r takes the r-th slice of
   each (``Split``). The last global batch, when short, is shared as evenly as possible, lower
   ranks taking one more: every sample is trained on exactly once per epoch, and a rank may
   have one batch fewer than rank 0 (DDP's ``join()`` covers it). A run resumed on another
   world size continues the same order from the same position.
4. DataLoader worker k of K reads blocks k, k+K, ... of those the rank needs and keeps the
   rank's samples of each; the training process sorts them by position and cuts the batches
   (``BatchLoader``, from ``loader()``), so the batches do not depend on K either.

A rank's samples are spread over every block of a window, so every rank reads every block: W
times the reads of a split by shards, the price of an order that does not depend on W. Batches
are built from numpy slices, never per sample, and yielded already collated. HDF5 files are
opened lazily inside each worker. Memory is bounded by the rank's samples of one window plus
the blocks in flight, whatever the cache size.
"""

from __future__ import annotations

import functools
import hashlib
import json
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .cache import CacheError, CacheMeta, CacheReader, ShardHandle, ShardInfo
from .cache.contract import MIX_REASONS
from .cache.remote import is_url

DEFAULT_BLOCK_BYTES = 4 << 20
DEFAULT_SHUFFLE_BUFFER = 16384  # rows, for callers that give the bound in rows (the benchmarks)
DEFAULT_SHUFFLE_BYTES = 64 << 20  # the shuffle window, unless given in rows
MAX_OPEN_FILES = 4
PREFETCH_SHARDS = 2  # a remote cache's shards downloaded ahead of the reader


@dataclass(frozen=True)
class Block:
    """Rows [start, stop) of one shard."""

    shard: int
    start: int
    stop: int


class Repeats(Protocol):
    """How many samples each row of a shard is in an epoch."""

    def counts(self, shard: int, epoch: int) -> np.ndarray:
        """One count >= 0 per row of ``shards[shard]`` (the stream's list), a pure function of
        its arguments, so that every rank and worker, and ``num_batches``, agree."""
        ...


Columns = dict[str, np.ndarray]
Batch = dict[str, torch.Tensor | np.ndarray]


def open_caches(
    directories: Sequence[str], *, allow_mixed_teachers: bool = False, skip_corrupt: bool = False, verify_checksums: bool = False
) -> tuple[list[CacheReader], CacheMeta]:
    """Open several cache directories and check that their shards can be trained on together.
    With ``verify_checksums`` every shard's sha256 is checked (one full read of the cache)
    before HDF5 parses it: damaged bytes can make HDF5 fail or even hang (see ``CacheReader``)."""
    if not directories:
        raise CacheError("no cache directory given")
    # A remote cache's shards are checked as they are downloaded (remote.Downloads), so reading
    # the whole bucket at start to check them first would be a second, wasted download.
    readers = [CacheReader(d, skip_corrupt=skip_corrupt, verify_checksums=verify_checksums and not is_url(d)) for d in directories]
    first = readers[0].meta
    for reader in readers[1:]:
        differences = [f"{problem} ({reason})" for name, reason in MIX_REASONS.items() if (problem := first.mismatch(reader.meta, (name,)))]
        if differences:
            raise CacheError(f"{reader.directory}: cannot be mixed with {readers[0].directory}: {'; '.join(differences)}")
        problem = first.mismatch(reader.meta, ("teacher_fingerprint",))
        if problem and not allow_mixed_teachers:
            raise CacheError(
                f"{reader.directory}: written by teacher {reader.meta.teacher_fingerprint[:12]}… "
                f"({reader.meta.teacher_name}), but {readers[0].directory} by "
                f"{first.teacher_fingerprint[:12]}… ({first.teacher_name}); "
                "pass --allow-mixed-teachers to train on both"
            )
    if sum(r.num_samples for r in readers) == 0:
        raise CacheError(f"{', '.join(str(r.directory) for r in readers)}: no samples to train on")
    return readers, first


def shard_window_for(shards: Sequence[ShardInfo]) -> tuple[int | None, str | None]:
    """How many shards one shuffle window may mix when a cache is read through the local cache
    of a remote one (``remote.downloads``): those that fit in half of it (the other half holds
    the prefetched shards). None, and no message, when the local cache holds the whole cache
    or nothing is remote; else the window and a line that says so."""
    if not any(info.storage.remote for info in shards):
        return None, None
    from .cache.remote import downloads

    budget, largest = downloads().max_bytes, max(info.bytes for info in shards)
    window = max(1, budget // (2 * max(1, largest)))
    if window >= len(shards):
        return None, None
    total = sum(info.bytes for info in shards)
    return window, (
        f"shuffling within windows of {window} of the cache's {len(shards)} shards, which half the local cache "
        f"({budget / 2**30:.2f} GiB) holds, not across the whole cache ({total / 2**30:.2f} GiB): raise --local-cache-gb "
        "to shuffle more widely"
    )


class Prefetch:
    """Downloads the next shards of a remote cache (``ShardInfo.path``) in a background thread
    while the current ones are read: ``ahead_of(step)`` asks for the shards of the next
    ``PREFETCH_SHARDS`` distinct shards after the one read at ``step``."""

    def __init__(self, shards: Sequence[ShardInfo], reads: Sequence[int]) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.shards, self.reads = shards, list(reads)
        self._asked: set[int] = set()
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="prefetch")
        self._futures: list[Any] = []

    def ahead_of(self, step: int) -> None:
        wanted: list[int] = []
        for shard in self.reads[step + 1 :]:
            if shard not in wanted and shard != self.reads[step]:
                wanted.append(shard)
            if len(wanted) == PREFETCH_SHARDS:
                break
        for shard in wanted:
            if shard not in self._asked:
                self._asked.add(shard)
                self._futures.append(self._pool.submit(lambda info=self.shards[shard]: info.path))

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        # A failed prefetch is not reported here: the read of that shard fetches it again and
        # raises its error where it belongs.


@dataclass(frozen=True)
class EpochPlan:
    """One epoch's global order (``plan_epoch``). ``blocks`` in reading order; block i holds the
    samples [offsets[i], offsets[i + 1]) of the reading order; window w is the blocks
    [windows[w], windows[w + 1]), and its samples take the positions ``positions(w)``."""

    blocks: list[Block]
    offsets: np.ndarray
    windows: np.ndarray
    seed: int
    epoch: int
    shuffle: bool

    @property
    def samples(self) -> int:
        return int(self.offsets[-1])

    def window_of(self, block: int) -> int:
        return int(np.searchsorted(self.windows, block, side="right")) - 1

    def window_end(self, window: int) -> int:
        """The position after the last sample of ``window``."""
        return int(self.offsets[self.windows[window + 1]])

    def positions(self, block: int) -> np.ndarray:
        """The position in the epoch of each sample of ``block``, in reading order."""
        window = self.window_of(block)
        first = int(self.offsets[self.windows[window]])
        order = _window_order(self.seed, self.epoch, window, self.window_end(window) - first, self.shuffle)
        return first + order[self.offsets[block] - first : self.offsets[block + 1] - first]

    def blocks_between(self, start: int, stop: int) -> range:
        """The blocks of the windows that hold positions [start, stop)."""
        if start >= stop:
            return range(0)
        firsts = self.offsets[self.windows]
        first = int(np.searchsorted(firsts, start, side="right")) - 1
        last = int(np.searchsorted(firsts, stop - 1, side="right")) - 1
        return range(int(self.windows[first]), int(self.windows[last + 1]))


@functools.lru_cache(maxsize=4)
def _window_order(seed: int, epoch: int, window: int, samples: int, shuffle: bool) -> np.ndarray:
    order = np.random.default_rng([seed, epoch, window, 2]).permutation(samples) if shuffle else np.arange(samples)
    order.flags.writeable = False  # shared by the calls that hit the cache
    return order


def plan_epoch(
    shard_sizes: Sequence[int],
    *,
    epoch: int,
    seed: int,
    block_rows: int,
    window_rows: int,
    shuffle: bool,
    counts: Callable[[int], np.ndarray] | None = None,
    shard_window: int | None = None,
) -> EpochPlan:
    """The global order of epoch ``epoch``; pure and cheap, and the same in every rank and worker
    whatever their numbers. ``counts(shard)``: how many samples each row of the shard is.
    ``shard_window``: the blocks mix only within groups of that many shards, taken in an order
    drawn from (seed, epoch), so that reading a window touches that many shards (a cache on
    object storage, read through a local cache that holds only some); None: across all."""
    cut = [
        [Block(shard, start, min(size, start + block_rows)) for start in range(0, size, block_rows)] for shard, size in enumerate(shard_sizes)
    ]
    if not shuffle:
        blocks = [block for shard in cut for block in shard]
    elif shard_window is None or shard_window >= len(shard_sizes):
        blocks = [block for shard in cut for block in shard]
        blocks = [blocks[i] for i in np.random.default_rng([seed, epoch]).permutation(len(blocks))]
    else:
        order = np.random.default_rng([seed, epoch, 3]).permutation(len(shard_sizes)).tolist()
        blocks = []
        for group, first in enumerate(range(0, len(order), shard_window)):
            members = [block for shard in order[first : first + shard_window] for block in cut[shard]]
            blocks += [members[i] for i in np.random.default_rng([seed, epoch, 3, group]).permutation(len(members))]
    sizes = [b.stop - b.start if counts is None else int(counts(b.shard)[b.start : b.stop].sum()) for b in blocks]
    windows, filled = [0], 0
    for index, size in enumerate(sizes[:-1]):
        filled += size
        if filled >= window_rows:
            windows.append(index + 1)
            filled = 0
    windows.append(len(blocks))
    offsets = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).astype(np.int64)
    return EpochPlan(blocks, offsets, np.asarray(windows, dtype=np.int64), seed, epoch, shuffle)


@dataclass(frozen=True)
class Split:
    """How the ranks share an epoch's positions [start, stop): global batches of
    ``batch_size × world_size`` samples from ``start``, rank r taking the r-th slice of each.
    The last, when short, is shared as evenly as possible, lower ranks taking one more."""

    start: int
    stop: int
    batch_size: int
    world_size: int

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    @property
    def num_batches(self) -> int:
        """Global batches: the optimiser steps of the epoch from ``start``."""
        return max(0, -(-(self.stop - self.start) // self.global_batch))

    def end(self, batch: int) -> int:
        """The position after global batch ``batch``."""
        return min(self.stop, self.start + (batch + 1) * self.global_batch)

    def owners(self, positions: np.ndarray) -> np.ndarray:
        """The rank that takes each position; -1 outside [start, stop)."""
        offset = np.asarray(positions, dtype=np.int64) - self.start
        first = offset // self.global_batch * self.global_batch  # of its global batch
        size = np.minimum(self.global_batch, self.stop - self.start - first)
        # Of a global batch of m samples, ranks r < m mod W take m // W + 1, the others m // W.
        share, more = size // self.world_size, size % self.world_size
        within, larger = offset - first, more * (share + 1)
        owner = np.where(within < larger, within // (share + 1), more + (within - larger) // np.maximum(share, 1))
        return np.where((offset >= 0) & (offset < self.stop - self.start), owner, -1)

    def rank_batches(self, rank: int) -> int:
        """The batches rank ``rank`` takes: every global batch but a last one too short to reach it."""
        batches = self.num_batches
        last = self.stop - self.start - (batches - 1) * self.global_batch
        return batches - int(batches > 0 and last < self.world_size and rank >= last)


LABEL_PERSON = b"kdcache-labels"


def keeps_label(ids: Sequence[str], fraction: float, seed: int) -> np.ndarray:
    """Whether each sample keeps its label under ``--label-fraction fraction --label-seed seed``:
    a function of (seed, id) alone, so the same samples keep their labels in every epoch, rank,
    worker and batch order, and in a converted copy of the cache. Each sample is kept with
    probability ``fraction``, independently (not stratified by class)."""
    from .cache.rng import keyed_seeds

    seeds = keyed_seeds(seed, ids, 1, LABEL_PERSON)[:, 0]
    return (seeds >> np.int64(11)).astype(np.float64) / float(1 << 52) < fraction


def shuffle_rows(meta: CacheMeta, shuffle_bytes: int = DEFAULT_SHUFFLE_BYTES, shuffle_buffer: int | None = None) -> int:
    """The rows of a shuffle window: ``shuffle_buffer`` when given, else as many rows of this
    cache as ``shuffle_bytes`` holds (``CacheMeta.row_bytes``), and at least one."""
    if shuffle_buffer is not None:
        return max(1, int(shuffle_buffer))
    return max(1, int(shuffle_bytes) // max(1, meta.row_bytes()))


def _dist_rank() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class ShardStream(IterableDataset):
    """Streams collated batches ``{"inputs", "labels", <the layout's fields>[, "ids"]}`` from
    cache shards (``{"inputs", "labels", "logits"}`` for full logits), in the global order of
    the module's docstring.

    ``rank``/``world_size`` default to torch.distributed's when it is initialised. Call
    ``set_epoch`` before iterating, as with DistributedSampler. ``loader(num_workers)`` gives
    the batches read by DataLoader workers, as the trainers read them; iterating the stream
    itself gives the same batches, read in one process. ``trust_code``: import the
    module:factory augment policy that the manifest names (``--trust-code``); without it such a
    cache raises UntrustedCode, with nothing imported. ``repeats``: each row is
    ``repeats.counts(shard, epoch)[row]`` samples (``Repeats``; ``num_batches`` counts them).
    ``transform``: applied to each block's numpy columns last, before they are batched. The
    shuffle window holds ``shuffle_bytes`` of rows, or ``shuffle_buffer`` rows when given
    (``shuffle_rows``), and at least one batch.
    """

    def __init__(
        self,
        shards: Sequence[ShardInfo],
        meta: CacheMeta,
        *,
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        shuffle_buffer: int | None = None,
        shuffle_bytes: int = DEFAULT_SHUFFLE_BYTES,
        block_rows: int | None = None,
        drop_last: bool = False,
        with_ids: bool = False,
        skip_corrupt: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
        label_fraction: float = 1.0,
        label_seed: int = 0,
        trust_code: bool = False,
        repeats: Repeats | None = None,
        transform: Callable[[Columns], Columns] | None = None,
        duplicates: dict[int, np.ndarray] | None = None,
        shard_window: int | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if not 0.0 < label_fraction <= 1.0:
            raise ValueError("label_fraction must lie in (0, 1]")
        self.shards = list(shards)
        self.meta = meta
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        # At least one rank's batch, not a global one: the window is part of the order, which the world size must not change.
        self.shuffle_buffer = max(shuffle_rows(meta, shuffle_bytes, shuffle_buffer), batch_size) if shuffle else batch_size
        chunk = meta.chunk_rows()
        self.block_rows = block_rows or chunk * max(1, DEFAULT_BLOCK_BYTES // max(1, chunk * meta.row_bytes()))
        self.drop_last = drop_last
        # The columns a training step takes: inputs, labels and the layout's target fields.
        seeds = ("view_seeds",) if meta.has_views else ()
        self.label_fraction, self.label_seed, self.with_ids = label_fraction, label_seed, with_ids
        reads_ids = with_ids or label_fraction < 1  # the kept labels are chosen by id
        self.fields = ("inputs", "labels", *seeds, *meta.layout.fields(meta.num_classes)) + (("ids",) if reads_ids else ())
        self.policy = None
        if meta.has_views:
            from .cache.manifest import MANIFEST_NAME
            from .cache.trust import Origin
            from .cache.views import parse_policy

            manifest = self.shards[0].storage.where(MANIFEST_NAME) if self.shards else "the cache's manifest"
            self.policy = parse_policy(meta.augment, Origin(manifest, trust_code))
        self.skip_corrupt = skip_corrupt
        self.repeats, self.transform = repeats, transform
        # Rows to leave out: ids that an earlier shard holds (a cache of several writers,
        # CacheReader.duplicates), by position in ``shards``.
        self.duplicates = dict(duplicates or {})
        self.shard_window = shard_window
        self._remote = any(info.storage.remote for info in self.shards)
        self._rank, self._world = rank, world_size
        # Shared memory, so that persistent DataLoader workers see set_epoch() from the parent.
        self._epoch = torch.zeros(2, dtype=torch.int64).share_memory_()  # epoch, start
        self._plan: EpochPlan | None = None
        self._row_shapes: dict[str, tuple[int, ...]] | None = None

    @classmethod
    def from_readers(cls, readers: Sequence[CacheReader], meta: CacheMeta, **kwargs: object) -> ShardStream:
        """The stream of the readers' shards, end to end, each id once within each cache."""
        duplicates, offset = {}, 0
        for reader in readers:
            duplicates.update({offset + shard: skip for shard, skip in reader.duplicates().items()})
            offset += len(reader.shards)
        return cls([s for r in readers for s in r.shards], meta, duplicates=duplicates, **kwargs)  # type: ignore[arg-type]

    def counts(self, shard: int, epoch: int) -> np.ndarray | None:
        """How many samples each row of ``shard`` is this epoch: the repeats, 0 for a duplicate;
        None when every row is one sample."""
        base = None if self.repeats is None else self.repeats.counts(shard, epoch)
        skip = self.duplicates.get(shard)
        if skip is None:
            return base
        base = np.ones(self.shards[shard].num_samples, dtype=np.int64) if base is None else np.array(base, dtype=np.int64)
        base[skip] = 0
        return base

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Iterate epoch ``epoch`` next, from position ``start``: the samples of it that all
        ranks together have trained on already (a run resumed mid-epoch; 0 otherwise)."""
        self._epoch[0], self._epoch[1] = epoch, start

    @property
    def epoch(self) -> int:
        return int(self._epoch[0])

    @property
    def start(self) -> int:
        return int(self._epoch[1])

    @property
    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.shards)

    def _rank_world(self) -> tuple[int, int]:
        if self._rank is not None and self._world is not None:
            return self._rank, self._world
        return _dist_rank()

    def plan(self, epoch: int | None = None) -> EpochPlan:
        """The global order of epoch ``epoch`` (default: the current one)."""
        epoch = self.epoch if epoch is None else epoch
        if self._plan is None or self._plan.epoch != epoch:
            counted = self.repeats is not None or bool(self.duplicates)
            self._plan = plan_epoch(
                [s.num_samples for s in self.shards], epoch=epoch, seed=self.seed, block_rows=self.block_rows,
                window_rows=self.shuffle_buffer, shuffle=self.shuffle, shard_window=self.shard_window,
                counts=(lambda shard: self._all_counts(shard, epoch)) if counted else None,
            )  # fmt: skip
        return self._plan

    def _all_counts(self, shard: int, epoch: int) -> np.ndarray:
        counts = self.counts(shard, epoch)
        return np.ones(self.shards[shard].num_samples, dtype=np.int64) if counts is None else counts

    def split(self, epoch: int | None = None, start: int | None = None) -> Split:
        """How this stream's ranks share epoch ``epoch`` from position ``start`` (defaults: the
        current ones); with ``drop_last``, without its last global batch when that is short."""
        samples = self.plan(epoch).samples
        start = min(samples, self.start if start is None else start)
        _, world = self._rank_world()
        stop = start + (samples - start) // (self.batch_size * world) * (self.batch_size * world) if self.drop_last else samples
        return Split(start, stop, self.batch_size, world)

    def num_batches(self, num_workers: int | None = None, epoch: int | None = None, start: int | None = None) -> int:
        """Batches this rank yields in epoch ``epoch`` from position ``start`` (defaults: the
        current ones). ``num_workers`` changes nothing; older callers pass it."""
        return self.split(epoch, start).rank_batches(self._rank_world()[0])

    def steps_until(self, epochs: int, epoch: int = 0, start: int = 0) -> int:
        """Global batches (optimiser steps) from position ``start`` of epoch ``epoch`` to the
        end of epoch ``epochs - 1``."""
        return sum(self.split(e, start if e == epoch else 0).num_batches for e in range(epoch, epochs))

    def order(self) -> dict[str, Any]:
        """What the order of samples depends on: a run resumed mid-epoch checks that it is the
        same. The shards are named by their names, sizes and checksums, so a cache moved
        elsewhere keeps its order."""
        shards = json.dumps([[s.name, s.num_samples, s.sha256] for s in self.shards])
        return {
            "seed": self.seed, "shuffle": self.shuffle, "window_rows": self.shuffle_buffer, "block_rows": self.block_rows,
            "samples": self.num_samples, "shards": hashlib.sha256(shards.encode()).hexdigest()[:16],
            **({"shard_window": self.shard_window} if self.shard_window is not None else {}),
        }  # fmt: skip

    def loader(self, num_workers: int, *, pin_memory: bool = False) -> BatchLoader:
        """This rank's batches of each epoch (``set_epoch``), read by ``num_workers`` DataLoader
        worker processes (0: in this one); the same batches for any number of them."""
        return BatchLoader(self, num_workers, pin_memory=pin_memory)

    def __iter__(self) -> Iterator[Batch]:
        """This rank's batches, read in this process. In DataLoader worker k of K it yields
        batches k, k+K, ..., which the DataLoader's turn-taking puts back in order, but each
        worker then reads every block: ``loader()`` reads each block once."""
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for index, batch in enumerate(self.batches(self.blocks(0, 1))):
            if index % num_workers == worker:
                yield batch

    # -- reading: the blocks of one worker ----------------------------------------------------

    def blocks(self, worker: int, num_workers: int) -> Iterator[tuple[int, Columns]]:
        """(index, the rank's samples of block ``index``) for blocks worker, worker + K, ... of
        those the rank needs this epoch; every block gives one item, empty when it has none of
        the rank's samples (or is skipped, unreadable, with ``skip_corrupt``)."""
        plan, split, rank = self.plan(), self.split(), self._rank_world()[0]
        handles: OrderedDict[int, ShardHandle] = OrderedDict()
        indices = plan.blocks_between(split.start, split.stop)[worker::num_workers]
        prefetch = Prefetch(self.shards, [plan.blocks[i].shard for i in indices]) if self._remote else None
        try:
            for step, index in enumerate(indices):
                if prefetch is not None:
                    prefetch.ahead_of(step)
                yield index, self._read(plan, split, rank, index, handles)
        finally:
            if prefetch is not None:
                prefetch.close()
            for handle in handles.values():
                handle.close()

    def _read(self, plan: EpochPlan, split: Split, rank: int, index: int, handles: OrderedDict[int, ShardHandle]) -> Columns:
        """The samples of block ``index`` that ``rank`` takes, ready to batch, with their
        positions in the epoch (``"position"``)."""
        positions = plan.positions(index)
        mine = split.owners(positions) == rank
        nothing = {"position": positions[:0]}
        if not mine.any():
            return nothing
        block = plan.blocks[index]
        try:
            rows = self._handle(handles, block).read(block.start, block.stop, self.fields)
            self._check(block, rows)
        except CacheError as exc:
            if not self.skip_corrupt:
                raise
            warnings.warn(f"skipping unreadable rows: {exc}", stacklevel=1)
            return nothing
        counts = self.counts(block.shard, plan.epoch)
        counts = None if counts is None else counts[block.start : block.stop]
        samples = np.arange(block.stop - block.start) if counts is None else np.repeat(np.arange(block.stop - block.start), counts)
        columns = self._prepare({name: values[samples[mine]] for name, values in rows.items()}, plan.epoch)
        columns["position"] = positions[mine]
        return columns

    def _handle(self, handles: OrderedDict[int, ShardHandle], block: Block) -> ShardHandle:
        handle = handles.pop(block.shard, None) or ShardHandle(self.shards[block.shard].path)
        handles[block.shard] = handle
        while len(handles) > MAX_OPEN_FILES:
            handles.popitem(last=False)[1].close()
        return handle

    def _check(self, block: Block, rows: Columns) -> None:
        """Cheap sanity checks on what the training step cannot take: the writer stores only
        finite logits and labels in [-1, C), so anything else is damage that the size and
        structure checks at open could not see (a flipped byte in a data chunk). Without them a
        bad label would escape as an IndexError from cross_entropy, and a NaN logit would
        silently turn the loss into NaN (tests/test_corrupt.py, bad-label/nan-logits). Rows of
        another shape than the first block's cannot share a batch with them."""
        shapes = {name: values.shape[1:] for name, values in rows.items()}
        self._row_shapes = self._row_shapes or shapes
        for name, shape in shapes.items():
            if shape != self._row_shapes[name]:
                raise CacheError(
                    f"{self.shards[block.shard].path}: {name} rows have shape {list(shape)}, but earlier shards' have {list(self._row_shapes[name])}"
                )
        labels = rows["labels"]
        bad_labels = (labels < -1) | (labels >= self.meta.num_classes)
        targets = {name: rows[name] for name in self.meta.layout.fields(self.meta.num_classes)}
        what = f"label {int(labels[bad_labels][0])} out of range" if bad_labels.any() else self.meta.layout.problem(targets)
        if what:
            raise CacheError(
                f"{self.shards[block.shard].path}: {what} in rows {block.start}:{block.stop} "
                "(the shard is corrupt; cache-inspect --verify checks it)"
            )

    def _prepare(self, columns: Columns, epoch: int) -> Columns:
        """What each sample trains on, sample by sample: its label or -1 (``label_fraction``),
        its view, replayed, and ``transform``."""
        if self.label_fraction < 1:
            columns["labels"] = np.where(keeps_label(columns["ids"], self.label_fraction, self.label_seed), columns["labels"], -1)
            if not self.with_ids:
                del columns["ids"]
        if self.policy is not None:
            columns = self._replay_views(columns, epoch)
        if self.transform is not None:
            columns = self.transform(columns)
        return columns

    def _replay_views(self, columns: Columns, epoch: int) -> Columns:
        """One view per sample, as the teacher saw it: in epoch e, sample i takes view
        (e + o_i) mod V, where o_i is drawn from (this run's seed, the sample's first view seed:
        a function of its id); its input is the policy replayed from that view's seed, and its
        targets are that view's. Adds ``view`` (the index) and ``view_seed``."""
        from .cache.views import below, philox

        assert self.policy is not None
        seeds = columns.pop("view_seeds")
        views = self.meta.views_per_id
        offsets = below(philox(seeds[:, 0], self.seed & 0xFFFFFFFF)[0], views)
        chosen = (epoch + offsets) % views
        rows = np.arange(len(seeds))
        if views > 1:
            for name in self.meta.layout.fields(self.meta.num_classes):
                columns[name] = columns[name][rows, chosen]
        columns["view_seed"] = seeds[rows, chosen]
        columns["view"] = chosen
        with torch.no_grad():
            columns["inputs"] = self.policy(torch.from_numpy(columns["inputs"]), torch.from_numpy(columns["view_seed"])).numpy()
        return columns

    # -- batching: in the training process -----------------------------------------------------

    def batches(self, blocks: Iterable[tuple[int, Columns]]) -> Iterator[Batch]:
        """This rank's batches of the epoch from its samples of each block (``blocks``), given
        in block order: each window's samples, put in the order of their positions, are cut at
        the ends of the global batches. A batch left empty (its rows skipped) is left out."""
        plan, split = self.plan(), self.split()
        held: Columns = {}  # the rank's samples not yet batched, by position
        pending: list[Columns] = []  # the current window's, as read
        window, batch = -1, 0
        for index, columns in blocks:
            if plan.window_of(index) != window:
                held = _by_position(held, pending)
                pending = []
                while window >= 0 and batch < split.num_batches and split.end(batch) <= plan.window_end(window):
                    held, out = _cut(held, split.end(batch))
                    batch += 1
                    if out:
                        yield out
                window = plan.window_of(index)
            if len(columns["position"]):
                pending.append(columns)
        held = _by_position(held, pending)
        while batch < split.num_batches:
            held, out = _cut(held, split.end(batch))
            batch += 1
            if out:
                yield out


def _by_position(held: Columns, pending: list[Columns]) -> Columns:
    """``held`` (in order, before the window) followed by the window's samples in order."""
    if not pending:
        return held
    parts = ([held] if held else []) + pending
    merged = {name: np.concatenate([part[name] for part in parts]) for name in pending[0]}
    order = np.argsort(merged["position"], kind="stable")
    return {name: values[order] for name, values in merged.items()}


def _cut(held: Columns, end: int) -> tuple[Columns, Batch | None]:
    """The samples of ``held`` before position ``end``, as a batch (None when there are none),
    and the rest."""
    if not held:
        return held, None
    n = int(np.searchsorted(held["position"], end))
    if n == 0:
        return held, None
    batch = {name: values[:n] if name == "ids" else torch.from_numpy(values[:n]) for name, values in held.items() if name != "position"}
    return {name: values[n:] for name, values in held.items()}, batch


class BatchLoader:
    """A rank's batches of its stream's current epoch (``ShardStream.set_epoch``), as
    ``ShardStream.loader`` makes them: ``num_workers`` DataLoader worker processes read the
    blocks (0: this process reads them), and this process puts their samples in order and
    batches them, so the batches are the same for any number of workers. Iterate it once per
    epoch; ``len`` is the epoch's batches."""

    def __init__(self, stream: ShardStream, num_workers: int, *, pin_memory: bool = False) -> None:
        self.stream, self.pin_memory = stream, pin_memory
        # A generator of its own: starting an epoch then leaves the global RNG alone, so that a
        # resumed run's dropout draws the same as the uninterrupted run's.
        self.reader = DataLoader(
            _Blocks(stream), batch_size=None, num_workers=num_workers, prefetch_factor=4 if num_workers else None,
            persistent_workers=num_workers > 0, generator=torch.Generator().manual_seed(0),
        )  # fmt: skip

    def __len__(self) -> int:
        return self.stream.num_batches()

    def __iter__(self) -> Iterator[Batch]:
        split = self.stream.split()
        first = self.stream.plan().blocks_between(split.start, split.stop).start
        for batch in self.stream.batches(_in_order(self.reader, first)):
            if self.pin_memory:
                batch = {name: values.pin_memory() if isinstance(values, torch.Tensor) else values for name, values in batch.items()}
            yield batch


class _Blocks(IterableDataset):
    """What ``BatchLoader``'s DataLoader workers read: worker k of K, blocks k, k+K, ..."""

    def __init__(self, stream: ShardStream) -> None:
        self.stream = stream

    def __iter__(self) -> Iterator[tuple[int, Columns]]:
        info = get_worker_info()
        return self.stream.blocks(*((info.id, info.num_workers) if info is not None else (0, 1)))


def _in_order(items: Iterable[Any], expected: int) -> Iterator[tuple[int, Columns]]:
    """The DataLoader's (index, columns) items in block order from block ``expected``, columns
    as numpy arrays. Its workers take turns, which is block order already; an item that came
    early would wait here."""
    waiting: dict[int, Columns] = {}
    for index, columns in items:
        waiting[index] = {name: values.numpy() if isinstance(values, torch.Tensor) else values for name, values in columns.items()}
        while expected in waiting:
            yield expected, waiting.pop(expected)
            expected += 1
    if waiting:
        raise RuntimeError(f"blocks {sorted(waiting)} came without block {expected}")
