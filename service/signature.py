"""This model's request contract, declared once: the inputs, outputs and parameters of the
teacher's infer route (``INPUTS``, ``OUTPUTS``, ``PARAMETERS``).

Generated from the declaration: ``validate`` (a decoded request checked against the model: 422
for what the model cannot take, 413 over the batch limit), ``model_metadata`` (what
``GET /v2/models/{name}`` answers) and ``request_schema`` (the OpenAPI body of the infer routes,
which read the raw body and so have no body parameter FastAPI could describe). ``RESPONSES``
and the other ``*_RESPONSES`` are what each route may answer, every status it sends documented
(an undocumented one fails an OpenAPI conformance check). The wire itself is
``service.protocol``'s. Numpy only: no HTTP framework, no model, no HDF5.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..offline.cache import CacheError, normalize_ids
from ..offline.cache.label_names import MAX_NAME_CHARS, MAX_TOTAL_CHARS, check_label_names
from .protocol import HEADER_LENGTH, DecodedRequest, ProtocolError, RequestedOutput
from .wire import BYTES, WIRE_DATATYPES, datatype_of

_FLOAT32_TINY = float(np.finfo(np.float32).tiny)


@dataclass(frozen=True)
class ModelSpec:
    input_shape: tuple[int, ...]
    input_dtype: str  # numpy name, e.g. "uint8"
    num_classes: int
    temperature: float  # the serving temperature, used when a request sends none
    max_samples: int  # per request
    # Soft targets exist only at the serving temperature: the temperature rule "serving" (an
    # arithmetic ensemble), or sparse targets (top-k, sampled), which a cache hit answers decoded.
    fixed_temperature: bool = False
    views: int = 1  # augmented views per sample; more than one adds a view axis to the outputs
    fixed_temperature_reason: str = "this model is an arithmetic ensemble that averages probabilities at the serving temperature"

    def output_shape(self) -> list[int]:
        return [-1, self.views, self.num_classes] if self.views > 1 else [-1, self.num_classes]


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatypes: tuple[str, ...]  # the wire datatypes taken, the first one advertised; () for the model's input dtype
    shape: Callable[[ModelSpec], list[int]]
    optional: bool = False


INPUTS = (
    TensorSpec("input", (), lambda model: [-1, *model.input_shape]),
    TensorSpec("id", (BYTES, "INT64"), lambda model: [-1], optional=True),  # default: the sha256 of the sample's bytes
    TensorSpec("label", ("INT64",), lambda model: [-1], optional=True),  # -1: unknown
)
OUTPUTS = (
    TensorSpec("soft_targets", ("FP32",), lambda model: model.output_shape()),  # softmax(logits / temperature)
    TensorSpec("logits", ("FP32",), lambda model: model.output_shape()),  # as the cache holds them
)
PARAMETERS = {  # JSON schemas of the request parameters; others are ignored
    "temperature": {"type": "number", "exclusiveMinimum": 0, "description": "softmax temperature of soft_targets"},
    "store": {"type": "boolean", "description": "append the samples to the cache (default true)"},
    "no_outputs": {
        "type": "boolean",
        "description": "answer no output tensor, only the parameters (cache_hits, cache_misses): what teacher-push uses. "
        "Without it, a request that lists no outputs gets them all, as the v2 protocol says (default false)",
    },
    "binary_data_output": {"type": "boolean"},  # read by the codec: outputs in binary unless asked otherwise
    "label_names": {
        "type": "array",
        "items": {"type": "string", "minLength": 1, "maxLength": MAX_NAME_CHARS},
        "uniqueItems": True,
        "description": "the name of each label index (label i is label_names[i]); recorded once in the cache's manifest, "
        "and a request whose names conflict with the recorded ones is refused (422). At most the model's class count, "
        f"each printable (no control or bidirectional characters), {MAX_TOTAL_CHARS:,} characters in all",
    },
}
INPUT_NAMES = tuple(t.name for t in INPUTS)
OUTPUT_NAMES = tuple(t.name for t in OUTPUTS)
_INPUT = {t.name: t for t in INPUTS}


# ---------------------------------------------------------------------------------------------
# Validation


@dataclass
class InferBatch:
    inputs: np.ndarray  # [B, *input_shape] in the model's dtype, C-contiguous; may be a read-only view of the request body
    ids: np.ndarray | None  # object array of str; None when the client sent none
    labels: np.ndarray | None  # int64 [B], values in [-1, C-1]
    temperature: float
    store: bool
    outputs: list[RequestedOutput]
    label_names: list[str] | None = None  # the request's label_names parameter, checked; None when absent


def _check_vector(name: str, array: np.ndarray, datatype: str, batch: int) -> None:
    allowed = _INPUT[name].datatypes
    if datatype not in allowed:
        raise ProtocolError(422, name, f"datatype {datatype}, expected {' or '.join(allowed)}")
    if array.shape != (batch,):
        raise ProtocolError(422, name, f"shape {list(array.shape)}, expected [{batch}] (one per sample of input)")


def _ids(array: np.ndarray, datatype: str, batch: int) -> np.ndarray:
    _check_vector("id", array, datatype, batch)
    try:
        ids = normalize_ids(array)
    except ValueError as exc:  # not UTF-8, empty, or a NUL (which the cache's HDF5 strings cannot hold)
        raise ProtocolError(422, "id", str(exc)) from None
    if len(set(ids)) != batch:
        seen: set[str] = set()
        for value in ids:
            if value in seen:
                raise ProtocolError(422, "id", f"{value!r} appears more than once in this request")
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
        raise ProtocolError(422, "temperature", f"must be a finite number > 0, got {raw!r}")
    if temperature < _FLOAT32_TINY:  # soft targets are computed in float32, where it would be 0 (or subnormal)
        raise ProtocolError(422, "temperature", f"must be at least {_FLOAT32_TINY:.4g} (float32's smallest normal number), got {raw!r}")
    if spec.fixed_temperature and not math.isclose(temperature, spec.temperature, rel_tol=1e-9):
        raise ProtocolError(
            422,
            "temperature",
            f"{spec.fixed_temperature_reason} {spec.temperature:g}, so it cannot serve temperature {temperature:g}; "
            f"omit the parameter or send {spec.temperature:g}",
        )
    return temperature


def validate(request: DecodedRequest, spec: ModelSpec) -> InferBatch:
    """Check a decoded request against the model; semantic errors are 422, too many samples 413."""
    unknown = sorted(set(request.inputs) - set(INPUT_NAMES))
    if unknown:
        raise ProtocolError(422, unknown[0], f"unknown input (the model takes {', '.join(INPUT_NAMES)})")
    for required in (t.name for t in INPUTS if not t.optional):
        if required not in request.inputs:
            raise ProtocolError(422, required, f"missing (the model's {required} tensor is required)")

    inputs = request.inputs["input"]
    expected_datatype = datatype_of(spec.input_dtype)
    if request.datatypes["input"] != expected_datatype:
        raise ProtocolError(422, "input", f"datatype {request.datatypes['input']}, model expects {expected_datatype}")
    expected_shape = _INPUT["input"].shape(spec)
    if inputs.ndim != len(expected_shape) or tuple(inputs.shape[1:]) != tuple(spec.input_shape) or inputs.shape[0] < 1:
        raise ProtocolError(422, "input", f"shape {list(inputs.shape)}, model expects {expected_shape}")
    batch = inputs.shape[0]
    if batch > spec.max_samples:
        raise ProtocolError(413, "input", f"{batch} samples in one request, the limit is {spec.max_samples}; split the batch")
    if inputs.dtype.kind == "f":
        finite = np.isfinite(inputs.reshape(batch, -1)).all(axis=1)
        if not finite.all():
            raise ProtocolError(422, "input", f"sample #{int(np.argmin(finite))} contains NaN or Inf")
    inputs = np.ascontiguousarray(inputs)  # a no-op for decoded tensors, which are contiguous already

    ids = _ids(request.inputs["id"], request.datatypes["id"], batch) if "id" in request.inputs else None

    labels = None
    if "label" in request.inputs:
        labels = request.inputs["label"]
        _check_vector("label", labels, request.datatypes["label"], batch)
        low, high = int(labels.min()), int(labels.max())
        if low < -1 or high > spec.num_classes - 1:
            raise ProtocolError(
                422, "label", f"value {low if low < -1 else high} is outside [-1, {spec.num_classes - 1}] (-1 means unknown)"
            )

    temperature = _temperature(request.parameters.get("temperature"), spec)
    store = request.parameters.get("store", True)
    if not isinstance(store, bool):
        raise ProtocolError(422, "store", f"must be true or false, got {store!r}")

    label_names = _label_names(request.parameters.get("label_names"), spec)
    if label_names is not None and labels is not None and int(labels.max()) >= len(label_names):
        raise ProtocolError(422, "label", f"value {int(labels.max())} has no name: label_names names {len(label_names)} labels")

    no_outputs = request.parameters.get("no_outputs", False)
    if not isinstance(no_outputs, bool):
        raise ProtocolError(422, "no_outputs", f"must be true or false, got {no_outputs!r}")
    if no_outputs and request.outputs:
        raise ProtocolError(422, "no_outputs", "is true, but the request lists outputs; send one or the other")
    if no_outputs:
        outputs = []
    elif request.outputs is None:
        outputs = [RequestedOutput(name, request.binary_output_default) for name in OUTPUT_NAMES]
    else:
        for out in request.outputs:
            if out.name not in OUTPUT_NAMES:
                raise ProtocolError(422, out.name, f"unknown output (the model has {', '.join(OUTPUT_NAMES)})")
        outputs = list(request.outputs)
    return InferBatch(inputs, ids, labels, temperature, store, outputs, label_names)


def _label_names(raw: Any, spec: ModelSpec) -> list[str] | None:
    if raw is None:
        return None
    try:
        return check_label_names(raw, spec.num_classes, owner="the model")
    except CacheError as exc:
        raise ProtocolError(422, None, str(exc)) from None


# ---------------------------------------------------------------------------------------------
# Metadata and OpenAPI


def _tensor_metadata(tensor: TensorSpec, spec: ModelSpec) -> dict[str, Any]:
    datatype = tensor.datatypes[0] if tensor.datatypes else datatype_of(spec.input_dtype)
    entry: dict[str, Any] = {"name": tensor.name, "datatype": datatype, "shape": tensor.shape(spec)}
    if tensor.optional:
        entry["optional"] = True
    return entry


def model_metadata(name: str, spec: ModelSpec, parameters: dict[str, Any]) -> dict[str, Any]:
    """The v2 model metadata: the model's name, its inputs and outputs, and ``parameters``."""
    return {
        "name": name,
        "versions": ["1"],
        "platform": "pytorch",
        "inputs": [_tensor_metadata(t, spec) for t in INPUTS],
        "outputs": [_tensor_metadata(t, spec) for t in OUTPUTS],
        "parameters": parameters,
    }


