"""Sample ids: what the cache deduplicates by. Numpy only."""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np


def normalize_ids(ids: Any, count: int | None = None) -> np.ndarray:
    """Ids as an object array of Python str. Integers become their decimal string."""
    arr = np.asarray(ids)
    if arr.ndim != 1:
        raise ValueError(f"ids must be one-dimensional, got shape {list(arr.shape)}")
    if count is not None and len(arr) != count:
        raise ValueError(f"got {len(arr)} ids for {count} samples")
    if arr.dtype.kind in "iu":
        return np.array([str(int(v)) for v in arr], dtype=object)
    if arr.dtype.kind == "S":
        arr = arr.astype(object)
    if arr.dtype.kind in "UO":
        out = np.empty(len(arr), dtype=object)
        for i, value in enumerate(arr):
            if isinstance(value, bytes):
                try:
                    value = value.decode("utf-8")
                except UnicodeDecodeError:
                    raise ValueError(f"id #{i} is not valid UTF-8") from None
            elif isinstance(value, (int, np.integer)) and not isinstance(value, bool):
                value = str(int(value))
            elif not isinstance(value, str):
                raise ValueError(f"id #{i} is a {type(value).__name__}, expected str or int")
            if not value:
                raise ValueError(f"id #{i} is empty")
            if "\x00" in value:  # HDF5 strings end at a NUL: such an id could never be written
                raise ValueError(f"id #{i} contains a NUL character")
            out[i] = value
        return out
    raise ValueError(f"ids have dtype {arr.dtype}, expected strings or integers")


def content_ids(inputs: np.ndarray) -> np.ndarray:
    """The default id of a sample: sha256 of its raw input bytes, in hex."""
    flat = np.ascontiguousarray(inputs).reshape(len(inputs), -1)
    return np.array([hashlib.sha256(row.tobytes()).hexdigest() for row in flat.view(np.uint8)], dtype=object)

