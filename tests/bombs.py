"""Small files that decode into large memory, written without holding what they decode into
(tests/test_bounded_sources.py, issue 20)."""

from __future__ import annotations

import io
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np


def png_bomb(path: Path, width: int = 10_000, height: int | None = None, channels: int = 1) -> Path:
    """A PNG of ``width`` x ``height`` (default: square) black pixels, grayscale or (``channels=4``)
    RGBA: 100 megapixels in about 97 KB, under Pillow's hard limit (2 x 89 MP). The rows are
    compressed as they are made."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    height = height or width
    deflate, row = zlib.compressobj(9), bytes(width * channels + 1)  # filter byte 0, then the row
    data = b"".join(deflate.compress(row) for _ in range(height)) + deflate.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, {1: 0, 4: 6}[channels], 0, 0, 0)  # 8 bits a channel
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b""))
    return path


def npy_header(shape: tuple[int, ...], dtype: str) -> bytes:
    """The magic and header of an ``.npy`` of ``shape`` and ``dtype``, its data to follow."""
    buffer = io.BytesIO()
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(buffer, header)
    return buffer.getvalue()


def npz_bomb(path: Path, inputs: np.ndarray, unused_bytes: int, *, name: str = "unused") -> Path:
    """An ``.npz`` of ``inputs`` and one more member of ``unused_bytes`` zeros (uint8), deflated
    as it is written: 3 GiB of zeros become about 3 MB."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        with archive.open("inputs.npy", "w") as member:
            np.lib.format.write_array(member, inputs, allow_pickle=False)
        with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
            member.write(npy_header((unused_bytes,), "uint8"))
            block = bytes(16 << 20)
            for start in range(0, unused_bytes, len(block)):
                member.write(block[: min(len(block), unused_bytes - start)])
    return path


def parquet_bomb(path: Path, numbers: int, column: str = "pixel_values") -> Path:
    """One row whose list holds ``numbers`` zeros (int8), run-length encoded: a few hundred bytes
    that pyarrow decodes into ``numbers`` values plus two 16-bit levels per value."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    values = pa.array(np.zeros(numbers, dtype=np.int8))
    table = pa.table({column: pa.ListArray.from_arrays(pa.array([0, numbers], pa.int32()), values)})
    pq.write_table(table, path, compression="zstd")
    return path
