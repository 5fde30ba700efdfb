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
    task: str = "classify"  # "lm": token sequences in (input_ids), targets per token out
    # The cache layout's fields, answered as outputs of their own: (name, row shape, numpy dtype).
    fields: tuple[tuple[str, tuple[int, ...], str], ...] = ()
    dense: bool = True  # whether soft_targets and logits are answered (DENSE_LIMIT)
    max_tokens: int = 0  # a language model's token budget per batch: rows x the longest sequence

    def output_shape(self) -> list[int]:
        if self.task == "lm":
            return [-1, -1, self.num_classes]
        return [-1, self.views, self.num_classes] if self.views > 1 else [-1, self.num_classes]

    @property
    def sequence_length(self) -> int:
        return self.input_shape[0]

    def outputs(self) -> tuple[TensorSpec, ...]:
        """What this model answers: the cache layout's fields, and the dense outputs where offered."""
        fields = tuple(
            TensorSpec(name, (datatype_of(dtype),), lambda model, shape=shape: [-1, *shape]) for name, shape, dtype in self.fields
        )
        return (OUTPUTS if self.dense else ()) + fields

    def inputs(self) -> tuple[TensorSpec, ...]:
        return TOKEN_INPUTS if self.task == "lm" else INPUTS


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
# A language model's inputs: token ids, padded on the right, with each sequence's length given by
# ``lengths`` or by an ``attention_mask`` of ones then zeros (neither: every sequence is L long).
TOKEN_INPUTS = (
    TensorSpec("input_ids", ("INT64",), lambda model: [-1, model.sequence_length]),
    TensorSpec("lengths", ("INT64", "INT32"), lambda model: [-1], optional=True),
    TensorSpec("attention_mask", ("INT64", "INT32", "BOOL"), lambda model: [-1, model.sequence_length], optional=True),
    TensorSpec("id", (BYTES, "INT64"), lambda model: [-1], optional=True),
)
OUTPUTS = (
    TensorSpec("soft_targets", ("FP32",), lambda model: model.output_shape()),  # softmax(logits / temperature)
    TensorSpec("logits", ("FP32",), lambda model: model.output_shape()),  # as the cache holds them
)
# Dense outputs (soft_targets, logits) of a sparse layout are decoded from its fields: C floats per
# sample or token where the cache keeps K. They are answered up to this many classes; above it a
# sparse service answers its fields only (a full layout answers them at any C).
DENSE_LIMIT = 1024
# Every output any model may answer, for the request schema: the dense ones and every layout's fields.
FIELD_OUTPUTS = ("topk_values", "topk_indices", "tail_logmass", "sample_indices", "sample_counts", "lengths")
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
_INPUT = {t.name: t for t in INPUTS + TOKEN_INPUTS}


# ---------------------------------------------------------------------------------------------
# Validation


@dataclass
class InferBatch:
    inputs: np.ndarray  # [B, *input_shape] in the model's dtype, C-contiguous; may be a read-only view of the request body
    # (a language model's: [B, L] token ids, padded with 0 to the cache's L)
    ids: np.ndarray | None  # object array of str; None when the client sent none
    labels: np.ndarray | None  # int64 [B], values in [-1, C-1]
    temperature: float
    store: bool
    outputs: list[RequestedOutput]
    label_names: list[str] | None = None  # the request's label_names parameter, checked; None when absent
    lengths: np.ndarray | None = None  # a language model's token counts [B]
    width: int = 0  # a language model's: the request's sequence axis, which the answer keeps


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
    names = tuple(t.name for t in spec.inputs())
    unknown = sorted(set(request.inputs) - set(names))
    if unknown:
        raise ProtocolError(422, unknown[0], f"unknown input (the model takes {', '.join(names)})")
    for required in (t.name for t in spec.inputs() if not t.optional):
        if required not in request.inputs:
            raise ProtocolError(422, required, f"missing (the model's {required} tensor is required)")
    lengths, width = None, 0
    if spec.task == "lm":
        inputs, lengths = _tokens(request, spec)
        width = request.inputs["input_ids"].shape[1]
    else:
        inputs = _samples(request, spec)
    batch = inputs.shape[0]

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
    outputs = _outputs(request, spec)
    return InferBatch(inputs, ids, labels, temperature, store, outputs, label_names, lengths, width)


def _samples(request: DecodedRequest, spec: ModelSpec) -> np.ndarray:
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
    return np.ascontiguousarray(inputs)  # a no-op for decoded tensors, which are contiguous already


