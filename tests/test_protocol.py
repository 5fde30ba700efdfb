"""service/protocol.py: the v2 codec against tritonclient's own encoder and decoder, and every
framing, syntax and semantic rule as a table of (request, status, field)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import tracemalloc
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from kdcache.service.protocol import (
    DATATYPES,
    HEADER_LENGTH,
    DecodedRequest,
    ProtocolError,
    RequestedOutput,
    datatype_of,
    decode_request,
    decode_response,
    encode_request,
    encode_response,
    error_body,
    parse_header_length,
)
from kdcache.service.signature import FIELD_OUTPUTS, OUTPUTS, ModelSpec, model_metadata, request_schema, validate

ROOT = Path(__file__).resolve().parent.parent
SPEC = ModelSpec(input_shape=(8, 8), input_dtype="uint8", num_classes=10, temperature=1.0, max_samples=16)
FLOAT_SPEC = ModelSpec(input_shape=(3, 4, 4), input_dtype="float32", num_classes=5, temperature=2.0, max_samples=16)
RNG = np.random.default_rng(0)
IMAGES = RNG.integers(0, 256, size=(4, 8, 8), dtype=np.uint8)
LABELS = np.array([3, -1, 9, 0], dtype=np.int64)


def triton():
    return pytest.importorskip("tritonclient.http")


def triton_body(inputs, *, binary=True, outputs=None, parameters=None, request_id=""):
    """A request body exactly as tritonclient.http builds it: (body, Inference-Header-Content-Length)."""
    http = triton()
    tensors = []
    for name, array, datatype in inputs:
        tensor = http.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array, binary_data=binary)
        tensors.append(tensor)
    return http.InferenceServerClient.generate_request_body(tensors, outputs=outputs, request_id=request_id, parameters=parameters)


def raw_body(header: dict, binary: bytes = b"") -> tuple[bytes, int | None]:
    text = json.dumps(header).encode()
    return text + binary, (len(text) if binary else None)


def image_entry(shape=(4, 8, 8), datatype="UINT8", **extra):
    entry = {"name": "input", "shape": list(shape), "datatype": datatype}
    entry.update(extra)
    return entry


# ---------------------------------------------------------------------------------------------
# Round trips with tritonclient


def test_tritonclient_binary_request_decodes_and_validates():
    http = triton()
    ids = np.array(["a", "b\u00e9", "c", "sample-4"], dtype=object)
    body, length = triton_body(
        [("input", IMAGES, "UINT8"), ("id", ids, "BYTES"), ("label", LABELS, "INT64")],
        outputs=[http.InferRequestedOutput("soft_targets", binary_data=True), http.InferRequestedOutput("logits", binary_data=False)],
        parameters={"temperature": 2.0, "store": False},
        request_id="req-1",
    )
    assert length is not None
    decoded = decode_request(body, length)
    assert decoded.id == "req-1"
    np.testing.assert_array_equal(decoded.inputs["input"], IMAGES)
    assert list(decoded.inputs["id"]) == [b"a", "b\u00e9".encode(), b"c", b"sample-4"]
    np.testing.assert_array_equal(decoded.inputs["label"], LABELS)
    assert decoded.datatypes == {"input": "UINT8", "id": "BYTES", "label": "INT64"}
    assert decoded.outputs == [RequestedOutput("soft_targets", True), RequestedOutput("logits", False)]
    assert decoded.binary_output_default is False

    batch = validate(decoded, SPEC)
    assert batch.inputs.dtype == np.uint8 and batch.inputs.flags.c_contiguous
    np.testing.assert_array_equal(batch.inputs, IMAGES)
    assert list(batch.ids) == ["a", "b\u00e9", "c", "sample-4"]
    np.testing.assert_array_equal(batch.labels, LABELS)
    assert (batch.temperature, batch.store) == (2.0, False)


def test_tritonclient_json_request_decodes():
    images = RNG.normal(size=(2, 3, 4, 4)).astype(np.float32)
    body, length = triton_body([("input", images, "FP32"), ("id", np.array([7, 8], dtype=np.int64), "INT64")], binary=False)
    assert length is None
    decoded = decode_request(body, None)
    np.testing.assert_array_equal(decoded.inputs["input"], images)  # JSON floats round-trip float32 exactly
    batch = validate(decoded, FLOAT_SPEC)
    assert list(batch.ids) == ["7", "8"]
    assert batch.labels is None and batch.temperature == 2.0 and batch.store is True


def test_tritonclient_outputs_none_asks_for_all_outputs_in_binary():
    body, length = triton_body([("input", IMAGES, "UINT8")])
    decoded = decode_request(body, length)
    assert decoded.outputs is None and decoded.binary_output_default is True
    batch = validate(decoded, SPEC)
    assert batch.outputs == [RequestedOutput("soft_targets", True), RequestedOutput("logits", True)]
    assert batch.ids is None


def test_tritonclient_json_bytes_ids_round_trip():
    ids = np.array([b"x", "\u00fcber".encode(), b"z", b"w"], dtype=object)
    body, length = triton_body([("input", IMAGES, "UINT8"), ("id", ids, "BYTES")], binary=False)
    decoded = decode_request(body, length)
    assert list(decoded.inputs["id"]) == list(ids)
    assert list(validate(decoded, SPEC).ids) == ["x", "\u00fcber", "z", "w"]


@pytest.mark.parametrize("binary", [True, False])
def test_encode_response_parses_with_tritonclient(binary):
    http = triton()
    soft = RNG.random((4, 10)).astype(np.float32)
    logits = RNG.normal(size=(4, 10)).astype(np.float32)
    names = np.array([b"a", b"b"], dtype=object)
    body, headers = encode_response(
        "teacher",
        "req-9",
        {"cache_hits": 3, "cache_misses": 1},
        [("soft_targets", soft, binary), ("logits", logits, False), ("names", names, binary)],
    )
    header_length = headers.get(HEADER_LENGTH)
    assert (header_length is not None) == binary
    assert headers["Content-Type"] == ("application/octet-stream" if binary else "application/json")
    result = http.InferResult.from_response_body(body, header_length=None if header_length is None else int(header_length))
    np.testing.assert_array_equal(result.as_numpy("soft_targets"), soft)
    np.testing.assert_array_equal(result.as_numpy("logits"), logits)
    assert [bytes(v) if binary else v.encode() for v in result.as_numpy("names")] == [b"a", b"b"]
    response = result.get_response()
    assert response["model_name"] == "teacher" and response["model_version"] == "1" and response["id"] == "req-9"
    assert response["parameters"] == {"cache_hits": 3, "cache_misses": 1}


def test_encode_request_matches_what_tritonclient_sends():
    http = triton()
    ids = np.array(["a", "b", "c", "d"], dtype=object)
    ours, our_length = encode_request(
        [("input", IMAGES), ("id", ids), ("label", LABELS)], parameters={"store": True}, outputs=[RequestedOutput("soft_targets", True)]
    )
    theirs, their_length = triton_body(
        [("input", IMAGES, "UINT8"), ("id", ids, "BYTES"), ("label", LABELS, "INT64")],
        outputs=[http.InferRequestedOutput("soft_targets")],
        parameters={"store": True},
    )
    a, b = decode_request(ours, our_length[HEADER_LENGTH]), decode_request(theirs, their_length)
    assert ours[int(our_length[HEADER_LENGTH]) :] == theirs[their_length:]  # identical binary payloads
    assert (a.parameters, a.outputs, a.datatypes) == (b.parameters, b.outputs, b.datatypes)
    for name in a.inputs:
        np.testing.assert_array_equal(a.inputs[name], b.inputs[name])


def test_decode_response_reads_binary_and_json():
    soft = RNG.random((2, 3)).astype(np.float32)
    ids = np.array([b"p", b"q"], dtype=object)
    body, headers = encode_response("teacher", None, {}, [("soft_targets", soft, True), ("ids", ids, True), ("logits", soft, False)])
    header, outputs = decode_response(body, headers[HEADER_LENGTH])
    assert "id" not in header
    np.testing.assert_array_equal(outputs["soft_targets"], soft)
    np.testing.assert_array_equal(outputs["logits"], soft)
    assert list(outputs["ids"]) == [b"p", b"q"]


def test_nested_and_flat_json_data():
    nested = IMAGES[:2].tolist()
    flat = IMAGES[:2].ravel().tolist()
    for data in (nested, flat, [nested[0], flat[64:]]):
        body, length = raw_body({"inputs": [image_entry((2, 8, 8), data=data)]})
        np.testing.assert_array_equal(decode_request(body, length).inputs["input"], IMAGES[:2])


def test_json_bool_and_fp16():
    body, _ = raw_body(
        {
            "inputs": [
                {"name": "flags", "shape": [3], "datatype": "BOOL", "data": [True, False, True]},
                {"name": "half", "shape": [2], "datatype": "FP16", "data": [1, 0.5]},
            ]
        }
    )
    decoded = decode_request(body, None)
    assert decoded.inputs["flags"].dtype == np.bool_ and decoded.inputs["flags"].tolist() == [True, False, True]
    assert decoded.inputs["half"].dtype == np.float16 and decoded.inputs["half"].tolist() == [1.0, 0.5]


def test_binary_inputs_are_zero_copy_views_of_the_body():
    body, length = triton_body([("input", IMAGES, "UINT8")])
    decoded = decode_request(body, length)
    assert not decoded.inputs["input"].flags.writeable  # a view of the request bytes, not a copy
    assert np.shares_memory(decoded.inputs["input"], np.frombuffer(body, np.uint8))


def test_header_length_accepts_its_raw_string_value():
    body, length = triton_body([("input", IMAGES, "UINT8")])
    np.testing.assert_array_equal(decode_request(body, str(length)).inputs["input"], IMAGES)


def test_huge_declared_shape_is_413_without_allocating():
    header = {"inputs": [image_entry((1 << 40, 8, 8), parameters={"binary_data_size": 64})]}
    body, length = raw_body(header, bytes(64))
    tracemalloc.start()
    started = time.perf_counter()
    with pytest.raises(ProtocolError) as info:
        decode_request(body, length, max_elements=1 << 20)
    elapsed = time.perf_counter() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert info.value.status == 413 and info.value.field == "input" and "input" in str(info.value)
    assert elapsed < 0.5 and peak < 1 << 20
    # JSON data too: the count is refused before the (short) data is even looked at.
    body, _ = raw_body({"inputs": [image_entry((1 << 40,), data=[1, 2])]})
    with pytest.raises(ProtocolError) as info:
        decode_request(body, None)
    assert info.value.status == 413


@pytest.mark.parametrize("module", ["kdcache.service.protocol", "kdcache.service.signature"])
def test_module_imports_no_framework_model_or_hdf5(module):
    code = f"import sys, {module}; print(sorted(m for m in ('fastapi', 'torch', 'h5py', 'httpx') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_header_length_is_read_as_the_service_always_read_it():
    """One parser for the header, the route's: int() of the raw value (a sign and white space allowed)."""
    assert parse_header_length(None, 10) is None
    assert parse_header_length(" 7 ", 10) == parse_header_length("+7", 10) == parse_header_length(7, 10) == 7
    for raw, message in (
        ("12x", "'12x' is not an integer"),
        ("-1", "must be a non-negative integer"),
        (True, "non-negative"),
        ("11", "only 10"),
    ):
        with pytest.raises(ProtocolError, match=message) as info:
            parse_header_length(raw, 10)
        assert (info.value.status, info.value.field) == (400, HEADER_LENGTH)


