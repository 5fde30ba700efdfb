"""One shard: an HDF5 file of N rows in the cache's columns, with the cache's metadata in its
attributes; reading its metadata (checked against its datasets) and contiguous row ranges."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .contract import CacheError, CacheMeta

SHARD_ATTRS = (
    "format",
    "schema_version",
    "teacher_fingerprint",
    "teacher_name",
    "num_classes",
    "input_shape",
    "input_dtype",
    "preprocessing",
    "temperature",
    "temperature_rule",
    "logits_dtype",
    "logits_layout",
    "views_per_id",
    "augment",
    "view_salt",
    "target_seed",  # of a sampled layout only (CacheMeta.to_dict leaves it out otherwise)
    "task",  # of a token cache only, with its tokenizer's fingerprint
    "tokenizer_fingerprint",
    "chunk_rows",
    "created_at",
)
STRING_DTYPE = h5py.string_dtype("utf-8")
_JSON_ATTRS = ("input_shape", "preprocessing", "augment")  # stored as JSON text; other strings are verbatim
# What h5py raises for a damaged file besides OSError: RuntimeError for some damaged metadata
# (attribute iteration over a header with a bad checksum: bench/corrupt.py), and, when an object
# of the wrong kind stands where a dataset belongs, TypeError/AttributeError/IndexError (a group
# has no .shape or .dtype; a scalar dataset has no shape[0]).
H5_ERRORS = (OSError, RuntimeError, KeyError, ValueError, TypeError, IndexError, AttributeError)


def encode_attrs(attrs: dict[str, Any]) -> dict[str, Any]:
    """The shard attributes as HDF5 stores them: lists and dicts as JSON text."""
    return {key: json.dumps(attrs[key]) if isinstance(attrs[key], (list, dict)) else attrs[key] for key in SHARD_ATTRS if key in attrs}


def _decode_attr(key: str, value: Any) -> Any:
    if isinstance(value, bytes):
        value = value.decode("utf-8")
    if isinstance(value, str) and key in _JSON_ATTRS:
        return json.loads(value)
    if isinstance(value, np.generic):
        return value.item()
    return value


def decode_ids(values: np.ndarray) -> np.ndarray:
    return np.array([v.decode("utf-8") if isinstance(v, bytes) else v for v in values], dtype=object)


def read_shard_meta(path: Path) -> tuple[CacheMeta, int]:
    """A shard's metadata and sample count, checking that its datasets agree with them."""
    try:
        with h5py.File(path, "r") as h5:
            raw = {key: _decode_attr(key, h5.attrs[key]) for key in h5.attrs}
            meta = CacheMeta.from_dict(raw, path.name)
            columns = meta.columns()
            missing = [name for name in columns if name not in h5]
            if missing:
                raise CacheError(f"{path}: missing dataset(s) {', '.join(missing)}")
            n = h5["ids"].shape[0]
            for name, (row_shape, dtype) in columns.items():
                if name == "ids":
                    continue
                if h5[name].shape != (n, *row_shape):
                    raise CacheError(f"{path}: {name} has shape {list(h5[name].shape)}, expected {[n, *row_shape]}")
                if h5[name].dtype != dtype:
                    # A shard rewritten by hand with float labels would otherwise fail later,
                    # inside the training step, with a raw torch error.
                    said = "expected" if name == "labels" else "attributes say"
                    raise CacheError(f"{path}: {name} are {h5[name].dtype}, {said} {dtype}")
            if h5py.check_string_dtype(h5["ids"].dtype) is None:
                raise CacheError(f"{path}: ids are {h5['ids'].dtype}, expected strings")
            return meta, n
    except CacheError:
        raise
    # The full path, so that a message from one of several caches says which file.
    except H5_ERRORS as exc:
        raise CacheError(f"{path}: not a readable HDF5 shard ({type(exc).__name__}: {exc})") from None


class ShardHandle:
    """Reads contiguous row ranges of one shard; opens the file on first use, so that it can be
    created in one process and used in a forked DataLoader worker."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._h5: h5py.File | None = None
        self._datasets: dict[str, h5py.Dataset] = {}

    def _dataset(self, name: str) -> h5py.Dataset:
        if self._h5 is None:
            self._h5 = h5py.File(self.path, "r")
        dataset = self._datasets.get(name)
        if dataset is None:
            dataset = self._datasets[name] = self._h5[name]
        return dataset

    def read(self, start: int, stop: int, fields: Sequence[str]) -> dict[str, np.ndarray]:
        try:
            out = {}
            for name in fields:
                values = self._dataset(name)[start:stop]
                out[name] = decode_ids(values) if name == "ids" else values
            return out
        except (OSError, RuntimeError, KeyError, ValueError, TypeError) as exc:
            raise self._failed(f"read of rows {start}:{stop}", exc) from None

    def fields(self, fields: Sequence[str]) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
        """Each field's row dtype and row shape, as stored in this shard."""
        try:
            return {name: (self._dataset(name).dtype, self._dataset(name).shape[1:]) for name in fields}
        except (OSError, RuntimeError, KeyError, ValueError, TypeError) as exc:
            raise self._failed(f"open of {', '.join(fields)}", exc) from None

    def read_into(self, start: int, stop: int, out: dict[str, np.ndarray], offset: int) -> None:
        """Read rows [start, stop) of each field in ``out`` straight into
        ``out[name][offset:offset + stop - start]``: one copy, from HDF5 to the caller's buffer.
        The buffers' dtypes may be wider than the shard's (HDF5 converts)."""
        rows = stop - start
        try:
            for name, buffer in out.items():
                if name == "ids":
                    buffer[offset : offset + rows] = self.read(start, stop, ("ids",))["ids"]
                elif rows:
                    # h5py's low-level read: its high-level selections cost about 0.3 ms each here.
                    dataset, dest = self._dataset(name), buffer[offset : offset + rows]
                    file_space = dataset.id.get_space()
                    file_space.select_hyperslab((start,) + (0,) * (dest.ndim - 1), dest.shape)
                    dataset.id.read(h5py.h5s.create_simple(dest.shape), file_space, dest)
        except (OSError, RuntimeError, KeyError, ValueError, TypeError) as exc:
            raise self._failed(f"read of rows {start}:{stop}", exc) from None

    def _failed(self, what: str, exc: BaseException) -> CacheError:
        # RuntimeError: what h5py raises for some damaged metadata (bench/corrupt.py); the full
        # path, so that the message says which cache the shard belongs to.
        self.close()
        return CacheError(f"{self.path}: {what} failed ({type(exc).__name__}: {exc})")

    def close(self) -> None:
        self._datasets = {}
        if self._h5 is not None:
            with contextlib.suppress(Exception):
                self._h5.close()
            self._h5 = None

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "_h5": None, "_datasets": {}}
