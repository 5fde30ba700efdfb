"""Transfer sets: the ``.npz`` files that clients push and the trainer evaluates on.

An ``.npz`` is a zip archive of ``.npy`` members. Only the members a transfer set uses
(``inputs``, ``labels``, ``ids``) are read, each whole, and each only after its header was
checked: a member holding Python objects is refused (nothing is unpickled), and so is one whose
declared shape needs more than ``max_bytes`` or more bytes than the member holds. Other members
are never decompressed: a 3 GiB array of zeros beside the inputs (3 MB compressed) costs nothing.
"""

from __future__ import annotations

import math
import os
import zipfile
from pathlib import Path
from typing import IO

import numpy as np

from .contract import CacheError
from .ids import normalize_ids

MEMBERS = ("inputs", "labels", "ids")
DEFAULT_MAX_NPZ_MB = 1024  # an .npz is read whole; an .npy (memory-mapped) has no such bound


def _member_header(member: IO[bytes]) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(member)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(member)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(member)
    raise ValueError(f".npy format version {version[0]}.{version[1]}, expected 1.0 or 2.0")


def _read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, where: str, max_bytes: int | None) -> np.ndarray:
    """One ``.npy`` member, its header checked before any of its data is read."""
    with archive.open(info) as member:
        shape, _, dtype = _member_header(member)
        header_bytes = member.tell()
    if dtype.hasobject:
        raise CacheError(f"{where}: holds Python objects ({dtype}), which are never unpickled; save plain arrays of numbers or strings")
    declared = math.prod(shape) * dtype.itemsize
    if declared > info.file_size - header_bytes:
        raise CacheError(
            f"{where}: its header declares {list(shape)} {dtype} ({declared:,} bytes), but the member holds {info.file_size - header_bytes:,}"
        )
    if max_bytes is not None and declared > max_bytes:
        raise CacheError(
            f"{where}: {list(shape)} {dtype} is {declared / 2**20:,.0f} MiB, over the limit of {max_bytes / 2**20:,.0f} MiB for an .npz, "
            "which is read whole (--max-npz-mb; an .npy is memory-mapped instead)"
        )
    with archive.open(info) as member:
        return np.lib.format.read_array(member, allow_pickle=False)


def read_npz_members(
    path: str | os.PathLike[str], names: tuple[str, ...], *, required: str, max_bytes: int | None = DEFAULT_MAX_NPZ_MB << 20
) -> dict[str, np.ndarray]:
    """The members ``names`` of an ``.npz`` that has them (``required`` must be there), each
    checked as ``read_transfer_set`` checks its own; other members are not read."""
    path = Path(path)
    if not path.is_file():
        raise CacheError(f"{path}: no such file")
    arrays: dict[str, np.ndarray] = {}
    try:
        with zipfile.ZipFile(path) as archive:
            members = {info.filename.removesuffix(".npy"): info for info in archive.infolist()}
            if required not in members:
                raise CacheError(f"{path}: has no {required!r} array (found: {', '.join(sorted(members)) or 'nothing'})")
            for name in names:
                if name in members:
                    arrays[name] = _read_member(archive, members[name], f"{path}: {name}", max_bytes)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, NotImplementedError) as exc:
        raise CacheError(f"{path}: not a readable .npz file ({type(exc).__name__}: {exc})") from None
    return arrays


def read_transfer_set(path: str | os.PathLike[str], *, max_bytes: int | None = DEFAULT_MAX_NPZ_MB << 20) -> dict[str, np.ndarray]:
    """Load ``inputs`` (required), ``labels`` and ``ids`` (optional) from an ``.npz`` file; each
    must need at most ``max_bytes`` (None: no bound). Other members are not read."""
    path = Path(path)
    arrays = read_npz_members(path, MEMBERS, required="inputs", max_bytes=max_bytes)
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