def test_model_metadata_and_openapi_come_from_one_declaration():
    meta = model_metadata("teacher", SPEC, {"temperature": 1.0})
    assert meta == {
        "name": "teacher",
        "versions": ["1"],
        "platform": "pytorch",
        "inputs": [
            {"name": "input", "datatype": "UINT8", "shape": [-1, 8, 8]},
            {"name": "id", "datatype": "BYTES", "shape": [-1], "optional": True},
            {"name": "label", "datatype": "INT64", "shape": [-1], "optional": True},
        ],
        "outputs": [
            {"name": "soft_targets", "datatype": "FP32", "shape": [-1, 10]},
            {"name": "logits", "datatype": "FP32", "shape": [-1, 10]},
        ],
        "parameters": {"temperature": 1.0},
    }
    schema = request_schema()
    tensor = schema["properties"]["inputs"]["items"]["properties"]
    assert tensor["datatype"]["enum"] == [*DATATYPES, "BYTES"]
    assert tensor["name"]["examples"] == ["input", "id", "label", "input_ids", "lengths", "attention_mask"]
    assert tensor["name"]["description"] == (
        "input (required: a classifier), id, label, input_ids (required: a language model), lengths or attention_mask"
    )
    assert schema["properties"]["outputs"]["items"]["properties"]["name"]["enum"] == [t.name for t in OUTPUTS] + list(FIELD_OUTPUTS)
    assert list(schema["properties"]["parameters"]["properties"]) == ["temperature", "store", "no_outputs", "binary_data_output", "label_names"]


