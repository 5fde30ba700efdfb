"""Tensors on the Open Inference Protocol's wire: datatypes, and a tensor's JSON and binary forms.

A tensor is ``{"name", "shape", "datatype"}`` with either ``"data"`` (JSON: nested or flat lists,
row-major; BYTES elements are strings) or ``"parameters": {"binary_data_size": n}`` (Triton's
binary extension: ``n`` little-endian, row-major bytes after the JSON; a BYTES element is a
4-byte little-endian length followed by its bytes). ``service.protocol`` frames tensors into
requests and responses. Every error is a ``ProtocolError`` whose message starts with the field
it is about. Numpy only.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np

DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
}
BYTES = "BYTES"
WIRE_DATATYPES = (*DATATYPES, BYTES)  # every datatype this codec reads and writes
_UNSUPPORTED_DATATYPES = ("BF16",)
_DATATYPE_OF = {dtype: name for name, dtype in DATATYPES.items()}
_LENGTH_PREFIX = struct.Struct("<I")
# numpy refuses arrays of more dimensions (32 before numpy 2, 64 since): refuse them as a 400
# here rather than meet numpy's ValueError in reshape, a 500 (found by tests/test_fuzz.py).
MAX_DIMS = 32


class ProtocolError(Exception):
    """A request the service refuses: an HTTP status, the field it is about (None for the whole
    request), and what is wrong with it. ``message`` is ``"field: detail"``."""

    def __init__(self, status: int, field: str | None, detail: str) -> None:
        self.status = status
        self.field = field
        self.message = f"{field}: {detail}" if field else detail
        super().__init__(self.message)


def datatype_of(dtype: Any) -> str:
    """The protocol's name for a numpy dtype (``object`` and ``bytes_`` are BYTES)."""
    dtype = np.dtype(dtype)
    if dtype.kind in "OS":
        return BYTES
    name = _DATATYPE_OF.get(dtype if dtype.isnative else dtype.newbyteorder("="))
    if name is None:
        raise ValueError(f"dtype {dtype} has no Open Inference Protocol datatype")
    return name


def numpy_dtype(field: str, datatype: Any) -> np.dtype | None:
    """The numpy dtype for a wire datatype, None for BYTES."""
    if not isinstance(datatype, str):
        raise ProtocolError(400, field, f"datatype must be a string, got {datatype!r}")
    if datatype == BYTES:
        return None
    if datatype in _UNSUPPORTED_DATATYPES:
        raise ProtocolError(422, field, f"datatype {datatype} is not supported (numpy has no {datatype}); send FP32 or FP16")
    if datatype not in DATATYPES:
        raise ProtocolError(400, field, f"unknown datatype {datatype!r} (expected one of {', '.join(WIRE_DATATYPES)})")
    return DATATYPES[datatype]


def parse_shape(field: str, shape: Any) -> list[int]:
    if not isinstance(shape, list) or not all(type(dim) is int and dim >= 0 for dim in shape):
        raise ProtocolError(400, field, f"shape must be a list of non-negative integers, got {shape!r}")
    if len(shape) > MAX_DIMS:
        raise ProtocolError(400, field, f"shape has {len(shape)} dimensions, at most {MAX_DIMS} are supported")
    return shape


