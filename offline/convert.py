"""``cache-convert SRC DST --targets topk:K|sampled:N``: re-encode a cache of full logits into
sparse targets (or full logits of another dtype) without the teacher.

Each row's stored logits are decoded to float32 and appended to a new cache whose metadata is
SRC's with the target layout, the logits dtype and (for ``sampled:N``) the draws' salt
``target_seed`` replaced: ids, inputs, labels, view seeds, teacher, preprocessing, augmentation
record and serving temperature are kept, and the manifest's ``provenance`` says where the rows
came from. SRC is read block by block, one shard at a time, and each source shard becomes one
shard of DST. The new cache is written into a hidden sibling directory of DST and renamed onto
DST at the end: DST holds the whole conversion or nothing, whatever happens on the way. The
staging directory's name holds the host and process id, so that the next run removes one that a
``kill -9`` left behind.

``convert_cache`` is the component; ``main`` parses arguments and turns errors into one line.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import secrets
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from .cache import LOGITS_DTYPES, CacheError, CacheMeta, CacheReader, CacheWriter, ShardHandle, make_layout
from .cache.layout import parse_targets
from .cache.manifest import MANIFEST_NAME, SHARD_PATTERN, index_names, now
from .cache.reader import open_storage
from .cache.remote import is_url
from .cache.rng import view_seeds
from .cache.storage import fsync_path
from .cache.writer import DEFAULT_SHARD_BYTES
from .cli import fail
from .journal import pending_samples

PROG = "cache-convert"
BLOCK_BYTES = 32 << 20  # rows of SRC read at once: bounded, whatever the shard size


class UsageError(Exception):
    """A conversion that the arguments ask for and that cannot be done (exit 2)."""


@dataclass(frozen=True)
class Conversion:
    """What ``convert_cache`` wrote."""

    directory: Path | str  # a URL for a cache on object storage
    meta: CacheMeta
    samples: int
    shards: int
    bytes: int
    provenance: dict[str, Any]


def check_targets(targets: str) -> str:
    """The spec, normalised (``topk:2``), once its form and number are valid on their own; the
    bound that needs the class count (K < C) is checked against SRC."""
    try:
        return make_layout(targets).spec
    except ValueError as exc:
        raise UsageError(f"--targets: {exc}") from None


def target_meta(source: CacheMeta, where: str, targets: str, logits_dtype: str | None, seed: int) -> CacheMeta:
    """SRC's metadata with the targets, the logits dtype (default: SRC's) and the draws' salt replaced."""
    if source.layout.name != "full":
        raise UsageError(f"cache-convert re-encodes a full cache; {where} holds {source.logits_layout} targets")
    name, _ = parse_targets(targets)
    dtype = logits_dtype or source.logits_dtype
    if name == "full" and dtype == source.logits_dtype:
        raise UsageError(f"{where} already holds full {dtype} logits: --targets full only changes the dtype (--logits-dtype)")
    randomized = make_layout(targets).randomized
    try:
        return replace(source, logits_layout=targets, logits_dtype=dtype, target_seed=seed if randomized else 0)
    except ValueError as exc:
        raise UsageError(f"--targets {targets} for {where}: {exc}") from None


def check_destination(source: Path, destination: Path) -> None:
    """DST must be new or an empty directory, in an existing directory, outside SRC, and neither
    the current directory nor an ancestor of it or of SRC: the finished cache is renamed onto
    DST, which cannot be done to a directory in use (``.`` converted everything, then failed)."""
    resolved = destination.resolve()
    if destination.name in ("", ".", "..") or resolved == Path.cwd().resolve() or resolved in Path.cwd().resolve().parents:
        raise UsageError(
            f"{destination}: the current directory or one of its ancestors, which the converted cache cannot be renamed onto; "
            "DST must be a new or an empty directory, e.g. ./converted"
        )
    if resolved in source.resolve().parents:
        raise UsageError(f"{destination}: holds SRC {source}; DST must be a new or an empty directory outside it")
    if destination.is_symlink() or (destination.exists() and not destination.is_dir()):
        raise UsageError(f"{destination}: exists and is not a directory; DST must be a new or an empty directory")
    if destination.is_dir() and any(destination.iterdir()):
        raise UsageError(f"{destination}: not empty; DST must be a new or an empty directory")
    parent = destination.absolute().parent
    if not parent.is_dir():
        raise UsageError(f"{parent}: no such directory (DST is created in an existing directory)")
    resolved, source_resolved = destination.resolve(), source.resolve()
    if resolved == source_resolved or source_resolved in resolved.parents:
        raise UsageError(f"{destination}: inside SRC {source}; DST must lie outside it")


