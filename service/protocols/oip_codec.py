"""The Open Inference Protocol's inference messages, free of routing: one neutral request type
(`InferRequest`) that the HTTP codec here (JSON, with the binary tensor data extension,
optionally compressed) and the gRPC codec (service/protocols/oip_grpc.py) each produce once, the
checks against the model both share, the JSON response, and the protocol-neutral parts both
adapters answer with (model metadata, extensions, versions).

A request has exactly one input, either of:
- the graph's input (`images`): FP32 [N, 3, H, W], preprocessed as the model's metadata says;
- `image_bytes`: BYTES [N] (or [N, 1]), one encoded image (JPEG, PNG, ...) per element.
Outputs are the graph's `logits` [N, classes] and `embedding` [N, dim], FP32. Extensions:
`binary_tensor_data` and `classification` (`{"classification": K}` on a requested output: BYTES
[N, K] of "value:index[:label]", highest first, as Triton answers).

The JSON request's structure is pydantic's job (`InferenceRequest`, as KServe's v2 data model,
strict: no coercion); a structure error becomes one clear 400 message naming the field
(`_EXPLAINED`). Tensor data is untrusted: sizes, shapes and element counts are checked against
the model before anything is allocated from them, and nested JSON is flattened without recursion.
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, ValidationError
from pydantic_core import ErrorDetails

from contract.repository import ModelEntry

from ..core.errors import (
    MalformedRequestError,
    ModelNotFoundError,
    RequestTooLargeError,
    TooManyImagesError,
    UnsupportedMediaTypeError,
    clip,
)
from ..core.postprocess import classifications
from ..core.serving import Model

IMAGE_BYTES = "image_bytes"
HEADER_LENGTH = "Inference-Header-Content-Length"
EXTENSIONS = ("binary_tensor_data", "classification")
PLATFORMS = {"onnxruntime": "onnxruntime_onnx", "openvino": "openvino"}
# Bounds on what a request may name: names and ids (Triton's are short), dimensions, outputs (a
# model has two; asking for more is an error anyway).
MAX_NAME = 256
MAX_DIMS = 8
MAX_OUTPUTS = 4
LENGTH = struct.Struct("<I")  # BYTES elements in binary data: uint32 little-endian length first
_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}

_bad = MalformedRequestError


# -- the neutral request ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RequestedOutput:
    name: str
    classes: int  # top-k of the classification extension; 0: the tensor itself
    binary: bool  # HTTP: in the binary data after the JSON; gRPC answers raw always


@dataclass(frozen=True, slots=True)
class InferRequest:
    """One inference request, validated against its model, whichever protocol carried it:
    `images` (preprocessed float32 [N, 3, H, W]) or else `blobs` (encoded images), and the
    outputs to answer with."""

    id: str | None
    images: np.ndarray | None
    blobs: list[bytes]
    outputs: list[RequestedOutput]


# -- checks against the model, shared by both codecs -----------------------------------------


def accepted(entry: ModelEntry) -> str:
    return f"{entry.input_name!r} (FP32 {[-1, *entry.input_shape]}) or {IMAGE_BYTES!r} (BYTES [-1])"


def check_input(entry: ModelEntry, name: str, shape: Sequence[int], max_images: int) -> None:
    """The input's name and batch, before any of its data is looked at."""
    if name not in (entry.input_name, IMAGE_BYTES):
        raise _bad(f"unknown input {clip(name)}; model {entry.name} takes {accepted(entry)}")
    if not shape:
        raise _bad(f"input {clip(name)}: shape must be a list of non-negative integers")
    if shape[0] < 1:
        raise _bad(f"input {clip(name)}: the batch is empty")
    if shape[0] > max_images:
        raise TooManyImagesError(f"{shape[0]} images exceed max_images_per_request={max_images}")


def fp32_shape(entry: ModelEntry, name: str, datatype: str, shape: Sequence[int]) -> int:
    """The element count of an FP32 input whose datatype and shape fit the model."""
    if datatype != "FP32":
        raise _bad(f"input {clip(name)} must be FP32, not {clip(datatype)}")
    if tuple(shape[1:]) != entry.input_shape:
        expected = [-1, *entry.input_shape]
        raise _bad(
            f"input {clip(name)} has shape {list(shape)}; model {entry.name} takes {expected}"
        )
    return math.prod(shape)


