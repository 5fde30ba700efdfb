"""Token sequences for a language-model teacher (a ``TokenSpec``): what the token kinds share, and
the ``.npz`` of ``input_ids``.

A token source's chunks are [n, W] int64 (W: its width, the ``.npz``'s L' or the text's
``seq_len``), 0 beyond each row's length, with ``lengths``. ``batches`` trims each batch to its
longest sequence and drops ``lengths`` when every row fills that, which is what a request carries
(``input_ids`` [B, l], and ``lengths`` [B] only when some row is shorter). Without ids given, a
sequence's id is ``sequence_ids``: the sha256 (hex) of its tokens as little-endian int64, padding
left out, so the same tokens have the same id whatever the file, its name or the batch they are
in (a re-push is all cache hits), and a sequence that repeats within a batch is sent once (the
service refuses an id twice in one request).
"""

from __future__ import annotations

import hashlib
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from ..cache.ids import normalize_ids
from ..cache.transfer_set import read_npz_members
from .base import Source, SourceBatch, SourceError, SourceOptions, TokenSpec, _shape_text

TOKEN_MEMBERS = ("input_ids", "lengths", "ids")
_TEXT_OPTIONS = ("text_column", "tokenizer", "seq_len")


def sequence_ids(inputs: np.ndarray, lengths: Sequence[int] | np.ndarray) -> list[str]:
    """Each row's id: the sha256 (hex) of its first ``length`` tokens as little-endian int64."""
    rows = np.ascontiguousarray(inputs, dtype="<i8")
    return [hashlib.sha256(row[: int(n)].tobytes()).hexdigest() for row, n in zip(rows, lengths, strict=True)]


def trimmed(batch: SourceBatch) -> SourceBatch:
    """``batch`` as a request carries it: as wide as its longest sequence, ``lengths`` only when
    some row is shorter."""
    if batch.lengths is None or not len(batch):
        return batch
    width = int(batch.lengths.max())
    lengths = None if (batch.lengths == width).all() else batch.lengths
    return SourceBatch(batch.ids, batch.inputs[:, :width], batch.labels, lengths)


def deduplicated(batch: SourceBatch) -> SourceBatch:
    """``batch`` with each id once (the first row that has it): for content ids, a repeat is the
    same sequence."""
    first = {}
    for row, item in enumerate(batch.ids):
        first.setdefault(item, row)
    if len(first) == len(batch):
        return batch
    keep = np.array(sorted(first.values()))
    lengths = None if batch.lengths is None else batch.lengths[keep]
    return SourceBatch([batch.ids[i] for i in keep], batch.inputs[keep], batch.labels[keep], lengths)


def full_lengths(count: int, width: int) -> np.ndarray:
    return np.full(count, width, dtype=np.int64)


def padding_mask(lengths: np.ndarray, width: int) -> np.ndarray:
    """[N, width] bool: True beyond each row's length."""
    return np.arange(width)[None, :] >= np.asarray(lengths)[:, None]


def check_vocabulary(tokens: np.ndarray, lengths: np.ndarray, vocab_size: int, where: str) -> None:
    """Refuse a token outside [0, vocab_size) within a row's length, naming the first one."""
    inside = ~padding_mask(lengths, tokens.shape[1])
    bad = inside & ((tokens < 0) | (tokens >= vocab_size))
    if bad.any():
        row, position = (int(i) for i in np.argwhere(bad)[0])
        more = int(bad.sum()) - 1
        raise SourceError(
            f"{where}: row {row} holds token {tokens[row, position]} at position {position}, outside the teacher's vocabulary "
            f"[0, {vocab_size})" + (f" ({more} more such tokens)" if more else "")
        )


