"""Text for a language-model teacher: a ``.txt`` file, JSONL or Parquet, tokenized with a Hugging
Face tokenizer and packed into sequences of ``seq_len`` tokens.

The tokenizer is a directory's ``tokenizer.json`` (as ``save_pretrained`` writes it; the file
itself may be named too), read by the ``tokenizers`` package (the ``lm`` extra), with its own
truncation and padding turned off. Documents are a JSONL line's text field, a Parquet row's text
column, or a whole ``.txt`` file; each is tokenized without special tokens, and they are joined
into one stream with the tokenizer's separator between them (the first of ``<|endoftext|>``,
``</s>``, ``[SEP]`` its vocabulary holds; none: nothing), which is cut into consecutive sequences
of ``seq_len`` tokens; the last keeps its shorter length. A document that tokenizes to nothing
is left out, separator included.

Text is read and tokenized a piece at a time: JSONL line by line, Parquet a record batch at a
time, a ``.txt`` in pieces of ``PIECE_CHARS`` characters cut before their last line break (or,
in a longer line, their last white space). Where pieces are cut depends only on the text, so the
same file and options give the same sequences, and the same ids (``tokens.sequence_ids``).
"""

from __future__ import annotations

import json
from abc import abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .base import Source, SourceBatch, SourceError, SourceOptions, TokenSpec, _is_cache
from .columns import _import_pyarrow, _storage_type
from .listing import NOT_UTF8, _files_under, _is_text, _Listing, _printable
from .tokens import TokenSource, check_vocabulary, full_lengths, sequence_ids

LM_INSTALL_HINT = "pip install 'kdcache[lm]' (pip install -e '.[lm]' in a checkout)"
SEPARATORS = ("<|endoftext|>", "</s>", "[SEP]")
PIECE_CHARS = 1 << 16  # a .txt is tokenized in pieces of about this many characters
GROUP_CHARS = 1 << 20  # pieces tokenized together (in parallel, by the tokenizers library)
DEFAULT_TEXT_COLUMN = "text"


def load_tokenizer(path: str | Path) -> Any:
    """The ``tokenizers.Tokenizer`` of a Hugging Face tokenizer directory (its ``tokenizer.json``)
    or of that file, with truncation and padding off."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise SourceError(f"tokenizing text needs the tokenizers package: {LM_INSTALL_HINT}") from None
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise SourceError(f"{path}: no tokenizer.json (a Hugging Face tokenizer directory, as save_pretrained writes it)")
    try:
        tokenizer = Tokenizer.from_file(str(file))
    except Exception as exc:  # the library raises plain Exceptions for a file it cannot parse
        raise SourceError(f"{file}: not a readable tokenizer ({' '.join(str(exc).split())[:200]})") from None
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


def separator_id(tokenizer: Any) -> int | None:
    """The id of the first of ``SEPARATORS`` the tokenizer's vocabulary holds, or None."""
    return next((i for i in (tokenizer.token_to_id(token) for token in SEPARATORS) if i is not None), None)


class _Packer:
    """Documents' tokens in, complete sequences of ``seq_len`` out; the rest is held."""

    def __init__(self, seq_len: int, separator: int | None) -> None:
        self.seq_len, self.separator = seq_len, separator
        self.parts: list[np.ndarray] = []
        self.started = False

    def add(self, tokens: list[int], new_document: bool) -> None:
        if not tokens:
            return
        if new_document and self.started and self.separator is not None:
            self.parts.append(np.array([self.separator], dtype=np.int64))
        self.parts.append(np.array(tokens, dtype=np.int64))
        self.started = True

    def complete(self) -> np.ndarray:
        """[k, seq_len]: every complete sequence held (none: k = 0)."""
        stream = np.concatenate(self.parts) if self.parts else np.zeros(0, dtype=np.int64)
        k = len(stream) // self.seq_len
        rest = stream[k * self.seq_len :]
        self.parts = [rest] if len(rest) else []
        return stream[: k * self.seq_len].reshape(k, self.seq_len)

    def last(self) -> tuple[np.ndarray, int] | None:
        """The last, partial sequence padded with 0 to ``seq_len``, and its length; None if none."""
        rest = np.concatenate(self.parts) if self.parts else np.zeros(0, dtype=np.int64)
        self.parts = []
        if not len(rest):
            return None
        return np.concatenate([rest, np.zeros(self.seq_len - len(rest), dtype=np.int64)]), len(rest)


