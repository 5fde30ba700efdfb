"""The cache format: the one package that knows how teacher outputs are laid out on disk.

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
``schema_version``, ``logits_layout`` (``full``; ``topk:K`` and ``sampled:N`` store their
own datasets in place of ``logits``: ``layout.py``) and ``views_per_id`` (a cache of views
adds ``view_seeds`` [N, V] and a view axis to the layout's datasets). Readers refuse layouts
they do not know with a message instead of misreading them.

Chunking: every dataset is chunked by whole rows, with the same number of rows per chunk
(``chunk_rows``, stored as an attribute). The row count is picked so that a chunk of
``inputs`` is about 1 MiB: large enough that HDF5's per-chunk cost is amortised and a read
is one sequential run of the file, small enough that a shuffle window of a few chunks stays
small. The streaming reader reads blocks of whole chunks, aligned to chunk boundaries, so each
chunk is read once per epoch and HDF5's chunk cache is never needed.

The package, one module per job (docs/architecture.md):

    contract       CacheMeta, Preprocessing, CacheError: what a cache holds (numpy only)
    ids            normalize_ids, content_ids (numpy only)
    layout         TargetLayout, FullLogits, TopK, Sampled: the teacher's outputs as stored (numpy only)
    diagnostics    soft-target statistics and the warnings they raise about a bad setup (numpy only)
    rng            seeds named by (salt, id, index) and Philox4x32-10 (numpy only)
    keys           RowIndex: id -> global row (numpy only)
    storage        Storage and LocalStorage: list, open, atomic put, put_if_match, lease
    manifest       manifest.json and ShardInfo
    label_names    the rules every label name obeys (check_label_names), and printable() for the terminal
    shard          one HDF5 shard: attributes, metadata checks, ShardHandle
    reader         CacheReader
    writer         CacheWriter
    faults         the named crash points of the crash trials
    transfer_set   the .npz files clients push
    trust          consent before code: the one place a module:factory named by a string is imported

It imports neither FastAPI nor any teacher code: the service and the trainer both import it.
"""

from typing import Any

from .contract import FORMAT_NAME, SCHEMA_VERSION, TEMPERATURE_RULES, CacheError, CacheMeta, Preprocessing
from .faults import CRASH_POINTS, crash_point
from .ids import content_ids, normalize_ids
from .layout import LAYOUTS, LOGITS_DTYPES, FullLogits, Sampled, TargetLayout, TopK, make_layout, parse_targets
from .manifest import MANIFEST_NAME, ShardInfo
from .storage import LOCK_NAME, LocalStorage, Storage
from .transfer_set import read_transfer_set

# The modules that need h5py load on first use, so that a client that only needs the contract
# and the ids (teacher-push, the protocol codec) does not import HDF5.
_LAZY = {
    "CacheReader": ".reader",
    "CacheWriter": ".writer",
    "SHARD_ATTRS": ".shard",
    "ShardHandle": ".shard",
    "read_shard_meta": ".shard",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CRASH_POINTS", "FORMAT_NAME", "LAYOUTS", "LOCK_NAME", "LOGITS_DTYPES", "MANIFEST_NAME", "SCHEMA_VERSION", "SHARD_ATTRS",
    "TEMPERATURE_RULES", "CacheError", "CacheMeta", "CacheReader", "CacheWriter", "FullLogits", "LocalStorage", "Preprocessing",
    "Sampled", "ShardHandle", "ShardInfo", "Storage", "TargetLayout", "TopK", "parse_targets", "content_ids", "crash_point", "make_layout", "normalize_ids",
    "read_shard_meta", "read_transfer_set",
]  # fmt: skip
