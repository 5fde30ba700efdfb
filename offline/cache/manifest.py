"""``manifest.json``: the list of published shards, and the cache's metadata.

A reader only reads the shards the manifest lists, so it never sees a half-written file; the
writer replaces the manifest after a shard is durable under its final name.

A manifest may carry ``provenance``: a JSON object saying where the cache's contents came from
when it was not filled by a teacher (``cache-convert`` records its source there), and
``label_names``: the name of each label index, ``label_names[i]`` for label ``i``, as the
transfer set's source named its classes (an image folder's class folders, a Parquet or Hugging
Face ClassLabel). Readers that do not know a key ignore it; writers keep both when they append.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .contract import FORMAT_NAME, SCHEMA_VERSION, SHARD_FIELDS, CacheError, CacheMeta
from .label_names import check_label_names, merge_label_names
from .storage import Storage

MANIFEST_NAME = "manifest.json"
_WRITER = r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}"
WRITER_ID = re.compile(rf"^{_WRITER}$")
SHARD_PATTERN = re.compile(rf"^shard-(?:(?P<writer>{_WRITER})-)?(?P<index>\d{{6,}})\.h5$")
TMP_PATTERN = re.compile(rf"^\.shard-(?:{_WRITER}-)?\d{{6,}}\.h5\.tmp$")
INDEX_PATTERN = re.compile(rf"^manifest(?:-(?P<writer>{_WRITER}))?\.json$")


def check_writer_id(writer: str | None) -> str | None:
    """A writer id names files, so it is a short run of letters, digits, '.', '_' and '-'."""
    if writer is not None and not WRITER_ID.match(writer):
        raise CacheError(f"writer id {writer!r}: use 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit")
    return writer


def shard_name(index: int, writer: str | None = None) -> str:
    return f"shard-{index:06d}.h5" if writer is None else f"shard-{writer}-{index:06d}.h5"


def index_name(writer: str | None = None) -> str:
    """The manifest of one writer: ``manifest.json`` for a cache's unnamed writer (every cache
    written before writer ids), ``manifest-ID.json`` for writer ``ID``."""
    return MANIFEST_NAME if writer is None else f"manifest-{writer}.json"


def shard_writer(name: str) -> str | None:
    match = SHARD_PATTERN.match(name)
    return match.group("writer") if match else None


def ids_name(shard: str) -> str:
    """The shard's id digests (``keys.id_digests``, in row order): what a reader of a cache with
    several writers needs to read each id once without downloading the shards."""
    return f"{shard[: -len('.h5')]}.ids"


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class ShardInfo:
    """One published shard, as the manifest lists it."""

    storage: Storage
    name: str
    num_samples: int
    sha256: str
    bytes: int
    ids_sha256: str | None = None  # of its .ids sidecar (ids_name), when its writer has an id

    @property
    def path(self) -> Path:
        """A local file that HDF5 can open: the shard itself, or on a remote cache its download,
        checked against ``sha256`` (``Storage.fetch``)."""
        return self.storage.fetch(self.name, self.sha256, self.bytes)

    @property
    def where(self) -> str:
        """How messages name the shard."""
        return self.storage.where(self.name)

    def to_manifest(self) -> dict[str, Any]:
        entry = {"name": self.name, "num_samples": self.num_samples, "sha256": self.sha256, "bytes": self.bytes}
        return entry if self.ids_sha256 is None else {**entry, "ids_sha256": self.ids_sha256}

    @classmethod
    def from_manifest(cls, storage: Storage, entry: Any, where: str) -> ShardInfo:
        try:
            name = entry["name"]
            if not isinstance(name, str) or not SHARD_PATTERN.match(name):
                raise ValueError(name)
            ids_sha256 = entry.get("ids_sha256")
            if ids_sha256 is not None and not re.fullmatch(r"[0-9a-f]{64}", str(ids_sha256)):
                raise ValueError(ids_sha256)
            return cls(storage, name, int(entry["num_samples"]), str(entry["sha256"]), int(entry["bytes"]), ids_sha256)
        except (KeyError, TypeError, ValueError):
            raise CacheError(f"{where}: malformed shard entry {entry!r}") from None


@dataclass(frozen=True)
class Manifest:
    meta: CacheMeta
    shards: list[ShardInfo]
    etag: str | None  # the version read, for put_if_match; the sha256 of the manifest's bytes
    provenance: dict[str, Any] | None = None
    label_names: list[str] | None = None
    # Why the manifest's label_names were set aside (load_manifest(report_bad_label_names=True)).
    label_names_problem: str | None = None
    writers: int = 1  # the writers' manifests merged into this one (load_namespace)


def index_names(storage: Storage) -> list[str]:
    """The manifests of a cache's writers: ``manifest.json`` first (the unnamed writer), then
    ``manifest-ID.json`` by writer id. This order is the namespace's order."""
    names = [name for name in storage.list() if INDEX_PATTERN.match(name)]
    return sorted(names, key=lambda name: (name != MANIFEST_NAME, name))