def _tokens(request: DecodedRequest, spec: ModelSpec) -> tuple[np.ndarray, np.ndarray]:
    """A language model's ``input_ids`` [B, l] → the ids padded with 0 to the cache's L, and the lengths."""
    tokens = request.inputs["input_ids"]
    if request.datatypes["input_ids"] != "INT64":
        raise ProtocolError(422, "input_ids", f"datatype {request.datatypes['input_ids']}, the model takes INT64 token ids")
    if tokens.ndim != 2 or tokens.shape[0] < 1:
        raise ProtocolError(422, "input_ids", f"shape {list(tokens.shape)}, the model takes [B, L] token ids with B >= 1")
    batch, width = tokens.shape
    if width > spec.sequence_length:
        raise ProtocolError(422, "input_ids", f"{width} tokens per sequence, beyond the teacher's {spec.sequence_length} (its context, or --input-shape)")
    if batch > spec.max_samples:
        raise ProtocolError(413, "input_ids", f"{batch} sequences in one request, the limit is {spec.max_samples}; split the batch")
    lengths = _token_lengths(request, batch, width)
    empty = np.flatnonzero(lengths < 1)
    if width == 0 or len(empty):
        raise ProtocolError(422, "input_ids", f"sequence #{int(empty[0]) if len(empty) else 0} is empty; every sequence needs a token")
    valid = np.arange(width)[None, :] < lengths[:, None]
    bad = valid & ((tokens < 0) | (tokens >= spec.num_classes))
    if bad.any():
        row, position = (int(v[0]) for v in np.nonzero(bad))
        raise ProtocolError(
            422, "input_ids", f"token id {int(tokens[row, position])} (sequence #{row}, position {position}) is outside the vocabulary [0, {spec.num_classes})"
        )
    cost = batch * int(lengths.max())
    if cost > spec.max_tokens:
        raise ProtocolError(
            413, "input_ids", f"{batch} sequences of up to {int(lengths.max())} tokens cost {cost} tokens, over the batch budget of "
            f"{spec.max_tokens} (--max-batch-tokens); split the request",
        )  # fmt: skip
    padded = np.zeros((batch, spec.sequence_length), dtype=np.int64)
    padded[:, :width] = np.where(valid, tokens, 0)
    return padded, lengths


def _token_lengths(request: DecodedRequest, batch: int, width: int) -> np.ndarray:
    """Each sequence's token count: from ``lengths``, from ``attention_mask`` (ones, then zeros), or ``width``."""
    if "lengths" in request.inputs and "attention_mask" in request.inputs:
        raise ProtocolError(422, "lengths", "give lengths or attention_mask, not both")
    if "lengths" in request.inputs:
        lengths = request.inputs["lengths"]
        _check_vector("lengths", lengths, request.datatypes["lengths"], batch)
        if lengths.size and int(lengths.max()) > width:
            raise ProtocolError(422, "lengths", f"value {int(lengths.max())} is beyond the {width} tokens sent per sequence")
        return lengths.astype(np.int64)
    if "attention_mask" in request.inputs:
        mask = request.inputs["attention_mask"]
        if request.datatypes["attention_mask"] not in _INPUT["attention_mask"].datatypes:
            raise ProtocolError(422, "attention_mask", f"datatype {request.datatypes['attention_mask']}, expected INT64, INT32 or BOOL")
        if mask.shape != (batch, width):
            raise ProtocolError(422, "attention_mask", f"shape {list(mask.shape)}, expected [{batch}, {width}] as input_ids")
        mask = mask.astype(np.int64)
        lengths = mask.sum(axis=1)
        if ((mask != 0) & (mask != 1)).any() or (mask != (np.arange(width)[None, :] < lengths[:, None])).any():
            raise ProtocolError(422, "attention_mask", "must be ones then zeros in each row (sequences padded on the right)")
        return lengths
    return np.full(batch, width, dtype=np.int64)


def _outputs(request: DecodedRequest, spec: ModelSpec) -> list[RequestedOutput]:
    no_outputs = request.parameters.get("no_outputs", False)
    if not isinstance(no_outputs, bool):
        raise ProtocolError(422, "no_outputs", f"must be true or false, got {no_outputs!r}")
    if no_outputs and request.outputs:
        raise ProtocolError(422, "no_outputs", "is true, but the request lists outputs; send one or the other")
    names = [t.name for t in spec.outputs()]
    if no_outputs:
        return []
    if request.outputs is None:
        return [RequestedOutput(name, request.binary_output_default) for name in names]
    for out in request.outputs:
        if out.name not in names:
            hint = f"; a sparse cache's model answers dense outputs up to {DENSE_LIMIT} classes" if out.name in OUTPUT_NAMES else ""
            raise ProtocolError(422, out.name, f"unknown output (the model has {', '.join(names)}){hint}")
    return list(request.outputs)


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
        "inputs": [_tensor_metadata(t, spec) for t in spec.inputs()],
        "outputs": [_tensor_metadata(t, spec) for t in spec.outputs()],
        "parameters": parameters,
    }


_JSON_ELEMENT = {"oneOf": [{"type": "number"}, {"type": "boolean"}, {"type": "string"}]}
_EXAMPLE = {"id": "r1", "inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [0.0, 0.5, 1.0, 0.25]}]}


def request_schema() -> dict[str, Any]:
    """The JSON schema of an infer request's JSON part."""
    every = {t.name: t for t in INPUTS + TOKEN_INPUTS}
    names = [f"{t.name}{'' if t.optional else ' (required: ' + ('a classifier' if t in INPUTS else 'a language model') + ')'}" for t in every.values()]
    tensor = {
        "type": "object",
        "required": ["name", "shape", "datatype"],
        "properties": {
            "name": {"type": "string", "description": f"{', '.join(names[:-1])} or {names[-1]}", "examples": list(every)},
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
            "name": {"type": "string", "enum": [*OUTPUT_NAMES, *FIELD_OUTPUTS]},
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
        "description": f"{' and '.join(OUTPUT_NAMES)} (dense), or the cache layout's fields; application/octet-stream when any output is binary",
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
