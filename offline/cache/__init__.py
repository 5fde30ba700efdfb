"""The cache format: the one module that knows how teacher outputs are laid out on disk.

A cache is a directory of immutable HDF5 shards plus ``manifest.json``::

    cache/
      manifest.json          # the published shards, their sample counts and sha256 checksums
      shard-000000.h5        # immutable once listed in the manifest
      shard-000001.h5
      .shard-000002.h5.tmp   # being written; never read, removed on the next writer start
      .writer.lock           # one writer per directory

Each shard holds N samples in four public datasets:

    ids      [N]        UTF-8 strings, unique within the cache (integer ids as decimal strings)
    inputs   [N, ...]   in the dtype they came in (uint8 images stay uint8)
    labels   [N]        int64, -1 means unknown
    logits   [N, C]     the teacher's raw logits, float32 (default) or float16

and records the teacher and the input contract in its attributes (see ``SHARD_ATTRS``).

Room for later versions without rewriting old shards: every shard carries
``schema_version``, ``logits_layout`` ("full" today; "topk" will store ``topk_values`` and
``topk_indices`` [N, K] instead of ``logits``) and ``views_per_id`` (1 today; more will add a
``view`` [N] dataset and make (id, view) the unique key). Readers refuse layouts they do not
know with a message instead of misreading them.

Chunking: every dataset is chunked by whole rows, with the same number of rows per chunk
(``chunk_rows``, stored as an attribute). The row count is picked so that a chunk of
``inputs`` is about 1 MiB: large enough that HDF5's per-chunk cost is amortised and a read
is one sequential run of the file, small enough that a shuffle window of a few chunks stays
small. The streaming reader reads blocks of whole chunks, aligned to chunk boundaries, so each
chunk is read once per epoch and HDF5's chunk cache is never needed.

This module imports neither FastAPI nor any teacher code: the service and the trainer both
import it.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import hashlib
import json
import os
import re
import signal
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

SCHEMA_VERSION = 1
FORMAT_NAME = "kd-cache"
MANIFEST_NAME = "manifest.json"
LOCK_NAME = ".writer.lock"
SHARD_PATTERN = re.compile(r"^shard-(\d{6,})\.h5$")
TMP_PATTERN = re.compile(r"^\.shard-(\d{6,})\.h5\.tmp$")
LOGITS_LAYOUTS = ("full",)
LOGITS_DTYPES = ("float32", "float16")
DATASETS = ("ids", "inputs", "labels", "logits")
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
    "logits_dtype",
    "logits_layout",
    "views_per_id",
    "chunk_rows",
    "created_at",
)
TARGET_CHUNK_BYTES = 1 << 20
MIN_CHUNK_ROWS = 16
MAX_CHUNK_ROWS = 16384
DEFAULT_SHARD_SAMPLES = 65536
DEFAULT_SHARD_BYTES = 512 << 20
STAGE_ROWS = 1024
IMAGE_BLOCK_BYTES = 4 << 20  # the in-memory open shard grows in steps of this many bytes
_STR_DTYPE = h5py.string_dtype("utf-8")


# Fault injection for the crash trials (bench/crash.py, docs/reliability.md): with
# KDCACHE_CRASH_AT=<point>[:<n>] in its environment, a process kills itself with SIGKILL the n-th
# time (default 1) it reaches ``crash_point(<point>)``, so a trial can stop the writer exactly
# between two steps that a random kill -9 would hit only rarely. Unset, a crash point is one
# comparison.
CRASH_POINTS = (
    "journal-synced",  # service: a group is durable in the journal, not yet in the shard
    "shard-partly-written",  # some of the open shard's datasets hold the new rows, the others not yet
    "shard-closed",  # rollover: the full shard's image is written and fsynced, not yet renamed
    "shard-renamed",  # rollover: renamed to its final name, not yet in the manifest
    "manifest-tmp-written",  # the new manifest is fsynced beside the old one, not yet replacing it
    "manifest-replaced",  # the manifest lists the new shard; the journal is not yet emptied
)
_CRASH_AT = os.environ.get("KDCACHE_CRASH_AT")
_crash_point, _, _crash_nth = (_CRASH_AT or "").partition(":")
_crash_countdown = int(_crash_nth) if _crash_nth.isdigit() else 1


def crash_point(point: str) -> None:
    global _crash_countdown
    if _CRASH_AT is None or point != _crash_point:
        return
    _crash_countdown -= 1
    if _crash_countdown <= 0:
        os.kill(os.getpid(), signal.SIGKILL)


class CacheError(Exception):
    """A cache directory or shard that cannot be used; the message names the file."""


# ---------------------------------------------------------------------------------------------
# The input contract: what the teacher was fed, and how to feed a student the same thing.


@dataclass(frozen=True)
class Preprocessing:
    """``x = (x.astype(float32) * scale - mean) / std``, with mean/std per channel (axis 0 of a
    sample) or scalars. The default is the identity."""

    scale: float = 1.0
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None) -> Preprocessing:
        raw = raw or {}
        unknown = set(raw) - {"scale", "mean", "std"}
        if unknown:
            raise ValueError(f"preprocessing has unknown keys {sorted(unknown)}")
        mean = tuple(float(v) for v in np.atleast_1d(raw.get("mean", 0.0)))
        std = tuple(float(v) for v in np.atleast_1d(raw.get("std", 1.0)))
        if any(s == 0 for s in std):
            raise ValueError("preprocessing std must not contain 0")
        return cls(scale=float(raw.get("scale", 1.0)), mean=mean, std=std)

    def to_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, "mean": list(self.mean), "std": list(self.std)}

    def apply(self, inputs: Any) -> Any:
        """Preprocess a torch tensor batch [B, *shape] on its own device; returns float32."""
        import torch

        x = inputs.to(torch.float32)
        if self.scale != 1.0:
            x = x * self.scale
        if self.mean != (0.0,) or self.std != (1.0,):
            view = (1, -1) + (1,) * (x.dim() - 2) if len(self.mean) > 1 or len(self.std) > 1 else ()
            mean = torch.tensor(self.mean, dtype=torch.float32, device=x.device)
            std = torch.tensor(self.std, dtype=torch.float32, device=x.device)
            if view:
                mean, std = mean.view(view), std.view(view)
            x = (x - mean) / std
        return x


@dataclass(frozen=True)
class CacheMeta:
    """What every shard of one cache shares. Two caches can be trained on together only if
    their ``num_classes`` and inputs agree (and, unless allowed, their teacher)."""

    teacher_fingerprint: str
    teacher_name: str
    num_classes: int
    input_shape: tuple[int, ...]
    input_dtype: str
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    temperature: float = 1.0
    logits_dtype: str = "float32"
    logits_layout: str = "full"
    views_per_id: int = 1
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        object.__setattr__(self, "input_shape", tuple(int(d) for d in self.input_shape))
        object.__setattr__(self, "input_dtype", np.dtype(self.input_dtype).name)
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        if self.logits_dtype not in LOGITS_DTYPES:
            raise ValueError(f"logits_dtype must be one of {LOGITS_DTYPES}, got {self.logits_dtype!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["input_shape"] = list(self.input_shape)
        out["preprocessing"] = self.preprocessing.to_dict()
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str) -> CacheMeta:
        try:
            version = int(raw.get("schema_version", 0))
            if version > SCHEMA_VERSION:
                raise CacheError(
                    f"{where}: schema version {version} is newer than this reader supports ({SCHEMA_VERSION}); upgrade the package"
                )
            layout = raw.get("logits_layout", "full")
            if layout not in LOGITS_LAYOUTS:
                raise CacheError(f"{where}: logits layout {layout!r} is not supported by this reader")
            if int(raw.get("views_per_id", 1)) != 1:
                raise CacheError(f"{where}: {raw['views_per_id']} views per id is not supported by this reader")
            return cls(
                teacher_fingerprint=str(raw["teacher_fingerprint"]),
                teacher_name=str(raw["teacher_name"]),
                num_classes=int(raw["num_classes"]),
                input_shape=tuple(raw["input_shape"]),
                input_dtype=str(raw["input_dtype"]),
                preprocessing=Preprocessing.from_dict(raw.get("preprocessing")),
                temperature=float(raw.get("temperature", 1.0)),
                logits_dtype=str(raw.get("logits_dtype", "float32")),
                logits_layout=layout,
                views_per_id=1,
                schema_version=version,
            )
        except CacheError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise CacheError(f"{where}: bad cache metadata ({type(exc).__name__}: {exc})") from None

    def mismatch(self, other: CacheMeta, fields: Sequence[str]) -> str | None:
        """The first of ``fields`` that differs, described, or None."""
        for name in fields:
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine != theirs:
                return f"{name} is {theirs!r}, expected {mine!r}"
        return None

    def row_bytes(self) -> int:
        """Bytes of one stored sample, without its id."""
        inputs = int(np.prod(self.input_shape, dtype=np.int64)) * np.dtype(self.input_dtype).itemsize
        return inputs + 8 + self.num_classes * np.dtype(self.logits_dtype).itemsize

    def chunk_rows(self) -> int:
        inputs = max(1, int(np.prod(self.input_shape, dtype=np.int64)) * np.dtype(self.input_dtype).itemsize)
        return int(min(MAX_CHUNK_ROWS, max(MIN_CHUNK_ROWS, TARGET_CHUNK_BYTES // inputs)))


# ---------------------------------------------------------------------------------------------
# Ids


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
                value = value.decode("utf-8")
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


# ---------------------------------------------------------------------------------------------
# Files


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: Path, progress: Any = None) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(4 << 20):
            digest.update(block)
            if progress is not None:
                progress.update(len(block))
    return digest.hexdigest()


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write JSON to ``path`` so that a reader sees the old file or the new one, never a mix."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(payload, fh, indent=1, sort_keys=True)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    crash_point(f"{path.stem}-tmp-written")
    os.replace(tmp, path)
    _fsync_path(path.parent)
    crash_point(f"{path.stem}-replaced")


@dataclass(frozen=True)
class ShardInfo:
    """One published shard, as the manifest lists it."""

    path: Path
    num_samples: int
    sha256: str
    bytes: int

    @property
    def name(self) -> str:
        return self.path.name

    def to_manifest(self) -> dict[str, Any]:
        return {"name": self.name, "num_samples": self.num_samples, "sha256": self.sha256, "bytes": self.bytes}


_JSON_ATTRS = ("input_shape", "preprocessing")  # stored as JSON text; other strings are verbatim


def _decode_attr(key: str, value: Any) -> Any:
    if isinstance(value, bytes):
        value = value.decode("utf-8")
    if isinstance(value, str) and key in _JSON_ATTRS:
        return json.loads(value)
    if isinstance(value, np.generic):
        return value.item()
    return value


def read_shard_meta(path: Path) -> tuple[CacheMeta, int]:
    """A shard's metadata and sample count, checking that its datasets agree with them."""
    try:
        with h5py.File(path, "r") as h5:
            raw = {key: _decode_attr(key, h5.attrs[key]) for key in h5.attrs}
            meta = CacheMeta.from_dict(raw, path.name)
            missing = [name for name in DATASETS if name not in h5]
            if missing:
                raise CacheError(f"{path}: missing dataset(s) {', '.join(missing)}")
            n = h5["ids"].shape[0]
            expected = {
                "inputs": (n, *meta.input_shape),
                "labels": (n,),
                "logits": (n, meta.num_classes),
            }
            for name, shape in expected.items():
                if h5[name].shape != shape:
                    raise CacheError(f"{path}: {name} has shape {list(h5[name].shape)}, expected {list(shape)}")
            if h5["inputs"].dtype != np.dtype(meta.input_dtype):
                raise CacheError(f"{path}: inputs are {h5['inputs'].dtype}, attributes say {meta.input_dtype}")
            if h5["logits"].dtype != np.dtype(meta.logits_dtype):
                raise CacheError(f"{path}: logits are {h5['logits'].dtype}, attributes say {meta.logits_dtype}")
            # A shard rewritten by hand with float labels or numeric ids would otherwise fail
            # later, inside the training step or the id lookup, with a raw torch/numpy error.
            if h5["labels"].dtype != np.dtype(np.int64):
                raise CacheError(f"{path}: labels are {h5['labels'].dtype}, expected int64")
            if h5py.check_string_dtype(h5["ids"].dtype) is None:
                raise CacheError(f"{path}: ids are {h5['ids'].dtype}, expected strings")
            return meta, n
    except CacheError:
        raise
    # The full path, so that a message from one of several caches says which file. Besides
    # OSError, a damaged file makes h5py raise RuntimeError (attribute iteration over a header
    # with a bad checksum: bench/corrupt.py), and an object of the wrong kind where a dataset
    # belongs gives TypeError/AttributeError/IndexError (a group has no .shape or .dtype; a
    # scalar dataset has no shape[0]).
    except (OSError, RuntimeError, KeyError, ValueError, TypeError, IndexError, AttributeError) as exc:
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

    def read(self, start: int, stop: int, fields: Sequence[str] = ("inputs", "logits", "labels")) -> dict[str, np.ndarray]:
        try:
            out = {}
            for name in fields:
                values = self._dataset(name)[start:stop]
                if name == "ids":
                    values = np.array([v.decode("utf-8") if isinstance(v, bytes) else v for v in values], dtype=object)
                out[name] = values
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


