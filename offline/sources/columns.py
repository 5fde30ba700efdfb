"""Columns of Arrow record batches (Parquet and Hugging Face datasets): choosing the input, label
and id columns, reading labels and ids, and turning a column of (nested) lists into arrays.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .base import (
    INSTALL_HINT,
    SampleSpec,
    Source,
    SourceBatch,
    SourceError,
    SourceOptions,
    _check_class_names,
    _names_text,
    _select,
    _shape_text,
    fit_inputs,
    fit_shape,
)
from .images import _Decoded, _ImageDecoding

INPUT_COLUMNS = ("image", "img", "pixel_values")
LABEL_COLUMNS = ("label", "labels")
ID_COLUMNS = ("id",)


def _import_pyarrow() -> Any:
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise SourceError(f"reading Parquet and Hugging Face datasets needs pyarrow: {INSTALL_HINT}") from None
    return pyarrow


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