_JSON_ELEMENT = {"oneOf": [{"type": "number"}, {"type": "boolean"}, {"type": "string"}]}
_EXAMPLE = {"id": "r1", "inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [0.0, 0.5, 1.0, 0.25]}]}


def request_schema() -> dict[str, Any]:
    """The JSON schema of an infer request's JSON part."""
    names = [f"{t.name}{'' if t.optional else ' (required)'}" for t in INPUTS]
    tensor = {
        "type": "object",
        "required": ["name", "shape", "datatype"],
        "properties": {
            "name": {"type": "string", "description": f"{', '.join(names[:-1])} or {names[-1]}", "examples": list(INPUT_NAMES)},
            "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
            "datatype": {"type": "string", "enum": list(WIRE_DATATYPES)},
            "data": {
                "type": "array",
                "description": "the elements, row-major: flat or nested as the shape; BYTES elements are strings",
                "items": {"oneOf": [_JSON_ELEMENT, {"type": "array", "items": {}}]},
            },
            "parameters": {
                "type": "object",
                "properties": {
                    "binary_data_size": {
                        "type": "integer",
                        "minimum": 0,
                        "description": "the tensor's bytes follow the JSON (binary extension) instead of 'data'",
                    }
                },
            },
        },
    }
    output = {
        "type": "object",
        "required": ["name"],
        "properties": {
            "name": {"type": "string", "enum": list(OUTPUT_NAMES)},
            "parameters": {"type": "object", "properties": {"binary_data": {"type": "boolean"}}},
        },
    }
    return {
        "type": "object",
        "required": ["inputs"],
        "properties": {
            "id": {"type": "string"},
            "parameters": {"type": "object", "properties": PARAMETERS},
            "inputs": {"type": "array", "items": tensor},
            "outputs": {"type": "array", "items": output},
        },
        "example": _EXAMPLE,
    }


def request_openapi() -> dict[str, Any]:
    """The infer routes' OpenAPI request: the header and the body, JSON or binary."""
    return {
        "parameters": [
            {
                "name": HEADER_LENGTH,
                "in": "header",
                "required": False,
                "schema": {"type": "integer", "minimum": 0},
                "description": "length of the JSON part when binary tensors follow it",
            }
        ],
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": request_schema()},
                "application/octet-stream": {
                    "schema": {"type": "string", "format": "binary"},
                    "description": "binary tensor extension: the JSON request, then the tensors' bytes",
                },
            },
        },
    }


