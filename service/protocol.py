"""The Open Inference Protocol (KServe v2 REST) codec, with Triton's binary tensor extension:
requests and responses, both directions. ``service.wire`` holds the tensors they carry; this
module is the codec's public face and exports those names too.

A request body is one JSON object, optionally followed by raw tensor bytes::

    {"id": "...", "parameters": {...},
     "inputs":  [{"name", "shape", "datatype", "data": [...]}                        # JSON tensor
                 {"name", "shape", "datatype", "parameters": {"binary_data_size": n}}],  # binary
     "outputs": [{"name", "parameters": {"binary_data": true}}]}                     # optional
    <binary tensors, concatenated in input order>

When any tensor is binary, the ``Inference-Header-Content-Length`` HTTP header gives the byte
length of the JSON part. Responses have the same layout, with ``binary_data_size`` in an
output's parameters when its data follows the JSON.

``decode_request`` checks framing and syntax (400; 413 for declared shapes over the element
limit, checked before anything is allocated); what a request means to this model is checked by
``service.signature``. Every message starts with the field it is about. This module is generic
and pure: numpy only, no HTTP framework, no model.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .wire import (
    BYTES,
    DATATYPES,
    ProtocolError,
    datatype_of,
    numpy_dtype,
    parameters_of,
    parse_shape,
    serialize_bytes,
    tensor_entry,
    tensor_from_binary,
    tensor_from_json,
)

HEADER_LENGTH = "Inference-Header-Content-Length"
JSON_CONTENT_TYPE = "application/json"
BINARY_CONTENT_TYPE = "application/octet-stream"


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
    """The ``Inference-Header-Content-Length`` value as an int, or None when absent. A string
    (the raw HTTP header) is read as Python's ``int()`` reads it, as the service always has."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = int(value)
        except ValueError:
            raise ProtocolError(400, HEADER_LENGTH, f"{value!r} is not an integer") from None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ProtocolError(400, HEADER_LENGTH, f"must be a non-negative integer, got {value!r}")
    if value > body_length:
        raise ProtocolError(400, HEADER_LENGTH, f"is {value} but the body has only {body_length} bytes")
    return value


