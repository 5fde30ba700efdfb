"""The Open Inference Protocol (KServe v2 REST) codec, with Triton's binary tensor extension.

A request body is one JSON object, optionally followed by raw tensor bytes::

    {"id": "...", "parameters": {...},
     "inputs":  [{"name", "shape", "datatype", "data": [...]}                        # JSON tensor
                 {"name", "shape", "datatype", "parameters": {"binary_data_size": n}}],  # binary
     "outputs": [{"name", "parameters": {"binary_data": true}}]}                     # optional
    <binary tensors, concatenated in input order>

When any tensor is binary, the ``Inference-Header-Content-Length`` HTTP header gives the byte
length of the JSON part. Binary tensors are little-endian and row-major; a BYTES element is a
4-byte little-endian length followed by its bytes. Responses have the same layout, with
``binary_data_size`` in an output's parameters when its data follows the JSON.

``decode_request`` checks framing and syntax (400; 413 for declared shapes over the element
limit, checked before anything is allocated). ``validate`` checks a decoded request against the
model (422; 413 over the batch limit) and returns the tensors a batcher needs. Every message
starts with the field it is about. This module is pure: numpy only, no HTTP framework, no model.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

HEADER_LENGTH = "Inference-Header-Content-Length"
JSON_CONTENT_TYPE = "application/json"
BINARY_CONTENT_TYPE = "application/octet-stream"
INPUT_NAMES = ("input", "id", "label")
OUTPUT_NAMES = ("soft_targets", "logits")

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
_UNSUPPORTED_DATATYPES = ("BF16",)
_DATATYPE_OF = {dtype: name for name, dtype in DATATYPES.items()}
_LENGTH_PREFIX = struct.Struct("<I")
# numpy refuses arrays of more dimensions (32 before numpy 2, 64 since): refuse them as a 400
# here rather than meet numpy's ValueError in reshape, a 500 (found by tests/test_fuzz.py).
MAX_DIMS = 32
_FLOAT32_TINY = float(np.finfo(np.float32).tiny)


class ProtocolError(Exception):
    """A request the service refuses: an HTTP status and a message that names the field."""

    def __init__(self, status: int, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field

    def __str__(self) -> str:
        return self.message


def _fail(status: int, field: str | None, message: str) -> ProtocolError:
    return ProtocolError(status, f"{field}: {message}" if field else message, field)


def datatype_of(dtype: Any) -> str:
    """The protocol's name for a numpy dtype (``object`` and ``bytes_`` are BYTES)."""
    dtype = np.dtype(dtype)
    if dtype.kind in "OS":
        return BYTES
    name = _DATATYPE_OF.get(dtype if dtype.isnative else dtype.newbyteorder("="))
    if name is None:
        raise ValueError(f"dtype {dtype} has no Open Inference Protocol datatype")
    return name


def _numpy_dtype(field: str, datatype: Any) -> np.dtype | None:
    """The numpy dtype for a wire datatype, None for BYTES."""
    if not isinstance(datatype, str):
        raise _fail(400, field, f"datatype must be a string, got {datatype!r}")
    if datatype == BYTES:
        return None
    if datatype in _UNSUPPORTED_DATATYPES:
        raise _fail(422, field, f"datatype {datatype} is not supported (numpy has no {datatype}); send FP32 or FP16")
    if datatype not in DATATYPES:
        raise _fail(400, field, f"unknown datatype {datatype!r} (expected one of {', '.join([*DATATYPES, BYTES])})")
    return DATATYPES[datatype]


# ---------------------------------------------------------------------------------------------
# Requests


@dataclass
class RequestedOutput:
    name: str
    binary: bool


@dataclass
class DecodedRequest:
    id: str | None
    parameters: dict[str, Any]
    inputs: dict[str, np.ndarray]  # BYTES -> 1-D object array of bytes; binary tensors are read-only views of the body
    datatypes: dict[str, str]
    outputs: list[RequestedOutput] | None  # None: the client asked for no specific outputs
    binary_output_default: bool  # the request-level binary_data_output