def load_namespace(storage: Storage, *, report_bad_label_names: bool = False) -> Manifest:
    """The whole cache as one manifest: every writer's manifest (``index_names``), merged. Their
    metadata must agree as a shard's must (``SHARD_FIELDS``); their shards follow one another in
    the namespace's order; label names merge. A cache with one manifest reads as before."""
    try:
        names = index_names(storage)
    except (FileNotFoundError, NotADirectoryError):
        names = []  # load_manifest says what is wrong
    if not names and storage.remote:
        storage.check()  # a missing bucket, named as such
        raise CacheError(f"{storage.location}: no cache there (no {MANIFEST_NAME} or manifest-ID.json)")
    if len(names) <= 1:
        return load_manifest(storage, names[0] if names else MANIFEST_NAME, report_bad_label_names=report_bad_label_names)
    parts = [load_manifest(storage, name, report_bad_label_names=report_bad_label_names) for name in names]
    first = parts[0]
    label_names, problem = first.label_names, first.label_names_problem
    for name, part in zip(names[1:], parts[1:], strict=True):
        mismatch = first.meta.mismatch(part.meta, SHARD_FIELDS)
        if mismatch:
            raise CacheError(f"{storage.where(name)}: disagrees with {storage.where(names[0])}: {mismatch}")
        if part.label_names is not None:
            label_names = merge_label_names(label_names, part.label_names, storage.where(name))
        problem = problem or part.label_names_problem
    etag = hashlib.sha256("".join(f"{name}:{part.etag}" for name, part in zip(names, parts, strict=True)).encode()).hexdigest()
    provenance = next((part.provenance for part in parts if part.provenance is not None), None)
    shards = [info for part in parts for info in part.shards]
    return Manifest(first.meta, shards, etag, provenance, label_names, problem, writers=len(parts))


def load_manifest(storage: Storage, name: str = MANIFEST_NAME, *, report_bad_label_names: bool = False) -> Manifest:
    """One writer's manifest, checked; a CacheError naming the file when it is missing or
    malformed. With ``report_bad_label_names``, label names that break the rules
    (label_names.py) are set aside and described in ``label_names_problem`` instead
    (``cache-inspect`` shows the rest)."""
    where = storage.where(name)
    try:
        raw_bytes = storage.read_bytes(name)
    except FileNotFoundError:
        try:
            stray = sorted(name for name in storage.list() if SHARD_PATTERN.match(name))
        except FileNotFoundError:
            raise CacheError(f"{storage.location}: no such cache directory") from None
        except NotADirectoryError:
            raise CacheError(f"{storage.location}: not a directory") from None
        if stray:
            raise CacheError(
                f"{where}: missing, but {len(stray)} shard file(s) are present; "
                "a writer started on this directory (teacher-serve, or CacheWriter) rebuilds it"
            ) from None
        raise CacheError(f"{storage.location}: empty cache directory (no {MANIFEST_NAME})") from None
    except NotADirectoryError:
        raise CacheError(f"{storage.location}: not a directory") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CacheError(f"{where}: unreadable manifest ({exc})") from None
    try:
        manifest = json.loads(raw_bytes.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CacheError(f"{where}: unreadable manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME or not isinstance(manifest.get("shards"), list):
        raise CacheError(f"{where}: not a {FORMAT_NAME} manifest")
    try:
        version = int(manifest.get("schema_version", 0))
    except (TypeError, ValueError):
        raise CacheError(f"{where}: bad schema_version {manifest.get('schema_version')!r}") from None
    if version > SCHEMA_VERSION:
        raise CacheError(f"{where}: schema version {version} is newer than this reader supports ({SCHEMA_VERSION}); upgrade the package")
    meta = CacheMeta.from_dict(manifest.get("meta", {}), where)
    shards = [ShardInfo.from_manifest(storage, entry, where) for entry in manifest["shards"]]
    provenance = manifest.get("provenance")
    if provenance is not None and not isinstance(provenance, dict):
        raise CacheError(f"{where}: provenance must be a JSON object, got {type(provenance).__name__}")
    label_names, label_names_problem = manifest.get("label_names"), None
    if label_names is not None:
        try:
            check_label_names(label_names, meta.num_classes, where)
        except CacheError as exc:
            if not report_bad_label_names:
                raise
            label_names, label_names_problem = None, str(exc)
    return Manifest(meta, shards, hashlib.sha256(raw_bytes).hexdigest(), provenance, label_names, label_names_problem)


def manifest_bytes(
    meta: CacheMeta, shards: list[ShardInfo], provenance: dict[str, Any] | None = None, label_names: list[str] | None = None
) -> bytes:
    payload = {
        "format": FORMAT_NAME,
        "schema_version": SCHEMA_VERSION,
        "meta": meta.to_dict(),
        "shards": [s.to_manifest() for s in shards],
        "num_samples": sum(s.num_samples for s in shards),
        "updated_at": now(),
        **({"provenance": provenance} if provenance is not None else {}),
        **({"label_names": label_names} if label_names is not None else {}),
    }
    return (json.dumps(payload, indent=1, sort_keys=True) + "\n").encode("utf-8")