class TextSource(TokenSource):
    """Text tokenized and packed; a subclass yields its pieces of text. How many sequences a
    pass yields is known only once it is tokenized: ``total()`` is None."""

    def __init__(self, path: Path, spec: TokenSpec, options: SourceOptions) -> None:
        super().__init__(path, spec, options)
        if options.tokenizer is None:
            raise SourceError(f"{path}: text needs a tokenizer to become token sequences (--tokenizer DIR)")
        self.seq_len = self.width = spec.seq_len if options.seq_len is None else options.seq_len
        if not 1 <= self.seq_len <= spec.seq_len:
            raise SourceError(f"{path}: seq_len {self.seq_len} is outside 1..{spec.seq_len}, the longest sequence the teacher takes")
        self.tokenizer = load_tokenizer(options.tokenizer)
        size = self.tokenizer.get_vocab_size(with_added_tokens=True)
        if size > spec.vocab_size:
            raise SourceError(
                f"{options.tokenizer}: the tokenizer has {size} tokens, more than the teacher's vocabulary of {spec.vocab_size} "
                "(is it the teacher's tokenizer?)"
            )
        self.separator = separator_id(self.tokenizer)

    def __len__(self) -> int:
        raise TypeError(f"{self.path}: a text source's sequences are counted only as it is tokenized (total() is None)")

    def __bool__(self) -> bool:  # not len(): an open source is true, as every other kind is (they have samples or say so)
        return True

    def total(self) -> int | None:
        return None

    @abstractmethod
    def _pieces(self) -> Iterator[tuple[str, bool]]:
        """The text in order, as (piece, whether it starts a document)."""

    def _groups(self) -> Iterator[list[tuple[str, bool]]]:
        group: list[tuple[str, bool]] = []
        held = 0
        for piece in self._pieces():
            group.append(piece)
            held += len(piece[0])
            if held >= GROUP_CHARS:
                yield group
                group, held = [], 0
        if group:
            yield group

    def _chunks(self, batch_size: int) -> Iterator[SourceBatch]:
        packer = _Packer(self.seq_len, self.separator)
        for group in self._groups():
            encodings = self.tokenizer.encode_batch([text for text, _ in group], add_special_tokens=False)
            for (_, new_document), encoding in zip(group, encodings, strict=True):
                packer.add(encoding.ids, new_document)
            rows = packer.complete()
            if len(rows):
                yield self._batch(rows, full_lengths(len(rows), self.seq_len))
        last = packer.last()
        if last is not None:
            row, length = last
            yield self._batch(row[None, :], np.array([length], dtype=np.int64))

    def _batch(self, rows: np.ndarray, lengths: np.ndarray) -> SourceBatch:
        check_vocabulary(rows, lengths, self.spec.vocab_size, f"{self.path}: tokenized")
        return SourceBatch(sequence_ids(rows, lengths), rows, self._unknown_labels(len(rows)), lengths)

    def _no_text_column(self) -> None:
        if self.options.text_column is not None:
            raise SourceError(
                f"{self.path}: text_column={self.options.text_column!r} applies to JSONL and Parquet sources, not to {self.kind} sources"
            )


class TextFileSource(TextSource):
    """A ``.txt`` file (UTF-8): one document, read in pieces."""

    kind = "text"

    @classmethod
    def detect(cls, path: Path) -> bool:
        return path.is_file() and path.suffix.lower() == ".txt"

    def __init__(self, path: Path, spec: TokenSpec, options: SourceOptions) -> None:
        super().__init__(path, spec, options)
        self._no_text_column()

    def _pieces(self) -> Iterator[tuple[str, bool]]:
        try:
            with open(self.path, encoding="utf-8", newline="") as handle:
                yield from ((piece, i == 0) for i, piece in enumerate(_cut(handle)))
        except UnicodeDecodeError as exc:
            raise SourceError(f"{self.path}: not UTF-8 text ({exc.reason})") from None


def _cut(handle: Any) -> Iterator[str]:
    """A text file's pieces, each cut before the last line break of the ``PIECE_CHARS`` read (or
    its last white space; or not at all), the rest carried into the next."""
    carry = ""
    while True:
        block = handle.read(PIECE_CHARS)
        text = carry + block
        if not block:
            if text:
                yield text
            return
        cut = text.rfind("\n")
        if cut <= 0:
            cut = max(text.rfind(" "), text.rfind("\t"))
        if cut <= 0:
            cut = len(text)
        yield text[:cut]
        carry = text[cut:]


