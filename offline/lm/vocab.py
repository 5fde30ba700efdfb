"""The vocabulary check of ``offline-distill --task lm``: a student's vocabulary V' must be the
cache's V, or, with ``--allow-vocab-padding``, every index the cache stores (the input token ids
within each sequence's length, and the top-k or sampled class indices of its valid tokens) must be
below min(V, V'). That is checked by reading the cache, never assumed; the first index that is not
is named with its shard, row and position.

A cache of full logits holds the teacher's distribution over all V classes: it trains a student
with more classes (their teacher probability is 0), never one with fewer.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import numpy as np
from tqdm import tqdm

from ..cache import CacheMeta, CacheReader, ShardHandle
from ..cache.tokens import valid_mask

SCAN_BYTES = 8 << 20  # rows read at a time: about this many bytes


class VocabularyError(ValueError):
    """A student vocabulary that does not fit the cache, in one line."""


def check_vocabulary(
    student_vocab: int, meta: CacheMeta, readers: Sequence[CacheReader], *, allow_padding: bool, progress: bool
) -> str | None:
    """None when the vocabularies agree; a line for the log when ``allow_padding`` lets them
    differ and the scan passes; VocabularyError otherwise."""
    cache_vocab = meta.num_classes
    if student_vocab == cache_vocab:
        return None
    sizes = f"the student's vocabulary has {student_vocab:,} tokens and the cache's {cache_vocab:,}"
    if not allow_padding:
        raise VocabularyError(
            f"{sizes}; they must agree (--allow-vocab-padding accepts the difference when every index the cache stores fits both)"
        )
    if student_vocab < cache_vocab and meta.layout.name == "full":
        raise VocabularyError(
            f"{sizes}; a cache of full logits holds the teacher's distribution over all {cache_vocab:,} tokens, "
            "so it cannot train a smaller vocabulary (cache-convert it to topk:K, or give the student the cache's vocabulary)"
        )
    bound = min(student_vocab, cache_vocab)
    rows = scan_indices(readers, meta, bound, progress=progress, sizes=sizes)
    return f"vocabulary: {sizes}; every stored token and target index of the {rows:,} sequences is below {bound:,} (--allow-vocab-padding, scanned)"


def index_fields(meta: CacheMeta) -> tuple[str, ...]:
    """The per-token fields of class indices that the layout stores."""
    return {"topk": ("topk_indices",), "sampled": ("sample_indices",)}.get(meta.layout.name, ())


def scan_indices(readers: Sequence[CacheReader], meta: CacheMeta, bound: int, *, progress: bool, sizes: str) -> int:
    """Read every row of the caches; VocabularyError at the first stored index >= ``bound``.
    Returns the rows scanned."""
    fields = ("inputs", "lengths", *index_fields(meta))
    step = max(1, SCAN_BYTES // max(1, meta.row_bytes()))
    shards = [info for reader in readers for info in reader.shards]
    scanned = 0
    with tqdm(
        total=sum(info.num_samples for info in shards), desc="vocabulary scan", unit="seq", disable=not progress, file=sys.stderr
    ) as bar:
        for info in shards:
            handle = ShardHandle(info.path)
            try:
                for start in range(0, info.num_samples, step):
                    block = handle.read(start, min(start + step, info.num_samples), fields)
                    problem = first_outside(block, fields, bound, meta.layout.length)  # type: ignore[attr-defined]
                    if problem:
                        row, position, name, value = problem
                        raise VocabularyError(
                            f"{info.where}: row {start + row}, position {position}: {name} {value} is not below {bound:,}; {sizes}, "
                            "and --allow-vocab-padding needs every stored index below the smaller"
                        )
                    bar.update(len(block["lengths"]))
                    scanned += len(block["lengths"])
            finally:
                handle.close()
    return scanned


def first_outside(block: dict[str, np.ndarray], fields: Sequence[str], bound: int, length: int) -> tuple[int, int, str, int] | None:
    """(row, position, what, value) of the first index >= ``bound`` (or < 0) of a valid token,
    in the order of ``fields``, or None."""
    valid = valid_mask(block["lengths"], length)
    names = {"inputs": "token id", "topk_indices": "top-k index", "sample_indices": "sampled index"}
    for name in fields:
        if name == "lengths":
            continue
        values = block[name].astype(np.int64)
        outside = (values >= bound) | (values < 0)
        if outside.ndim == 3:
            outside = outside.any(axis=-1)
        outside &= valid
        if outside.any():
            row, position = (int(i) for i in np.argwhere(outside)[0])
            where = values[row, position]
            value = int(where[(where >= bound) | (where < 0)][0]) if where.ndim else int(where)
            return row, position, names[name], value
    return None
