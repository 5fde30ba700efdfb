"""The streaming dataset: one object that owns the shard → rank → worker split and the shuffle.

Each epoch:

1. The shards of all caches are put in an order drawn from (seed, epoch).
2. Laid end to end in that order they form one sequence of N samples. Rank r of W takes the
   contiguous range [N·r/W, N·(r+1)/W), and worker k of K takes the same share of its rank's
   range. Every sample therefore lands in exactly one (rank, worker) per epoch, ranks get
   counts that differ by at most one, and each range covers whole shards except at its two
   ends, so a rank reads a set of shards disjoint from the others' but for the boundaries.
3. A worker cuts its range into chunk-aligned blocks, visits the blocks in a random order, and
   pushes them through a bounded shuffle buffer: whenever the buffer holds ``shuffle_buffer``
   rows, it is permuted and emitted as whole batches; the remainder stays for the next fill.
   The bound is set in bytes (``shuffle_bytes``, default 64 MiB, turned into rows by the
   cache's bytes per row, ``CacheMeta.row_bytes``), so that a row of 128 tokens with their
   top-k targets and a row of one 8x8 image get the same memory; ``shuffle_buffer`` gives it
   in rows instead. Either way it holds at least one batch.
   With ``repeats`` (``Repeats``), each row enters the buffer as many times as
   ``repeats.counts(shard, epoch)`` says (0: left out this epoch), a specialist's enrichment.

Batches are built from numpy slices, never per sample, and yielded already collated, so the
DataLoader runs with ``batch_size=None``. HDF5 files are opened lazily inside each worker.
Memory per worker is bounded by the shuffle buffer plus one block, whatever the cache size.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from .cache import CacheError, CacheMeta, CacheReader, ShardHandle, ShardInfo
from .cache.contract import MIX_REASONS

DEFAULT_BLOCK_BYTES = 4 << 20
DEFAULT_SHUFFLE_BUFFER = 16384  # rows, for callers that give the bound in rows (the benchmarks)
DEFAULT_SHUFFLE_BYTES = 64 << 20  # each worker's shuffle window, unless given in rows
MAX_OPEN_FILES = 4


@dataclass(frozen=True)
class Block:
    """Rows [start, stop) of one shard."""

    shard: int
    start: int
    stop: int


class Repeats(Protocol):
    """How many times each row of a shard enters an epoch's shuffle buffer."""

    def counts(self, shard: int, epoch: int) -> np.ndarray:
        """One count >= 0 per row of ``shards[shard]`` (the stream's list), a pure function of
        its arguments, so that every rank and worker, and ``num_batches``, agree."""
        ...


Columns = dict[str, np.ndarray]


def open_caches(
    directories: Sequence[str], *, allow_mixed_teachers: bool = False, skip_corrupt: bool = False, verify_checksums: bool = False
) -> tuple[list[CacheReader], CacheMeta]:
    """Open several cache directories and check that their shards can be trained on together.
    With ``verify_checksums`` every shard's sha256 is checked (one full read of the cache)
    before HDF5 parses it: damaged bytes can make HDF5 fail or even hang (see ``CacheReader``)."""
    if not directories:
        raise CacheError("no cache directory given")
    readers = [CacheReader(d, skip_corrupt=skip_corrupt, verify_checksums=verify_checksums) for d in directories]
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


