"""Transfer-set sources: every kind of data set a teacher is asked about, read in batches.

``open_source(path, spec)`` asks each kind in ``SOURCE_KINDS``, in order, whether ``path`` is
one of its own (``detect``) and opens it as a ``Source``, whose ``batches(batch_size)`` yield
``SourceBatch``es (ids, inputs laid out and typed as ``SampleSpec`` says, labels with -1 for
unknown) of exactly ``batch_size`` samples, the last one shorter. Nothing reads the whole set:
an image folder is listed and decoded a bounded window ahead, Parquet and Arrow files are read
record batch by record batch, an ``.npy`` is memory-mapped (an ``.npz`` is the exception: the
members it uses are read whole, as ``read_transfer_set`` always has, and the others not at all).

The kinds, in the order they are asked:

    npz           an ``.npz`` with ``inputs``, optional ``labels`` and ``ids`` (``read_transfer_set``);
                  without ids, a sample's id is the sha256 of its input bytes (``content_ids``),
                  the id the service gives a sample sent without one
    npy           an ``.npy`` array [N, *input_shape], memory-mapped; no labels; a sample's id is the
                  sha256 of its input bytes once fitted to the spec (``content_ids``), as for an npz
    hf-dataset    a Hugging Face ``datasets`` directory written by ``save_to_disk`` (``state.json``
                  lists its Arrow stream files); read with pyarrow, ``datasets`` is not needed;
                  ClassLabel names in ``dataset_info.json`` become ``label_names``
    parquet       a ``.parquet`` file, or a directory holding ``.parquet`` files (searched recursively)
    image-folder  a directory of JPEG/PNG/WebP images: flat (no labels) or one sub-folder per class
                  (torchvision's ImageFolder: the sorted folder names are classes 0..K-1);
                  symbolic links are never followed (so none leads out of the folder or round in
                  a loop) and each real file is listed once

A cache directory (it has ``manifest.json``) is not a source: no kind claims it.

For a language-model teacher the spec is a ``TokenSpec`` (its ``seq_len`` L and ``vocab_size``
V) and the kinds are the token kinds, asked in this order (``TOKEN_KINDS``):

    token-npz     an ``.npz`` with ``input_ids`` [N, L'] (integers, L' <= L), optional ``lengths``
                  [N] (1..L'; without them every row is L' tokens) and ``ids`` (``tokens``)
    text          a ``.txt`` file, one document (``text``)
    jsonl         a ``.jsonl`` file, one object a line, its ``text_column`` (default ``text``)
    text-parquet  a ``.parquet`` file or folder with the string column ``text_column``

Text is tokenized with ``tokenizer`` (a Hugging Face tokenizer directory; the ``lm`` extra) and
packed into sequences of ``seq_len`` tokens (default: L). A token source's batches are
``input_ids`` as wide as their longest sequence (0 beyond each length), with ``lengths`` where a
row is shorter; its ids are ``ids`` or the sha256 of each sequence's tokens; tokens outside
[0, V) are refused before any batch (a tokenizer with more than V tokens, when it opens).

Images (files, or encoded bytes in a column: Hugging Face's Image feature is a struct of
``bytes`` and ``path``) are decoded with Pillow, converted to the teacher's channels (1: "L",
3: "RGB"; grayscale for a 3-channel teacher and colour for a 1-channel one are converted with one
warning per pass), resized (``"short-side"``: the image scaled, keeping its aspect ratio, until it
covers H×W, sides truncated to integers, then center-cropped, as torchvision's Resize +
CenterCrop do; ``"stretch"``: straight
to H×W; both bilinear with Pillow's antialiasing), laid out channels-first as the input shape says
((C, H, W); a 2-dim shape (H, W) is one channel without a channel axis), and given the teacher's
input dtype holding the pixel values 0..255 as they are: a float dtype gets 0.0..255.0, not
0..1. The teacher's preprocessing (``teacher-serve --input-scale/--normalize``) does the rest,
exactly as it does for uint8 inputs. An image may decode into at most ``max_pixels`` pixels
(``DEFAULT_MAX_PIXELS``, below Pillow's own limit), read from its header before any pixel is
decoded (a JPEG is decoded at the smallest scale that covers H×W, and counted at it); the
decoding threads share a budget of that many pixels.

Columns (Parquet and Hugging Face): the input column holds encoded images or arrays of numbers
(lists, nested lists, fixed-size lists; a flat list is reshaped to the input shape, nested lists
keep theirs, which must be the same in every row and fit as an array's does: equal up to axes
of size 1); the label column
integers (null: -1); the id column strings or integers. Unnamed, the columns are found by the names
``image``/``img``/``pixel_values``, ``label``/``labels`` and ``id``. Without an id column a
sample's id is ``<file>:<row>``: the file's path relative to the source (its name, for one file)
and the row's index within that file.

Bad items (an image that does not decode or has too many pixels, a null input, a label outside
[0, C), a file whose name is not UTF-8, named by its bytes) raise
``SourceError`` naming the file (and row) and the reason under ``on_error="stop"``, or are
recorded in ``Source.skipped`` and left out under ``on_error="skip"``; ``len(source)`` counts
what the listing found (the rows of Parquet's metadata, the image files), so a pass that skips
yields fewer. Inputs whose shape or dtype cannot be made to fit the spec, missing columns and
unusable options always stop, and so does a Parquet row group whose input column holds more than
twice the numbers its rows can (refused from the file's metadata, before pyarrow decodes it).
Warnings (images converted, files of other types and links left out) go to
``warn`` once per source or pass, with a count.

Pillow and pyarrow are imported by the kinds that need them (the ``data`` extra, ``INSTALL_HINT``);
this package imports neither h5py nor torch.

The package, one module a job: ``base`` (the spec, options, ``Source``, fitting arrays),
``listing`` (folders: links, loops, names that are not UTF-8), ``images`` (decoding under a pixel
limit; the image-folder kind), ``columns`` (Arrow columns, nested lists), ``tables`` (Parquet,
Hugging Face), ``arrays`` (npz, npy), ``tokens`` (token sequences; the token npz), ``text``
(tokenizing and packing text).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

from ..cache.manifest import MANIFEST_NAME
from ..cache.transfer_set import DEFAULT_MAX_NPZ_MB
from .arrays import NpySource, NpzSource
from .base import (
    DEFAULT_MAX_PIXELS,
    INSTALL_HINT,
    ON_ERROR,
    RESIZE_MODES,
    SampleSpec,
    Source,
    SourceBatch,
    SourceError,
    SourceOptions,
    TokenSpec,
    _is_cache,
    _warn_stderr,
    fit_inputs,
    fit_shape,
)
from .images import IMAGE_SUFFIXES, ImageFolderSource, ImageLayout, PixelBudget
from .tables import HFDatasetSource, ParquetSource
from .text import LM_INSTALL_HINT, TextSource, load_tokenizer
from .text import TEXT_KINDS as _TEXT_KINDS
from .tokens import TokenNpzSource, TokenSource, is_token_npz, sequence_ids

# Asked in this order: the first kind whose detect() says yes opens the path.
SOURCE_KINDS: list[type[Source]] = [NpzSource, NpySource, HFDatasetSource, ParquetSource, ImageFolderSource]
TOKEN_KINDS: list[type[Source]] = [TokenNpzSource, *_TEXT_KINDS]  # for a TokenSpec
TEXT_OPTIONS = ("text_column", "tokenizer", "seq_len")


def detect_kind(path: str | os.PathLike[str], spec: SampleSpec | TokenSpec | None = None) -> type[Source] | None:
    """The kind that would open ``path`` for ``spec`` (a ``TokenSpec``: the token kinds), or
    None (a cache directory is never a source)."""
    path = Path(path)
    if path.is_dir() and _is_cache(path):
        return None
    kinds = TOKEN_KINDS if isinstance(spec, TokenSpec) else SOURCE_KINDS
    return next((kind for kind in kinds if kind.detect(path)), None)


def open_source(
    path: str | os.PathLike[str],
    spec: SampleSpec | TokenSpec,
    *,
    resize: str = "short-side",
    input_column: str | None = None,
    label_column: str | None = None,
    id_column: str | None = None,
    on_error: str = "stop",
    workers: int | None = None,
    warn: Callable[[str], None] = _warn_stderr,
    label_names: Sequence[str] | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_npz_mb: int = DEFAULT_MAX_NPZ_MB,
    text_column: str | None = None,
    tokenizer: str | os.PathLike[str] | None = None,
    seq_len: int | None = None,
) -> Source:
    """Open the transfer set at ``path`` as the first kind in ``SOURCE_KINDS`` that detects it.

    ``resize``: ``"short-side"`` or ``"stretch"`` (images). ``input_column``, ``label_column``,
    ``id_column``: Parquet and Hugging Face columns (defaults: the module docstring); given for
    another kind they are an error. ``on_error``: ``"stop"`` or ``"skip"`` bad items.
    ``workers``: image-decoding threads (default: the CPU count). ``warn`` receives each warning
    (default: printed to stderr). ``label_names``: the class names labels must index (e.g. those a
    cache recorded); sources that name their classes are mapped through them. ``max_pixels``:
    the most pixels an image may decode into (a JPEG at the reduced scale it is decoded at);
    checked from the header, a larger image is a bad item. ``max_npz_mb``: the most MiB an
    ``.npz`` member may take (it is read whole). ``text_column``, ``tokenizer``, ``seq_len``:
    text, for a ``TokenSpec`` only (the module docstring).
    """
    path = Path(path)
    if resize not in RESIZE_MODES:
        raise SourceError(f"resize must be one of {', '.join(RESIZE_MODES)}, got {resize!r}")
    if on_error not in ON_ERROR:
        raise SourceError(f"on_error must be one of {', '.join(ON_ERROR)}, got {on_error!r}")
    if workers is not None and workers < 1:
        raise SourceError(f"workers must be at least 1, got {workers}")
    if max_pixels < 1:
        raise SourceError(f"max_pixels must be at least 1, got {max_pixels}")
    if seq_len is not None and seq_len < 1:
        raise SourceError(f"seq_len must be at least 1, got {seq_len}")
    tokens = isinstance(spec, TokenSpec)
    text = {"text_column": text_column, "tokenizer": tokenizer, "seq_len": seq_len}
    if not tokens and any(value is not None for value in text.values()):
        given = ", ".join(f"{name}={value!r}" for name, value in text.items() if value is not None)
        raise SourceError(f"{path}: {given} applies to text for a language-model teacher, not to a teacher of fixed-shape inputs")
    if not path.exists():
        raise SourceError(f"{path}: no such file or directory")
    if path.is_dir() and _is_cache(path):
        raise SourceError(f"{path}: a cache directory (it has {MANIFEST_NAME}), not a transfer set")
    kind = detect_kind(path, spec)
    if kind is None:
        kinds = ", ".join(k.kind for k in (TOKEN_KINDS if tokens else SOURCE_KINDS))
        what = (
            "an .npz of input_ids, or a .txt, .jsonl or .parquet file (or a folder of Parquet files) of text"
            if tokens
            else "an .npz, .npy or .parquet file, or a folder of images, Parquet files or a saved Hugging Face dataset"
        )
        raise SourceError(f"{path}: not a transfer set this can read ({kinds}): {what}")
    options = SourceOptions(
        resize=resize, input_column=input_column, label_column=label_column, id_column=id_column, on_error=on_error,
        workers=workers, warn=warn, label_names=None if label_names is None else tuple(str(n) for n in label_names),
        max_pixels=max_pixels, max_npz_mb=max_npz_mb, text_column=text_column,
        tokenizer=None if tokenizer is None else str(tokenizer), seq_len=seq_len,
    )  # fmt: skip
    return kind(path, spec, options)


__all__ = [
    "DEFAULT_MAX_PIXELS", "IMAGE_SUFFIXES", "INSTALL_HINT", "LM_INSTALL_HINT", "ON_ERROR", "RESIZE_MODES", "SOURCE_KINDS",
    "TEXT_OPTIONS", "TOKEN_KINDS", "HFDatasetSource", "ImageFolderSource", "ImageLayout", "NpySource", "NpzSource",
    "ParquetSource", "PixelBudget", "SampleSpec", "Source", "SourceBatch", "SourceError", "SourceOptions", "TextSource",
    "TokenNpzSource", "TokenSource", "TokenSpec", "detect_kind", "fit_inputs", "fit_shape", "is_token_npz", "load_tokenizer",
    "open_source", "sequence_ids",
]  # fmt: skip
