"""Transfer-set sources: every kind of data set a teacher is asked about, read in batches.

``open_source(path, spec)`` asks each kind in ``SOURCE_KINDS``, in order, whether ``path`` is
one of its own (``detect``) and opens it as a ``Source``, whose ``batches(batch_size)`` yield
``SourceBatch``es (ids, inputs laid out and typed as ``SampleSpec`` says, labels with -1 for
unknown) of exactly ``batch_size`` samples, the last one shorter. Nothing reads the whole set:
an image folder is listed and decoded a bounded window ahead, Parquet and Arrow files are read
record batch by record batch, an ``.npy`` is memory-mapped (an ``.npz`` is the exception: numpy
loads its arrays whole, as ``read_transfer_set`` always has).

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
                  (torchvision's ImageFolder: the sorted folder names are classes 0..K-1)

A cache directory (it has ``manifest.json``) is not a source: no kind claims it.

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
exactly as it does for uint8 inputs.

Columns (Parquet and Hugging Face): the input column holds encoded images or arrays of numbers
(lists, nested lists, fixed-size lists; a flat list is reshaped to the input shape, nested lists
keep theirs, which must fit as an array's does: equal up to axes of size 1); the label column
integers (null: -1); the id column strings or integers. Unnamed, the columns are found by the names
``image``/``img``/``pixel_values``, ``label``/``labels`` and ``id``. Without an id column a
sample's id is ``<file>:<row>``: the file's path relative to the source (its name, for one file)
and the row's index within that file.

Bad items (an image that does not decode, a null input, a label outside [0, C)) raise
``SourceError`` naming the file (and row) and the reason under ``on_error="stop"``, or are
recorded in ``Source.skipped`` and left out under ``on_error="skip"``; ``len(source)`` counts
what the listing found (the rows of Parquet's metadata, the image files), so a pass that skips
yields fewer. Inputs whose shape or dtype cannot be made to fit the spec, missing columns and
unusable options always stop. Warnings (images converted, files of other types left out) go to
``warn`` once per source or pass, with a count.

Pillow and pyarrow are imported by the kinds that need them (the ``data`` extra, ``INSTALL_HINT``);
this module imports neither h5py nor torch.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import math
import os
import sys
import threading
import warnings
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from .contract import CacheError
from .ids import content_ids
from .label_names import check_label_names
from .manifest import MANIFEST_NAME
from .transfer_set import read_transfer_set

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
RESIZE_MODES = ("short-side", "stretch")
ON_ERROR = ("stop", "skip")
INPUT_COLUMNS = ("image", "img", "pixel_values")
LABEL_COLUMNS = ("label", "labels")
ID_COLUMNS = ("id",)
INSTALL_HINT = "pip install -e '.[data]' in a checkout (pip install 'kdcache[data]' where kdcache comes from a package index)"
# Pixels an image may decode into: below Pillow's own limit (89.5 MP warns, twice that refuses),
# which lets a 97 KB PNG of 10,000 x 10,000 through to take 100 MB per copy.
DEFAULT_MAX_PIXELS = 40_000_000


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


@dataclass
class SourceBatch:
    ids: list[str]
    inputs: np.ndarray  # [B, *input_shape], input_dtype
    labels: np.ndarray  # [B] int64, -1 = unknown

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


class Source(ABC):
    """A transfer set opened for reading; ``kind`` names it, ``detect`` recognises its paths.

    ``label_names[i]`` names class ``i`` when the source names its classes (an image folder's
    class folders, a Hugging Face ClassLabel), else None. When ``open_source`` is given
    ``label_names`` such a source's labels are mapped through them by name (and
    ``label_names`` is that list); a source whose labels are bare integers keeps them."""

    kind: ClassVar[str]
    path: Path
    label_names: list[str] | None
    skipped: list[tuple[str, str]]

    def __init__(self, path: Path, spec: SampleSpec, options: SourceOptions) -> None:
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
    if len(batches) == 1:
        return batches[0]
    return SourceBatch(
        ids=[i for b in batches for i in b.ids],
        inputs=np.concatenate([b.inputs for b in batches]),
        labels=np.concatenate([b.labels for b in batches]),
    )


def _split(batch: SourceBatch, count: int) -> tuple[SourceBatch, SourceBatch]:
    return (
        SourceBatch(batch.ids[:count], batch.inputs[:count], batch.labels[:count]),
        SourceBatch(batch.ids[count:], batch.inputs[count:], batch.labels[count:]),
    )


def _select(batch: SourceBatch, keep: np.ndarray) -> SourceBatch:
    if keep.all():
        return batch
    return SourceBatch([i for i, k in zip(batch.ids, keep, strict=True) if k], batch.inputs[keep], batch.labels[keep])


# --- fitting arrays to the spec ---------------------------------------------------------------


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


# --- images -----------------------------------------------------------------------------------


def _import_pil() -> Any:
    try:
        from PIL import Image
    except ImportError:
        raise SourceError(f"reading images needs Pillow: {INSTALL_HINT}") from None
    return Image


def _import_pyarrow() -> Any:
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise SourceError(f"reading Parquet and Hugging Face datasets needs pyarrow: {INSTALL_HINT}") from None
    return pyarrow


GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})


class PixelBudget:
    """The pixels being decoded at once by a source's threads, at most ``limit`` (an image alone
    may take it all): N threads on N images near the pixel limit would otherwise hold N of them."""

    def __init__(self, limit: int) -> None:
        self.limit, self.held = limit, 0
        self._changed = threading.Condition()

    @contextlib.contextmanager
    def hold(self, pixels: int) -> Iterator[None]:
        with self._changed:
            self._changed.wait_for(lambda: self.held == 0 or self.held + pixels <= self.limit)
            self.held += pixels
        try:
            yield
        finally:
            with self._changed:
                self.held -= pixels
                self._changed.notify_all()


@dataclass(frozen=True)
class ImageLayout:
    """How a decoded image becomes one sample: channels, height, width, the resize mode, and the
    most pixels an image may decode into (checked from its header, before it is decoded)."""

    channels: int
    height: int
    width: int
    channel_axis: bool
    resize: str
    dtype: np.dtype
    max_pixels: int = DEFAULT_MAX_PIXELS
    budget: PixelBudget = field(default_factory=lambda: PixelBudget(DEFAULT_MAX_PIXELS), compare=False, repr=False)

    @classmethod
    def from_spec(cls, spec: SampleSpec, resize: str, path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageLayout:
        shape = spec.input_shape
        if len(shape) == 2:
            channels, (height, width), axis = 1, shape, False
        elif len(shape) == 3 and shape[0] in (1, 3):
            channels, height, width, axis = shape[0], shape[1], shape[2], True
        else:
            hint = " (channels-last? the teacher takes channels-first)" if len(shape) == 3 and shape[-1] in (1, 3) else ""
            raise SourceError(
                f"{path}: holds images, but the teacher's input shape {_shape_text(shape)} is not (1|3, H, W) or (H, W){hint}"
            )
        dtype = np.dtype(spec.input_dtype)
        if dtype.kind == "b" or (dtype.kind in "iu" and np.iinfo(dtype).max < 255):
            raise SourceError(f"{path}: holds images, but the teacher's input dtype {dtype} cannot hold pixel values 0..255")
        if max_pixels < height * width:
            raise SourceError(f"{path}: max_pixels {max_pixels:,} is below the teacher's own {width}x{height} images")
        if max_pixels <= _import_pil().MAX_IMAGE_PIXELS:
            # Pillow warns (once per process, on stderr) about images past its own limit; this
            # layout refuses them by its lower one, naming each.
            warnings.filterwarnings("ignore", category=_import_pil().DecompressionBombWarning)
        return cls(channels, height, width, axis, resize, dtype, max_pixels, PixelBudget(max_pixels))

    def convert(self, image: Any) -> tuple[np.ndarray, str | None]:
        """The sample, and "gray" or "color" when the image had to change its channels."""
        Image = _import_pil()
        changed = None
        gray = image.mode in GRAY_MODES
        if self.channels == 3:
            changed = "gray" if gray else None
            if image.mode != "RGB":
                image = image.convert("RGB")
        else:
            changed = "color" if not gray and image.mode != "P" else None
            if image.mode != "L":
                image = image.convert("L")
        width, height = image.size
        if self.resize == "stretch":
            if (width, height) != (self.width, self.height):
                image = image.resize((self.width, self.height), Image.BILINEAR)
        else:
            # the smallest scale at which the image covers H x W (sides truncated, as torchvision's
            # Resize does), then torchvision's CenterCrop offsets
            scale = max(self.height / height, self.width / width)
            size = (max(self.width, int(width * scale)), max(self.height, int(height * scale)))
            if size != (width, height):
                image = image.resize(size, Image.BILINEAR)
            left, top = round((size[0] - self.width) / 2), round((size[1] - self.height) / 2)
            if size != (self.width, self.height):
                image = image.crop((left, top, left + self.width, top + self.height))
        pixels = np.asarray(image, dtype=np.uint8)
        if pixels.ndim == 3:
            pixels = pixels.transpose(2, 0, 1)
        elif self.channel_axis:
            pixels = pixels[None]
        return np.ascontiguousarray(pixels, dtype=self.dtype), changed


@dataclass(frozen=True)
class _Decoded:
    sample: np.ndarray | None
    changed: str | None = None
    reason: str | None = None


def _decode(layout: ImageLayout, payload: bytes | Path) -> _Decoded:
    """One image file or encoded image, decoded and converted; a failure is a reason, not an
    exception, so that the consumer can stop at it in file order or skip it. Opening reads only
    the header: a JPEG is then set to decode at the smallest of 1/8, 1/4, 1/2 or full scale that
    still covers the teacher's size (``draft``), and an image that would still decode into more
    than ``layout.max_pixels`` is refused before any of its pixels are."""
    Image = _import_pil()
    try:
        with Image.open(io.BytesIO(payload) if isinstance(payload, bytes) else payload) as image:
            if image.format == "JPEG":
                image.draft(None, (layout.width, layout.height))
            width, height = image.size
            if width * height > layout.max_pixels:
                reason = f"{width}x{height} is {width * height:,} pixels, over the limit of {layout.max_pixels:,} (--max-pixels)"
                return _Decoded(None, reason=reason)
            with layout.budget.hold(width * height):
                image.load()
                sample, changed = layout.convert(image)
        return _Decoded(sample, changed)
    except Image.UnidentifiedImageError:
        return _Decoded(None, reason="not an image Pillow can read")
    except Exception as exc:  # any decoder failure belongs to this one image
        return _Decoded(None, reason=f"cannot decode the image ({type(exc).__name__}: {exc})")


def _ordered_map(function: Callable[[Any], Any], items: Iterable[Any], workers: int, read_ahead: int) -> Iterator[Any]:
    """``function`` over ``items`` in a thread pool (Pillow releases the GIL while it decodes and
    resizes), the results in item order, with at most ``read_ahead`` items submitted and not yet
    taken: memory stays bounded however many items there are."""
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kdcache-source") as pool:
        pending: deque[Future[Any]] = deque()
        try:
            for item in items:
                pending.append(pool.submit(function, item))
                if len(pending) >= read_ahead:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()


class _ImageDecoding:
    """The part of a source that decodes images: the layout, the pool, the per-pass warnings."""

    def _init_images(self: Any) -> None:
        _import_pil()  # missing, it is named when the source opens, not at its first image
        self.layout = ImageLayout.from_spec(self.spec, self.options.resize, self.path, self.options.max_pixels)
        self.workers = self.options.workers or os.cpu_count() or 1

    def _image_chunks(
        self: Any, entries: Iterable[tuple[str, int, str, bytes | Path | _Decoded]], batch_size: int
    ) -> Iterator[SourceBatch]:
        """Batches of ``(id, label, where, payload)`` entries decoded in order, one pool for the
        whole pass: while the caller uses one batch, the next is being decoded, and no more. A
        payload that is a ``_Decoded`` already (a failure found before decoding) is taken as it
        is, in its place, so that bad items stop or are skipped in order."""
        changed = {"gray": 0, "color": 0}
        first: dict[str, str] = {}

        def work(entry: tuple[str, int, str, bytes | Path | _Decoded]) -> tuple[str, int, str, _Decoded]:
            item, label, where, payload = entry
            return item, label, where, payload if isinstance(payload, _Decoded) else _decode(self.layout, payload)

        ids: list[str] = []
        samples: list[np.ndarray] = []
        labels: list[int] = []
        try:
            for item, label, where, decoded in _ordered_map(work, entries, self.workers, max(batch_size, 2 * self.workers)):
                if decoded.sample is None:
                    self._bad(item, where, decoded.reason or "unreadable")
                    continue
                if decoded.changed:
                    changed[decoded.changed] += 1
                    first.setdefault(decoded.changed, item)
                ids.append(item)
                samples.append(decoded.sample)
                labels.append(label)
                if len(ids) == batch_size:
                    yield SourceBatch(ids, np.stack(samples), np.array(labels, dtype=np.int64))
                    ids, samples, labels = [], [], []
            if ids:
                yield SourceBatch(ids, np.stack(samples), np.array(labels, dtype=np.int64))
        finally:
            if changed["gray"]:
                self.options.warn(
                    f"{self.path}: converted {changed['gray']} grayscale image(s) to RGB for the teacher's 3 channels (first: {first['gray']})"
                )
            if changed["color"]:
                self.options.warn(
                    f"{self.path}: converted {changed['color']} colour image(s) to grayscale for the teacher's 1 channel (first: {first['color']})"
                )


# --- the kinds --------------------------------------------------------------------------------


def _is_cache(path: Path) -> bool:
    return (path / MANIFEST_NAME).is_file()


class NpzSource(Source):
    """An ``.npz`` transfer set, read whole as ``read_transfer_set`` reads it."""

    kind = "npz"

    @classmethod
    def detect(cls, path: Path) -> bool:
        return path.is_file() and path.suffix.lower() == ".npz"

    def __init__(self, path: Path, spec: SampleSpec, options: SourceOptions) -> None:
        super().__init__(path, spec, options)
        self._column_options_unused()
        arrays = read_transfer_set(path)
        self.inputs = fit_inputs(arrays["inputs"], spec, str(path))
        n = len(self.inputs)
        self.labels = arrays.get("labels", np.full(n, -1, dtype=np.int64))
        self.ids = [str(i) for i in (arrays["ids"] if "ids" in arrays else content_ids(self.inputs))]

    def __len__(self) -> int:
        return len(self.inputs)

    def _chunks(self, batch_size: int) -> Iterator[SourceBatch]:
        for start in range(0, len(self), batch_size):
            stop = start + batch_size
            ids = self.ids[start:stop]
            keep = self._check_labels(self.labels[start:stop], ids, [f"{self.path}: row {start + i}" for i in range(len(ids))])
            yield _select(SourceBatch(ids, self.inputs[start:stop], self.labels[start:stop]), keep)


class NpySource(Source):
    """An ``.npy`` array [N, *input_shape], memory-mapped: a batch reads only its own rows. Ids
    are content ids (sha256 of each sample's bytes, once fitted to the teacher's dtype)."""

    kind = "npy"

    @classmethod
    def detect(cls, path: Path) -> bool:
        return path.is_file() and path.suffix.lower() == ".npy"

    def __init__(self, path: Path, spec: SampleSpec, options: SourceOptions) -> None:
        super().__init__(path, spec, options)
        self._column_options_unused()
        try:
            self.array = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise SourceError(f"{path}: not a readable .npy file ({exc})") from None
        if self.array.ndim < 2:
            raise SourceError(f"{path}: inputs must be [N, ...], got shape {_shape_text(self.array.shape)}")
        fit_shape(self.array[:0], spec, str(path))
        if not _dtype_can_fit(self.array.dtype, np.dtype(spec.input_dtype)):
            raise SourceError(
                f"{path}: inputs are {self.array.dtype}, the teacher takes {spec.input_dtype} (no conversion keeps their values)"
            )

    def __len__(self) -> int:
        return len(self.array)

    def _chunks(self, batch_size: int) -> Iterator[SourceBatch]:
        for start in range(0, len(self), batch_size):
            rows = np.array(self.array[start : start + batch_size])  # a copy of these rows only
            inputs = fit_inputs(rows, self.spec, f"{self.path}: rows {start}..{start + len(rows) - 1}")
            # content ids, as the service gives samples sent without ids: two files cannot collide
            yield SourceBatch(list(content_ids(inputs)), inputs, np.full(len(rows), -1, dtype=np.int64))


class ImageFolderSource(_ImageDecoding, Source):
    """A directory of images: flat (labels -1), or one sub-folder per class, as torchvision's
    ImageFolder reads it (sorted folder names -> 0..K-1, files found recursively inside each).
    Ids are the files' paths relative to the directory, POSIX style. Files of other types are
    left out (with one warning); hidden files and folders are ignored."""

    kind = "image-folder"

    @classmethod
    def detect(cls, path: Path) -> bool:
        if not path.is_dir() or _is_cache(path):
            return False
        return any(_is_image_file(p) for p in _files_under(path))

    def __init__(self, path: Path, spec: SampleSpec, options: SourceOptions) -> None:
        super().__init__(path, spec, options)
        self._column_options_unused()
        self._init_images()
        listing = _Listing.of(path)
        top_images = [name for name, _ in listing.files if "/" not in name and _is_image_file(Path(name))]
        folders = listing.folders
        if top_images and folders:
            raise SourceError(
                f"{path}: has both images at the top ({top_images[0]}, ...) and sub-folders ({folders[0]}, ...); "
                "use a flat folder (no labels) or one folder per class"
            )
        files: list[tuple[str, int]] = []  # (relative path, label)
        others: list[str] = []
        labels = self._class_labels(folders) if folders else {}
        for relative, file in listing.files:
            folder = relative.split("/")[0] if "/" in relative else None
            if folders and folder is None:
                continue  # beside the class folders: not part of the set
            if not _is_image_file(file):
                others.append(relative)
            elif not _is_text(relative):
                self._bad(_printable(relative), repr(os.fsencode(file)), NOT_UTF8)
            else:
                files.append((relative, labels[folder] if folder is not None else -1))
        listing.warn_left_out(options.warn)
        if others:
            first = _printable(others[0])
            options.warn(f"{path}: left out {len(others)} file(s) that are not {', '.join(IMAGE_SUFFIXES)} (first: {first})")
        if not files:
            raise SourceError(f"{path}: no images ({', '.join(IMAGE_SUFFIXES)}) in it")
        labels = np.array([label for _, label in files], dtype=np.int64)
        names = [relative for relative, _ in files]
        keep = self._check_labels(labels, names, [f"{path / name} (class folder {name.split('/')[0]!r})" for name in names])
        self.files = [entry for entry, kept in zip(files, keep, strict=True) if kept]

    def _class_labels(self, folders: list[str]) -> dict[str, int]:
        untext = [name for name in folders if not _is_text(name)]
        if untext:  # class names are label names, which are text: no skipping a class
            raise SourceError(f"{self.path}: class folder {os.fsencode(untext[0])!r}: the name is not UTF-8, and class names must be text")
        _check_class_names(folders, f"{self.path}: class folders")
        given = self.options.label_names
        if given is None:
            self.label_names = list(folders)
            return {name: index for index, name in enumerate(folders)}
        index = {name: i for i, name in enumerate(given)}
        unknown = [name for name in folders if name not in index]
        if unknown:
            raise SourceError(f"{self.path}: class folder {unknown[0]!r} is not among the label names [{_names_text(given)}]")
        self.label_names = list(given)
        return {name: index[name] for name in folders}

    def __len__(self) -> int:
        return len(self.files)

    def _chunks(self, batch_size: int) -> Iterator[SourceBatch]:
        entries = ((relative, label, str(self.path / relative), self.path / relative) for relative, label in self.files)
        return self._image_chunks(entries, batch_size)


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


def _is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


# --- columns: Parquet and Hugging Face -----------------------------------------------------------


@dataclass
class _Columns:
    """The chosen columns, their Arrow types in the first file, and how the input is read."""

    input: str
    label: str | None
    id: str | None
    encoded: bool  # encoded images (bytes, or HF's Image struct) rather than arrays of numbers
    types: dict[str, Any] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return [name for name in (self.input, self.label, self.id) if name is not None]


class _ColumnarSource(_ImageDecoding, Source):
    """Arrow record batches from one or more files; a subclass lists the files and reads each
    one's schema, row count and record batches."""

    @abstractmethod
    def _files(self) -> list[Path]: ...

    @abstractmethod
    def _schema(self, file: Path) -> Any: ...

    @abstractmethod
    def _file_rows(self, file: Path) -> int: ...

    @abstractmethod
    def _record_batches(self, file: Path, columns: list[str], batch_size: int) -> Iterator[Any]: ...

    def _hf_features(self) -> dict[str, Any] | None:
        """The Hugging Face ``features`` the files were written with, if they say."""
        return None

    def __init__(self, path: Path, spec: SampleSpec, options: SourceOptions) -> None:
        super().__init__(path, spec, options)
        self.pa = _import_pyarrow()
        self.files = self._files()
        if not self.files:
            raise SourceError(f"{path}: no data files in it")
        self.columns = self._choose_columns(self._schema(self.files[0]), self.files[0])
        if self.columns.encoded:
            self._init_images()
        self.rows = [self._file_rows(file) for file in self.files]
        self._label_map = self._hf_label_names()

    def _file_label(self, file: Path) -> str:
        return file.name if file == self.path else file.relative_to(self.path).as_posix()

    def _choose_columns(self, schema: Any, file: Path) -> _Columns:
        pa = self.pa
        names = list(schema.names)
        available = ", ".join(names) or "none"

        def pick(given: str | None, defaults: Sequence[str], what: str, required: bool) -> str | None:
            if given is not None:
                if given not in names:
                    raise SourceError(f"{file}: has no {what} column {given!r} (columns: {available})")
                return given
            found = next((name for name in defaults if name in names), None)
            if found is None and required:
                raise SourceError(f"{file}: no {what} column named {' or '.join(defaults)} (columns: {available}); name it ({what}_column)")
            return found

        o = self.options
        input_name = pick(o.input_column, INPUT_COLUMNS, "input", True)
        label_name = pick(o.label_column, LABEL_COLUMNS, "label", False)
        id_name = pick(o.id_column, ID_COLUMNS, "id", False)
        assert input_name is not None
        types = {name: schema.field(name).type for name in (input_name, label_name, id_name) if name is not None}
        input_type = _storage_type(types[input_name])
        if _is_binary(pa, input_type) or (pa.types.is_struct(input_type) and input_type.get_field_index("bytes") >= 0):
            encoded = True
        elif _is_list(pa, input_type):
            encoded = False
        else:
            raise SourceError(
                f"{file}: input column {input_name!r} is {input_type}; expected encoded images (bytes, or a struct with 'bytes') or arrays of numbers"
            )
        if label_name is not None and not pa.types.is_integer(_storage_type(types[label_name])):
            raise SourceError(f"{file}: label column {label_name!r} is {types[label_name]}; expected integers (-1 or null: unknown)")
        if id_name is not None:
            id_type = _storage_type(types[id_name])
            if not (pa.types.is_integer(id_type) or pa.types.is_string(id_type) or pa.types.is_large_string(id_type)):
                raise SourceError(f"{file}: id column {id_name!r} is {id_type}; expected strings or integers")
        return _Columns(input_name, label_name, id_name, encoded, types)

    def _check_file(self, file: Path) -> None:
        """Every file must hold the chosen columns with the first file's types."""
        schema = self._schema(file)
        names = list(schema.names)
        for name, expected in self.columns.types.items():
            if name not in names:
                raise SourceError(f"{file}: has no column {name!r} (columns: {', '.join(names) or 'none'})")
            if schema.field(name).type != expected:
                raise SourceError(f"{file}: column {name!r} is {schema.field(name).type}, but {expected} in {self.files[0]}")

    def _hf_label_names(self) -> np.ndarray | None:
        """The label column's ClassLabel names become ``label_names``, or are mapped through the
        caller's names: then the returned array maps own class indices to the caller's."""
        features = self._hf_features() or {}
        feature = features.get(self.columns.label) if self.columns.label else None
        if not isinstance(feature, dict) or feature.get("_type") != "ClassLabel" or not isinstance(feature.get("names"), list):
            return None
        own = _check_class_names(feature["names"], f"{self.path}: ClassLabel names of label column {self.columns.label!r}")
        given = self.options.label_names
        if given is None:
            self.label_names = own
            return None
        index = {name: i for i, name in enumerate(given)}
        unknown = [name for name in own if name not in index]
        if unknown:
            raise SourceError(
                f"{self.path}: class {unknown[0]!r} of label column {self.columns.label!r} is not among the label names [{_names_text(given)}]"
            )
        self.label_names = list(given)
        return np.array([index[name] for name in own], dtype=np.int64)

    def __len__(self) -> int:
        return sum(self.rows)

    def _rows(self, batch_size: int) -> Iterator[tuple[Path, int, Any, list[str], np.ndarray, np.ndarray]]:
        """Each record batch with its file, first row, ids, labels and the rows to keep."""
        for file in self.files:
            self._check_file(file)
            first_row = 0
            for record_batch in self._record_batches(file, self.columns.names, batch_size):
                n = record_batch.num_rows
                rows = range(first_row, first_row + n)
                ids = self._ids(file, rows, record_batch)
                labels = self._labels(record_batch)
                keep = self._check_labels(labels, ids, [f"{file}: row {r}" for r in rows])
                yield file, first_row, record_batch, ids, labels, keep
                first_row += n

    def _ids(self, file: Path, rows: range, record_batch: Any) -> list[str]:
        if self.columns.id is None:
            label = self._file_label(file)
            return [f"{label}:{r}" for r in rows]
        ids = []
        for r, value in zip(rows, record_batch.column(self.columns.id).to_pylist(), strict=True):
            if value is None or value == "":
                raise SourceError(f"{file}: row {r}: id column {self.columns.id!r} is empty")
            ids.append(str(value))
        return ids

    def _labels(self, record_batch: Any) -> np.ndarray:
        if self.columns.label is None:
            return np.full(record_batch.num_rows, -1, dtype=np.int64)
        import pyarrow.compute as pc

        column = _storage(self.pa, record_batch.column(self.columns.label))
        labels = pc.fill_null(column, -1).to_numpy(zero_copy_only=False).astype(np.int64)
        if self._label_map is not None:
            mapped = (labels >= 0) & (labels < len(self._label_map))
            labels = np.where(mapped, self._label_map[np.clip(labels, 0, len(self._label_map) - 1)], labels)
        return labels

    def _chunks(self, batch_size: int) -> Iterator[SourceBatch]:
        if self.columns.encoded:
            return self._image_chunks(self._image_entries(batch_size), batch_size)
        return self._array_chunks(batch_size)

    def _array_chunks(self, batch_size: int) -> Iterator[SourceBatch]:
        name = self.columns.input
        for file, first_row, record_batch, ids, labels, keep in self._rows(batch_size):
            where = f"{file}: column {name!r}"
            inputs, filled = _list_values(self.pa, _storage(self.pa, record_batch.column(name)), self.spec, where, first_row)
            for r in np.flatnonzero(~filled & keep):
                self._bad(ids[r], f"{file}: row {first_row + r}", f"input column {name!r} is null")
            yield _select(SourceBatch(ids, fit_inputs(inputs, self.spec, where), labels), keep & filled)

    def _image_entries(self, batch_size: int) -> Iterator[tuple[str, int, str, bytes | Path | _Decoded]]:
        pa, name = self.pa, self.columns.input
        for file, first_row, record_batch, ids, labels, keep in self._rows(batch_size):
            column = _storage(pa, record_batch.column(name))
            if pa.types.is_struct(column.type):
                payloads = column.field("bytes").to_pylist()
                has_path = column.type.get_field_index("path") >= 0
                paths = column.field("path").to_pylist() if has_path else [None] * len(payloads)
            else:
                payloads, paths = column.to_pylist(), [None] * len(column)
            for r in np.flatnonzero(keep):
                where = f"{file}: row {first_row + r}"
                payload = payloads[r]
                if payload is None and paths[r]:  # an HF Image that refers to a file
                    payload = file.parent / paths[r]  # an absolute path stays itself
                if payload is None:
                    payload = _Decoded(None, reason=f"input column {name!r} is null")
                yield ids[r], int(labels[r]), where, payload