class JsonlSource(TextSource):
    """A ``.jsonl`` file: one JSON object a line, its text in ``text_column`` (default ``text``);
    blank lines are passed over; a line that is not such an object is a bad item."""

    kind = "jsonl"

    @classmethod
    def detect(cls, path: Path) -> bool:
        return path.is_file() and path.suffix.lower() == ".jsonl"

    def _pieces(self) -> Iterator[tuple[str, bool]]:
        column = self.options.text_column or DEFAULT_TEXT_COLUMN
        try:
            with open(self.path, encoding="utf-8") as handle:
                for number, line in enumerate(handle, 1):
                    if not line.strip():
                        continue
                    text = self._text(line, column, number)
                    if text is not None:
                        yield text, True
        except UnicodeDecodeError as exc:
            raise SourceError(f"{self.path}: not UTF-8 text ({exc.reason})") from None

    def _text(self, line: str, column: str, number: int) -> str | None:
        item, where = f"{self.path.name}:{number}", f"{self.path}: line {number}"
        try:
            record = json.loads(line)
        except ValueError:
            self._bad(item, where, "not JSON")
            return None
        if not isinstance(record, dict) or not isinstance(record.get(column), str):
            found = f"keys: {', '.join(list(record)[:10]) or 'none'}" if isinstance(record, dict) else f"a JSON {type(record).__name__}"
            self._bad(item, where, f"not an object with a string {column!r} ({found}); name the field with --text-column")
            return None
        return record[column]


class TextParquetSource(TextSource):
    """A ``.parquet`` file, or a folder of them (as the Parquet kind lists it), with a string
    column ``text_column`` (default ``text``); a row is a document, a null one a bad item."""

    kind = "text-parquet"

    @classmethod
    def detect(cls, path: Path) -> bool:
        if path.is_file():
            return path.suffix.lower() == ".parquet"
        return path.is_dir() and not _is_cache(path) and any(p.suffix.lower() == ".parquet" for p in _files_under(path, True))

    def __init__(self, path: Path, spec: TokenSpec, options: SourceOptions) -> None:
        super().__init__(path, spec, options)
        self.pa = _import_pyarrow()
        self.column = options.text_column or DEFAULT_TEXT_COLUMN
        self.files = self._files()
        if not self.files:
            raise SourceError(f"{path}: no data files in it")
        for file in self.files:
            self._check_column(file)

    def _files(self) -> list[Path]:
        if self.path.is_file():
            return [self.path]
        listing = _Listing.of(self.path, follow_links=True)
        listing.warn_left_out(self.options.warn)
        files = []
        for relative, path in listing.files:
            if path.suffix.lower() == ".parquet":
                if _is_text(relative):
                    files.append(path)
                else:
                    self._bad(_printable(relative), repr(path), f"{NOT_UTF8} (its rows are left out)")
        return files

    def _check_column(self, file: Path) -> None:
        pa = self.pa
        try:
            schema = pa.parquet.read_schema(file)
        except (OSError, pa.ArrowException) as exc:
            raise SourceError(f"{file}: not a readable Parquet file ({exc})") from None
        if self.column not in schema.names:
            raise SourceError(
                f"{file}: has no text column {self.column!r} (columns: {', '.join(schema.names) or 'none'}); name it with --text-column"
            )
        kind = _storage_type(schema.field(self.column).type)
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise SourceError(f"{file}: text column {self.column!r} is {kind}, not strings")

    def _pieces(self) -> Iterator[tuple[str, bool]]:
        for file in self.files:
            label = file.name if file == self.path else file.relative_to(self.path).as_posix()
            try:
                with self.pa.parquet.ParquetFile(file) as parquet:
                    row = 0
                    for batch in parquet.iter_batches(batch_size=1024, columns=[self.column]):
                        for text in batch.column(0).to_pylist():
                            if text is None:
                                self._bad(f"{label}:{row}", f"{file}: row {row}", f"text column {self.column!r} is null")
                            else:
                                yield text, True
                            row += 1
            except (OSError, self.pa.ArrowException) as exc:
                raise SourceError(f"{file}: cannot read ({exc})") from None


TEXT_KINDS: list[type[Source]] = [TextFileSource, JsonlSource, TextParquetSource]
