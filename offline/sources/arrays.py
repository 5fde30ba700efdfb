"""The kinds that are numpy arrays already: an ``.npz`` (its used members read whole) and an
``.npy`` (memory-mapped).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ..cache.ids import content_ids
from ..cache.transfer_set import read_transfer_set
from .base import SampleSpec, Source, SourceBatch, SourceError, SourceOptions, _dtype_can_fit, _select, _shape_text, fit_inputs, fit_shape


class NpzSource(Source):
    """An ``.npz`` transfer set, read whole as ``read_transfer_set`` reads it."""

    kind = "npz"

    @classmethod
    def detect(cls, path: Path) -> bool:
        return path.is_file() and path.suffix.lower() == ".npz"

    def __init__(self, path: Path, spec: SampleSpec, options: SourceOptions) -> None:
        super().__init__(path, spec, options)
        self._column_options_unused()
        arrays = read_transfer_set(path, max_bytes=options.max_npz_mb << 20)
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