def test_datatype_of_and_error_body():
    assert datatype_of(np.float32) == "FP32" and datatype_of(np.dtype(">i8")) == "INT64" and datatype_of(object) == "BYTES"
    with pytest.raises(ValueError):
        datatype_of(np.complex64)
    assert json.loads(error_body("input: bad")) == {"error": "input: bad"}
    exc = ProtocolError(422, "label", "out of range")
    assert (str(exc), exc.status, exc.field) == ("label: out of range", 422, "label")


# ---------------------------------------------------------------------------------------------
# decode_request rules: (case, body, header length, status, field named in the message)


def _binary_case(entries, payload, length_delta=0):
    text = json.dumps({"inputs": entries}).encode()
    return text + payload, len(text) + length_delta


GOOD_IMAGE = image_entry(parameters={"binary_data_size": 256})
DECODE_CASES = [
    ("not json", b"{nope", None, 400, None),
    ("not utf-8", b"\xff\xfe\xfd", None, 400, None),
    ("not an object", b"[1, 2]", None, 400, None),
    ("header length not an int", *_binary_case([GOOD_IMAGE], IMAGES.tobytes())[:1], "12x", 400, HEADER_LENGTH),
    ("header length negative", b"{}", "-1", 400, HEADER_LENGTH),
    ("header length past the body", b'{"inputs": []}', 999, 400, HEADER_LENGTH),
    ("inputs missing", b"{}", None, 400, "inputs"),
    ("inputs not a list", b'{"inputs": {"name": "input"}}', None, 400, "inputs"),
    ("input not an object", b'{"inputs": [3]}', None, 400, "inputs[0]"),
    ("input without name", *raw_body({"inputs": [{"shape": [1], "datatype": "INT64", "data": [1]}]}), 400, "inputs[0]"),
    ("input without datatype", *raw_body({"inputs": [{"name": "input", "shape": [1], "data": [1]}]}), 400, "input"),
    ("input without shape", *raw_body({"inputs": [{"name": "input", "datatype": "UINT8", "data": [1]}]}), 400, "input"),
    ("shape not a list", *raw_body({"inputs": [image_entry(data=[1]) | {"shape": 4}]}), 400, "input"),
    ("negative dim", *raw_body({"inputs": [image_entry((-1, 8, 8), data=[])]}), 400, "input"),
    ("float dim", *raw_body({"inputs": [image_entry((1.0, 8, 8), data=[])]}), 400, "input"),
    ("bool dim", *raw_body({"inputs": [image_entry((True, 1), data=[1])]}), 400, "input"),
    ("unknown datatype", *raw_body({"inputs": [image_entry(datatype="UINT7", data=[])]}), 400, "input"),
    ("BF16", *raw_body({"inputs": [image_entry(datatype="BF16", data=[])]}), 422, "input"),
    ("duplicate input", *raw_body({"inputs": [image_entry((1,), data=[1]), image_entry((1,), data=[1])]}), 400, "input"),
    ("no data", *raw_body({"inputs": [image_entry()]}), 400, "input"),
    ("data and binary", *_binary_case([image_entry(data=[1], parameters={"binary_data_size": 256})], IMAGES.tobytes()), 400, "input"),
    ("binary without header length", *raw_body({"inputs": [GOOD_IMAGE]})[:1], None, 400, "input"),
    ("binary size negative", *_binary_case([image_entry(parameters={"binary_data_size": -4})], b""), 400, "input"),
    (
        "binary size wrong for shape",
        *_binary_case([image_entry(parameters={"binary_data_size": 255})], IMAGES.tobytes()[:255]),
        400,
        "input",
    ),
    ("binary too short", *_binary_case([GOOD_IMAGE], IMAGES.tobytes()[:200]), 400, "input"),
    ("binary too long", *_binary_case([GOOD_IMAGE], IMAGES.tobytes() + b"extra"), 400, HEADER_LENGTH),
    ("header length cuts the json", *_binary_case([GOOD_IMAGE], IMAGES.tobytes(), length_delta=-3), 400, None),
    ("json data too short", *raw_body({"inputs": [image_entry((2, 2), data=[1, 2, 3])]}), 400, "input"),
    ("json data too long", *raw_body({"inputs": [image_entry((2, 2), data=[[1, 2], [3, 4], [5]])]}), 400, "input"),
    ("json data not a list", *raw_body({"inputs": [image_entry((1,), data=5)]}), 400, "input"),
    ("json string for ints", *raw_body({"inputs": [image_entry((2,), data=[1, "2"])]}), 400, "input"),
    ("json float for ints", *raw_body({"inputs": [image_entry((2,), data=[1, 2.5])]}), 400, "input"),
    ("json bool for ints", *raw_body({"inputs": [image_entry((2,), data=[1, True])]}), 400, "input"),
    ("json int out of range", *raw_body({"inputs": [image_entry((2,), data=[1, 256])]}), 400, "input"),
    ("json string for floats", *raw_body({"inputs": [image_entry((1,), "FP32", data=["1.0"])]}), 400, "input"),
    ("json number for BYTES", *raw_body({"inputs": [{"name": "id", "shape": [1], "datatype": "BYTES", "data": [7]}]}), 400, "id"),
    ("json int for BOOL", *raw_body({"inputs": [{"name": "flag", "shape": [1], "datatype": "BOOL", "data": [1]}]}), 400, "flag"),
    (
        "BYTES binary count short",
        *_binary_case([{"name": "id", "shape": [2], "datatype": "BYTES", "parameters": {"binary_data_size": 5}}], b"\x01\x00\x00\x00a"),
        400,
        "id",
    ),
    (
        "BYTES binary truncated element",
        *_binary_case([{"name": "id", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 6}}], b"\x09\x00\x00\x00ab"),
        400,
        "id",
    ),
    (
        "BYTES binary extra element",
        *_binary_case(
            [{"name": "id", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 10}}], b"\x01\x00\x00\x00a" * 2
        ),
        400,
        "id",
    ),
    ("shared memory", *raw_body({"inputs": [image_entry(parameters={"shared_memory_region": "r"})]}), 400, "input"),
    ("request id not a string", *raw_body({"id": 5, "inputs": []}), 400, "id"),
    ("parameters not an object", *raw_body({"parameters": [1], "inputs": []}), 400, "parameters"),
    ("binary_data_output not a bool", *raw_body({"parameters": {"binary_data_output": 1}, "inputs": []}), 400, "binary_data_output"),
    ("outputs not a list", *raw_body({"inputs": [], "outputs": "logits"}), 400, "outputs"),
    ("output without name", *raw_body({"inputs": [], "outputs": [{}]}), 400, "outputs[0]"),
    ("output twice", *raw_body({"inputs": [], "outputs": [{"name": "logits"}, {"name": "logits"}]}), 400, "logits"),
    (
        "binary_data not a bool",
        *raw_body({"inputs": [], "outputs": [{"name": "logits", "parameters": {"binary_data": "yes"}}]}),
        400,
        "logits",
    ),
    ("classification", *raw_body({"inputs": [], "outputs": [{"name": "logits", "parameters": {"classification": 3}}]}), 422, "logits"),
    ("too many elements", *raw_body({"inputs": [image_entry((1 << 20, 1 << 20), data=[])]}), 413, "input"),
]