# ---------------------------------------------------------------------------------------------
# Reading


def _load_manifest(directory: Path) -> dict[str, Any]:
    manifest_path = directory / MANIFEST_NAME
    if not directory.exists():
        raise CacheError(f"{directory}: no such cache directory")
    if not directory.is_dir():
        raise CacheError(f"{directory}: not a directory")
    if not manifest_path.exists():
        stray = sorted(p.name for p in directory.iterdir() if SHARD_PATTERN.match(p.name))
        if stray:
            raise CacheError(
                f"{manifest_path}: missing, but {len(stray)} shard file(s) are present; "
                "a writer started on this directory (teacher-serve, or CacheWriter) rebuilds it"
            )
        raise CacheError(f"{directory}: empty cache directory (no {MANIFEST_NAME})")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CacheError(f"{manifest_path}: unreadable manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME or not isinstance(manifest.get("shards"), list):
        raise CacheError(f"{manifest_path}: not a {FORMAT_NAME} manifest")
    try:
        version = int(manifest.get("schema_version", 0))
    except (TypeError, ValueError):
        raise CacheError(f"{manifest_path}: bad schema_version {manifest.get('schema_version')!r}") from None
    if version > SCHEMA_VERSION:
        raise CacheError(
            f"{manifest_path}: schema version {version} is newer than this reader supports ({SCHEMA_VERSION}); upgrade the package"
        )
    return manifest


class CacheReader:
    """A published cache: its manifest, its shards, their verification, and block reads.

    Opening checks each listed shard's size and HDF5 structure against the manifest (cheap);
    ``verify()`` also checks the sha256 checksums. With ``skip_corrupt`` a bad shard is dropped
    and recorded in ``skipped`` instead of raising.

    The cheap checks cannot see damage that keeps a shard's size (flipped or zeroed bytes): such
    a shard opens, and its rows read as garbage, fail in HDF5 (a ``CacheError``), or, when the
    damage hits a global heap (where the ids and string attributes live), can make HDF5 itself
    loop forever (a libhdf5 bug, 2.0.0 included: an all-zero heap object never advances its
    parser; see bench/corrupt.py). ``verify_checksums=True`` checks each shard's sha256 *before*
    HDF5 parses it, which rules all of that out at the cost of one read of the cache.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        skip_corrupt: bool = False,
        check_files: bool = True,
        verify_checksums: bool = False,
        progress: Any = None,
    ) -> None:
        self.directory = Path(directory)
        manifest = _load_manifest(self.directory)
        where = str(self.directory / MANIFEST_NAME)
        self.meta = CacheMeta.from_dict(manifest.get("meta", {}), where)
        self.skipped: list[tuple[str, str]] = []
        self.shards: list[ShardInfo] = []
        for entry in manifest["shards"]:
            try:
                info = ShardInfo(self.directory / entry["name"], int(entry["num_samples"]), str(entry["sha256"]), int(entry["bytes"]))
            except (KeyError, TypeError, ValueError):
                raise CacheError(f"{where}: malformed shard entry {entry!r}") from None
            try:
                if verify_checksums:
                    problem = self._checksum_problem(info, progress)
                    if problem:
                        raise CacheError(f"{info.path}: {problem}")
                if check_files:
                    self._check_shard(info)
                self.shards.append(info)
            except CacheError as exc:
                if not skip_corrupt:
                    raise
                self.skipped.append((info.name, str(exc)))

    def _check_shard(self, info: ShardInfo) -> None:
        if not info.path.exists():
            raise CacheError(f"{info.path}: listed in the manifest but missing")
        size = info.path.stat().st_size
        if size != info.bytes:
            raise CacheError(f"{info.path}: {size} bytes on disk, manifest says {info.bytes} (truncated or replaced?)")
        meta, n = read_shard_meta(info.path)
        if n != info.num_samples:
            raise CacheError(f"{info.path}: holds {n} samples, manifest says {info.num_samples}")
        problem = self.meta.mismatch(meta, ("teacher_fingerprint", "num_classes", "input_shape", "input_dtype", "logits_dtype"))
        if problem:
            raise CacheError(f"{info.path}: {problem} (from the manifest)")

    @property
    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.shards)

    @property
    def total_bytes(self) -> int:
        return sum(s.bytes for s in self.shards)

    def verify(self, progress: Any = None) -> list[tuple[str, str]]:
        """Checksum every shard. Returns [(file, problem)], empty when all match."""
        problems = []
        for info in self.shards:
            problem = self._checksum_problem(info, progress)
            if problem:
                problems.append((str(info.path), problem))
        return problems

    @staticmethod
    def _checksum_problem(info: ShardInfo, progress: Any = None) -> str | None:
        """What is wrong with the shard's bytes, or None. Presence and size first, so that a
        missing or truncated shard is described as such, not as a checksum mismatch."""
        try:
            size = info.path.stat().st_size
            if size != info.bytes:
                return f"{size} bytes on disk, manifest says {info.bytes} (truncated or replaced?)"
            actual = sha256_file(info.path, progress)
        except FileNotFoundError:
            return "listed in the manifest but missing"
        except OSError as exc:
            return f"unreadable ({exc})"
        if actual != info.sha256:
            return f"sha256 {actual[:12]}… does not match the manifest's {info.sha256[:12]}…"
        return None

    def unlisted_files(self) -> list[str]:
        """Shard-like files that the manifest does not list: leftovers of an interrupted writer."""
        listed = {s.name for s in self.shards} | {name for name, _ in self.skipped}
        return sorted(
            p.name for p in self.directory.iterdir() if (SHARD_PATTERN.match(p.name) and p.name not in listed) or TMP_PATTERN.match(p.name)
        )

    def read(self, fields: Sequence[str] = ("ids", "inputs", "labels", "logits")) -> dict[str, np.ndarray]:
        """Everything, in shard order. For small caches and tests; training streams instead."""
        parts: dict[str, list[np.ndarray]] = {name: [] for name in fields}
        for info in self.shards:
            handle = ShardHandle(info.path)
            try:
                block = handle.read(0, info.num_samples, fields)
            finally:
                handle.close()
            for name in fields:
                parts[name].append(block[name])
        empty = {
            "ids": np.empty(0, dtype=object),
            "inputs": np.empty((0, *self.meta.input_shape), dtype=self.meta.input_dtype),
            "labels": np.empty(0, dtype=np.int64),
            "logits": np.empty((0, self.meta.num_classes), dtype=self.meta.logits_dtype),
        }
        return {name: np.concatenate(parts[name]) if parts[name] else empty[name] for name in fields}

    def iter_ids(self) -> Iterator[tuple[ShardInfo, np.ndarray]]:
        for info in self.shards:
            handle = ShardHandle(info.path)
            try:
                yield info, handle.read(0, info.num_samples, ("ids",))["ids"]
            finally:
                handle.close()

    def label_coverage(self) -> float:
        total = labelled = 0
        for info in self.shards:
            handle = ShardHandle(info.path)
            try:
                labels = handle.read(0, info.num_samples, ("labels",))["labels"]
            finally:
                handle.close()
            total += len(labels)
            labelled += int((labels >= 0).sum())
        return labelled / total if total else 0.0


# ---------------------------------------------------------------------------------------------
# Writing


class CacheWriter:
    """Appends teacher outputs to a cache directory; the only code that writes shards.

    Rows go into an open shard held in memory. When it reaches ``max_samples`` rows or
    ``max_bytes`` (or on ``flush_shard()`` / ``close()``), its image is written to a hidden
    temporary file, fsynced, renamed to its final name, the directory fsynced, and only then the
    manifest replaced atomically. A reader therefore only ever sees complete shards, and a full
    disk fails a publication cleanly, to be retried.

    Opening takes an exclusive lock on the directory, removes temporary files left by a crashed
    writer (their rows were never published), adopts complete shards that a crash left out of
    the manifest, and loads the ids already present so that ``append`` stores each id once.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        meta: CacheMeta,
        *,
        max_samples: int = DEFAULT_SHARD_SAMPLES,
        max_bytes: int = DEFAULT_SHARD_BYTES,
        compression: str | None = None,
    ) -> None:
        if max_samples < 1 or max_bytes < 1:
            raise ValueError("max_samples and max_bytes must be >= 1")
        self.directory = Path(directory)
        self.meta = meta
        self.max_samples = max_samples
        self.max_bytes = max_bytes
        self.compression = compression
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock_fh = open(self.directory / LOCK_NAME, "a+")  # noqa: SIM115 - held for the writer's life
        try:
            fcntl.flock(self._lock_fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_fh.close()
            raise CacheError(f"{self.directory}: another writer holds {LOCK_NAME}") from None
        try:
            self._shards: list[ShardInfo] = []
            # id -> global row: rows are numbered across the published shards in manifest order,
            # then the open shard, so a cache hit can be read back without scanning.
            self._ids: dict[str, int] = {}
            self._published_rows = 0
            self._recover()
        except BaseException:
            self._release_lock()
            raise
        self._h5: h5py.File | None = None
        self._tmp_path: Path | None = None
        self._open_rows = 0  # rows of the open shard: written to HDF5, then staged
        self._written_rows = 0
        self._staged: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        self._chunk_rows = meta.chunk_rows()
        # Appends are staged and written to HDF5 in pieces of at least this many rows: each h5py
        # call holds the GIL, and four resize-and-write calls per small batch stalled the
        # service's teacher thread (docs/benchmarks.md). A crash loses staged rows exactly as it
        # loses the rows of the unpublished temporary shard.
        self._stage_rows = max(1, min(self._chunk_rows, STAGE_ROWS))

    # -- start-up ---------------------------------------------------------------------------
    def _recover(self) -> None:
        manifest_path = self.directory / MANIFEST_NAME
        if manifest_path.exists():
            manifest = _load_manifest(self.directory)
            existing = CacheMeta.from_dict(manifest.get("meta", {}), str(manifest_path))
            self._check_compatible(existing, str(manifest_path))
            listed = [
                ShardInfo(self.directory / e["name"], int(e["num_samples"]), str(e["sha256"]), int(e["bytes"])) for e in manifest["shards"]
            ]
        else:
            listed = []
        for path in self.directory.iterdir():
            if TMP_PATTERN.match(path.name):
                path.unlink()
        (self.directory / f".{MANIFEST_NAME}.tmp").unlink(missing_ok=True)  # see write_json_atomic
        listed_names = {s.name for s in listed}
        adopted = []
        for path in sorted(self.directory.iterdir()):
            if SHARD_PATTERN.match(path.name) and path.name not in listed_names:
                meta, n = read_shard_meta(path)
                self._check_compatible(meta, path.name)
                adopted.append(ShardInfo(path, n, sha256_file(path), path.stat().st_size))
        self._shards = listed + adopted
        for info in self._shards:
            handle = ShardHandle(info.path)
            try:
                shard_ids = handle.read(0, info.num_samples, ("ids",))["ids"].tolist()
            finally:
                handle.close()
            self._ids.update(zip(shard_ids, range(self._published_rows, self._published_rows + len(shard_ids)), strict=True))
            self._published_rows += len(shard_ids)
        self._handles: dict[int, ShardHandle] = {}
        if adopted or not manifest_path.exists():
            self._write_manifest()

    def _check_compatible(self, existing: CacheMeta, where: str) -> None:
        problem = self.meta.mismatch(
            existing, ("teacher_fingerprint", "num_classes", "input_shape", "input_dtype", "logits_dtype", "preprocessing")
        )
        if problem:
            raise CacheError(f"{where}: this cache was written by another teacher or input contract: {problem}")

    # -- public API -------------------------------------------------------------------------
    @property
    def shards(self) -> list[ShardInfo]:
        return list(self._shards)

    @property
    def pending_rows(self) -> int:
        """Rows appended to the open temporary shard but not yet published."""
        return self._open_rows

    @property
    def capacity(self) -> int:
        """Rows per shard: max_samples, or as many whole rows as fit in max_bytes (at least one)."""
        return self._capacity()

    def __contains__(self, sample_id: str) -> bool:
        return sample_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def lookup(self, ids: Sequence[str]) -> np.ndarray:
        """Global row of each id (published or in the open shard), -1 where the id is absent."""
        get = self._ids.get
        return np.fromiter((get(sample_id, -1) for sample_id in ids), dtype=np.int64, count=len(ids))

    def read_logits(self, rows: np.ndarray) -> np.ndarray:
        """The stored logits of global ``rows`` (from ``lookup``), as float32 [len(rows), C].

        Rows still in the open temporary shard are read from it, so a sample answers as a cache
        hit as soon as it is appended, before its shard is published."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), self.meta.num_classes), dtype=np.float32)
        if len(rows) == 0:
            return out
        if rows.min() < 0 or rows.max() >= self._published_rows + self._open_rows:
            raise ValueError("read_logits: row out of range")
        starts = np.array([0] + [s.num_samples for s in self._shards], dtype=np.int64).cumsum()
        shard_of = np.searchsorted(starts, rows, side="right") - 1
        for shard in np.unique(shard_of):
            mask = shard_of == shard
            local = rows[mask] - starts[shard]
            if shard < len(self._shards):
                handle = self._handles.get(int(shard))
                if handle is None:
                    handle = self._handles[int(shard)] = ShardHandle(self._shards[shard].path)
                lo, hi = int(local.min()), int(local.max()) + 1
                block = handle.read(lo, hi, ("logits",))["logits"]
                out[mask] = block[local - lo]
            else:
                assert self._h5 is not None
                written = local < self._written_rows
                if written.any():
                    part = local[written]
                    lo, hi = int(part.min()), int(part.max()) + 1
                    block = np.asarray(self._h5["logits"][lo:hi], dtype=np.float32)
                    out[np.flatnonzero(mask)[written]] = block[part - lo]
                if not written.all():
                    staged = np.concatenate([batch[2] for batch in self._staged]).astype(self.meta.logits_dtype)
                    out[np.flatnonzero(mask)[~written]] = staged[local[~written] - self._written_rows]
        return out

    def append(self, ids: Any, inputs: np.ndarray, logits: np.ndarray, labels: np.ndarray | None = None) -> int:
        """Append a batch. Ids already in the cache are skipped. Returns the rows written."""
        inputs = np.asarray(inputs)
        n = len(inputs)
        norm_ids = normalize_ids(ids, n)
        logits = np.asarray(logits)
        labels = np.full(n, -1, dtype=np.int64) if labels is None else np.asarray(labels)
        self._validate_batch(norm_ids, inputs, logits, labels)
        keep = np.array([sample_id not in self._ids for sample_id in norm_ids], dtype=bool)
        if not keep.any():
            return 0
        if not keep.all():
            norm_ids, inputs, logits, labels = norm_ids[keep], inputs[keep], logits[keep], labels[keep]
        written = 0
        while written < len(norm_ids):
            if self._open_rows >= self._capacity():
                self.flush_shard()  # full, and its publication failed before (a full disk): retry first
            room = self._room()
            take = slice(written, written + room)
            self._write_rows(norm_ids[take], inputs[take], logits[take], labels[take])
            written += len(norm_ids[take])
            if self._open_rows >= self._capacity():
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
        tmp_path = self._tmp_path
        assert tmp_path is not None
        self._drain()
        if 0 < self._open_rows < self._chunk_rows:
            self._compact()
            self._drain()
        self._h5.flush()
        image = self._h5.id.get_file_image()
        try:
            with open(tmp_path, "wb") as fh:
                fh.write(image)
                fh.flush()
                os.fsync(fh.fileno())
        except OSError:
            tmp_path.unlink(missing_ok=True)
            raise
        crash_point("shard-closed")
        rows = self._open_rows
        self._h5.close()
        self._h5, self._tmp_path, self._open_rows, self._written_rows = None, None, 0, 0
        final = self.directory / tmp_path.name[1:-4]
        info = ShardInfo(final, rows, hashlib.sha256(image).hexdigest(), len(image))
        del image
        os.replace(tmp_path, final)
        _fsync_path(self.directory)
        crash_point("shard-renamed")
        self._shards.append(info)
        self._published_rows += info.num_samples
        self._write_manifest()
        return info

    def close(self) -> None:
        """Publish the open shard and release the directory."""
        try:
            self.flush_shard()
        finally:
            self._release_lock()

    def abort(self) -> None:
        """Drop the open shard's unpublished rows and release the directory."""
        if self._h5 is not None:
            with contextlib.suppress(Exception):
                self._h5.close()
            if self._tmp_path is not None:
                self._tmp_path.unlink(missing_ok=True)
            self._h5 = None
        self._staged = []
        self._release_lock()

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    # -- internals --------------------------------------------------------------------------
    def _release_lock(self) -> None:
        for handle in getattr(self, "_handles", {}).values():
            handle.close()
        if not self._lock_fh.closed:
            fcntl.flock(self._lock_fh, fcntl.LOCK_UN)
            self._lock_fh.close()

    def _validate_batch(self, ids: np.ndarray, inputs: np.ndarray, logits: np.ndarray, labels: np.ndarray) -> None:
        n, meta = len(ids), self.meta
        if tuple(inputs.shape[1:]) != meta.input_shape:
            raise ValueError(f"inputs have sample shape {list(inputs.shape[1:])}, cache expects {list(meta.input_shape)}")
        if inputs.dtype != np.dtype(meta.input_dtype):
            raise ValueError(f"inputs are {inputs.dtype}, cache expects {meta.input_dtype}")
        if logits.shape != (n, meta.num_classes):
            raise ValueError(f"logits have shape {list(logits.shape)}, expected {[n, meta.num_classes]}")
        if not np.isfinite(logits).all():
            raise ValueError("logits contain NaN or Inf")
        if labels.shape != (n,) or labels.dtype.kind not in "iu":
            raise ValueError(f"labels must be {n} integers, got shape {list(labels.shape)} of {labels.dtype}")
        if ((labels < -1) | (labels >= meta.num_classes)).any():
            raise ValueError(f"labels must lie in [-1, {meta.num_classes - 1}]")
        if len(set(ids.tolist())) != n:
            raise ValueError("ids must be unique within a batch")

    def _capacity(self) -> int:
        """Rows per shard: max_samples, or as many whole rows as fit in max_bytes (at least one)."""
        by_bytes = max(1, self.max_bytes // max(1, self.meta.row_bytes()))
        return min(self.max_samples, by_bytes)

    def _room(self) -> int:
        return max(1, self._capacity() - self._open_rows)

    def _next_index(self) -> int:
        indices = [int(m.group(1)) for p in self.directory.iterdir() if (m := SHARD_PATTERN.match(p.name))]
        return max(indices, default=-1) + 1

    def _open_shard(self, path: Path | None = None, rows: int | None = None) -> None:
        meta = self.meta
        self._tmp_path = path or self.directory / f".shard-{self._next_index():06d}.h5.tmp"
        # The open shard lives in memory (HDF5's core driver) and reaches the disk as one plain
        # write when it is published. HDF5 itself never writes to the disk, so a full disk is a
        # clean OSError in flush_shard, never a failed write inside HDF5, which left h5py's file
        # unusable and crashed the process at close (docs/reliability.md). Unpublished rows are
        # lost in a crash either way; the service's journal holds them.
        h5 = h5py.File(self._tmp_path, "w", libver="latest", driver="core", backing_store=False, block_size=IMAGE_BLOCK_BYTES)
        rows = rows or self._chunk_rows
        attrs = meta.to_dict()
        attrs.update(format=FORMAT_NAME, chunk_rows=rows, created_at=_now())
        for key in SHARD_ATTRS:
            value = attrs[key]
            h5.attrs[key] = json.dumps(value) if isinstance(value, (list, dict)) else value
        options = {"chunks": True, "compression": self.compression}
        h5.create_dataset("ids", shape=(0,), maxshape=(None,), dtype=_STR_DTYPE, **{**options, "chunks": (rows,)})
        h5.create_dataset(
            "inputs", shape=(0, *meta.input_shape), maxshape=(None, *meta.input_shape), dtype=meta.input_dtype,
            **{**options, "chunks": (rows, *meta.input_shape)},
        )  # fmt: skip
        h5.create_dataset("labels", shape=(0,), maxshape=(None,), dtype=np.int64, **{**options, "chunks": (rows,)})
        h5.create_dataset(
            "logits", shape=(0, meta.num_classes), maxshape=(None, meta.num_classes), dtype=meta.logits_dtype,
            **{**options, "chunks": (rows, meta.num_classes)},
        )  # fmt: skip
        self._h5, self._open_rows, self._written_rows, self._staged = h5, 0, 0, []

    def _compact(self) -> None:
        """Rewrite a shard smaller than one chunk with chunks of its own size: HDF5 allocates
        whole chunks, so a 100-row shard in 16384-row chunks would be mostly empty space."""
        assert self._h5 is not None and self._tmp_path is not None
        rows = self._open_rows
        columns = {name: self._h5[name][:rows] for name in DATASETS}
        self._h5.close()
        self._open_shard(self._tmp_path, rows)
        ids = np.array([v.decode("utf-8") if isinstance(v, bytes) else v for v in columns["ids"]], dtype=object)
        for sample_id in ids.tolist():
            del self._ids[sample_id]
        self._write_rows(ids, columns["inputs"], columns["logits"], columns["labels"])

    def _write_rows(self, ids: np.ndarray, inputs: np.ndarray, logits: np.ndarray, labels: np.ndarray) -> None:
        """Assign the rows to the open shard; they reach HDF5 in ``_drain``."""
        if self._h5 is None:
            self._open_shard()
        start = self._open_rows
        self._staged.append((ids, inputs, logits, labels.astype(np.int64)))
        self._open_rows += len(ids)
        base = self._published_rows + start
        self._ids.update(zip(ids.tolist(), range(base, base + len(ids)), strict=True))
        if self._open_rows - self._written_rows >= self._stage_rows:
            self._drain()

    def _drain(self) -> None:
        """Write the staged rows to the open shard: one resize and one write per dataset."""
        if not self._staged:
            return
        assert self._h5 is not None
        staged, self._staged = self._staged, []
        columns = [np.concatenate(column) if len(staged) > 1 else column[0] for column in zip(*staged, strict=True)]
        start, stop = self._written_rows, self._open_rows
        for name, values in zip(("ids", "inputs", "logits", "labels"), columns, strict=True):
            dataset = self._h5[name]
            dataset.resize(stop, axis=0)
            dataset[start:stop] = values.astype(self.meta.logits_dtype) if name == "logits" else values
            if name == "inputs":
                crash_point("shard-partly-written")
        self._written_rows = stop

    def _write_manifest(self) -> None:
        payload = {
            "format": FORMAT_NAME,
            "schema_version": SCHEMA_VERSION,
            "meta": self.meta.to_dict(),
            "shards": [s.to_manifest() for s in self._shards],
            "num_samples": sum(s.num_samples for s in self._shards),
            "updated_at": _now(),
        }
        write_json_atomic(self.directory / MANIFEST_NAME, payload)


# ---------------------------------------------------------------------------------------------
# Transfer sets: the .npz files that clients push and the trainer evaluates on


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


__all__ = [
    "CacheError",
    "CacheMeta",
    "CacheReader",
    "CacheWriter",
    "Preprocessing",
    "ShardHandle",
    "ShardInfo",
    "content_ids",
    "normalize_ids",
    "read_transfer_set",
    "sha256_file",
    "SCHEMA_VERSION",
]