def plan_epoch(
    shard_sizes: Sequence[int],
    *,
    epoch: int,
    seed: int,
    rank: int,
    world_size: int,
    worker: int,
    num_workers: int,
    block_rows: int,
    shuffle: bool,
) -> list[Block]:
    """The blocks that (rank, worker) reads this epoch, in reading order. Pure and cheap."""
    order = np.random.default_rng([seed, epoch]).permutation(len(shard_sizes)) if shuffle else np.arange(len(shard_sizes))
    sizes = np.asarray(shard_sizes, dtype=np.int64)[order]
    total = int(sizes.sum())
    rank_lo, rank_hi = total * rank // world_size, total * (rank + 1) // world_size
    span = rank_hi - rank_lo
    lo, hi = rank_lo + span * worker // num_workers, rank_lo + span * (worker + 1) // num_workers
    blocks: list[Block] = []
    offset = 0
    for shard, size in zip(order.tolist(), sizes.tolist(), strict=True):
        start, stop = max(lo, offset) - offset, min(hi, offset + size) - offset
        offset += size
        if start >= stop:
            continue
        cut = start
        while cut < stop:
            # Align block ends to multiples of block_rows so blocks start on chunk boundaries.
            end = min(stop, (cut // block_rows + 1) * block_rows)
            blocks.append(Block(shard, cut, end))
            cut = end
    if shuffle:
        rng = np.random.default_rng([seed, epoch, rank, worker, 1])
        blocks = [blocks[i] for i in rng.permutation(len(blocks))]
    return blocks


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
    cache shards (``{"inputs", "labels", "logits"}`` for full logits).

    ``rank``/``world_size`` default to torch.distributed's when it is initialised. Call
    ``set_epoch`` before iterating, as with DistributedSampler. ``trust_code``: import the
    module:factory augment policy that the manifest names (``--trust-code``); without it such a
    cache raises UntrustedCode, with nothing imported. ``repeats``: each row enters the shuffle
    buffer ``repeats.counts(shard, epoch)[row]`` times (``Repeats``; ``num_batches`` counts
    them). ``transform``: applied to each batch's numpy columns last, before they become tensors.
    The shuffle window holds ``shuffle_bytes`` of rows, or ``shuffle_buffer`` rows when given
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
        self._rank, self._world = rank, world_size
        # Shared memory, so that persistent DataLoader workers see set_epoch() from the parent.
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()

    @classmethod
    def from_readers(cls, readers: Sequence[CacheReader], meta: CacheMeta, **kwargs: object) -> ShardStream:
        return cls([s for r in readers for s in r.shards], meta, **kwargs)  # type: ignore[arg-type]

    def set_epoch(self, epoch: int) -> None:
        self._epoch[0] = epoch

    @property
    def epoch(self) -> int:
        return int(self._epoch[0])

    @property
    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.shards)

    def _rank_world(self) -> tuple[int, int]:
        if self._rank is not None and self._world is not None:
            return self._rank, self._world
        return _dist_rank()

    def plan(self, worker: int, num_workers: int, epoch: int | None = None) -> list[Block]:
        rank, world = self._rank_world()
        return plan_epoch(
            [s.num_samples for s in self.shards],
            epoch=self.epoch if epoch is None else epoch, seed=self.seed, rank=rank, world_size=world,
            worker=worker, num_workers=num_workers, block_rows=self.block_rows, shuffle=self.shuffle,
        )  # fmt: skip

    def _counts(self, block: Block, epoch: int) -> np.ndarray | None:
        """How many times each row of ``block`` enters the buffer; None: once each."""
        return None if self.repeats is None else self.repeats.counts(block.shard, epoch)[block.start : block.stop]

    def _rows(self, block: Block, epoch: int) -> int:
        counts = self._counts(block, epoch)
        return block.stop - block.start if counts is None else int(counts.sum())

    def num_batches(self, num_workers: int, epoch: int | None = None) -> int:
        """Batches this rank yields in epoch ``epoch`` (default: the current one) with
        ``num_workers`` DataLoader workers."""
        epoch = self.epoch if epoch is None else epoch
        total = 0
        for worker in range(max(1, num_workers)):
            rows = sum(self._rows(b, epoch) for b in self.plan(worker, max(1, num_workers), epoch))
            total += rows // self.batch_size if self.drop_last else -(-rows // self.batch_size)
        return total

    def __iter__(self) -> Iterator[dict[str, torch.Tensor | np.ndarray]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch = self.epoch
        blocks = self.plan(worker, num_workers, epoch)
        rng = np.random.default_rng([self.seed, epoch, *self._rank_world(), worker, 2])
        handles: OrderedDict[int, ShardHandle] = OrderedDict()
        # One buffer per field, allocated once per epoch: blocks are read straight into it (no
        # per-block arrays to concatenate), and the rows left over after the whole batches of
        # one fill move to its front. It can hold a full shuffle window plus one block (as
        # read, and with its rows repeated).
        rows = [max(b.stop - b.start, self._rows(b, epoch)) for b in blocks]
        capacity = min(self.shuffle_buffer + max(rows, default=0), sum(rows))  # never more than the epoch's rows
        buffer: dict[str, np.ndarray] = {}
        fill = 0
        try:
            for block in blocks:
                try:
                    handle = self._handle(handles, block)
                    buffer = self._fit(buffer, handle, capacity, fill)
                    handle.read_into(block.start, block.stop, buffer, fill)
                    self._check(block, buffer, fill)
                except CacheError as exc:
                    if not self.skip_corrupt:
                        raise
                    warnings.warn(f"skipping unreadable rows: {exc}", stacklevel=1)
                    continue
                fill += self._repeat(buffer, fill, block.stop - block.start, self._counts(block, epoch))
                if fill >= self.shuffle_buffer:
                    fill = yield from self._emit(buffer, fill, rng, final=False)
            if fill:
                yield from self._emit(buffer, fill, rng, final=True)
        finally:
            for handle in handles.values():
                handle.close()

    def _handle(self, handles: OrderedDict[int, ShardHandle], block: Block) -> ShardHandle:
        handle = handles.pop(block.shard, None) or ShardHandle(self.shards[block.shard].path)
        handles[block.shard] = handle
        while len(handles) > MAX_OPEN_FILES:
            handles.popitem(last=False)[1].close()
        return handle

    def _fit(self, buffer: dict[str, np.ndarray], handle: ShardHandle, capacity: int, fill: int) -> dict[str, np.ndarray]:
        """The epoch's buffers, allocated on the first block. A later shard that stores a field in
        a wider dtype (float32 logits after float16 ones, from another cache) widens that buffer,
        as concatenating the two would."""
        for name, (dtype, shape) in handle.fields(self.fields).items():
            dtype = np.dtype(object) if name == "ids" else dtype
            held = buffer.get(name)
            if held is None:
                buffer[name] = np.empty((capacity, *shape), dtype=dtype)
            elif held.shape[1:] != shape:
                raise CacheError(f"{handle.path}: {name} rows have shape {list(shape)}, but earlier shards' have {list(held.shape[1:])}")
            elif np.result_type(held.dtype, dtype) != held.dtype:
                wider = np.empty(held.shape, dtype=np.result_type(held.dtype, dtype))
                wider[:fill] = held[:fill]
                buffer[name] = wider
        return buffer

    def _check(self, block: Block, buffer: dict[str, np.ndarray], fill: int) -> None:
        """Cheap sanity checks on what the training step cannot take: the writer stores only
        finite logits and labels in [-1, C), so anything else is damage that the size and
        structure checks at open could not see (a flipped byte in a data chunk). Without them a
        bad label would escape as an IndexError from cross_entropy, and a NaN logit would
        silently turn the loss into NaN (tests/test_corrupt.py, bad-label/nan-logits)."""
        rows = slice(fill, fill + block.stop - block.start)
        labels = buffer["labels"][rows]
        bad_labels = (labels < -1) | (labels >= self.meta.num_classes)
        targets = {name: buffer[name][rows] for name in self.meta.layout.fields(self.meta.num_classes)}
        what = f"label {int(labels[bad_labels][0])} out of range" if bad_labels.any() else self.meta.layout.problem(targets)
        if what:
            raise CacheError(
                f"{self.shards[block.shard].path}: {what} in rows {block.start}:{block.stop} "
                "(the shard is corrupt; cache-inspect --verify checks it)"
            )

    @staticmethod
    def _repeat(buffer: dict[str, np.ndarray], fill: int, rows: int, counts: np.ndarray | None) -> int:
        """Repeat the ``rows`` rows just read at ``fill`` in place, row i ``counts[i]`` times;
        returns the rows they now take."""
        if counts is None:
            return rows
        index = fill + np.repeat(np.arange(rows), counts)
        for values in buffer.values():
            values[fill : fill + len(index)] = values[index]  # fancy indexing copies first: overlap is safe
        return len(index)

    def _emit(
        self, buffer: dict[str, np.ndarray], fill: int, rng: np.random.Generator, *, final: bool
    ) -> Generator[dict[str, torch.Tensor | np.ndarray], None, int]:
        """Yield whole batches from the first ``fill`` rows, permuted; move the remainder to the
        front of the buffer (or yield it as a last, short batch when ``final``). Returns the
        rows left in the buffer."""
        order = rng.permutation(fill) if self.shuffle else np.arange(fill)
        whole = fill - fill % self.batch_size
        for start in range(0, whole, self.batch_size):
            yield self._batch(buffer, order[start : start + self.batch_size])
        rest = order[whole:]
        if final:
            if len(rest) and not self.drop_last:
                yield self._batch(buffer, rest)
            return 0
        for values in buffer.values():
            values[: len(rest)] = values[rest]  # fancy indexing copies first: overlap is safe
        return len(rest)

    def _batch(self, buffer: dict[str, np.ndarray], index: np.ndarray) -> dict[str, torch.Tensor | np.ndarray]:
        index = np.sort(index) if not self.shuffle else index
        columns = {name: buffer[name][index] for name in self.fields}
        if self.label_fraction < 1:
            columns["labels"] = np.where(keeps_label(columns["ids"], self.label_fraction, self.label_seed), columns["labels"], -1)
            if not self.with_ids:
                del columns["ids"]
        if self.policy is not None:
            columns = self._replay_views(columns)
        if self.transform is not None:
            columns = self.transform(columns)
        return {name: values if name == "ids" else torch.from_numpy(np.ascontiguousarray(values)) for name, values in columns.items()}

    def _replay_views(self, columns: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One view per sample, as the teacher saw it: in epoch e, sample i takes view
        (e + o_i) mod V, where o_i is drawn from (this run's seed, the sample's first view seed:
        a function of its id); its input is the policy replayed from that view's seed, and its
        targets are that view's. Adds ``view`` (the index) and ``view_seed``."""
        from .cache.views import below, philox

        assert self.policy is not None
        seeds = columns.pop("view_seeds")
        views = self.meta.views_per_id
        offsets = below(philox(seeds[:, 0], self.seed & 0xFFFFFFFF)[0], views)
        chosen = (self.epoch + offsets) % views
        rows = np.arange(len(seeds))
        if views > 1:
            for name in self.meta.layout.fields(self.meta.num_classes):
                columns[name] = columns[name][rows, chosen]
        columns["view_seed"] = seeds[rows, chosen]
        columns["view"] = chosen
        with torch.no_grad():
            columns["inputs"] = self.policy(torch.from_numpy(columns["inputs"]), torch.from_numpy(columns["view_seed"])).numpy()
        return columns