@pytest.mark.parametrize(("case", "body", "header_length", "status", "field"), DECODE_CASES, ids=[case[0] for case in DECODE_CASES])
def test_decode_request_rules(case, body, header_length, status, field):
    with pytest.raises(ProtocolError) as info:
        decode_request(body, header_length)
    assert info.value.status == status, str(info.value)
    if field is not None:
        assert info.value.field == field
        assert str(info.value).startswith(f"{field}: "), str(info.value)


def test_empty_outputs_list_means_all_outputs():
    body, _ = raw_body({"inputs": [image_entry((1, 8, 8), data=IMAGES[:1].tolist())], "outputs": []})
    decoded = decode_request(body, None)
    assert decoded.outputs is None
    assert [out.name for out in validate(decoded, SPEC).outputs] == ["soft_targets", "logits"]


# ---------------------------------------------------------------------------------------------
# validate rules: (case, inputs, parameters, outputs, status, field)


def _decoded(inputs: dict, datatypes: dict | None = None, parameters: dict | None = None, outputs=None) -> DecodedRequest:
    datatypes = datatypes or {}
    arrays, types = {}, {}
    for name, array in inputs.items():
        arrays[name] = array
        types[name] = datatypes.get(name) or datatype_of(array.dtype)
    return DecodedRequest(None, parameters or {}, arrays, types, outputs, False)