def package_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kdcache")
    except PackageNotFoundError:
        return None


def provenance_of(reader: CacheReader) -> dict[str, Any]:
    """Where the converted rows come from: SRC as it was read (its manifest's sha256 names the
    exact version), and SRC's own provenance if it was converted too."""
    meta = reader.meta
    source = {
        "directory": str(reader.directory.resolve()) if isinstance(reader.directory, Path) else reader.directory,
        "manifest_sha256": reader.manifest_sha256,
        "logits_layout": meta.logits_layout,
        "logits_dtype": meta.logits_dtype,
        "samples": reader.num_samples,
        "shards": len(reader.shards),
        **({"provenance": reader.provenance} if reader.provenance else {}),
    }
    version = package_version()
    return {"tool": PROG, **({"version": version} if version else {}), "converted_at": now(), "source": source}


def block_rows(meta: CacheMeta) -> int:
    """Rows per read: whole chunks of SRC where they fit in ``BLOCK_BYTES``."""
    rows = max(1, BLOCK_BYTES // max(1, meta.row_bytes()))
    chunk = meta.chunk_rows()
    return rows - rows % chunk if rows >= chunk else rows


def source_blocks(reader: CacheReader) -> Iterator[tuple[str, dict[str, np.ndarray], bool]]:
    """SRC's rows in order, block by block: (where, columns, last block of its shard)."""
    meta = reader.meta
    names = list(meta.columns())
    step = block_rows(meta)
    duplicates = reader.duplicates()  # a cache of several writers: each id once
    for position, info in enumerate(reader.shards):
        handle = ShardHandle(info.path)
        skip = duplicates.get(position)
        try:
            for start in range(0, info.num_samples, step):
                stop = min(start + step, info.num_samples)
                rows = handle.read(start, stop, names)
                if skip is not None:
                    rows = {name: values[~skip[start:stop]] for name, values in rows.items()}
                yield f"{info.where} rows {start}:{stop}", rows, stop == info.num_samples
        finally:
            handle.close()


def append_block(writer: CacheWriter, source: CacheMeta, where: str, rows: dict[str, np.ndarray]) -> None:
    ids = rows["ids"]
    if source.has_views:
        # The writer gives each row the seeds of (view_salt, id); a row whose stored seeds are
        # others would be paired with views that its logits were not computed on.
        expected = view_seeds(source.view_salt, ids, source.views_per_id)
        if not np.array_equal(expected, rows["view_seeds"]):
            raise CacheError(f"{where}: view_seeds are not those of the cache's view_salt {source.view_salt} and the ids")
    logits = source.layout.decode({name: rows[name] for name in source.layout.fields(source.num_classes)})
    try:
        written = writer.append(ids, rows["inputs"], logits, rows["labels"])
    except ValueError as exc:
        raise CacheError(f"{where}: {exc}") from None
    if written != len(ids):
        raise CacheError(f"{where}: {len(ids) - written} id(s) already seen earlier in the cache")


def staging_directory(destination: Path) -> Path:
    """A new hidden sibling of DST, made like any directory (the umask applies), named
    ``.DST.convert-HOST-PID-TOKEN`` so that a later run can tell whether its writer still runs."""
    parent = destination.absolute().parent
    while True:
        staging = parent / f".{destination.name}.convert-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
        with contextlib.suppress(FileExistsError):
            staging.mkdir()
            return staging


STAGING = re.compile(r"\.convert-(?:(?P<host>.+)-(?P<pid>\d+)-)?[0-9a-f]{8}")


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def clear_stale_staging(destination: Path) -> None:
    """Remove the staging directories of DST that a killed run left (``kill -9`` skips the
    clean-up; one held 162 MB): those of this host whose process is gone. Others (a run still
    going, another host's, one named before the names held a process id) are named in a warning."""
    parent, prefix = destination.absolute().parent, f".{destination.name}"
    for entry in sorted(parent.iterdir()):
        match = STAGING.fullmatch(entry.name[len(prefix) :]) if entry.name.startswith(prefix) else None
        if match is None or entry.is_symlink() or not entry.is_dir():
            continue
        pid = match["pid"]
        if match["host"] == socket.gethostname() and pid is not None and not _running(int(pid)):
            shutil.rmtree(entry, ignore_errors=True)
            print(f"{PROG}: removed {entry}, left by a conversion into {destination} that was stopped (process {pid})", file=sys.stderr)
        else:
            owner = f"process {pid} on {match['host']}" if pid is not None else "an earlier run"
            print(f"{PROG}: warning: {entry} is a staging directory of {owner}; remove it if no conversion is running", file=sys.stderr)


def convert_cache(
    source: str | os.PathLike[str],
    destination: str | os.PathLike[str],
    targets: str,
    *,
    logits_dtype: str | None = None,
    seed: int | None = None,
    verify_checksums: bool = True,
    progress: bool = False,
) -> Conversion:
    """Re-encode the full cache ``source`` into a new cache ``destination`` with ``targets``
    (see the module docstring). ``seed`` is the salt of ``sampled:N`` draws (default: a fresh
    random 63-bit one). Raises UsageError for arguments that cannot work, CacheError for a SRC
    that cannot be read; DST is then left as it was."""
    from tqdm import tqdm

    if is_url(destination):
        return _convert_to_url(source, str(destination), targets, logits_dtype, seed, verify_checksums, progress)
    src, dst = (source if is_url(source) else Path(source)), Path(destination)
    targets = check_targets(targets)
    if logits_dtype is not None and logits_dtype not in LOGITS_DTYPES:
        raise UsageError(f"--logits-dtype must be one of {', '.join(LOGITS_DTYPES)}, got {logits_dtype!r}")
    seed = secrets.randbits(63) if seed is None else int(seed)
    if not 0 <= seed < 1 << 64:
        raise UsageError(f"--seed must be in [0, 2**64), got {seed}")
    if isinstance(src, Path):
        check_destination(src, dst)
    clear_stale_staging(dst)
    # The manifest alone first, so that a conversion that cannot work (K >= C, a sparse SRC) is
    # refused before the checksums are read.
    target_meta(CacheReader(src, check_files=False).meta, str(src), targets, logits_dtype, seed)
    if verify_checksums:
        total = CacheReader(src, check_files=False).total_bytes
        with tqdm(total=total, unit="B", unit_scale=True, desc="verify", disable=not progress, file=sys.stderr) as bar:
            reader = CacheReader(src, verify_checksums=True, progress=bar)
    else:
        reader = CacheReader(src)
    meta = target_meta(reader.meta, str(src), targets, logits_dtype, seed)
    journal = pending_samples(reader.directory, reader.meta) if isinstance(reader.directory, Path) else 0
    if journal:
        print(
            f"{PROG}: warning: {src}'s journal holds {journal:,} samples not yet in a published shard; they are not converted",
            file=sys.stderr,
        )
    provenance = provenance_of(reader)
    largest = max((info.num_samples for info in reader.shards), default=1)
    shard_bytes = max(DEFAULT_SHARD_BYTES, max((info.bytes for info in reader.shards), default=0))
    staging = staging_directory(dst)
    try:
        with (
            CacheWriter(
                staging, meta, max_samples=largest, max_bytes=shard_bytes, provenance=provenance, label_names=reader.label_names
            ) as writer,
            tqdm(total=reader.num_samples, unit="samples", desc="convert", disable=not progress, file=sys.stderr) as bar,
        ):
            for where, rows, shard_done in source_blocks(reader):
                append_block(writer, reader.meta, where, rows)
                if shard_done:
                    writer.flush_shard()  # one shard of DST per shard of SRC
                bar.update(len(rows["ids"]))
        shards = writer.shards
        expected = reader.num_samples - sum(int(skip.sum()) for skip in reader.duplicates().values())
        if sum(info.num_samples for info in shards) != expected:
            raise CacheError(f"{staging}: holds {sum(info.num_samples for info in shards)} samples, {src} {expected}")
        try:
            os.rename(staging, dst)  # onto a missing or an empty directory, atomically
        except OSError as exc:
            raise CacheError(
                f"{dst}: cannot put the converted cache in place ({exc.strerror}); DST must be a new or an empty directory"
            ) from None
        fsync_path(dst.absolute().parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return Conversion(dst, meta, expected, len(shards), sum(info.bytes for info in shards), provenance)


def _convert_to_url(
    source: str | os.PathLike[str], destination: str, targets: str, logits_dtype: str | None, seed: int | None,
    verify_checksums: bool, progress: bool,
) -> Conversion:  # fmt: skip
    """Convert into a local staging directory, then upload its shards and, last, its manifest:
    readers see nothing of DST until the whole cache is there."""
    storage = open_storage(destination)
    storage.check()
    if index_names(storage) or any(SHARD_PATTERN.match(name) for name in storage.list()):
        raise UsageError(f"{destination}: already holds a cache; DST must be a new or an empty prefix")
    with tempfile.TemporaryDirectory(prefix="cache-convert-") as tmp:
        local = convert_cache(
            source, Path(tmp) / "dst", targets, logits_dtype=logits_dtype, seed=seed, verify_checksums=verify_checksums, progress=progress
        )
        staged = Path(local.directory)
        names = sorted(p.name for p in staged.iterdir() if SHARD_PATTERN.match(p.name))
        for name in names:
            storage.put_file(name, staged / name)
        storage.put_file(MANIFEST_NAME, staged / MANIFEST_NAME)
    return replace(local, directory=destination)


def describe(conversion: Conversion) -> str:
    meta = conversion.meta
    target_bytes = meta.layout.row_bytes(meta.num_classes)
    full_bytes = 4 * meta.num_classes * meta.views_per_id
    seed = f", target_seed {meta.target_seed}" if meta.layout.randomized else ""
    return (
        f"{PROG}: wrote {conversion.directory}: {conversion.samples:,} samples in {conversion.shards} shard(s), "
        f"targets {meta.logits_layout} {meta.logits_dtype} at serving T {meta.serving_temperature:g}{seed}; "
        f"{target_bytes:,} target bytes/sample, {target_bytes / full_bytes:.1%} of full float32"
    )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Re-encode a cache of full logits into topk:K or sampled:N targets (or full logits of another "
        "dtype) without the teacher. Keeps ids, inputs, labels, views, teacher and serving temperature; DST "
        "appears complete or not at all.",
    )
    p.add_argument("source", metavar="SRC", help="a cache of full logits")
    p.add_argument("destination", metavar="DST", help="a new or an empty directory")
    p.add_argument(
        "--targets",
        required=True,
        metavar="SPEC",
        help="topk:K (K < classes), sampled:N (N >= 1 draws at the serving temperature), or full (with --logits-dtype: a dtype conversion)",
    )
    p.add_argument("--logits-dtype", choices=LOGITS_DTYPES, default=None, help="dtype of the stored values (default: SRC's)")
    p.add_argument(
        "--seed",
        type=int,
        default=None,
        help="salt of the sampled:N draws, recorded as target_seed (default: a fresh random 63-bit seed; the same --seed "
        "gives the same targets); ignored by topk and full",
    )
    p.add_argument(
        "--verify-checksums",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="check every shard's sha256 before HDF5 reads it (one extra read of SRC; on by default)",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.add_argument(
        "--trust-code", action="store_true",
        help="accepted as by the other commands, and changes nothing: cache-convert copies the record of a cache's "
        "augment policy as data and never imports it",
    )  # fmt: skip
    return p


def _terminated(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # the staging directory is removed on the way out, as for Ctrl-C


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    previous: Any = _terminated
    with contextlib.suppress(ValueError):  # only the main thread may set a handler
        previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        conversion = convert_cache(
            args.source, args.destination, args.targets, logits_dtype=args.logits_dtype, seed=args.seed,
            verify_checksums=args.verify_checksums, progress=not args.no_progress,
        )  # fmt: skip
    except UsageError as exc:
        return fail(PROG, str(exc), code=2)
    except (CacheError, OSError) as exc:
        return fail(PROG, str(exc), code=1)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; {args.destination} was not written", file=sys.stderr)
        return 130
    finally:
        if previous is not _terminated:
            signal.signal(signal.SIGTERM, previous)
    print(describe(conversion))
    return 0


if __name__ == "__main__":
    sys.exit(main())
