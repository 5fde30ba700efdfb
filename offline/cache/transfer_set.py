"""Transfer sets: the ``.npz`` files that clients push and the trainer evaluates on."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .contract import CacheError
from .ids import normalize_ids


def read_transfer_set(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Load ``inputs`` (required), ``labels`` and ``ids`` (optional) from an ``.npz`` file."""
    path = Path(path)
    if not path.is_file():
        raise CacheError(f"{path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except (OSError, ValueError) as exc:
        raise CacheError(f"{path}: not a readable .npz file ({exc})") from None
    if "inputs" not in arrays:
        raise CacheError(f"{path}: has no 'inputs' array (found: {', '.join(sorted(arrays)) or 'nothing'})")
    n = len(arrays["inputs"])
    if arrays["inputs"].ndim < 2:
        raise CacheError(f"{path}: inputs must be [N, ...], got shape {list(arrays['inputs'].shape)}")
    if "labels" in arrays:
        labels = arrays["labels"]
        if labels.shape != (n,) or labels.dtype.kind not in "iu":
            raise CacheError(f"{path}: labels must be {n} integers, got shape {list(labels.shape)} of {labels.dtype}")
        arrays["labels"] = labels.astype(np.int64)
    if "ids" in arrays:
        try:
            arrays["ids"] = normalize_ids(arrays["ids"], n)
        except ValueError as exc:
            raise CacheError(f"{path}: ids: {exc}") from None
    return arrays
