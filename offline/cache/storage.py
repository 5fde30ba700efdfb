"""Where a cache's files live: the ``Storage`` abstraction and its local-filesystem backend.

The cache format needs little from a store: list the files, read one, publish one atomically
(a reader sees the old object or the new one, never a mix), replace the manifest only if nobody
else did in between (``put_if_match``), delete, and hold a writer lease so that one writer owns
a cache at a time. ``LocalStorage`` does all of it with a directory: a temporary file, fsync,
rename and a directory fsync for ``put``, and ``flock`` on ``.writer.lock`` for the lease. An
object-store backend implements the same methods.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, BinaryIO

from . import faults
from .contract import CacheError

LOCK_NAME = ".writer.lock"
_PARTIAL = re.compile(r"^\.(.+)\.tmp$")


class PreconditionFailed(CacheError):
    """``put_if_match`` found the object changed since it was read."""


class WriterLease:
    """An exclusive right to write one cache, held until ``release``."""

    def release(self) -> None:  # pragma: no cover - the base holds nothing
        pass


class Storage(ABC):
    """A flat namespace of files that make up one cache."""

    location: str  # the directory or URL, for messages
    remote = False  # whether a shard must be fetched (downloaded) before HDF5 opens it

    def where(self, name: str) -> str:
        """How messages name a file of this cache."""
        return f"{self.location.rstrip('/')}/{name}"

    @abstractmethod
    def list(self) -> list[str]:
        """The names of the files present, in no particular order."""

    @abstractmethod
    def size(self, name: str) -> int:
        """Bytes of a file; FileNotFoundError when absent."""

    @abstractmethod
    def open(self, name: str) -> BinaryIO:
        """A file opened for reading."""

    @abstractmethod
    def put(self, name: str, data: bytes | memoryview, *, crash_points: tuple[str | None, str | None] = (None, None)) -> None:
        """Publish ``data`` under ``name`` atomically and durably. ``crash_points`` are reached
        once the data is durable but not yet visible, and once it is visible."""

    @abstractmethod
    def delete(self, name: str) -> None:
        """Remove a file; absent is fine."""

    @abstractmethod
    def partial_puts(self) -> list[str]:
        """Names whose ``put`` was interrupted (their temporary objects exist)."""

    @abstractmethod
    def discard_partial(self, name: str) -> None:
        """Remove what an interrupted ``put`` of ``name`` left."""

    @abstractmethod
    def lease(self, writer: str | None = None, token: str | None = None) -> WriterLease:
        """Take the lease of writer id ``writer`` (None: the cache's one unnamed writer), or
        raise CacheError when another process holds it. ``token`` names the holder across
        restarts (the service's spool), so a restarted writer takes over its own stale lease."""

    def local_path(self, name: str) -> Path | None:
        """A path that HDF5 can open directly, when the backend has one."""
        return None

    def fetch(self, name: str, sha256: str, size: int) -> Path:
        """A local file of the shard ``name`` (whose bytes should hash to ``sha256``) that HDF5
        can open: the file itself on a local backend, a checked download on a remote one."""
        path = self.local_path(name)
        if path is None:  # pragma: no cover - remote backends override fetch
            raise CacheError(f"{self.where(name)}: this storage cannot fetch files")
        return path

    def put_file(self, name: str, path: Path) -> None:
        """``put`` the bytes of a local file."""
        self.put(name, path.read_bytes())

    def check(self) -> None:
        """Reach the store now, so that a bad location is named at start (remote backends)."""
        return None  # a local directory is checked where it is used

    def exists(self, name: str) -> bool:
        try:
            self.size(name)
        except FileNotFoundError:
            return False
        return True

    def read_bytes(self, name: str) -> bytes:
        with self.open(name) as fh:
            return fh.read()

    def etag(self, name: str) -> str | None:
        """An opaque version of a file's content; None when absent."""
        try:
            return hashlib.sha256(self.read_bytes(name)).hexdigest()
        except FileNotFoundError:
            return None

    def put_if_match(
        self, name: str, data: bytes, expected_etag: str | None, *, crash_points: tuple[str | None, str | None] = (None, None)
    ) -> None:
        """``put``, only if the file's etag is still ``expected_etag`` (None: it must be absent).
        The local backend's writer lease makes the check and the put one step; an object store
        uses its conditional write."""
        if self.etag(name) != expected_etag:
            raise PreconditionFailed(f"{self.where(name)}: changed by another writer since it was read")
        self.put(name, data, crash_points=crash_points)

    def sha256(self, name: str, progress: Any = None) -> str:
        """The sha256 of a file's bytes, read in 4 MiB pieces (``progress.update(bytes)``)."""
        digest = hashlib.sha256()
        with self.open(name) as fh:
            while block := fh.read(4 << 20):
                digest.update(block)
                if progress is not None:
                    progress.update(len(block))
        return digest.hexdigest()


class _FileLease(WriterLease):
    def __init__(self, handle: Any) -> None:
        self._handle = handle

    def release(self) -> None:
        if not self._handle.closed:
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalStorage(Storage):
    """A directory. ``put`` writes ``.NAME.tmp``, fsyncs it, renames it over ``NAME`` and fsyncs
    the directory, so a crash leaves the old file or the new one, and at most a temporary file
    that the next writer removes."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self.location = str(self.directory)

    def where(self, name: str) -> str:
        return str(self.directory / name)

    def local_path(self, name: str) -> Path:
        return self.directory / name

    def list(self) -> list[str]:
        return [p.name for p in self.directory.iterdir()]

    def size(self, name: str) -> int:
        return (self.directory / name).stat().st_size

    def open(self, name: str) -> BinaryIO:
        return open(self.directory / name, "rb")  # noqa: SIM115 - the caller closes it

    def put(self, name: str, data: bytes | memoryview, *, crash_points: tuple[str | None, str | None] = (None, None)) -> None:
        tmp = self.directory / f".{name}.tmp"
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            faults.crash_point(crash_points[0])
            os.replace(tmp, self.directory / name)
        except OSError:
            tmp.unlink(missing_ok=True)
            raise
        fsync_path(self.directory)
        faults.crash_point(crash_points[1])

    def delete(self, name: str) -> None:
        (self.directory / name).unlink(missing_ok=True)

    def partial_puts(self) -> list[str]:
        return sorted(m.group(1) for p in self.directory.iterdir() if (m := _PARTIAL.match(p.name)))

    def discard_partial(self, name: str) -> None:
        (self.directory / f".{name}.tmp").unlink(missing_ok=True)

    def lease(self, writer: str | None = None, token: str | None = None) -> WriterLease:
        self.directory.mkdir(parents=True, exist_ok=True)
        name = LOCK_NAME if writer is None else f".writer-{writer}.lock"
        handle = open(self.directory / name, "a+")  # noqa: SIM115 - held for the writer's life
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            who = "another writer" if writer is None else f"another process with writer id {writer!r}"
            raise CacheError(f"{self.directory}: {who} holds {name}") from None
        return _FileLease(handle)