def is_token_npz(path: str | Path) -> bool:
    """Whether ``path`` is an ``.npz`` of token sequences (``input_ids``, no ``inputs``); an
    unreadable one is not (``read_transfer_set`` says why)."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = {info.filename.removesuffix(".npy") for info in archive.infolist()}
    except (OSError, zipfile.BadZipFile):
        return False
    return "input_ids" in names and "inputs" not in names


class TokenSource(Source):
    """A source of token sequences, ``width`` tokens at most: its chunks carry ``lengths``;
    ``batches`` trims them and, for content ids, sends a repeated sequence once per batch."""

    content_ids = True
    width: int

    def __init__(self, path: Path, spec: TokenSpec, options: SourceOptions) -> None:
        if not isinstance(spec, TokenSpec):
            raise SourceError(f"{path}: a {self.kind} source holds token sequences, for a language-model teacher")
        super().__init__(path, spec, options)
        o = options
        columns = {"input_column": o.input_column, "label_column": o.label_column, "id_column": o.id_column}
        given = [f"{name}={value!r}" for name, value in columns.items() if value is not None]
        if given:
            raise SourceError(f"{path}: {', '.join(given)} applies to Parquet and Hugging Face sources of inputs, not to token sequences")

    def batches(self, batch_size: int) -> Iterator[SourceBatch]:
        for batch in super().batches(batch_size):
            yield trimmed(deduplicated(batch) if self.content_ids else batch)

    def _unknown_labels(self, count: int) -> np.ndarray:
        return np.full(count, -1, dtype=np.int64)


class TokenNpzSource(TokenSource):
    """An ``.npz`` of ``input_ids`` [N, L'] (integers, L' at most the teacher's ``seq_len``),
    optional ``lengths`` [N] (each 1..L'; without them every row is L' tokens) and ``ids`` [N];
    read whole (at most ``max_npz_mb`` a member), checked whole before any batch."""

    kind = "token-npz"

    @classmethod
    def detect(cls, path: Path) -> bool:
        return path.is_file() and path.suffix.lower() == ".npz"

    def __init__(self, path: Path, spec: TokenSpec, options: SourceOptions) -> None:
        super().__init__(path, spec, options)
        given = [name for name in _TEXT_OPTIONS if getattr(options, name) is not None]
        if given:
            raise SourceError(f"{path}: {', '.join(given)} applies to text, not to an .npz of input_ids (sent as its rows are)")
        arrays = read_npz_members(path, TOKEN_MEMBERS, required="input_ids", max_bytes=options.max_npz_mb << 20)
        tokens = arrays["input_ids"]
        if tokens.ndim != 2 or tokens.dtype.kind not in "iu":
            raise SourceError(f"{path}: input_ids must be integers [N, L], got {_shape_text(tokens.shape)} of {tokens.dtype}")
        n, width = tokens.shape
        if width > spec.seq_len:
            raise SourceError(f"{path}: input_ids are {width} tokens wide, the teacher takes at most {spec.seq_len} (its sequence_length)")
        if width < 1 and n:
            raise SourceError(f"{path}: input_ids are 0 tokens wide")
        self.width = width
        self.lengths = self._lengths(arrays.get("lengths"), n, width)
        check_vocabulary(tokens, self.lengths, spec.vocab_size, f"{path}: input_ids")
        self.tokens = np.where(padding_mask(self.lengths, width), 0, tokens).astype(np.int64)
        if "ids" in arrays:
            try:
                self.ids = [str(i) for i in normalize_ids(arrays["ids"], n)]
            except ValueError as exc:
                raise SourceError(f"{path}: ids: {exc}") from None
            self.content_ids = False
        else:
            self.ids = sequence_ids(self.tokens, self.lengths)

    def _lengths(self, lengths: np.ndarray | None, n: int, width: int) -> np.ndarray:
        if lengths is None:
            return full_lengths(n, width)
        if lengths.shape != (n,) or lengths.dtype.kind not in "iu":
            raise SourceError(f"{self.path}: lengths must be {n} integers, got {_shape_text(lengths.shape)} of {lengths.dtype}")
        bad = np.flatnonzero((lengths < 1) | (lengths > width))
        if len(bad):
            raise SourceError(f"{self.path}: lengths: row {bad[0]} is {lengths[bad[0]]}, outside 1..{width} (the width of input_ids)")
        return lengths.astype(np.int64)

    def __len__(self) -> int:
        return len(self.tokens)

    def _chunks(self, batch_size: int) -> Iterator[SourceBatch]:
        for start in range(0, len(self), batch_size):
            stop = start + batch_size
            rows = self.tokens[start:stop]
            yield SourceBatch(self.ids[start:stop], rows, self._unknown_labels(len(rows)), self.lengths[start:stop])