def _check_class_names(names: list[Any], where: str) -> list[str]:
    """A source's own class names, checked as the cache's label names are (label_names.py): a
    name that repeats would map two classes to one label."""
    try:
        return check_label_names(names, None, where)
    except CacheError as exc:
        raise SourceError(str(exc)) from None


def _names_text(names: Sequence[str]) -> str:
    return ", ".join(repr(n) for n in names[:20]) + (", ..." if len(names) > 20 else "")


def _storage_type(arrow_type: Any) -> Any:
    """An extension type's storage (e.g. HF's Array2D, Arrow's fixed_shape_tensor), else the type."""
    return getattr(arrow_type, "storage_type", arrow_type)


def _storage(pa: Any, array: Any) -> Any:
    return array.storage if isinstance(array, pa.ExtensionArray) else array


def _is_binary(pa: Any, arrow_type: Any) -> bool:
    view = getattr(pa.types, "is_binary_view", lambda t: False)
    return pa.types.is_binary(arrow_type) or pa.types.is_large_binary(arrow_type) or view(arrow_type)


def _is_list(pa: Any, arrow_type: Any) -> bool:
    return pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type) or pa.types.is_fixed_size_list(arrow_type)


def _list_values(pa: Any, column: Any, spec: SampleSpec, where: str, first_row: int) -> tuple[np.ndarray, np.ndarray]:
    """A column of (nested) lists of numbers as [N, ...], and which rows are not null. A flat list
    is reshaped to the input shape when it holds the right count of numbers. Nested lists keep
    their shape, which must fit the spec as an array's would (``fit_shape``): every list of a
    level, in every row, has the same length (inner lists that only add up to the right count
    are refused). Sizes are read from the Arrow offsets before any number is converted. Null
    rows come back as zeros."""
    n = len(column)
    filled = np.asarray(column.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
    bounds = np.arange(n + 1, dtype=np.int64)  # row r spans [bounds[r], bounds[r + 1]) of the current level
    sizes: list[int] = []  # the length of every list at each level
    depth, inner = 0, column.type
    while _is_list(pa, _storage_type(inner)):
        depth, inner = depth + 1, _storage_type(inner).value_type
    values = column
    while _is_list(pa, values.type):
        if pa.types.is_fixed_size_list(values.type):
            size = values.type.list_size
            bounds = bounds * size
            values = values.values.slice(values.offset * size, len(values) * size)
        else:
            offsets = values.offsets.to_numpy().astype(np.int64)  # of this (possibly sliced) array
            lengths = np.diff(offsets)
            # the lists of this level that belong to rows that are not null
            owned = np.repeat(filled, np.diff(bounds)) if sizes else filled
            size = int(lengths[owned][0]) if owned.any() else 0
            if depth > 1:
                uneven = np.flatnonzero(owned & (lengths != size))
                if len(uneven):
                    row = int(np.searchsorted(bounds, uneven[0], side="right") - 1)
                    raise SourceError(
                        f"{where}: row {first_row + row} holds nested lists of uneven lengths ({int(lengths[uneven[0]])} where "
                        f"the first holds {size}); nested lists must have the teacher's input shape {_shape_text(spec.input_shape)}"
                    )
            bounds = offsets[bounds] - offsets[0]
            values = values.values.slice(int(offsets[0]), int(offsets[-1] - offsets[0]))
        sizes.append(size)
        values = _storage(pa, values)
    if not (pa.types.is_integer(values.type) or pa.types.is_floating(values.type) or pa.types.is_boolean(values.type)):
        raise SourceError(f"{where}: holds lists of {values.type}, expected numbers")
    need = math.prod(spec.input_shape)
    counts = np.diff(bounds)
    wrong = np.flatnonzero(filled & (counts != need))
    if len(wrong):
        row = int(wrong[0])
        raise SourceError(
            f"{where}: row {first_row + row} holds {int(counts[row])} numbers, the teacher's input shape {_shape_text(spec.input_shape)} needs {need}"
        )
    if values.null_count:
        raise SourceError(f"{where}: holds null numbers inside its arrays")
    nested = depth > 1 and filled.any()
    if nested:
        fit_shape(np.empty((0, *sizes)), spec, where)  # the nested shape, before any number is converted
    flat = values.to_numpy(zero_copy_only=False)
    rows = np.zeros((n, need), dtype=flat.dtype)
    starts = bounds[:-1][filled]
    rows[filled] = flat[starts[:, None] + np.arange(need)]
    if nested:
        return fit_shape(rows.reshape(n, *sizes), spec, where), filled
    return rows.reshape(n, *spec.input_shape), filled


class ParquetSource(_ColumnarSource):
    """A ``.parquet`` file, or a directory of them (recursively, sorted by path), read with
    pyarrow one record batch at a time. Hugging Face's ``huggingface`` schema metadata (written
    by ``Dataset.to_parquet``) names ClassLabel classes."""

    kind = "parquet"

    @classmethod
    def detect(cls, path: Path) -> bool:
        if path.is_file():
            return path.suffix.lower() == ".parquet"
        return path.is_dir() and not _is_cache(path) and any(p.suffix.lower() == ".parquet" for p in _files_under(path, True))

    def _files(self) -> list[Path]:
        """The folder's ``.parquet`` files, links followed (a Hugging Face hub snapshot links
        each to a blob beside it) but each folder entered and each file read once."""
        if self.path.is_file():
            return [self.path]
        listing = _Listing.of(self.path, follow_links=True)
        listing.warn_left_out(self.options.warn)
        files = []
        for relative, path in listing.files:
            if path.suffix.lower() != ".parquet":
                continue
            if _is_text(relative):
                files.append(path)
            else:
                self._bad(_printable(relative), repr(os.fsencode(path)), f"{NOT_UTF8} (its rows are left out)")
        return files

    def _metadata(self, file: Path) -> Any:
        try:
            return self.pa.parquet.read_metadata(file)
        except (OSError, self.pa.ArrowException) as exc:
            raise SourceError(f"{file}: not a readable Parquet file ({exc})") from None

    def _schema(self, file: Path) -> Any:
        return self._metadata(file).schema.to_arrow_schema()

    def _file_rows(self, file: Path) -> int:
        return self._metadata(file).num_rows

    def _check_row_groups(self, file: Path) -> None:
        """Refuse, before pyarrow decodes any of it, a row group whose input column holds more
        numbers than its rows can: run-length encoding fits 100 million zeros in one row of a
        654-byte file, which pyarrow would decode whole (with two 16-bit levels per number) only
        for the row's count to be refused after. The counts come from the file's metadata; each
        row's own count is checked again from the decoded offsets (``_list_values``)."""
        if self.columns.encoded:
            return
        metadata, name = self._metadata(file), self.columns.input
        need = max(1, math.prod(self.spec.input_shape))
        paths = [metadata.schema.column(i).path for i in range(metadata.num_columns)]
        leaves = [i for i, path in enumerate(paths) if path == name or path.startswith(f"{name}.")]
        for index in range(metadata.num_row_groups):
            group = metadata.row_group(index)
            for leaf in leaves:
                numbers = group.column(leaf).num_values
                if numbers > group.num_rows * need:
                    raise SourceError(
                        f"{file}: row group {index} holds {numbers:,} numbers in input column {name!r} for {group.num_rows:,} row(s); "
                        f"the teacher's input shape {_shape_text(self.spec.input_shape)} takes {need:,} a row (refused before reading it)"
                    )

    def _record_batches(self, file: Path, columns: list[str], batch_size: int) -> Iterator[Any]:
        self._check_row_groups(file)
        try:
            with self.pa.parquet.ParquetFile(file) as parquet:
                yield from parquet.iter_batches(batch_size=batch_size, columns=columns)
        except (OSError, self.pa.ArrowException) as exc:
            raise SourceError(f"{file}: cannot read ({exc})") from None

    def _hf_features(self) -> dict[str, Any] | None:
        metadata = self._schema(self.files[0]).metadata or {}
        raw = metadata.get(b"huggingface")
        try:
            return json.loads(raw)["info"]["features"] if raw else None
        except (ValueError, KeyError, TypeError):
            return None


class HFDatasetSource(_ColumnarSource):
    """A directory written by ``datasets.Dataset.save_to_disk``: the Arrow stream files that
    ``state.json`` lists, memory-mapped and read record batch by record batch."""

    kind = "hf-dataset"

    @classmethod
    def detect(cls, path: Path) -> bool:
        return path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file())

    def __init__(self, path: Path, spec: SampleSpec, options: SourceOptions) -> None:
        if (path / "dataset_dict.json").is_file():
            splits = sorted(p.name for p in path.iterdir() if (p / "state.json").is_file())
            example = f", e.g. {path / splits[0]}" if splits else ""
            raise SourceError(f"{path}: a DatasetDict with splits {', '.join(splits) or 'none'}; pass one split's folder{example}")
        super().__init__(path, spec, options)

    def _files(self) -> list[Path]:
        state_path = self.path / "state.json"
        try:
            state = json.loads(state_path.read_text())
            names = [str(entry["filename"]) for entry in state["_data_files"]]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise SourceError(f"{state_path}: not a datasets state file ({type(exc).__name__}: {exc})") from None
        outside = [name for name in names if Path(name).is_absolute() or ".." in Path(name).parts]
        if outside:  # save_to_disk names files beside state.json; the file is data, not a path to follow
            raise SourceError(f"{state_path}: data file {outside[0]!r} lies outside {self.path}")
        return [self.path / name for name in names]

    def _read_arrow(self, file: Path) -> Iterator[Any]:
        """The schema, then every record batch of one Arrow file (stream format, as ``datasets``
        writes it, or the random-access file format), memory-mapped: batches are zero-copy."""
        pa = self.pa
        try:
            with pa.memory_map(str(file)) as mapped:
                try:
                    reader = pa.ipc.open_stream(mapped)
                    yield reader.schema
                    yield from reader
                except pa.ArrowInvalid:
                    mapped.seek(0)
                    file_reader = pa.ipc.open_file(mapped)
                    yield file_reader.schema
                    yield from (file_reader.get_batch(i) for i in range(file_reader.num_record_batches))
        except (OSError, pa.ArrowException) as exc:
            raise SourceError(f"{file}: not a readable Arrow file ({exc})") from None

    def _schema(self, file: Path) -> Any:
        reader = self._read_arrow(file)
        try:
            return next(reader)
        finally:
            reader.close()

    def _file_rows(self, file: Path) -> int:
        # zero-copy batches: counting reads the batch headers, not the data
        return sum(batch.num_rows for batch in itertools.islice(self._read_arrow(file), 1, None))

    def _record_batches(self, file: Path, columns: list[str], batch_size: int) -> Iterator[Any]:
        for batch in itertools.islice(self._read_arrow(file), 1, None):
            selected = batch.select(columns)
            for start in range(0, selected.num_rows, batch_size):
                yield selected.slice(start, batch_size)

    def _hf_features(self) -> dict[str, Any] | None:
        info_path = self.path / "dataset_info.json"
        try:
            return json.loads(info_path.read_text()).get("features") if info_path.is_file() else None
        except (OSError, ValueError, AttributeError):
            return None


