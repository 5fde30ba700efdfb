"""The cache's reproducible randomness: seeds named by (salt, id, index) and a counter-based
generator that gives the same bits with numpy on any machine and with torch on any device.
Numpy only (torch tensors are accepted where noted, never imported).

Everything below is part of the cache format and must never change:

* ``keyed_seeds``: ``seed = blake2b(salt as 8 bytes LE ‖ id as UTF-8 ‖ index as 4 bytes LE,
  digest_size=8, person=PERSON)`` read as a little-endian integer, top bit cleared (so it is a
  non-negative int64). The fields around the id are fixed-width, so the message is unambiguous.
  ``view_seeds`` (the seeds of augmented views) use the person ``kdcache-views``; the draws of a
  sampled target layout use ``kdcache-draws``, so the two never share a stream.
* ``philox``: Philox4x32-10 (Salmon et al., SC 2011; Random123's known answers are in the
  tests), key = the seed's two 32-bit halves (low, high), counter = (n, 0, 0, 0); four 32-bit
  words per counter. It is written once for numpy and torch int64 arrays with no operation that
  can overflow (each 32x32 product is split at 16 bits), so the bits are the same everywhere.
* From words: ``uniform24`` (float32 in [0, 1), exact), ``uniform53`` (float64 in [0, 1) from
  two words, exact), ``below(word, n) = (word * n) >> 32`` (an integer in [0, n)).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from .ids import normalize_ids

VIEW_SEED_PERSON = b"kdcache-views"
DRAW_SEED_PERSON = b"kdcache-draws"
_MASK32 = 0xFFFFFFFF
_MASK63 = (1 << 63) - 1


def keyed_seeds(salt: int, ids: Sequence[str], count: int, person: bytes) -> np.ndarray:
    """The seeds [N, count] int64 of indices 0..count-1 of each id (see the module docstring)."""
    if not 0 <= int(salt) < 1 << 64:
        raise ValueError(f"salt must be in [0, 2**64), got {salt}")
    if not 1 <= int(count) < 1 << 31:
        raise ValueError(f"count must be at least 1, got {count}")
    names = normalize_ids(ids)
    seeds = np.empty((len(names), int(count)), dtype=np.int64)
    prefix = int(salt).to_bytes(8, "little")
    for row, name in enumerate(names):
        base = hashlib.blake2b(prefix + name.encode("utf-8"), digest_size=8, person=person)
        for index in range(int(count)):
            h = base.copy()
            h.update(index.to_bytes(4, "little"))
            seeds[row, index] = int.from_bytes(h.digest(), "little") & _MASK63
    return seeds


def view_seeds(salt: int, ids: Sequence[str], views: int) -> np.ndarray:
    """The seeds [N, V] int64 of the V views of each id."""
    if not 0 <= int(salt) < 1 << 64:
        raise ValueError(f"view salt must be in [0, 2**64), got {salt}")
    if not 1 <= int(views) < 1 << 31:
        raise ValueError(f"views must be at least 1, got {views}")
    return keyed_seeds(salt, ids, views, VIEW_SEED_PERSON)


def draw_seeds(salt: int, ids: Sequence[str], views: int) -> np.ndarray:
    """The seeds [N, V] int64 of the draws of a sampled target layout, one per view of each id."""
    return keyed_seeds(salt, ids, views, DRAW_SEED_PERSON)


def _mulhilo(a: Any, m: int) -> tuple[Any, Any]:
    """(high, low) 32-bit words of a * m, for 32-bit a and m, with every product below 2**49."""
    low_part = (a & 0xFFFF) * m
    high_part = (a >> 16) * m
    carry = (low_part >> 16) + high_part
    return carry >> 16, ((carry & 0xFFFF) << 16) | (low_part & 0xFFFF)


def philox4x32(counter: Sequence[Any], key: Sequence[Any]) -> tuple[Any, Any, Any, Any]:
    """Philox4x32-10 of four counter words and two key words (int64 values in [0, 2**32))."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for round_index in range(10):
        if round_index:
            k0, k1 = (k0 + 0x9E3779B9) & _MASK32, (k1 + 0xBB67AE85) & _MASK32
        hi0, lo0 = _mulhilo(c0, 0xD2511F53)
        hi1, lo1 = _mulhilo(c2, 0xCD9E8D57)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def _philox4x32_numpy(counter: Sequence[np.ndarray], key: Sequence[np.ndarray]) -> tuple[np.ndarray, ...]:
    """``philox4x32`` with numpy's uint64 products (a 32x32 product fits exactly): the same bits,
    about three times faster than the split products that torch's int64 needs."""
    c0, c1, c2, c3 = (np.asarray(c).astype(np.uint64) for c in counter)
    k0, k1 = (np.asarray(k).astype(np.uint64) for k in key)
    mask, shift = np.uint64(_MASK32), np.uint64(32)
    m0, m1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
    w0, w1 = np.uint64(0x9E3779B9), np.uint64(0xBB67AE85)
    for round_index in range(10):
        if round_index:
            k0, k1 = (k0 + w0) & mask, (k1 + w1) & mask
        p0, p1 = c0 * m0, c2 * m1
        c0, c1, c2, c3 = (p1 >> shift) ^ c1 ^ k0, p1 & mask, (p0 >> shift) ^ c3 ^ k1, p0 & mask
    return tuple(c.astype(np.int64) for c in (c0, c1, c2, c3))  # type: ignore[return-value]


def philox(seeds: Any, counter: Any) -> tuple[Any, Any, Any, Any]:
    """The four 32-bit words (int64 arrays) for each seed at ``counter`` (broadcast together)."""
    zero = seeds & 0
    words = (counter + zero, zero, zero, zero), (seeds & _MASK32, (seeds >> 32) & _MASK32)
    if isinstance(zero, np.ndarray):
        return _philox4x32_numpy(*words)  # type: ignore[return-value]
    return philox4x32(*words)


def _to_float(values: Any, numpy_dtype: type, torch_method: str) -> Any:
    # torch tensors convert with their own method; numpy arrays with astype (torch is never imported)
    return (
        getattr(values, torch_method)()
        if not isinstance(values, np.ndarray) and hasattr(values, torch_method)
        else np.asarray(values).astype(numpy_dtype)
    )


def uniform24(word: Any) -> Any:
    """float32 in [0, 1) from the top 24 bits of a word, exactly."""
    return _to_float(word >> 8, np.float32, "float") * 2.0**-24


def uniform53(high: Any, low: Any) -> Any:
    """float64 in [0, 1) from 27 bits of ``high`` and 26 of ``low``, exactly."""
    return _to_float(((high >> 5) << 26) | (low >> 6), np.float64, "double") * 2.0**-53


def below(word: Any, n: Any) -> Any:
    """An integer in [0, n) from a word (multiply-shift; n < 2**31)."""
    return (word * n) >> 32