def fp32_from_raw(name: str, raw: memoryview | bytes, shape: Sequence[int]) -> np.ndarray:
    count = math.prod(shape)
    if len(raw) != 4 * count:
        raise _bad(f"input {clip(name)}: {len(raw)} bytes of binary data for {count} FP32 values")
    return finite(name, np.frombuffer(raw, dtype="<f4").astype(np.float32, copy=False), shape)


def finite(name: str, array: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    if not np.isfinite(array).all():
        raise _bad(f"input {clip(name)} holds NaN or infinite values")
    return array.reshape(shape)


def bytes_shape(datatype: str, shape: Sequence[int]) -> int:
    """The element count of a BYTES input whose datatype and shape are one image per row."""
    if datatype != "BYTES":
        raise _bad(f"input {IMAGE_BYTES!r} must be BYTES, not {clip(datatype)}")
    if len(shape) > 2 or math.prod(shape) != shape[0]:
        raise _bad(f"input {IMAGE_BYTES!r} has shape {list(shape)}; it takes [-1] (or [-1, 1])")
    return shape[0]


def deserialize_bytes(raw: memoryview | bytes, limit: int) -> list[bytes]:
    """BYTES binary data: each element a uint32 little-endian length, then its bytes; stops
    after `limit` + 1 elements (the caller refuses a count that is not the shape's)."""
    view = memoryview(raw)
    blobs, offset = [], 0
    while offset < len(view) and len(blobs) <= limit:
        if offset + LENGTH.size > len(view):
            raise _bad("BYTES binary data ends inside an element's length")
        (length,) = LENGTH.unpack_from(view, offset)
        offset += LENGTH.size
        if offset + length > len(view):
            raise _bad("BYTES binary data ends inside an element")
        blobs.append(bytes(view[offset : offset + length]))
        offset += length
    return blobs


def check_count(blobs: list[bytes], count: int, shape: Sequence[int]) -> list[bytes]:
    if len(blobs) != count:
        raise _bad(f"input {IMAGE_BYTES!r}: {len(blobs)} elements for shape {list(shape)}")
    return blobs


def output_sizes(entry: ModelEntry) -> dict[str, int]:
    return {entry.logits_name: entry.num_classes, entry.embedding_name: entry.embedding_dim}


def requested_outputs(
    entry: ModelEntry, asked: Sequence[tuple[str, int, bool]], default_binary: bool
) -> list[RequestedOutput]:
    """(name, classification, binary) as asked -> the outputs to answer with; every output
    when none is asked."""
    sizes = output_sizes(entry)
    if not asked:
        return [RequestedOutput(name, 0, default_binary) for name in sizes]
    outputs: list[RequestedOutput] = []
    for name, classes, binary in asked:
        if name not in sizes:
            raise _bad(f"unknown output {clip(name)}; model {entry.name} has {list(sizes)}")
        if any(o.name == name for o in outputs):
            raise _bad(f"output {clip(name)} is requested twice")
        if not 0 <= classes <= sizes[name]:
            raise _bad(
                f"output {clip(name)}: classification must be an integer in 0..{sizes[name]}"
            )
        outputs.append(RequestedOutput(name, classes, binary))
    return outputs


def output_tensors(
    entry: ModelEntry, request: InferRequest, results: dict[str, np.ndarray]
) -> list[tuple[RequestedOutput, str, list[int], np.ndarray | list[str]]]:
    """(output, datatype, shape, data) per requested output: FP32 arrays, or the
    classification extension's "value:index[:label]" strings."""
    tensors: list[tuple[RequestedOutput, str, list[int], np.ndarray | list[str]]] = []
    for output in request.outputs:
        tensor = results[output.name]
        if output.classes:
            labels = entry.labels if output.name == entry.logits_name else ()
            strings = classifications(tensor, output.classes, labels)
            tensors.append((output, "BYTES", [len(tensor), output.classes], strings))
        else:
            array = np.ascontiguousarray(tensor, dtype="<f4")
            tensors.append((output, "FP32", list(tensor.shape), array))
    return tensors


def serialize(data: np.ndarray | list[str]) -> bytes:
    """A tensor's binary data: FP32 as little-endian floats, BYTES length-prefixed."""
    if isinstance(data, list):
        return b"".join(LENGTH.pack(len(b)) + b for b in (s.encode() for s in data))
    return data.tobytes()


# -- what both adapters answer besides inference -----------------------------------------------


def model_metadata(entry: ModelEntry) -> dict[str, Any]:
    """The protocol's model metadata. Both inputs are listed; a request sends exactly one."""
    return {
        "name": entry.name,
        "versions": [str(entry.version)],
        "platform": PLATFORMS.get(entry.engine, entry.engine),
        "inputs": [
            {"name": entry.input_name, "datatype": "FP32", "shape": [-1, *entry.input_shape]},
            {"name": IMAGE_BYTES, "datatype": "BYTES", "shape": [-1]},
        ],
        "outputs": [
            {"name": entry.logits_name, "datatype": "FP32", "shape": [-1, entry.num_classes]},
            {"name": entry.embedding_name, "datatype": "FP32", "shape": [-1, entry.embedding_dim]},
        ],
    }


def check_version(model: Model, version: str | None) -> Model:
    """The served model when `version` is absent or its version; NOT_FOUND otherwise."""
    if version and version != str(model.entry.version):
        raise ModelNotFoundError(
            f"model {model.entry.name!r} has no version {clip(version)}; "
            f"it serves version {model.entry.version}"
        )
    return model


# -- HTTP: JSON (and binary data after it) -----------------------------------------------------


class _Message(BaseModel):
    # Strict: no coercion ("1" is not 1, true is not 1); unknown keys are ignored, as Triton does.
    model_config = ConfigDict(strict=True, frozen=True)


class InputParameters(_Message):
    binary_data_size: NonNegativeInt | None = None  # binary tensor data extension


class RequestInput(_Message):
    name: str = Field(max_length=MAX_NAME)
    datatype: str = Field(max_length=16)
    shape: list[NonNegativeInt] = Field(min_length=1, max_length=MAX_DIMS)
    parameters: InputParameters = InputParameters()
    data: Any = None  # checked against the model's datatype and shape, without per-element models


class OutputParameters(_Message):
    classification: NonNegativeInt = 0  # classification extension: top K
    binary_data: bool | None = None  # None: as the request's binary_data_output


class RequestOutput(_Message):
    name: str = Field(max_length=MAX_NAME)
    parameters: OutputParameters = OutputParameters()


class RequestParameters(_Message):
    binary_data_output: bool = False


class InferenceRequest(_Message):
    """The JSON inference request, as KServe's v2 data model has it (one input)."""

    id: str | None = Field(None, max_length=MAX_NAME)
    parameters: RequestParameters = RequestParameters()
    inputs: list[RequestInput] = Field(min_length=1, max_length=1)
    outputs: list[RequestOutput] | None = Field(None, max_length=MAX_OUTPUTS)


def decompress(body: bytes | bytearray, encoding: str, max_bytes: int) -> bytes | bytearray:
    """The body without its Content-Encoding, never more than `max_bytes` (no zip bombs)."""
    if encoding in ("", "identity"):
        return body
    wbits = _WBITS.get(encoding)
    if wbits is None:
        raise UnsupportedMediaTypeError(
            f"unsupported Content-Encoding {clip(encoding)}: use gzip, deflate or identity"
        )
    decompressor = zlib.decompressobj(wbits)
    try:
        data = decompressor.decompress(body, max_bytes + 1)
    except zlib.error as exc:
        raise _bad(f"body is not valid {encoding} data: {exc}") from None
    if len(data) > max_bytes:
        raise RequestTooLargeError(f"decompressed request body exceeds {max_bytes} bytes")
    if not decompressor.eof:
        raise _bad(f"{encoding} body ends before its end of stream")
    return data


def split(
    body: bytes | bytearray, header_length: str | None, max_json_bytes: int
) -> tuple[Any, memoryview]:
    """(the JSON request, the binary tensor data after it). JSON is parsed by one C call that
    holds the interpreter throughout, so its size is bounded (`max_json_bytes`); tensors of any
    size travel as binary data."""
    size = len(body)
    if header_length is not None:
        declared = (
            header_length.isascii()
            and header_length.isdigit()
            and len(header_length) <= 19
            and int(header_length)
        )
        if not 0 < declared <= size:
            raise _bad(
                f"{HEADER_LENGTH} {clip(header_length)} is not in 1..{size}, the body's size"
            )
        size = declared
    if size > max_json_bytes:
        raise RequestTooLargeError(
            f"the JSON of the inference request is {size} bytes, over max_json_bytes="
            f"{max_json_bytes}: send tensor data as binary (the binary tensor data extension, "
            "what Triton's clients do by default)"
        )
    try:
        payload = orjson.loads(memoryview(body)[:size])
    except orjson.JSONDecodeError as exc:
        raise _bad(f"the inference request is not valid JSON: {exc}") from None
    return payload, memoryview(body)[size:]


def parse_http(
    payload: Any, binary: memoryview, entry: ModelEntry, max_images: int
) -> InferRequest:
    """A JSON inference request (its structure by `InferenceRequest`, then against the model)."""
    try:
        request = InferenceRequest.model_validate(payload)
    except ValidationError as exc:
        raise _bad(_explain(exc.errors()[0], payload, entry)) from None
    spec = request.inputs[0]
    check_input(entry, spec.name, spec.shape, max_images)
    raw = _raw_data(spec, binary)
    images, blobs = None, []
    if spec.name == entry.input_name:
        count = fp32_shape(entry, spec.name, spec.datatype, spec.shape)
        images = (
            fp32_from_raw(spec.name, raw, spec.shape)
            if raw is not None
            else _fp32_from_json(spec.name, spec.data, count, spec.shape)
        )
    else:
        count = bytes_shape(spec.datatype, spec.shape)
        found = deserialize_bytes(raw, count) if raw is not None else _strings_from_json(spec.data)
        blobs = check_count(found, count, spec.shape)
    binary_output = request.parameters.binary_data_output
    asked = [
        (
            o.name,
            o.parameters.classification,
            binary_output if o.parameters.binary_data is None else o.parameters.binary_data,
        )
        for o in request.outputs or ()
    ]
    return InferRequest(request.id, images, blobs, requested_outputs(entry, asked, binary_output))


def encode_http(
    entry: ModelEntry, request: InferRequest, results: dict[str, np.ndarray]
) -> tuple[dict[str, Any], list[bytes]]:
    """(the response object, the binary data of its binary outputs, in order)."""
    outputs: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for output, datatype, shape, data in output_tensors(entry, request, results):
        described: dict[str, Any] = {"name": output.name, "datatype": datatype, "shape": shape}
        if output.binary:
            raw = serialize(data)
            described["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            described["data"] = data if isinstance(data, list) else data.ravel()
        outputs.append(described)
    body: dict[str, Any] = {"model_name": entry.name, "model_version": str(entry.version)}
    if request.id is not None:
        body["id"] = request.id
    body["outputs"] = outputs
    return body, chunks


# What a structure error at each place means, in the words a client needs; "*" is a list index.
_EXPLAINED = {
    (): "the inference request must be a JSON object",
    ("id",): '"id" must be a string',
    ("parameters",): '"parameters" must be a JSON object',
    ("parameters", "binary_data_output"): '"binary_data_output" must be a boolean',
    ("inputs",): '"inputs" must hold exactly one input object: {accepted}',
    ("inputs", "*"): '"inputs" must hold exactly one input object: {accepted}',
    ("inputs", "*", "name"): "unknown input {value}; model {model} takes {accepted}",
    ("inputs", "*", "datatype"): "input {input}: datatype must be a string, not {value}",
    ("inputs", "*", "shape"): "input {input}: shape must be a list of non-negative integers",
    ("inputs", "*", "shape", "*"): "input {input}: shape must be a list of non-negative integers",
    ("inputs", "*", "parameters"): "input {input}: parameters must be a JSON object",
    ("inputs", "*", "parameters", "binary_data_size"): (
        "input {input}: binary_data_size must be a non-negative integer, not {value}"
    ),
    ("outputs",): '"outputs" must be a list of objects',
    ("outputs", "*"): '"outputs" must be a list of objects',
    ("outputs", "*", "name"): "unknown output {value}; model {model} has {outputs}",
    ("outputs", "*", "parameters"): "output {output}: parameters must be a JSON object",
    ("outputs", "*", "parameters", "classification"): (
        "output {output}: classification must be an integer in 0..{classes}"
    ),
    ("outputs", "*", "parameters", "binary_data"): (
        "output {output}: binary_data must be a boolean"
    ),
}


def _explain(error: ErrorDetails, payload: Any, entry: ModelEntry) -> str:
    """One structure error of `InferenceRequest` as a clear message."""
    loc = tuple(error["loc"])
    where = tuple("*" if isinstance(part, int) else part for part in loc)
    template = _EXPLAINED.get(where)
    if template is None:  # a place the table does not name: pydantic's own words
        return f"{'.'.join(map(str, loc)) or 'request'}: {error['msg']}"
    missing = error["type"] == "missing"
    sizes = output_sizes(entry)
    item = _item(payload, loc[:2]) if len(loc) > 2 else {}
    named = item.get("name") if isinstance(item, dict) else None
    return template.format(
        value=clip(None if missing else error["input"]),
        input=clip(named),
        output=clip(named),
        classes=sizes.get(named, max(sizes.values())) if isinstance(named, str) else 0,
        model=entry.name,
        accepted=accepted(entry),
        outputs=list(sizes),
    )


def _item(payload: Any, loc: tuple[Any, ...]) -> Any:
    """payload["inputs"][i] (or outputs): the object whose field an error is about."""
    for key in loc:
        payload = payload[key]
    return payload


def _raw_data(spec: RequestInput, binary: memoryview) -> memoryview | None:
    """The input's binary tensor data (then it is all of it), or None when it is in JSON."""
    size = spec.parameters.binary_data_size
    if size is None:
        if len(binary):
            raise _bad(f"{len(binary)} bytes of binary data, but no input has binary_data_size")
        if "data" not in spec.model_fields_set:
            raise _bad(f"input {clip(spec.name)} has neither data nor binary_data_size")
        return None
    if size != len(binary):
        raise _bad(f"binary_data_size {clip(size)} is not the {len(binary)} bytes after the JSON")
    return binary


def _fp32_from_json(name: str, data: Any, count: int, shape: Sequence[int]) -> np.ndarray:
    if _count(data, count) > count:  # counted before numpy converts anything
        raise _bad(f"input {clip(name)}: more than {count} values for shape {list(shape)}")
    try:
        array = np.asarray(data, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise _bad(
            f"input {clip(name)}: data is not an array of numbers: {clip(str(exc))}"
        ) from None
    if array.size != count:
        raise _bad(f"input {clip(name)}: {array.size} values for shape {list(shape)}")
    return finite(name, array, shape)


def _strings_from_json(data: Any) -> list[bytes]:
    elements = _flatten(data)
    if not all(isinstance(e, str) for e in elements):
        raise _bad(f"input {IMAGE_BYTES!r}: JSON data must be strings; send images as binary")
    return [e.encode("utf-8") for e in elements]


def _count(data: Any, limit: int) -> int:
    """The elements of JSON tensor data, nested or flat, counted up to `limit` + 1."""
    if isinstance(data, list) and not any(isinstance(e, list) for e in data[:1]):
        return min(len(data), limit + 1)  # flat (a ragged one is numpy's to refuse)
    found, pending = 0, [data]
    while pending and found <= limit:
        item = pending.pop()
        if isinstance(item, list):
            pending.extend(item)
        else:
            found += 1
    return found


def _flatten(data: Any) -> list[Any]:
    """Row-major elements of JSON tensor data, nested or flat (iterative: nesting is untrusted)."""
    elements: list[Any] = []
    pending = [data]
    while pending:
        item = pending.pop()
        if isinstance(item, list):
            pending.extend(reversed(item))
        else:
            elements.append(item)
    return elements