def parameters_of(field: str, raw: Any) -> dict[str, Any]:
    """A ``parameters`` object (of the request, or of one tensor), {} when absent."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        what = "must be" if field == "parameters" else "parameters must be"
        raise ProtocolError(400, field, f"{what} a JSON object, got {type(raw).__name__}")
    return raw


# ---------------------------------------------------------------------------------------------
# Reading a tensor


def _flatten(field: str, data: Any, count: int) -> list[Any]:
    """Row-major elements of nested (or flat) JSON lists; stops as soon as there are too many."""
    if not isinstance(data, list):
        raise ProtocolError(400, field, f"data must be a JSON array, got {type(data).__name__}")
    flat: list[Any] = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            flat.append(item)
            if len(flat) > count:
                raise ProtocolError(400, field, f"data has more than the {count} elements the shape declares")
        else:
            stack.pop()
    if len(flat) != count:
        raise ProtocolError(400, field, f"data has {len(flat)} elements, the shape declares {count}")
    return flat


_JSON_KINDS = {"b": ((bool,), "booleans"), "i": ((int,), "integers"), "u": ((int,), "integers"), "f": ((int, float), "numbers")}


def tensor_from_json(field: str, data: Any, shape: list[int], count: int, datatype: str, dtype: np.dtype | None) -> np.ndarray:
    flat = _flatten(field, data, count)
    if dtype is None:
        strings = np.empty(count, dtype=object)
        for i, item in enumerate(flat):
            if type(item) is not str:
                raise ProtocolError(400, field, f"data element #{i} is {type(item).__name__}, BYTES in JSON are strings")
            try:
                strings[i] = item.encode("utf-8")
            except UnicodeEncodeError:  # JSON can spell a lone surrogate ("\ud800"), which UTF-8 cannot hold
                raise ProtocolError(400, field, f"data element #{i} is not valid Unicode (a lone surrogate)") from None
        return strings.reshape(shape)
    accepted, noun = _JSON_KINDS[dtype.kind]
    for i, item in enumerate(flat):
        if type(item) not in accepted:
            raise ProtocolError(400, field, f"data element #{i} is {type(item).__name__}, {datatype} needs {noun}")
    if dtype.kind in "iu" and flat:
        info = np.iinfo(dtype)
        low, high = min(flat), max(flat)
        if low < info.min or high > info.max:
            raise ProtocolError(400, field, f"data value {low if low < info.min else high} is out of range for {datatype}")
    try:
        # A value beyond the float type's range (1e300 as FP16) becomes inf, which validation
        # refuses with 422 like any non-finite input; no warning on the server's stderr for it.
        with np.errstate(over="ignore"):
            array = np.array(flat, dtype=dtype)
    except OverflowError:  # a JSON integer literal beyond any float (1e400 spelled out), for an FP datatype
        raise ProtocolError(400, field, f"a data value is out of range for {datatype}") from None
    return array.reshape(shape)


def _bytes_elements(field: str, chunk: memoryview, count: int) -> np.ndarray:
    """A BYTES tensor from its binary form: per element, a 4-byte little-endian length and the bytes."""
    elements = np.empty(count, dtype=object)
    offset, n, end = 0, 0, len(chunk)
    while offset < end:
        if n == count:
            raise ProtocolError(400, field, f"binary data holds more than the {count} BYTES elements the shape declares")
        if offset + 4 > end:
            raise ProtocolError(400, field, f"binary data ends inside the length prefix of element #{n}")
        (length,) = _LENGTH_PREFIX.unpack_from(chunk, offset)
        offset += 4
        if offset + length > end:
            raise ProtocolError(400, field, f"BYTES element #{n} declares {length} bytes, only {end - offset} remain")
        elements[n] = bytes(chunk[offset : offset + length])
        offset += length
        n += 1
    if n != count:
        raise ProtocolError(400, field, f"binary data holds {n} BYTES elements, the shape declares {count}")
    return elements


def tensor_from_binary(field: str, chunk: memoryview, shape: list[int], count: int, dtype: np.dtype | None) -> np.ndarray:
    if dtype is None:
        return _bytes_elements(field, chunk, count).reshape(shape)
    # Zero-copy: a read-only view into the request body. The wire is little-endian; on a
    # big-endian host astype makes the one copy needed.
    wire = np.frombuffer(chunk, dtype=dtype.newbyteorder("<"), count=count)
    return wire.astype(dtype, copy=False).reshape(shape)


# ---------------------------------------------------------------------------------------------
# Writing a tensor


def serialize_bytes(elements: Any) -> bytes:
    """BYTES elements (bytes or str, row-major) as 4-byte little-endian lengths plus bytes."""
    parts = []
    for element in np.asarray(elements, dtype=object).ravel():
        raw = element if isinstance(element, bytes) else str(element).encode("utf-8")
        parts.append(_LENGTH_PREFIX.pack(len(raw)))
        parts.append(raw)
    return b"".join(parts)


def tensor_entry(name: str, array: np.ndarray, binary: bool) -> tuple[dict[str, Any], bytes | memoryview | None]:
    """One tensor's JSON entry, and its binary payload when ``binary``."""
    datatype = datatype_of(array.dtype)
    entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
    if binary:
        if datatype == BYTES:
            payload: bytes | memoryview = serialize_bytes(array)
        else:
            wire = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
            payload = wire.reshape(-1).view(np.uint8).data  # no copy; the framing joins it into the body
        entry["parameters"] = {"binary_data_size": len(payload)}
        return entry, payload
    if datatype == BYTES:
        entry["data"] = [element.decode("utf-8") if isinstance(element, bytes) else str(element) for element in array.ravel()]
    else:
        entry["data"] = array.ravel().tolist()
    return entry, None