def _ids(*values):
    return np.array([v.encode() if isinstance(v, str) else v for v in values], dtype=object)


def _floats(value):
    images = np.zeros((2, 3, 4, 4), np.float32)
    images[1, 0, 0, 0] = value
    return images


VALIDATE_CASES = [
    ("unknown input", {"input": IMAGES, "extra": LABELS}, {}, None, SPEC, 422, "extra"),
    ("input missing", {"label": LABELS}, {}, None, SPEC, 422, "input"),
    ("input wrong datatype", {"input": IMAGES.astype(np.float32)}, {}, None, SPEC, 422, "input"),
    ("input wrong sample shape", {"input": np.zeros((4, 8, 9), np.uint8)}, {}, None, SPEC, 422, "input"),
    ("input missing batch dim", {"input": np.zeros((8, 8), np.uint8)}, {}, None, SPEC, 422, "input"),
    ("input empty batch", {"input": np.zeros((0, 8, 8), np.uint8)}, {}, None, SPEC, 422, "input"),
    ("input too many samples", {"input": np.zeros((17, 8, 8), np.uint8)}, {}, None, SPEC, 413, "input"),
    ("input NaN", {"input": _floats(np.nan)}, {}, None, FLOAT_SPEC, 422, "input"),
    ("input Inf", {"input": _floats(-np.inf)}, {}, None, FLOAT_SPEC, 422, "input"),
    ("id wrong datatype", {"input": IMAGES, "id": np.arange(4, dtype=np.int32)}, {}, None, SPEC, 422, "id"),
    ("id wrong count", {"input": IMAGES, "id": _ids("a", "b", "c")}, {}, None, SPEC, 422, "id"),
    ("id wrong rank", {"input": IMAGES, "id": np.arange(4, dtype=np.int64).reshape(2, 2)}, {}, None, SPEC, 422, "id"),
    ("id empty string", {"input": IMAGES, "id": _ids("a", "", "c", "d")}, {}, None, SPEC, 422, "id"),
    ("id not utf-8", {"input": IMAGES, "id": _ids("a", b"\xff", "c", "d")}, {}, None, SPEC, 422, "id"),
    ("id duplicate", {"input": IMAGES, "id": _ids("a", "b", "a", "d")}, {}, None, SPEC, 422, "id"),
    ("id duplicate int", {"input": IMAGES, "id": np.array([1, 2, 3, 1], np.int64)}, {}, None, SPEC, 422, "id"),
    ("label wrong datatype", {"input": IMAGES, "label": LABELS.astype(np.int32)}, {}, None, SPEC, 422, "label"),
    ("label wrong count", {"input": IMAGES, "label": LABELS[:3]}, {}, None, SPEC, 422, "label"),
    ("label too big", {"input": IMAGES, "label": np.array([0, 1, 10, 2], np.int64)}, {}, None, SPEC, 422, "label"),
    ("label below -1", {"input": IMAGES, "label": np.array([0, -2, 1, 2], np.int64)}, {}, None, SPEC, 422, "label"),
    ("temperature zero", {"input": IMAGES}, {"temperature": 0}, None, SPEC, 422, "temperature"),
    ("temperature negative", {"input": IMAGES}, {"temperature": -1.5}, None, SPEC, 422, "temperature"),
    ("temperature string", {"input": IMAGES}, {"temperature": "2"}, None, SPEC, 422, "temperature"),
    ("temperature bool", {"input": IMAGES}, {"temperature": True}, None, SPEC, 422, "temperature"),
    ("temperature inf", {"input": IMAGES}, {"temperature": float("inf")}, None, SPEC, 422, "temperature"),
    ("temperature nan", {"input": IMAGES}, {"temperature": float("nan")}, None, SPEC, 422, "temperature"),
    ("temperature fixed", {"input": IMAGES}, {"temperature": 4.0}, None, ModelSpec((8, 8), "uint8", 10, 1.0, 16, True), 422, "temperature"),
    ("store not bool", {"input": IMAGES}, {"store": "false"}, None, SPEC, 422, "store"),
    ("store int", {"input": IMAGES}, {"store": 0}, None, SPEC, 422, "store"),
    ("unknown output", {"input": IMAGES}, {}, [RequestedOutput("probs", True)], SPEC, 422, "probs"),
]