# Asked in this order: the first kind whose detect() says yes opens the path.
SOURCE_KINDS: list[type[Source]] = [NpzSource, NpySource, HFDatasetSource, ParquetSource, ImageFolderSource]


def detect_kind(path: str | os.PathLike[str]) -> type[Source] | None:
    """The kind that would open ``path``, or None (a cache directory is never a source)."""
    path = Path(path)
    if path.is_dir() and _is_cache(path):
        return None
    return next((kind for kind in SOURCE_KINDS if kind.detect(path)), None)


def open_source(
    path: str | os.PathLike[str],
    spec: SampleSpec,
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
) -> Source:
    """Open the transfer set at ``path`` as the first kind in ``SOURCE_KINDS`` that detects it.

    ``resize``: ``"short-side"`` or ``"stretch"`` (images). ``input_column``, ``label_column``,
    ``id_column``: Parquet and Hugging Face columns (defaults: the module docstring); given for
    another kind they are an error. ``on_error``: ``"stop"`` or ``"skip"`` bad items.
    ``workers``: image-decoding threads (default: the CPU count). ``warn`` receives each warning
    (default: printed to stderr). ``label_names``: the class names labels must index (e.g. those a
    cache recorded); sources that name their classes are mapped through them. ``max_pixels``:
    the most pixels an image may decode into (a JPEG at the reduced scale it is decoded at);
    checked from the header, a larger image is a bad item.
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
    if not path.exists():
        raise SourceError(f"{path}: no such file or directory")
    if path.is_dir() and _is_cache(path):
        raise SourceError(f"{path}: a cache directory (it has {MANIFEST_NAME}), not a transfer set")
    kind = detect_kind(path)
    if kind is None:
        kinds = ", ".join(k.kind for k in SOURCE_KINDS)
        raise SourceError(
            f"{path}: not a transfer set this can read ({kinds}): an .npz, .npy or .parquet file, or a folder of images, Parquet files or a saved Hugging Face dataset"
        )
    options = SourceOptions(
        resize=resize, input_column=input_column, label_column=label_column, id_column=id_column, on_error=on_error,
        workers=workers, warn=warn, label_names=None if label_names is None else tuple(str(n) for n in label_names),
        max_pixels=max_pixels,
    )  # fmt: skip
    return kind(path, spec, options)


__all__ = [
    "IMAGE_SUFFIXES", "SOURCE_KINDS", "HFDatasetSource", "ImageFolderSource", "ImageLayout", "NpySource", "NpzSource", "ParquetSource",
    "SampleSpec", "Source", "SourceBatch", "SourceError", "SourceOptions", "detect_kind", "fit_inputs", "fit_shape", "open_source",
]  # fmt: skip
