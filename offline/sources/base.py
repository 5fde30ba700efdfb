"""What every kind of transfer set shares: the spec it is fitted to (``SampleSpec``, or
``TokenSpec`` for a language-model teacher), its options and batches, the ``Source`` base class,
and fitting arrays to the teacher's shape and dtype.
"""

from __future__ import annotations

import contextlib
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ..cache.contract import CacheError
from ..cache.label_names import check_label_names
from ..cache.manifest import MANIFEST_NAME
from ..cache.transfer_set import DEFAULT_MAX_NPZ_MB

RESIZE_MODES = ("short-side", "stretch")
ON_ERROR = ("stop", "skip")
INSTALL_HINT = "pip install -e '.[data]' in a checkout (pip install 'kdcache[data]' where kdcache comes from a package index)"
# Pixels an image may decode into: a 6000 x 4000 photo. Pillow's own limit (89.5 MP warns, twice
# that refuses) lets a 97 KB PNG of 10,000 x 10,000 through to take 100 MB a copy; at this one, three
# RGBA PNGs that large take 246 MB in teacher-push with 2 threads (docs/reliability.md § 8).
DEFAULT_MAX_PIXELS = 24_000_000


class SourceError(CacheError):
    """A transfer set that cannot be read, in one line naming the file (and row or column)."""


@dataclass(frozen=True)
class SampleSpec:
    """What the teacher takes, from its model metadata: one sample's shape (channels-first for
    images), its dtype, and the class count labels must lie under (None: not checked)."""

    input_shape: tuple[int, ...]
    input_dtype: str
    num_classes: int | None = None

    def __post_init__(self) -> None:
        shape = tuple(int(d) for d in self.input_shape)
        if not shape or any(d < 1 for d in shape):
            raise ValueError(f"input_shape must be positive dimensions, got {list(self.input_shape)}")
        dtype = np.dtype(self.input_dtype)
        if dtype.kind not in "biuf":
            raise ValueError(f"input_dtype must be numeric, got {dtype}")
        if self.num_classes is not None and self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        object.__setattr__(self, "input_shape", shape)
        object.__setattr__(self, "input_dtype", dtype.name)


@dataclass(frozen=True)
class TokenSpec:
    """What a language-model teacher takes, from its model metadata: token sequences (int64 ids
    in [0, ``vocab_size``)) of at most ``seq_len`` tokens."""

    seq_len: int
    vocab_size: int

    def __post_init__(self) -> None:
        if self.seq_len < 1 or self.vocab_size < 1:
            raise ValueError(f"seq_len and vocab_size must be at least 1, got {self.seq_len} and {self.vocab_size}")


@dataclass
class SourceBatch:
    ids: list[str]
    inputs: np.ndarray  # [B, *input_shape], input_dtype; token sources: [B, l] int64, 0 beyond each length
    labels: np.ndarray  # [B] int64, -1 = unknown
    lengths: np.ndarray | None = None  # token sources: [B] int64, tokens in each row; None: every row is full

    def __len__(self) -> int:
        return len(self.ids)