@pytest.mark.parametrize(
    ("case", "inputs", "parameters", "outputs", "spec", "status", "field"), VALIDATE_CASES, ids=[c[0] for c in VALIDATE_CASES]
)
def test_validate_rules(case, inputs, parameters, outputs, spec, status, field):
    with pytest.raises(ProtocolError) as info:
        validate(_decoded(inputs, parameters=parameters, outputs=outputs), spec)
    assert info.value.status == status, str(info.value)
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: "), str(info.value)


def test_validate_messages_say_what_was_expected():
    with pytest.raises(ProtocolError, match=r"^input: shape \[4, 8, 9\], model expects \[-1, 8, 8\]$"):
        validate(_decoded({"input": np.zeros((4, 8, 9), np.uint8)}), SPEC)
    with pytest.raises(ProtocolError, match=r"^input: datatype FP32, model expects UINT8$"):
        validate(_decoded({"input": IMAGES.astype(np.float32)}), SPEC)
    with pytest.raises(ProtocolError, match="arithmetic ensemble"):
        validate(_decoded({"input": IMAGES}, parameters={"temperature": 4.0}), ModelSpec((8, 8), "uint8", 10, 1.0, 16, True))


def test_validate_accepts_the_edges():
    fixed = ModelSpec((8, 8), "uint8", 10, 1.0, 4, fixed_temperature=True)
    labels = np.array([-1, 0, 9, 5], np.int64)
    batch = validate(
        _decoded(
            {"input": IMAGES, "label": labels, "id": np.array([-3, 0, 5, 2**40], np.int64)}, parameters={"temperature": 1, "store": True}
        ),
        fixed,
    )
    assert batch.temperature == 1.0 and batch.store is True
    assert list(batch.ids) == ["-3", "0", "5", str(2**40)]
    np.testing.assert_array_equal(batch.labels, labels)
    # Request parameters other than temperature and store are ignored (tritonclient sends binary_data_output).
    batch = validate(_decoded({"input": IMAGES}, parameters={"binary_data_output": True, "priority": 3}), SPEC)
    assert batch.temperature == SPEC.temperature


