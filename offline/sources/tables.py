"""The kinds read as Arrow record batches: Parquet files and saved Hugging Face datasets."""

from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .base import SampleSpec, SourceError, SourceOptions, _is_cache, _shape_text
from .columns import _ColumnarSource
from .listing import NOT_UTF8, _files_under, _is_text, _Listing, _printable


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
        row's own count is checked from the decoded offsets (``_list_values``)."""
        if self.columns.encoded:
            return
        metadata, name = self._metadata(file), self.columns.input
        need = max(1, math.prod(self.spec.input_shape))
        paths = [metadata.schema.column(i).path for i in range(metadata.num_columns)]
        leaves = [i for i, path in enumerate(paths) if path == name or path.startswith(f"{name}.")]
        for index in range(metadata.num_row_groups):
            group = metadata.row_group(index)
            for leaf in leaves:
                # every number, null and empty list is one value; twice the need leaves room for a
                # row whose own count _list_values then names
                values = group.column(leaf).num_values
                if values > 2 * need * group.num_rows:
                    raise SourceError(
                        f"{file}: row group {index} holds {values:,} values in input column {name!r} for {group.num_rows:,} row(s), "
                        f"more than twice the {need:,} a row of the teacher's input shape {_shape_text(self.spec.input_shape)} "
                        "(refused before reading it)"
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