def _warn_stderr(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


@dataclass(frozen=True)
class SourceOptions:
    """``open_source``'s keyword options, handed to the kind that opens the path."""

    resize: str = "short-side"
    input_column: str | None = None
    label_column: str | None = None
    id_column: str | None = None
    on_error: str = "stop"
    workers: int | None = None
    warn: Callable[[str], None] = _warn_stderr
    label_names: tuple[str, ...] | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_npz_mb: int = DEFAULT_MAX_NPZ_MB
    # token sources (a TokenSpec): text
    text_column: str | None = None
    tokenizer: str | None = None
    seq_len: int | None = None


class Source(ABC):
    """A transfer set opened for reading; ``kind`` names it, ``detect`` recognises its paths.

    ``label_names[i]`` names class ``i`` when the source names its classes (an image folder's
    class folders, a Hugging Face ClassLabel), else None. When ``open_source`` is given
    ``label_names`` such a source's labels are mapped through them by name (and
    ``label_names`` is that list); a source whose labels are bare integers keeps them."""

    kind: ClassVar[str]
    path: Path
    spec: Any  # SampleSpec, or TokenSpec for the token kinds
    label_names: list[str] | None
    skipped: list[tuple[str, str]]

    def __init__(self, path: Path, spec: Any, options: SourceOptions) -> None:
        self.path, self.spec, self.options = path, spec, options
        self.label_names = None
        self.skipped = []

    @classmethod
    @abstractmethod
    def detect(cls, path: Path) -> bool:
        """Whether ``path`` is a source of this kind (cheap: names and a listing, no decoding)."""

    def numbered_by(self, label_names: Sequence[str]) -> Source:
        """This source opened again as ``open_source(..., label_names=label_names)`` opens it. The
        warnings of opening, given once already, are not given again; those of a pass are."""
        opening = True

        def warn(message: str) -> None:
            if not opening:
                self.options.warn(message)

        options = replace(self.options, label_names=tuple(str(name) for name in label_names), warn=warn)
        source = type(self)(self.path, self.spec, options)
        opening = False
        return source

    @abstractmethod
    def __len__(self) -> int:
        """The samples listed, known before reading them."""

    def total(self) -> int | None:
        """The samples a pass yields at most, for a progress bar: ``len(self)``, or None where
        only reading tells (text, whose sequences are counted once tokenized)."""
        return len(self)

    @abstractmethod
    def _chunks(self, batch_size: int) -> Iterator[SourceBatch]:
        """The samples in order, in chunks of any size, bad items already stopped at or left out."""

    def batches(self, batch_size: int) -> Iterator[SourceBatch]:
        """The samples in order, ``batch_size`` at a time (the last batch shorter)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        pending: list[SourceBatch] = []
        held = 0
        with contextlib.closing(self._chunks(batch_size)) as chunks:  # a pass stopped early stops its threads
            for chunk in chunks:
                if not len(chunk):
                    continue
                pending.append(chunk)
                held += len(chunk)
                while held >= batch_size:
                    batch, rest = _split(_concat(pending), batch_size)
                    yield batch
                    pending, held = ([rest] if len(rest) else []), len(rest)
        if held:
            yield _concat(pending)

    def _bad(self, item: str, where: str, reason: str) -> None:
        """A bad item: stop with ``where: reason``, or record ``(item, reason)`` and go on."""
        if self.options.on_error == "stop":
            raise SourceError(f"{where}: {reason}")
        self.skipped.append((item, reason))

    def _check_labels(self, labels: np.ndarray, items: Sequence[str], wheres: Sequence[str]) -> np.ndarray:
        """A mask of the rows whose label is -1 or in [0, C); the others are bad items."""
        limit = self.spec.num_classes
        bad = (labels < -1) | ((labels >= limit) if limit is not None else False)
        for row in np.flatnonzero(bad):
            bound = f"outside [0, {limit})" if limit is not None else "negative (-1 means unknown)"
            self._bad(items[row], wheres[row], f"label {int(labels[row])} is {bound}")
        return ~bad

    def _column_options_unused(self) -> None:
        o = self.options
        columns = {"input_column": o.input_column, "label_column": o.label_column, "id_column": o.id_column}
        given = [f"{name}={value!r}" for name, value in columns.items() if value is not None]
        if given:
            raise SourceError(f"{self.path}: {', '.join(given)} applies to Parquet and Hugging Face sources, not to {self.kind} sources")


def _concat(batches: list[SourceBatch]) -> SourceBatch:
    """One batch of several; lengths are kept only where every part has them (a token source's
    chunks always do, all of one width)."""
    if len(batches) == 1:
        return batches[0]
    lengths = [b.lengths for b in batches]
    return SourceBatch(
        ids=[i for b in batches for i in b.ids],
        inputs=np.concatenate([b.inputs for b in batches]),
        labels=np.concatenate([b.labels for b in batches]),
        lengths=None if any(n is None for n in lengths) else np.concatenate(lengths),
    )


def _split(batch: SourceBatch, count: int) -> tuple[SourceBatch, SourceBatch]:
    n = batch.lengths
    return (
        SourceBatch(batch.ids[:count], batch.inputs[:count], batch.labels[:count], None if n is None else n[:count]),
        SourceBatch(batch.ids[count:], batch.inputs[count:], batch.labels[count:], None if n is None else n[count:]),
    )


def _select(batch: SourceBatch, keep: np.ndarray) -> SourceBatch:
    if keep.all():
        return batch
    ids = [i for i, k in zip(batch.ids, keep, strict=True) if k]
    return SourceBatch(ids, batch.inputs[keep], batch.labels[keep], None if batch.lengths is None else batch.lengths[keep])


def _shape_text(shape: Sequence[int]) -> str:
    return f"[{', '.join(str(d) for d in shape)}]"


def fit_shape(values: np.ndarray, spec: SampleSpec, where: str) -> np.ndarray:
    """``values`` [N, ...] as [N, *input_shape]: equal shapes, or equal once axes of size 1 are
    dropped (e.g. [N, 28, 28] for (1, 28, 28)). Anything else would scramble the layout."""
    sample = tuple(values.shape[1:])
    if sample == spec.input_shape:
        return values
    if [d for d in sample if d != 1] == [d for d in spec.input_shape if d != 1]:
        return values.reshape(len(values), *spec.input_shape)
    hint = ""
    if len(sample) == 3 and sample == spec.input_shape[1:] + spec.input_shape[:1]:
        hint = " (channels-last? the teacher takes channels-first)"
    raise SourceError(f"{where}: inputs have sample shape {_shape_text(sample)}, the teacher takes {_shape_text(spec.input_shape)}{hint}")


def _dtype_can_fit(source: np.dtype, target: np.dtype) -> bool:
    """Whether values of ``source`` can become ``target`` without losing what they mean: any
    numbers into floats, integers into integers (their range is checked), never floats into
    integers."""
    if source.kind not in "biuf":
        return False
    return target.kind == "f" or source.kind in "biu"


def _fit_dtype(values: np.ndarray, spec: SampleSpec, where: str) -> np.ndarray:
    target = np.dtype(spec.input_dtype)
    if values.dtype == target:
        return values
    if not _dtype_can_fit(values.dtype, target):
        raise SourceError(f"{where}: inputs are {values.dtype}, the teacher takes {target} (no conversion keeps their values)")
    if values.dtype.kind in "iu" and target.kind in "iu" and not np.can_cast(values.dtype, target, "safe") and values.size:
        low, high, info = values.min(), values.max(), np.iinfo(target)
        if low < info.min or high > info.max:
            raise SourceError(
                f"{where}: inputs hold {values.dtype} values {low}..{high}, outside the teacher's {target} ({info.min}..{info.max})"
            )
    return values.astype(target)


def fit_inputs(values: np.ndarray, spec: SampleSpec, where: str) -> np.ndarray:
    """``values`` [N, ...] as the teacher takes them: ``fit_shape``, then its dtype where no value changes, contiguous."""
    return np.ascontiguousarray(_fit_dtype(fit_shape(values, spec, where), spec, where))


def _is_cache(path: Path) -> bool:
    return (path / MANIFEST_NAME).is_file()


def _check_class_names(names: list[Any], where: str) -> list[str]:
    """A source's own class names, checked as the cache's label names are (label_names.py): a
    name that repeats would map two classes to one label."""
    try:
        return check_label_names(names, None, where)
    except CacheError as exc:
        raise SourceError(str(exc)) from None


def _names_text(names: Sequence[str]) -> str:
    return ", ".join(repr(n) for n in names[:20]) + (", ..." if len(names) > 20 else "")