def _load_json_object(raw: bytes, what: str) -> dict[str, Any]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError(400, None, f"{what} is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    try:
        header = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(400, None, f"{what} is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise ProtocolError(400, None, f"{what} must be a JSON object, got {type(header).__name__}")
    return header


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
        raise ProtocolError(400, "id", f"the request id must be a string, got {type(request_id).__name__}")
    parameters = parameters_of("parameters", header.get("parameters"))
    binary_output_default = parameters.get("binary_data_output", False)
    if not isinstance(binary_output_default, bool):
        raise ProtocolError(400, "binary_data_output", f"must be true or false, got {binary_output_default!r}")

    raw_inputs = header.get("inputs")
    if not isinstance(raw_inputs, list):
        raise ProtocolError(400, "inputs", "missing" if raw_inputs is None else f"must be a list, got {type(raw_inputs).__name__}")
    inputs: dict[str, np.ndarray] = {}
    datatypes: dict[str, str] = {}
    offset = 0
    for index, raw in enumerate(raw_inputs):
        where = f"inputs[{index}]"
        if not isinstance(raw, dict):
            raise ProtocolError(400, where, f"must be an object, got {type(raw).__name__}")
        name = raw.get("name")
        if not isinstance(name, str) or not name:
            raise ProtocolError(400, where, "missing 'name'")
        if name in inputs:
            raise ProtocolError(400, name, f"duplicate input name ({where})")
        if "datatype" not in raw:
            raise ProtocolError(400, name, "missing 'datatype'")
        if "shape" not in raw:
            raise ProtocolError(400, name, "missing 'shape'")
        dtype = numpy_dtype(name, raw["datatype"])
        datatype = raw["datatype"]
        shape = parse_shape(name, raw["shape"])
        count = math.prod(shape)
        if count > max_elements:
            raise ProtocolError(413, name, f"shape {shape} declares {count} elements, the limit is {max_elements}")
        # A zero dimension makes the count 0 whatever the others are, yet numpy refuses a shape whose
        # other dimensions multiply past its index range (a 500 before, found by tests/test_fuzz.py).
        if math.prod(dim for dim in shape if dim) > max_elements:
            raise ProtocolError(413, name, f"shape {shape} has dimensions whose product exceeds the limit of {max_elements} elements")
        params = parameters_of(name, raw.get("parameters"))
        if "shared_memory_region" in params:
            raise ProtocolError(400, name, "shared memory inputs are not supported; send the data in the body")
        size = params.get("binary_data_size")
        if size is not None:
            if "data" in raw:
                raise ProtocolError(400, name, "has both 'data' and binary_data_size")
            if type(size) is not int or size < 0:
                raise ProtocolError(400, name, f"binary_data_size must be a non-negative integer, got {size!r}")
            if json_length is None:
                raise ProtocolError(400, name, f"binary_data_size is set but the request has no {HEADER_LENGTH} header")
            if dtype is not None and size != count * dtype.itemsize:
                raise ProtocolError(
                    400, name, f"binary_data_size is {size}, shape {shape} of {datatype} needs {count * dtype.itemsize} bytes"
                )
            if offset + size > len(binary):
                raise ProtocolError(400, name, f"binary_data_size is {size} but only {len(binary) - offset} bytes of binary data remain")
            inputs[name] = tensor_from_binary(name, binary[offset : offset + size], shape, count, dtype)
            offset += size
        elif "data" in raw:
            inputs[name] = tensor_from_json(name, raw["data"], shape, count, datatype, dtype)
        else:
            raise ProtocolError(400, name, "has neither 'data' nor binary_data_size")
        datatypes[name] = datatype
    if offset != len(binary):
        raise ProtocolError(
            400, HEADER_LENGTH, f"{len(binary) - offset} bytes follow the binary tensors (their binary_data_size values add up to {offset})"
        )

    outputs = _requested_outputs(header.get("outputs"), binary_output_default)
    return DecodedRequest(request_id, parameters, inputs, datatypes, outputs, binary_output_default)


def _requested_outputs(raw_outputs: Any, binary_default: bool) -> list[RequestedOutput] | None:
    if raw_outputs is None or raw_outputs == []:  # KServe: no outputs listed means all of them
        return None
    if not isinstance(raw_outputs, list):
        raise ProtocolError(400, "outputs", f"must be a list, got {type(raw_outputs).__name__}")
    outputs: list[RequestedOutput] = []
    for index, raw in enumerate(raw_outputs):
        where = f"outputs[{index}]"
        if not isinstance(raw, dict) or not isinstance(raw.get("name"), str) or not raw["name"]:
            raise ProtocolError(400, where, "must be an object with a 'name'")
        name = raw["name"]
        if any(out.name == name for out in outputs):
            raise ProtocolError(400, name, f"output requested twice ({where})")
        params = parameters_of(name, raw.get("parameters"))
        if "classification" in params:
            raise ProtocolError(422, name, "classification outputs are not supported")
        if "shared_memory_region" in params:
            raise ProtocolError(400, name, "shared memory outputs are not supported")
        binary = params.get("binary_data", binary_default)
        if not isinstance(binary, bool):
            raise ProtocolError(400, name, f"binary_data must be true or false, got {binary!r}")
        outputs.append(RequestedOutput(name, binary))
    return outputs


# ---------------------------------------------------------------------------------------------
# Responses, and requests as a client sends them


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
        entry, payload = tensor_entry(name, np.asarray(array), binary)
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
        entry, payload = tensor_entry(name, np.asarray(array), binary)
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
        raise ProtocolError(502, "outputs", "must be a list")
    for index, raw in enumerate(raw_outputs):
        if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
            raise ProtocolError(502, f"outputs[{index}]", "must be an object with a 'name'")
        name = raw["name"]
        try:
            dtype = numpy_dtype(name, raw.get("datatype"))
            shape = parse_shape(name, raw.get("shape"))
            count = math.prod(shape)
            size = parameters_of(name, raw.get("parameters")).get("binary_data_size")
            if size is not None:
                if type(size) is not int or size < 0 or offset + size > len(binary):
                    raise ProtocolError(502, name, f"binary_data_size {size!r} does not fit the {len(binary) - offset} bytes left")
                if dtype is not None and size != count * dtype.itemsize:
                    raise ProtocolError(502, name, f"binary_data_size is {size}, shape {shape} needs {count * dtype.itemsize} bytes")
                outputs[name] = tensor_from_binary(name, binary[offset : offset + size], shape, count, dtype)
                offset += size
            else:
                outputs[name] = tensor_from_json(name, raw.get("data"), shape, count, raw["datatype"], dtype)
        except ProtocolError as exc:
            raise ProtocolError(502, "response", exc.message) from None
    return header, outputs


__all__ = [
    "BINARY_CONTENT_TYPE",
    "BYTES",
    "DATATYPES",
    "HEADER_LENGTH",
    "JSON_CONTENT_TYPE",
    "DecodedRequest",
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
]
