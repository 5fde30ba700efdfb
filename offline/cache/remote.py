"""Caches on object storage: ``FsspecStorage``, and ``Downloads``, the bounded local directory
that whole shards are fetched into before HDF5 opens them.

Any fsspec URL is a cache location (``s3://bucket/prefix``, ``gs://``, ``memory://``). S3 goes
through ``s3fs`` (the ``s3`` extra): the endpoint comes from ``AWS_ENDPOINT_URL`` and the
credentials from where the AWS tools read them (the environment, ``~/.aws``, an instance role).

HDF5 never reads over the network: h5py's ``ros3`` driver is not in the PyPI wheels, and h5py
over fsspec file objects issues thousands of small ranged reads. A shard is downloaded whole
into ``Downloads`` (named by its sha256, so caches and writers share it safely), its checksum
is checked before HDF5 parses it, and the least recently used shards go when the directory is
over its budget. A file that an open ``ShardHandle`` still reads can go: POSIX keeps it alive.

An object store publishes an object whole or not at all, so ``put`` is one upload; there are
no partial puts to clean up. The writer lease of a writer id is an object, ``.lease-ID.json``,
that its holder refreshes (``Lease``); see docs/architecture.md § Several writers.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import socket
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any, BinaryIO

from .contract import CacheError
from .storage import Storage, WriterLease

URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
DEFAULT_DOWNLOADS = Path(tempfile.gettempdir()) / "kd-shards"
DEFAULT_DOWNLOAD_GB = 16.0
DOWNLOAD_ATTEMPTS = 3
LEASE_SECONDS = 60.0  # a lease not refreshed for this long is free
_PARTIAL_DOWNLOAD = ".part-"


def is_url(location: Any) -> bool:
    return isinstance(location, str) and bool(URL.match(location))


class Downloads:
    """A bounded local directory of whole shards, named ``SHA256.h5``, least recently used out
    first. Downloads are written to a temporary name and renamed, so concurrent processes
    (DataLoader workers, ranks) sharing the directory see whole files only."""

    def __init__(self, directory: str | os.PathLike[str] = DEFAULT_DOWNLOADS, max_bytes: int = int(DEFAULT_DOWNLOAD_GB * 2**30)) -> None:
        if max_bytes <= 0:
            raise ValueError("the local cache's size must be positive")
        self.directory = Path(directory)
        self.max_bytes = int(max_bytes)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Downloads({str(self.directory)!r}, {self.max_bytes})"

    def path(self, sha256: str) -> Path:
        return self.directory / f"{sha256}.h5"

    def held(self, sha256: str, size: int) -> Path | None:
        """The local copy, touched as recently used, or None."""
        path = self.path(sha256)
        try:
            if path.stat().st_size == size:
                os.utime(path)
                return path
        except FileNotFoundError:
            pass
        return None

    def fetch(self, storage: Storage, name: str, sha256: str, size: int) -> Path:
        """The shard as a local file whose sha256 was checked: from the directory, or downloaded
        (up to ``DOWNLOAD_ATTEMPTS`` times; a cut or damaged download is retried, then named)."""
        if not re.fullmatch(r"[0-9a-f]{64}", sha256):
            raise CacheError(f"{storage.where(name)}: the index lists a malformed sha256 {sha256[:80]!r}")
        held = self.held(sha256, size)
        if held is not None:
            return held
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CacheError(f"local cache {self.directory}: cannot create it ({exc.strerror or exc})") from None
        if size > self.max_bytes:
            raise CacheError(
                f"{storage.where(name)}: {size / 2**30:.2f} GiB, larger than the local cache "
                f"({self.max_bytes / 2**30:.2f} GiB at {self.directory}); raise --local-cache-gb"
            )
        # One download per shard, whichever of the processes sharing the directory (DataLoader
        # workers, ranks on one node) asks first; the others wait for it and take its file.
        with open(self.directory / f".lock-{sha256}", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            held = self.held(sha256, size)
            if held is not None:
                return held
            self._make_room(size)
            problem = ""
            for attempt in range(DOWNLOAD_ATTEMPTS):
                problem = self._download(storage, name, sha256, size)
                if not problem:
                    return self.path(sha256)
                time.sleep(0.2 * 2**attempt)
        raise CacheError(f"{storage.where(name)}: download failed {DOWNLOAD_ATTEMPTS} times, last: {problem}")

    def _download(self, storage: Storage, name: str, sha256: str, size: int) -> str:
        """Download once; '' when the file is in place, else what went wrong."""
        tmp = self.directory / f"{_PARTIAL_DOWNLOAD}{uuid.uuid4().hex}"
        digest, got = hashlib.sha256(), 0
        try:
            with storage.open(name) as src, open(tmp, "wb") as dst:
                while block := src.read(8 << 20):
                    digest.update(block)
                    dst.write(block)
                    got += len(block)
            if got != size:
                return f"{got} bytes arrived, the index says {size} (cut short or replaced)"
            if digest.hexdigest() != sha256:
                return f"sha256 {digest.hexdigest()[:12]}… does not match the index's {sha256[:12]}…"
            os.replace(tmp, self.path(sha256))
            return ""
        except FileNotFoundError:
            raise CacheError(f"{storage.where(name)}: listed in the index but missing") from None
        except OSError as exc:
            if exc.errno == 28:  # ENOSPC
                raise CacheError(
                    f"local cache {self.directory}: disk full while downloading {name}; free space or lower --local-cache-gb"
                ) from None
            return str(exc) or type(exc).__name__
        finally:
            tmp.unlink(missing_ok=True)

    def _make_room(self, size: int) -> None:
        with self._lock:
            files = []
            for entry in os.scandir(self.directory):
                with contextlib.suppress(FileNotFoundError):
                    stat = entry.stat()
                    if entry.name.startswith(".lock-"):
                        continue
                    if entry.name.startswith(_PARTIAL_DOWNLOAD):
                        if time.time() - stat.st_mtime > 3600:  # left by a killed process
                            os.unlink(entry.path)
                        continue
                    files.append((stat.st_mtime, stat.st_size, entry.path))
            used = sum(size_ for _, size_, _ in files)
            for _, size_, path in sorted(files):
                if used + size <= self.max_bytes:
                    break
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                with contextlib.suppress(FileNotFoundError):  # its lock: a racing waiter at worst downloads it again
                    os.unlink(os.path.join(self.directory, f".lock-{Path(path).stem}"))
                used -= size_


_configured: Downloads | None = None


def configure_downloads(directory: str | os.PathLike[str] | None = None, gigabytes: float | None = None) -> Downloads:
    """Set where this process downloads shards of remote caches (``--local-cache``,
    ``--local-cache-gb``); DataLoader workers forked later inherit it."""
    global _configured
    size = DEFAULT_DOWNLOAD_GB if gigabytes is None else float(gigabytes)
    if not size > 0:
        raise CacheError(f"--local-cache-gb must be positive, got {gigabytes}")
    _configured = Downloads(DEFAULT_DOWNLOADS if directory is None else directory, int(size * 2**30))
    return _configured


def downloads() -> Downloads:
    return _configured or configure_downloads()


def _filesystem(protocol: str) -> Any:
    try:
        import fsspec
    except ImportError:  # pragma: no cover - fsspec comes with the s3 extra
        raise CacheError("a cache URL needs fsspec: pip install 'kd-cache[s3]'") from None
    options: dict[str, Any] = {}
    if protocol in ("s3", "s3a"):
        try:
            import s3fs  # noqa: F401
        except ImportError:
            raise CacheError("an s3:// cache needs s3fs: pip install 'kd-cache[s3]'") from None
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        options = {
            "client_kwargs": {"endpoint_url": endpoint} if endpoint else {},
            # Fail in seconds, not minutes, on an unreachable endpoint; retries are ours.
            "config_kwargs": {"connect_timeout": 5, "read_timeout": 60, "retries": {"max_attempts": 3, "mode": "standard"}},
            "use_listings_cache": False,
        }
    try:
        return fsspec.filesystem(protocol, skip_instance_cache=True, **options)
    except (ImportError, ValueError) as exc:
        raise CacheError(f"{protocol}:// caches are not supported here ({exc})") from None


def describe_error(location: str, exc: BaseException) -> str:
    """One line for what went wrong talking to the store."""
    text = str(exc) or type(exc).__name__
    lowered = text.lower()
    if (
        isinstance(exc, PermissionError)
        or "accessdenied" in lowered
        or "invalidaccesskeyid" in lowered
        or "signaturedoesnotmatch" in lowered
    ):
        return f"{location}: access denied: check the credentials (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_PROFILE) ({text})"
    if "nosuchbucket" in lowered or "bucket does not exist" in lowered:
        return f"{location}: the bucket does not exist ({text})"
    if "could not connect" in lowered or "connect timeout" in lowered or "endpoint" in lowered or isinstance(exc, ConnectionError):
        return f"{location}: the store is unreachable: check AWS_ENDPOINT_URL and the network ({text})"
    return f"{location}: {type(exc).__name__}: {text}"


class FsspecStorage(Storage):
    """A cache under an fsspec URL; see the module docstring."""

    remote = True

    def __init__(self, url: str, downloads_: Downloads | None = None) -> None:
        if not is_url(url):
            raise CacheError(f"{url}: not a URL")
        self.location = url.rstrip("/")
        self.protocol = url.split("://", 1)[0].lower()
        self._root = self.location.split("://", 1)[1]
        self._downloads = downloads_
        self._fs: Any = None
        self._pid = 0

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fs": None}  # a forked or spawned worker makes its own client

    @property
    def fs(self) -> Any:
        """This process's client: a forked DataLoader worker makes its own, as s3fs's event loop
        and connections do not survive a fork."""
        if self._fs is None or self._pid != os.getpid():
            self._fs, self._pid = _filesystem(self.protocol), os.getpid()
        return self._fs

    def _key(self, name: str) -> str:
        return f"{self._root}/{name}"

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (FileNotFoundError, FileExistsError, CacheError):
            raise
        except Exception as exc:  # botocore and aiohttp raise many kinds; one message names the cause
            raise CacheError(describe_error(f"{self.location} ({what})", exc)) from None

    def check(self) -> None:
        """Reach the bucket now, so that a bad endpoint, credentials or bucket is named at start."""
        bucket = self._root.split("/", 1)[0]
        try:
            exists = self._call("checking the bucket", self.fs.exists, bucket)
        except FileNotFoundError:
            exists = False
        if not exists and self.protocol in ("s3", "s3a", "gs", "gcs"):
            raise CacheError(f"{self.location}: the bucket {bucket!r} does not exist (or these credentials cannot see it)")

    def list(self) -> list[str]:
        try:
            entries = self._call("listing", self.fs.ls, self._root, detail=False, refresh=True)
        except FileNotFoundError:
            return []
        return [str(entry).rstrip("/").rsplit("/", 1)[-1] for entry in entries]

    def size(self, name: str) -> int:
        info = self._call(f"reading {name}", self.fs.info, self._key(name))
        return int(info["size"])

    def open(self, name: str) -> BinaryIO:
        return self._call(f"opening {name}", self.fs.open, self._key(name), "rb", block_size=8 << 20, cache_type="none")  # type: ignore[no-any-return]

    def read_bytes(self, name: str) -> bytes:
        return self._call(f"reading {name}", self.fs.cat_file, self._key(name))  # type: ignore[no-any-return]

    def put(self, name: str, data: bytes | memoryview, *, crash_points: tuple[str | None, str | None] = (None, None)) -> None:
        from . import faults

        faults.crash_point(crash_points[0])
        self._call(f"uploading {name}", self.fs.pipe_file, self._key(name), bytes(data))
        faults.crash_point(crash_points[1])

    def create(self, name: str, data: bytes) -> bool:
        """Upload ``data`` only if ``name`` does not exist (``If-None-Match: *`` on S3); False
        when it does. A store without conditional writes behaves as ``put``."""
        options = {"mode": "create"} if self.protocol in ("s3", "s3a") else {}
        try:
            self._call(f"creating {name}", self.fs.pipe_file, self._key(name), data, **options)
        except FileExistsError:  # s3fs's name for 412 Precondition Failed
            return False
        return True

    def put_file(self, name: str, path: Path) -> None:
        self._call(f"uploading {name}", self.fs.put_file, str(path), self._key(name))

    def delete(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._call(f"deleting {name}", self.fs.rm_file, self._key(name))

    def partial_puts(self) -> list[str]:
        return []  # an upload is published whole or not at all

    def discard_partial(self, name: str) -> None:
        pass

    def fetch(self, name: str, sha256: str, size: int) -> Path:
        return (self._downloads or downloads()).fetch(self, name, sha256, size)

    def lease(self, writer: str | None = None, token: str | None = None) -> WriterLease:
        if writer is None:
            raise CacheError(f"{self.location}: a cache on object storage is written with a writer id (--writer-id)")
        return Lease(self, writer, token)


class Lease(WriterLease):
    """A writer id's lease on an object store: ``.lease-ID.json`` with a holder token and a
    time, refreshed every ``LEASE_SECONDS / 4``. Another holder whose lease is fresh is refused;
    a stale one (a killed process) is taken over. A free id is taken with a conditional create
    (``If-None-Match: *``), so of two processes starting at once with the same id one is
    refused; taking over a stale lease is a plain write (docs/architecture.md)."""

    def __init__(self, storage: FsspecStorage, writer: str, token: str | None = None) -> None:
        self.storage, self.name = storage, f".lease-{writer}.json"
        self.token = token or uuid.uuid4().hex
        current = self._read()
        if current is None and not storage.create(self.name, self._record()):
            current = self._read()  # another process created it a moment ago
            if current is None:
                current = {"time": time.time()}
        if current is not None:
            if current.get("token") != self.token and time.time() - float(current.get("time", 0)) < LEASE_SECONDS:
                raise CacheError(
                    f"{storage.location}: writer id {writer!r} is in use by {current.get('host', '?')} "
                    f"(pid {current.get('pid', '?')}); give each replica its own --writer-id"
                )
            self._write()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._refresh, name="lease", daemon=True)
        self._thread.start()

    def _read(self) -> dict[str, Any] | None:
        try:
            record = json.loads(self.storage.read_bytes(self.name))
        except FileNotFoundError:
            return None
        except (ValueError, UnicodeDecodeError):
            return None
        return record if isinstance(record, dict) else None

    def _record(self) -> bytes:
        return json.dumps({"token": self.token, "time": time.time(), "host": socket.gethostname(), "pid": os.getpid()}).encode()

    def _write(self) -> None:
        self.storage.put(self.name, self._record())

    def _refresh(self) -> None:
        while not self._stop.wait(LEASE_SECONDS / 4):
            with contextlib.suppress(CacheError, OSError):
                self._write()

    def release(self) -> None:
        if not self._stop.is_set():
            self._stop.set()
            with contextlib.suppress(CacheError, OSError):
                current = self._read()
                if current is None or current.get("token") == self.token:
                    self.storage.delete(self.name)
