"""Listing a folder of files: symbolic links never followed (or followed, for Parquet folders,
with every folder entered once), each real file once, names that are not UTF-8 told apart.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .base import SourceError

NOT_UTF8 = "the file name is not UTF-8, and ids are text"


def _is_text(name: str) -> bool:
    """Whether a name from the file system is text: on POSIX a name whose bytes are not UTF-8
    comes back holding lone surrogates (``os.fsdecode``), which no id, JSON or HDF5 string takes."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _printable(name: str) -> str:
    """A file-system name as text, bytes that are not UTF-8 written as ``\\xe9``."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def _scan(folder: Path, follow_links: bool = False) -> Iterator[tuple[str, str, Path]]:
    """``(what, relative POSIX path, path)`` for what ``folder`` holds, depth first in name order,
    hidden files and folders left out: ``"file"`` (a regular file), ``"link"`` (a symbolic link:
    not followed, so no link leads out of the folder or round in a loop) and ``"again"`` (a
    folder reached before, through a bind mount: not entered twice). ``follow_links``: links are
    taken as what they lead to instead (a folder reached before is still not entered again, and
    a link that leads nowhere is a ``"link"``)."""
    root = folder.stat()
    seen = {(root.st_dev, root.st_ino)}
    pending: list[tuple[Path, str]] = [(folder, "")]
    while pending:
        directory, prefix = pending.pop()
        try:
            with os.scandir(directory) as scan:
                entries = sorted(scan, key=lambda entry: entry.name)
        except OSError as exc:
            raise SourceError(f"{_printable(str(directory))}: cannot list it ({exc.strerror})") from None
        below: list[tuple[Path, str]] = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            relative, path = prefix + entry.name, Path(entry.path)
            if entry.is_symlink() and not (follow_links and os.path.exists(path)):
                yield "link", relative, path
            elif entry.is_dir(follow_symlinks=follow_links):
                status = entry.stat(follow_symlinks=follow_links)
                if (status.st_dev, status.st_ino) in seen:
                    yield "again", relative, path
                else:
                    seen.add((status.st_dev, status.st_ino))
                    below.append((path, relative + "/"))
            elif entry.is_file(follow_symlinks=follow_links):
                yield "file", relative, path
        pending.extend(reversed(below))


@dataclass
class _Listing:
    """A folder's regular files, sorted by relative POSIX path, each real file once (a hard link
    to a file listed already is left out), its sub-folders, and what was left out: symbolic links
    (never followed; a link to a file inside the folder adds nothing, the file is listed under
    its own path) and folders or files reached a second time."""

    folder: Path
    files: list[tuple[str, Path]]
    folders: list[str]
    links: list[tuple[str, Path]]
    again: list[str]

    @classmethod
    def of(cls, folder: Path, follow_links: bool = False) -> _Listing:
        files, links, again = [], [], []
        for what, relative, path in _scan(folder, follow_links):
            if what == "file":
                files.append((relative, path))
            elif what == "link":
                links.append((relative, path))
            else:
                again.append(relative)
        files.sort(key=lambda entry: entry[0])
        seen: set[tuple[int, int]] = set()
        unique = []
        for relative, path in files:
            status = path.stat()  # what a followed link leads to
            if (status.st_nlink > 1 or follow_links) and (status.st_dev, status.st_ino) in seen:
                again.append(relative)
                continue
            seen.add((status.st_dev, status.st_ino))
            unique.append((relative, path))
        with os.scandir(folder) as scan:
            folders = sorted(e.name for e in scan if not e.name.startswith(".") and e.is_dir(follow_symlinks=False))
        return cls(folder, unique, folders, links, again)

    def warn_left_out(self, warn: Callable[[str], None]) -> None:
        if self.links:
            relative, path = self.links[0]
            target = _printable(os.fsdecode(os.readlink(path)))
            warn(f"{self.folder}: left out {len(self.links)} symbolic link(s) (first: {_printable(relative)} -> {target})")
        if self.again:
            first = _printable(self.again[0])
            warn(f"{self.folder}: left out {len(self.again)} folder(s) or file(s) reached a second time (first: {first})")


def _files_under(folder: Path, follow_links: bool = False) -> Iterator[Path]:
    """The regular files under ``folder`` in no order, as ``_scan`` finds them."""
    return (path for what, _, path in _scan(folder, follow_links) if what == "file")
