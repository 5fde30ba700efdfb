"""The spool: the local directory where one writer keeps its journal.

A cache on object storage cannot hold a journal (an object is replaced whole, never appended
to), so the service journals acknowledged samples to a local directory (``--spool``) and
publishes each finished shard with one upload, then its manifest. The spool is one writer's:

* a ``flock`` on ``.spool.lock`` keeps a second process off it;
* ``.writer-id`` remembers the writer id chosen when none was given, so that a restart on the
  same spool is the same writer and replays its journal;
* ``.token`` names this spool in the writer's lease on the store, so that a restart after a
  ``kill -9`` takes over its own lease at once instead of waiting for it to expire.

Acknowledged samples are as durable as the spool: on Kubernetes, a volume that outlives the pod.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import socket
import tempfile
import uuid
from pathlib import Path
from typing import Any

from ..offline.cache import CacheError
from ..offline.cache.manifest import check_writer_id

DEFAULT_SPOOL_ROOT = Path(tempfile.gettempdir()) / "teacher-serve-spool"


def default_spool(cache: str) -> Path:
    """Where a remote cache's spool goes without ``--spool``: one directory per cache URL."""
    return DEFAULT_SPOOL_ROOT / hashlib.sha256(cache.encode()).hexdigest()[:16]


def _read_or_create(path: Path, make: Any) -> str:
    with contextlib.suppress(FileNotFoundError):
        value = path.read_text().strip()
        if value:
            return value
    value = make()
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(value + "\n")
    os.replace(tmp, path)
    return value


def spool_writer_id(spool: Path) -> str:
    """The writer id a spool remembers, or a new one (host name and a random suffix: unique per
    process, and a Kubernetes pod's host name is its name)."""
    host = "".join(c if c.isalnum() or c in "._-" else "-" for c in socket.gethostname())[:40].strip("-._") or "writer"
    try:
        spool.mkdir(parents=True, exist_ok=True)
        value = _read_or_create(spool / ".writer-id", lambda: f"{host}-{uuid.uuid4().hex[:8]}")
    except OSError as exc:
        raise CacheError(f"spool {spool}: cannot write to it ({exc.strerror or exc})") from None
    check_writer_id(value)
    return value


class Spool:
    """A writer's spool directory, held until ``release`` (see the module docstring)."""

    def __init__(self, directory: Path, writer_id: str | None) -> None:
        self.directory = Path(directory)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._lock = open(self.directory / f".spool{'-' + writer_id if writer_id else ''}.lock", "a+")  # noqa: SIM115 - held
        except OSError as exc:
            raise CacheError(f"spool {self.directory}: cannot write to it ({exc.strerror or exc})") from None
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise CacheError(f"spool {self.directory}: another teacher-serve uses it; give each replica its own --spool") from None
        self.token = _read_or_create(self.directory / f".token{'-' + writer_id if writer_id else ''}", lambda: uuid.uuid4().hex)

    def release(self) -> None:
        if not self._lock.closed:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()


def resolve_writer(settings: Any) -> Any:
    """``settings`` with the spool and writer id a URL cache needs filled in: ``--spool``, else
    ``default_spool``; ``--writer-id``, else the spool's (``spool_writer_id``). A local cache
    keeps what was given: its own directory as the spool, and one unnamed writer."""
    from ..offline.cache.remote import is_url

    if not is_url(settings.cache):
        return settings
    spool = settings.spool or default_spool(settings.cache)
    writer_id = settings.writer_id or spool_writer_id(spool)
    return settings.model_copy(update={"spool": spool, "writer_id": writer_id})