def test_tritonclient_talks_to_a_loopback_server_built_on_the_codec():
    """The whole wire, headers included, with a stdlib HTTP server standing in for the service."""
    http = triton()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            try:
                decoded = decode_request(body, self.headers.get(HEADER_LENGTH))
                batch = validate(decoded, SPEC)
                logits = batch.inputs.reshape(len(batch.inputs), -1)[:, :10].astype(np.float32)
                payload, headers = encode_response(
                    "teacher", decoded.id, {"cache_hits": 0}, [(o.name, logits, o.binary) for o in batch.outputs]
                )
                status = 200
            except ProtocolError as exc:
                payload, headers, status = error_body(exc.message), {"Content-Type": "application/json"}, exc.status
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key.lower(), value)  # header names are case-insensitive to tritonclient
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        client = http.InferenceServerClient(f"127.0.0.1:{server.server_port}")
        tensor = http.InferInput("input", [4, 8, 8], "UINT8").set_data_from_numpy(IMAGES)
        result = client.infer("teacher", [tensor], request_id="r1")  # outputs=None: every output, binary
        expected = IMAGES.reshape(4, -1)[:, :10].astype(np.float32)
        np.testing.assert_array_equal(result.as_numpy("soft_targets"), expected)
        np.testing.assert_array_equal(result.as_numpy("logits"), expected)
        assert result.get_response()["id"] == "r1" and result.get_response()["parameters"] == {"cache_hits": 0}
        json_out = http.InferRequestedOutput("logits", binary_data=False)
        np.testing.assert_array_equal(client.infer("teacher", [tensor], outputs=[json_out]).as_numpy("logits"), expected)
        bad = http.InferInput("input", [2, 8, 9], "UINT8").set_data_from_numpy(np.zeros((2, 8, 9), np.uint8))
        with pytest.raises(Exception) as info:
            client.infer("teacher", [bad])
        assert info.value.status() == "422" and info.value.message() == "input: shape [2, 8, 9], model expects [-1, 8, 8]"
        client.close()
    finally:
        server.shutdown()
        server.server_close()
