"""Images: decoding with Pillow under a pixel limit, and the image-folder kind."""

from __future__ import annotations

import contextlib
import io
import os
import threading
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .base import (
    DEFAULT_MAX_PIXELS,
    INSTALL_HINT,
    SampleSpec,
    Source,
    SourceBatch,
    SourceError,
    SourceOptions,
    _check_class_names,
    _is_cache,
    _names_text,
    _shape_text,
)
from .listing import NOT_UTF8, _files_under, _is_text, _Listing, _printable

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


def _import_pil() -> Any:
    try:
        from PIL import Image
    except ImportError:
        raise SourceError(f"reading images needs Pillow: {INSTALL_HINT}") from None
    return Image


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


def _is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")