_RESPONSE_SCHEMA = {
    "type": "object",
    "required": ["model_name", "outputs"],
    "properties": {
        "model_name": {"type": "string"},
        "model_version": {"type": "string"},
        "id": {"type": "string"},
        "parameters": {"type": "object"},
        "outputs": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name", "datatype", "shape"],
                "properties": {
                    "name": {"type": "string"},
                    "datatype": {"type": "string"},
                    "shape": {"type": "array", "items": {"type": "integer"}},
                    "data": {"type": "array"},
                    "parameters": {"type": "object"},
                },
            },
        },
    },
}
_ERROR = {
    "content": {"application/json": {"schema": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}}}}
}
_ERRORS = {  # every refusal's status and what it means; service.app's docstring says when
    400: "malformed request",
    401: "missing or wrong bearer token",
    404: "unknown model or version",
    413: "body or batch too large",
    415: "a Content-Encoding other than identity",
    422: "a request the model cannot take",
    503: "queue full or not ready (Retry-After)",
    507: "cache disk full (Retry-After)",
}


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"description": _ERRORS[status], **_ERROR} for status in statuses}


_TENSOR_METADATA = {
    "type": "object",
    "required": ["name", "datatype", "shape"],
    "properties": {
        "name": {"type": "string"},
        "datatype": {"type": "string"},
        "shape": {"type": "array", "items": {"type": "integer"}},
        "optional": {"type": "boolean"},
    },
}
_READY = {"application/json": {"schema": {"type": "object", "required": ["ready"], "properties": {"ready": {"type": "boolean"}}}}}

# What the infer routes answer.
RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": f"{' and '.join(OUTPUT_NAMES)}; application/octet-stream when any output is binary",
        "content": {
            "application/json": {"schema": _RESPONSE_SCHEMA},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    },
    **_errors(*_ERRORS),
}
# What the other routes answer beyond their 200: every route but the health routes takes the token.
AUTH_RESPONSES: dict[int | str, dict[str, Any]] = _errors(401)
METADATA_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "the model's inputs, outputs and parameters",
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["name", "platform", "inputs", "outputs"],
                    "properties": {
                        "name": {"type": "string"},
                        "versions": {"type": "array", "items": {"type": "string"}},
                        "platform": {"type": "string"},
                        "inputs": {"type": "array", "items": _TENSOR_METADATA},
                        "outputs": {"type": "array", "items": _TENSOR_METADATA},
                        "parameters": {"type": "object"},
                    },
                }
            }
        },
    },
    **_errors(401, 404),
}
HEALTH_READY_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "ready: the teacher is loaded and warmed up", "content": _READY},
    503: {"description": "not ready yet (Retry-After)", "content": _READY},
}
READY_RESPONSES: dict[int | str, dict[str, Any]] = {**HEALTH_READY_RESPONSES, **_errors(401, 404)}