def parse_header_length(value: Any, body_length: int) -> int | None:
    """The ``Inference-Header-Content-Length`` value as an int, or None when absent."""
    if value is None:
        return None
    if isinstance(value, bool):
        value = repr(value)
    if isinstance(value, str):
        text = value.strip()
        if not text.isdigit():  # also refuses "-5", "+5", "1e3"
            raise _fail(400, HEADER_LENGTH, f"must be a non-negative integer, got {value!r}")
        value = int(text)
    if not isinstance(value, int) or value < 0:
        raise _fail(400, HEADER_LENGTH, f"must be a non-negative integer, got {value!r}")
    if value > body_length:
        raise _fail(400, HEADER_LENGTH, f"is {value} but the body has only {body_length} bytes")
    return value


def _load_json_object(raw: bytes, what: str) -> dict[str, Any]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _fail(400, None, f"{what} is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    try:
        header = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise _fail(400, None, f"{what} is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise _fail(400, None, f"{what} must be a JSON object, got {type(header).__name__}")
    return header


def _shape(field: str, shape: Any) -> list[int]:
    if not isinstance(shape, list) or not all(type(dim) is int and dim >= 0 for dim in shape):
        raise _fail(400, field, f"shape must be a list of non-negative integers, got {shape!r}")
    if len(shape) > MAX_DIMS:
        raise _fail(400, field, f"shape has {len(shape)} dimensions, at most {MAX_DIMS} are supported")
    return shape


def _flatten(field: str, data: Any, count: int) -> list[Any]:
    """Row-major elements of nested (or flat) JSON lists; stops as soon as there are too many."""
    if not isinstance(data, list):
        raise _fail(400, field, f"data must be a JSON array, got {type(data).__name__}")
    flat: list[Any] = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            flat.append(item)
            if len(flat) > count:
                raise _fail(400, field, f"data has more than the {count} elements the shape declares")
        else:
            stack.pop()
    if len(flat) != count:
        raise _fail(400, field, f"data has {len(flat)} elements, the shape declares {count}")
    return flat


_JSON_KINDS = {"b": ((bool,), "booleans"), "i": ((int,), "integers"), "u": ((int,), "integers"), "f": ((int, float), "numbers")}


def _from_json(field: str, data: Any, shape: list[int], count: int, datatype: str, dtype: np.dtype | None) -> np.ndarray:
    flat = _flatten(field, data, count)
    if dtype is None:
        strings = np.empty(count, dtype=object)
        for i, item in enumerate(flat):
            if type(item) is not str:
                raise _fail(400, field, f"data element #{i} is {type(item).__name__}, BYTES in JSON are strings")
            try:
                strings[i] = item.encode("utf-8")
            except UnicodeEncodeError:  # JSON can spell a lone surrogate ("\ud800"), which UTF-8 cannot hold
                raise _fail(400, field, f"data element #{i} is not valid Unicode (a lone surrogate)") from None
        return strings.reshape(shape)
    accepted, noun = _JSON_KINDS[dtype.kind]
    for i, item in enumerate(flat):
        if type(item) not in accepted:
            raise _fail(400, field, f"data element #{i} is {type(item).__name__}, {datatype} needs {noun}")
    if dtype.kind in "iu" and flat:
        info = np.iinfo(dtype)
        low, high = min(flat), max(flat)
        if low < info.min or high > info.max:
            raise _fail(400, field, f"data value {low if low < info.min else high} is out of range for {datatype}")
    try:
        # A value beyond the float type's range (1e300 as FP16) becomes inf, which validate()
        # refuses with 422 like any non-finite input; no warning on the server's stderr for it.
        with np.errstate(over="ignore"):
            array = np.array(flat, dtype=dtype)
    except OverflowError:  # a JSON integer literal beyond any float (1e400 spelled out), for an FP datatype
        raise _fail(400, field, f"a data value is out of range for {datatype}") from None
    return array.reshape(shape)


def _bytes_elements(field: str, chunk: memoryview, count: int) -> np.ndarray:
    """A BYTES tensor from its binary form: per element, a 4-byte little-endian length and the bytes."""
    elements = np.empty(count, dtype=object)
    offset, n, end = 0, 0, len(chunk)
    while offset < end:
        if n == count:
            raise _fail(400, field, f"binary data holds more than the {count} BYTES elements the shape declares")
        if offset + 4 > end:
            raise _fail(400, field, f"binary data ends inside the length prefix of element #{n}")
        (length,) = _LENGTH_PREFIX.unpack_from(chunk, offset)
        offset += 4
        if offset + length > end:
            raise _fail(400, field, f"BYTES element #{n} declares {length} bytes, only {end - offset} remain")
        elements[n] = bytes(chunk[offset : offset + length])
        offset += length
        n += 1
    if n != count:
        raise _fail(400, field, f"binary data holds {n} BYTES elements, the shape declares {count}")
    return elements


def _from_binary(field: str, chunk: memoryview, shape: list[int], count: int, dtype: np.dtype | None) -> np.ndarray:
    if dtype is None:
        return _bytes_elements(field, chunk, count).reshape(shape)
    # Zero-copy: a read-only view into the request body. The wire is little-endian; on a
    # big-endian host astype makes the one copy needed.
    wire = np.frombuffer(chunk, dtype=dtype.newbyteorder("<"), count=count)
    return wire.astype(dtype, copy=False).reshape(shape)


def _parameters(field: str, raw: Any) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        what = "must be" if field == "parameters" else "parameters must be"
        raise _fail(400, field, f"{what} a JSON object, got {type(raw).__name__}")
    return raw


def decode_request(body: bytes | bytearray | memoryview, header_length: int | str | None, *, max_elements: int = 1 << 28) -> DecodedRequest:
    """Parse a v2 inference request (JSON, or JSON + binary tensors); syntax errors are 400.

    ``header_length`` is the ``Inference-Header-Content-Length`` header (int or its raw string
    value), None when absent. Tensors declaring more than ``max_elements`` elements are refused
    with 413 before any allocation.
    """
    view = memoryview(body).cast("B")
    json_length = parse_header_length(header_length, len(view))
    if json_length is None:
        header = _load_json_object(body if isinstance(body, bytes) else view.tobytes(), "request body")
        binary = view[:0]
    else:
        header = _load_json_object(view[:json_length].tobytes(), f"request header (the first {json_length} bytes)")
        binary = view[json_length:]

    request_id = header.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise _fail(400, "id", f"the request id must be a string, got {type(request_id).__name__}")
    parameters = _parameters("parameters", header.get("parameters"))
    binary_output_default = parameters.get("binary_data_output", False)
    if not isinstance(binary_output_default, bool):
        raise _fail(400, "binary_data_output", f"must be true or false, got {binary_output_default!r}")

    raw_inputs = header.get("inputs")
    if not isinstance(raw_inputs, list):
        raise _fail(400, "inputs", "missing" if raw_inputs is None else f"must be a list, got {type(raw_inputs).__name__}")
    inputs: dict[str, np.ndarray] = {}
    datatypes: dict[str, str] = {}
    offset = 0
    for index, raw in enumerate(raw_inputs):
        where = f"inputs[{index}]"
        if not isinstance(raw, dict):
            raise _fail(400, where, f"must be an object, got {type(raw).__name__}")
        name = raw.get("name")
        if not isinstance(name, str) or not name:
            raise _fail(400, where, "missing 'name'")
        if name in inputs:
            raise _fail(400, name, f"duplicate input name ({where})")
        if "datatype" not in raw:
            raise _fail(400, name, "missing 'datatype'")
        if "shape" not in raw:
            raise _fail(400, name, "missing 'shape'")
        dtype = _numpy_dtype(name, raw["datatype"])
        datatype = raw["datatype"]
        shape = _shape(name, raw["shape"])
        count = math.prod(shape)
        if count > max_elements:
            raise _fail(413, name, f"shape {shape} declares {count} elements, the limit is {max_elements}")
        # A zero dimension makes the count 0 whatever the others are, yet numpy refuses a shape whose
        # other dimensions multiply past its index range (a 500 before, found by tests/test_fuzz.py).
        if math.prod(dim for dim in shape if dim) > max_elements:
            raise _fail(413, name, f"shape {shape} has dimensions whose product exceeds the limit of {max_elements} elements")
        params = _parameters(name, raw.get("parameters"))
        if "shared_memory_region" in params:
            raise _fail(400, name, "shared memory inputs are not supported; send the data in the body")
        size = params.get("binary_data_size")
        if size is not None:
            if "data" in raw:
                raise _fail(400, name, "has both 'data' and binary_data_size")
            if type(size) is not int or size < 0:
                raise _fail(400, name, f"binary_data_size must be a non-negative integer, got {size!r}")
            if json_length is None:
                raise _fail(400, name, f"binary_data_size is set but the request has no {HEADER_LENGTH} header")
            if dtype is not None and size != count * dtype.itemsize:
                raise _fail(400, name, f"binary_data_size is {size}, shape {shape} of {datatype} needs {count * dtype.itemsize} bytes")
            if offset + size > len(binary):
                raise _fail(400, name, f"binary_data_size is {size} but only {len(binary) - offset} bytes of binary data remain")
            inputs[name] = _from_binary(name, binary[offset : offset + size], shape, count, dtype)
            offset += size
        elif "data" in raw:
            inputs[name] = _from_json(name, raw["data"], shape, count, datatype, dtype)
        else:
            raise _fail(400, name, "has neither 'data' nor binary_data_size")
        datatypes[name] = datatype
    if offset != len(binary):
        raise _fail(
            400, HEADER_LENGTH, f"{len(binary) - offset} bytes follow the binary tensors (their binary_data_size values add up to {offset})"
        )

    outputs = _requested_outputs(header.get("outputs"), binary_output_default)
    return DecodedRequest(request_id, parameters, inputs, datatypes, outputs, binary_output_default)


def _requested_outputs(raw_outputs: Any, binary_default: bool) -> list[RequestedOutput] | None:
    if raw_outputs is None or raw_outputs == []:  # KServe: no outputs listed means all of them
        return None
    if not isinstance(raw_outputs, list):
        raise _fail(400, "outputs", f"must be a list, got {type(raw_outputs).__name__}")
    outputs: list[RequestedOutput] = []
    for index, raw in enumerate(raw_outputs):
        where = f"outputs[{index}]"
        if not isinstance(raw, dict) or not isinstance(raw.get("name"), str) or not raw["name"]:
            raise _fail(400, where, "must be an object with a 'name'")
        name = raw["name"]
        if any(out.name == name for out in outputs):
            raise _fail(400, name, f"output requested twice ({where})")
        params = _parameters(name, raw.get("parameters"))
        if "classification" in params:
            raise _fail(422, name, "classification outputs are not supported")
        if "shared_memory_region" in params:
            raise _fail(400, name, "shared memory outputs are not supported")
        binary = params.get("binary_data", binary_default)
        if not isinstance(binary, bool):
            raise _fail(400, name, f"binary_data must be true or false, got {binary!r}")
        outputs.append(RequestedOutput(name, binary))
    return outputs


# ---------------------------------------------------------------------------------------------
# Validation against the model


@dataclass(frozen=True)
class ModelSpec:
    input_shape: tuple[int, ...]
    input_dtype: str  # numpy name, e.g. "uint8"
    num_classes: int
    temperature: float  # the serving temperature, used when a request sends none
    max_samples: int  # per request
    fixed_temperature: bool = False  # an arithmetic ensemble: probabilities exist only at the serving temperature


@dataclass
class InferBatch:
    inputs: np.ndarray  # [B, *input_shape] in the model's dtype, C-contiguous; may be a read-only view of the request body
    ids: np.ndarray | None  # object array of str; None when the client sent none
    labels: np.ndarray | None  # int64 [B], values in [-1, C-1]
    temperature: float
    store: bool
    outputs: list[RequestedOutput]


def _check_vector(name: str, array: np.ndarray, datatype: str, allowed: Sequence[str], batch: int) -> None:
    if datatype not in allowed:
        raise _fail(422, name, f"datatype {datatype}, expected {' or '.join(allowed)}")
    if array.shape != (batch,):
        raise _fail(422, name, f"shape {list(array.shape)}, expected [{batch}] (one per sample of input)")


def _ids(array: np.ndarray, datatype: str, batch: int) -> np.ndarray:
    _check_vector("id", array, datatype, (BYTES, "INT64"), batch)
    if datatype == BYTES:
        ids = np.empty(batch, dtype=object)
        for i, raw in enumerate(array):
            try:
                ids[i] = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise _fail(422, "id", f"element #{i} is not valid UTF-8") from None
            if not ids[i]:
                raise _fail(422, "id", f"element #{i} is empty")
            if "\x00" in ids[i]:  # the cache's HDF5 strings cannot hold one (offline.cache.normalize_ids)
                raise _fail(422, "id", f"element #{i} contains a NUL character")
    else:
        # offline.cache imports h5py; importing it here, only for integer ids, keeps this module
        # importable without it.
        from ..offline.cache import normalize_ids

        ids = normalize_ids(array)
    if len(set(ids)) != batch:
        seen: set[str] = set()
        for value in ids:
            if value in seen:
                raise _fail(422, "id", f"{value!r} appears more than once in this request")
            seen.add(value)
    return ids


def _temperature(raw: Any, spec: ModelSpec) -> float:
    if raw is None:
        return float(spec.temperature)
    try:
        temperature = float(raw) if type(raw) in (int, float) else math.nan
    except OverflowError:  # an integer beyond any float: math.isfinite would raise it too (a 500 before)
        temperature = math.inf
    if not math.isfinite(temperature) or temperature <= 0:
        raise _fail(422, "temperature", f"must be a finite number > 0, got {raw!r}")
    if temperature < _FLOAT32_TINY:  # soft targets are computed in float32, where it would be 0 (or subnormal)
        raise _fail(422, "temperature", f"must be at least {_FLOAT32_TINY:.4g} (float32's smallest normal number), got {raw!r}")
    if spec.fixed_temperature and not math.isclose(temperature, spec.temperature, rel_tol=1e-9):
        raise _fail(
            422,
            "temperature",
            f"this model is an arithmetic ensemble that averages probabilities at the serving temperature "
            f"{spec.temperature:g}, so it cannot serve temperature {temperature:g}; omit the parameter or send {spec.temperature:g}",
        )
    return temperature


def validate(request: DecodedRequest, spec: ModelSpec) -> InferBatch:
    """Check a decoded request against the model; semantic errors are 422, too many samples 413."""
    unknown = sorted(set(request.inputs) - set(INPUT_NAMES))
    if unknown:
        raise _fail(422, unknown[0], f"unknown input (the model takes {', '.join(INPUT_NAMES)})")
    if "input" not in request.inputs:
        raise _fail(422, "input", "missing (the model's input tensor is required)")

    inputs = request.inputs["input"]
    expected_datatype = datatype_of(spec.input_dtype)
    if request.datatypes["input"] != expected_datatype:
        raise _fail(422, "input", f"datatype {request.datatypes['input']}, model expects {expected_datatype}")
    expected_shape = [-1, *spec.input_shape]
    if inputs.ndim != len(expected_shape) or tuple(inputs.shape[1:]) != tuple(spec.input_shape) or inputs.shape[0] < 1:
        raise _fail(422, "input", f"shape {list(inputs.shape)}, model expects {expected_shape}")
    batch = inputs.shape[0]
    if batch > spec.max_samples:
        raise _fail(413, "input", f"{batch} samples in one request, the limit is {spec.max_samples}; split the batch")
    if inputs.dtype.kind == "f":
        finite = np.isfinite(inputs.reshape(batch, -1)).all(axis=1)
        if not finite.all():
            raise _fail(422, "input", f"sample #{int(np.argmin(finite))} contains NaN or Inf")
    inputs = np.ascontiguousarray(inputs)  # a no-op for decoded tensors, which are contiguous already

    ids = _ids(request.inputs["id"], request.datatypes["id"], batch) if "id" in request.inputs else None

    labels = None
    if "label" in request.inputs:
        labels = request.inputs["label"]
        _check_vector("label", labels, request.datatypes["label"], ("INT64",), batch)
        low, high = int(labels.min()), int(labels.max())
        if low < -1 or high > spec.num_classes - 1:
            raise _fail(422, "label", f"value {low if low < -1 else high} is outside [-1, {spec.num_classes - 1}] (-1 means unknown)")

    temperature = _temperature(request.parameters.get("temperature"), spec)
    store = request.parameters.get("store", True)
    if not isinstance(store, bool):
        raise _fail(422, "store", f"must be true or false, got {store!r}")

    if request.outputs is None:
        outputs = [RequestedOutput(name, request.binary_output_default) for name in OUTPUT_NAMES]
    else:
        for out in request.outputs:
            if out.name not in OUTPUT_NAMES:
                raise _fail(422, out.name, f"unknown output (the model has {', '.join(OUTPUT_NAMES)})")
        outputs = list(request.outputs)
    return InferBatch(inputs, ids, labels, temperature, store, outputs)


# ---------------------------------------------------------------------------------------------
# Tensors on the wire, both directions


def serialize_bytes(elements: Any) -> bytes:
    """BYTES elements (bytes or str, row-major) as 4-byte little-endian lengths plus bytes."""
    parts = []
    for element in np.asarray(elements, dtype=object).ravel():
        raw = element if isinstance(element, bytes) else str(element).encode("utf-8")
        parts.append(_LENGTH_PREFIX.pack(len(raw)))
        parts.append(raw)
    return b"".join(parts)


def _tensor_json(name: str, array: np.ndarray, binary: bool) -> tuple[dict[str, Any], bytes | memoryview | None]:
    """One tensor's JSON entry, and its binary payload when ``binary``."""
    datatype = datatype_of(array.dtype)
    entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
    if binary:
        if datatype == BYTES:
            payload: bytes | memoryview = serialize_bytes(array)
        else:
            wire = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
            payload = wire.reshape(-1).view(np.uint8).data  # no copy; _frame joins it into the body
        entry["parameters"] = {"binary_data_size": len(payload)}
        return entry, payload
    if datatype == BYTES:
        entry["data"] = [element.decode("utf-8") if isinstance(element, bytes) else str(element) for element in array.ravel()]
    else:
        entry["data"] = array.ravel().tolist()
    return entry, None


def _frame(header: dict[str, Any], payloads: list[bytes | memoryview]) -> tuple[bytes, dict[str, str]]:
    header_json = json.dumps(header, separators=(",", ":")).encode()  # ASCII: ensure_ascii is on
    if not payloads:
        return header_json, {"Content-Type": JSON_CONTENT_TYPE}
    headers = {"Content-Type": BINARY_CONTENT_TYPE, HEADER_LENGTH: str(len(header_json))}
    return b"".join([header_json, *payloads]), headers


def encode_response(
    model_name: str, request_id: str | None, parameters: dict[str, Any], outputs: list[tuple[str, np.ndarray, bool]]
) -> tuple[bytes, dict[str, str]]:
    """A v2 inference response: body and HTTP headers. ``outputs`` are (name, array, binary)."""
    header: dict[str, Any] = {"model_name": model_name, "model_version": "1"}
    if request_id is not None:
        header["id"] = request_id
    header["parameters"] = parameters
    entries, payloads = [], []
    for name, array, binary in outputs:
        entry, payload = _tensor_json(name, np.asarray(array), binary)
        entries.append(entry)
        if payload is not None:
            payloads.append(payload)
    header["outputs"] = entries
    return _frame(header, payloads)


def error_body(message: str) -> bytes:
    """An error response body, as tritonclient reads it: ``{"error": message}``."""
    return json.dumps({"error": message}).encode()


def encode_request(
    inputs: Sequence[tuple[str, np.ndarray]],
    *,
    parameters: dict[str, Any] | None = None,
    outputs: Sequence[RequestedOutput] | None = None,
    binary: bool = True,
    request_id: str | None = None,
) -> tuple[bytes, dict[str, str]]:
    """A v2 inference request, laid out as tritonclient lays it out: body and HTTP headers.

    With ``outputs`` None no outputs are listed (the server returns all of them) and, like
    tritonclient, ``binary_data_output`` asks for them in binary when ``binary``.
    """
    header: dict[str, Any] = {}
    if request_id is not None:
        header["id"] = request_id
    entries, payloads = [], []
    for name, array in inputs:
        entry, payload = _tensor_json(name, np.asarray(array), binary)
        entries.append(entry)
        if payload is not None:
            payloads.append(payload)
    header["inputs"] = entries
    params = dict(parameters or {})
    if outputs:
        header["outputs"] = [{"name": out.name, "parameters": {"binary_data": out.binary}} for out in outputs]
    elif binary:
        params["binary_data_output"] = True
    if params:
        header["parameters"] = params
    return _frame(header, payloads)


def decode_response(body: bytes | bytearray | memoryview, header_length: int | str | None) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """A v2 inference response: its JSON header and its outputs by name (BYTES as bytes objects)."""
    view = memoryview(body).cast("B")
    json_length = parse_header_length(header_length, len(view))
    end = len(view) if json_length is None else json_length
    header = _load_json_object(view[:end].tobytes(), "response body")
    binary = view[end:]
    outputs: dict[str, np.ndarray] = {}
    offset = 0
    raw_outputs = header.get("outputs", [])
    if not isinstance(raw_outputs, list):
        raise _fail(502, "outputs", "must be a list")
    for index, raw in enumerate(raw_outputs):
        if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
            raise _fail(502, f"outputs[{index}]", "must be an object with a 'name'")
        name = raw["name"]
        try:
            dtype = _numpy_dtype(name, raw.get("datatype"))
            shape = _shape(name, raw.get("shape"))
            count = math.prod(shape)
            size = _parameters(name, raw.get("parameters")).get("binary_data_size")
            if size is not None:
                if type(size) is not int or size < 0 or offset + size > len(binary):
                    raise _fail(502, name, f"binary_data_size {size!r} does not fit the {len(binary) - offset} bytes left")
                if dtype is not None and size != count * dtype.itemsize:
                    raise _fail(502, name, f"binary_data_size is {size}, shape {shape} needs {count * dtype.itemsize} bytes")
                outputs[name] = _from_binary(name, binary[offset : offset + size], shape, count, dtype)
                offset += size
            else:
                outputs[name] = _from_json(name, raw.get("data"), shape, count, raw["datatype"], dtype)
        except ProtocolError as exc:
            raise ProtocolError(502, f"response: {exc.message}", exc.field) from None
    return header, outputs


__all__ = [
    "BYTES",
    "DATATYPES",
    "HEADER_LENGTH",
    "DecodedRequest",
    "InferBatch",
    "ModelSpec",
    "ProtocolError",
    "RequestedOutput",
    "datatype_of",
    "decode_request",
    "decode_response",
    "encode_request",
    "encode_response",
    "error_body",
    "parse_header_length",
    "serialize_bytes",
    "validate",
]
