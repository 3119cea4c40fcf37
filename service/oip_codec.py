"""The Open Inference Protocol's inference messages, free of HTTP routing: request bodies (JSON,
with the binary tensor data extension, optionally compressed) -> validated inputs for the data
plane, and model outputs -> response bodies (with the classification extension).

The request's structure is pydantic's job (`InferenceRequest`, as KServe's v2 data model, strict:
no coercion); a structure error becomes one clear 400 message naming the field
(`_EXPLAINED`). What depends on the model (input and output names, datatype, shape, element
count, top-k range) and on the binary data after the JSON is checked here after it. Tensor
data is untrusted: sizes, shapes and element counts are checked against the model before
anything is allocated from them, and nested JSON is flattened without recursion.
"""

from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, ValidationError
from pydantic_core import ErrorDetails

from .errors import (
    MalformedRequestError,
    RequestTooLargeError,
    TooManyImagesError,
    UnsupportedMediaTypeError,
)
from .postprocess import classifications
from .repository import ModelEntry

IMAGE_BYTES = "image_bytes"
HEADER_LENGTH = "Inference-Header-Content-Length"
_LENGTH = struct.Struct("<I")  # BYTES elements in binary data: uint32 little-endian length first
_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


class _Message(BaseModel):
    # Strict: no coercion ("1" is not 1, true is not 1); unknown keys are ignored, as Triton does.
    model_config = ConfigDict(strict=True, frozen=True)


class InputParameters(_Message):
    binary_data_size: NonNegativeInt | None = None  # binary tensor data extension


class RequestInput(_Message):
    name: str
    datatype: str
    shape: list[NonNegativeInt] = Field(min_length=1)
    parameters: InputParameters = InputParameters()
    data: Any = None  # checked against the model's datatype and shape, without per-element models


class OutputParameters(_Message):
    classification: NonNegativeInt = 0  # classification extension: top K
    binary_data: bool | None = None  # None: as the request's binary_data_output


class RequestOutput(_Message):
    name: str
    parameters: OutputParameters = OutputParameters()


class RequestParameters(_Message):
    binary_data_output: bool = False


class InferenceRequest(_Message):
    """The JSON inference request, as KServe's v2 data model has it (one input: see oip.py)."""

    id: str | None = None
    parameters: RequestParameters = RequestParameters()
    inputs: list[RequestInput] = Field(min_length=1, max_length=1)
    outputs: list[RequestOutput] | None = None


@dataclass(frozen=True, slots=True)
class RequestedOutput:
    name: str
    classes: int  # top-k of the classification extension; 0: the tensor itself
    binary: bool


@dataclass(frozen=True, slots=True)
class ParsedRequest:
    """A request validated against the model: `images` (preprocessed float32 [N, 3, H, W]) or
    else `blobs` (encoded images), and the outputs to answer with."""

    id: str | None
    images: np.ndarray | None
    blobs: list[bytes]
    outputs: list[RequestedOutput]


_bad = MalformedRequestError


def decompress(body: bytes, encoding: str, max_bytes: int) -> bytes:
    """The body without its Content-Encoding, never more than `max_bytes` (no zip bombs)."""
    if encoding in ("", "identity"):
        return body
    wbits = _WBITS.get(encoding)
    if wbits is None:
        raise UnsupportedMediaTypeError(
            f"unsupported Content-Encoding {encoding!r}: use gzip, deflate or identity"
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


def split(body: bytes, header_length: str | None) -> tuple[Any, memoryview]:
    """(the JSON request, the binary tensor data after it)."""
    size = len(body)
    if header_length is not None:
        declared = header_length.isascii() and header_length.isdigit() and int(header_length)
        if not 0 < declared <= size:
            raise _bad(f"{HEADER_LENGTH} {header_length!r} is not in 1..{size}, the body's size")
        size = declared
    try:
        payload = orjson.loads(memoryview(body)[:size])
    except orjson.JSONDecodeError as exc:
        raise _bad(f"the inference request is not valid JSON: {exc}") from None
    return payload, memoryview(body)[size:]


def parse_request(
    payload: Any, binary: memoryview, entry: ModelEntry, max_images: int
) -> ParsedRequest:
    """Validate an inference request (its structure by `InferenceRequest`, then against the
    model); the tensor or images it carries."""
    try:
        request = InferenceRequest.model_validate(payload)
    except ValidationError as exc:
        raise _bad(_explain(exc.errors()[0], payload, entry)) from None
    spec = request.inputs[0]
    name, shape = spec.name, spec.shape
    if name not in (entry.input_name, IMAGE_BYTES):
        raise _bad(f"unknown input {name!r}; model {entry.name} takes {_accepted(entry)}")
    if shape[0] < 1:
        raise _bad(f"input {name!r}: the batch is empty")
    if shape[0] > max_images:
        raise TooManyImagesError(f"{shape[0]} images exceed max_images_per_request={max_images}")
    raw = _raw_data(spec, binary)
    images, blobs = None, []
    if name == entry.input_name:
        images = _fp32_tensor(spec, raw, entry)
    else:
        blobs = _encoded_images(spec, raw)
    outputs = _requested_outputs(request, entry)
    return ParsedRequest(request.id, images, blobs, outputs)


def _accepted(entry: ModelEntry) -> str:
    return f"{entry.input_name!r} (FP32 {[-1, *entry.input_shape]}) or {IMAGE_BYTES!r} (BYTES [-1])"


# What a structure error at each place means, in the words a client needs; "*" is a list index.
_EXPLAINED = {
    (): "the inference request must be a JSON object",
    ("id",): '"id" must be a string',
    ("parameters",): '"parameters" must be a JSON object',
    ("parameters", "binary_data_output"): '"binary_data_output" must be a boolean',
    ("inputs",): '"inputs" must hold exactly one input object: {accepted}',
    ("inputs", "*"): '"inputs" must hold exactly one input object: {accepted}',
    ("inputs", "*", "name"): "unknown input {value!r}; model {model} takes {accepted}",
    ("inputs", "*", "datatype"): "input {input!r}: datatype must be a string, not {value!r}",
    ("inputs", "*", "shape"): "input {input!r}: shape must be a list of non-negative integers",
    ("inputs", "*", "shape", "*"): "input {input!r}: shape must be a list of non-negative integers",
    ("inputs", "*", "parameters"): "input {input!r}: parameters must be a JSON object",
    ("inputs", "*", "parameters", "binary_data_size"): (
        "input {input!r}: binary_data_size must be a non-negative integer, not {value!r}"
    ),
    ("outputs",): '"outputs" must be a list of objects',
    ("outputs", "*"): '"outputs" must be a list of objects',
    ("outputs", "*", "name"): "unknown output {value!r}; model {model} has {outputs}",
    ("outputs", "*", "parameters"): "output {output!r}: parameters must be a JSON object",
    ("outputs", "*", "parameters", "classification"): (
        "output {output!r}: classification must be an integer in 0..{classes}"
    ),
    ("outputs", "*", "parameters", "binary_data"): (
        "output {output!r}: binary_data must be a boolean"
    ),
}


def _explain(error: ErrorDetails, payload: Any, entry: ModelEntry) -> str:
    """One structure error of `InferenceRequest` as today's clear message."""
    loc = tuple(error["loc"])
    where = tuple("*" if isinstance(part, int) else part for part in loc)
    template = _EXPLAINED.get(where)
    if template is None:  # a place the table does not name: pydantic's own words
        return f"{'.'.join(map(str, loc)) or 'request'}: {error['msg']}"
    missing = error["type"] == "missing"
    sizes = _output_sizes(entry)
    item = _item(payload, loc[:2]) if len(loc) > 2 else {}
    named = item.get("name") if isinstance(item, dict) else None
    return template.format(
        value=None if missing else error["input"],
        input=named,
        output=named,
        classes=sizes.get(named, max(sizes.values())) if isinstance(named, str) else 0,
        model=entry.name,
        accepted=_accepted(entry),
        outputs=list(sizes),
    )


def _item(payload: Any, loc: tuple[Any, ...]) -> Any:
    """payload["inputs"][i] (or outputs): the object whose field an error is about."""
    for key in loc:
        payload = payload[key]
    return payload


def _output_sizes(entry: ModelEntry) -> dict[str, int]:
    return {entry.logits_name: entry.num_classes, entry.embedding_name: entry.embedding_dim}


def _raw_data(spec: RequestInput, binary: memoryview) -> memoryview | None:
    """The input's binary tensor data (then it is all of it), or None when it is in JSON."""
    size = spec.parameters.binary_data_size
    if size is None:
        if len(binary):
            raise _bad(f"{len(binary)} bytes of binary data, but no input has binary_data_size")
        if "data" not in spec.model_fields_set:
            raise _bad(f"input {spec.name!r} has neither data nor binary_data_size")
        return None
    if size != len(binary):
        raise _bad(f"binary_data_size {size!r} is not the {len(binary)} bytes after the JSON")
    return binary


def _fp32_tensor(spec: RequestInput, raw: memoryview | None, entry: ModelEntry) -> np.ndarray:
    name, datatype, shape = spec.name, spec.datatype, spec.shape
    if datatype != "FP32":
        raise _bad(f"input {name!r} must be FP32, not {datatype!r}")
    if tuple(shape[1:]) != entry.input_shape:
        expected = [-1, *entry.input_shape]
        raise _bad(f"input {name!r} has shape {shape}; model {entry.name} takes {expected}")
    count = math.prod(shape)
    if raw is not None:
        if len(raw) != 4 * count:
            raise _bad(f"input {name!r}: {len(raw)} bytes of binary data for {count} FP32 values")
        array = np.frombuffer(raw, dtype="<f4").astype(np.float32, copy=False)
    else:
        try:
            array = np.asarray(spec.data, dtype=np.float32)
        except (TypeError, ValueError) as exc:
            raise _bad(f"input {name!r}: data is not an array of numbers: {exc}") from None
        if array.size != count:
            raise _bad(f"input {name!r}: {array.size} values for shape {shape}")
    if not np.isfinite(array).all():
        raise _bad(f"input {name!r} holds NaN or infinite values")
    return array.reshape(shape)


def _encoded_images(spec: RequestInput, raw: memoryview | None) -> list[bytes]:
    datatype, shape = spec.datatype, spec.shape
    if datatype != "BYTES":
        raise _bad(f"input {IMAGE_BYTES!r} must be BYTES, not {datatype!r}")
    if len(shape) > 2 or math.prod(shape) != shape[0]:
        raise _bad(f"input {IMAGE_BYTES!r} has shape {shape}; it takes [-1] (or [-1, 1])")
    count = shape[0]
    if raw is not None:
        blobs = _deserialize_bytes(raw, count)
    else:
        elements = _flatten(spec.data)
        if not all(isinstance(e, str) for e in elements):
            raise _bad(f"input {IMAGE_BYTES!r}: JSON data must be strings; send images as binary")
        blobs = [e.encode("utf-8") for e in elements]
    if len(blobs) != count:
        raise _bad(f"input {IMAGE_BYTES!r}: {len(blobs)} elements for shape {shape}")
    return blobs


def _deserialize_bytes(raw: memoryview, limit: int) -> list[bytes]:
    """BYTES binary data: each element a uint32 little-endian length, then its bytes."""
    blobs, offset = [], 0
    while offset < len(raw) and len(blobs) <= limit:
        if offset + _LENGTH.size > len(raw):
            raise _bad("BYTES binary data ends inside an element's length")
        (length,) = _LENGTH.unpack_from(raw, offset)
        offset += _LENGTH.size
        if offset + length > len(raw):
            raise _bad("BYTES binary data ends inside an element")
        blobs.append(bytes(raw[offset : offset + length]))
        offset += length
    return blobs


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


def _requested_outputs(request: InferenceRequest, entry: ModelEntry) -> list[RequestedOutput]:
    sizes = _output_sizes(entry)
    binary_output = request.parameters.binary_data_output
    if not request.outputs:
        return [RequestedOutput(name, 0, binary_output) for name in sizes]
    outputs: list[RequestedOutput] = []
    for item in request.outputs:
        name, parameters = item.name, item.parameters
        if name not in sizes:
            raise _bad(f"unknown output {name!r}; model {entry.name} has {list(sizes)}")
        if any(o.name == name for o in outputs):
            raise _bad(f"output {name!r} is requested twice")
        if parameters.classification > sizes[name]:
            raise _bad(f"output {name!r}: classification must be an integer in 0..{sizes[name]}")
        binary = binary_output if parameters.binary_data is None else parameters.binary_data
        outputs.append(RequestedOutput(name, parameters.classification, binary))
    return outputs


def encode_outputs(
    entry: ModelEntry, parsed: ParsedRequest, results: dict[str, np.ndarray]
) -> tuple[dict[str, Any], list[bytes]]:
    """(the response object, the binary data of its binary outputs, in order)."""
    outputs: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for output in parsed.outputs:
        tensor = results[output.name]
        data: np.ndarray | list[str]
        if output.classes:
            labels = entry.labels if output.name == entry.logits_name else ()
            data = classifications(tensor, output.classes, labels)
            datatype, shape = "BYTES", [len(tensor), output.classes]
        else:
            data = np.ascontiguousarray(tensor, dtype="<f4")
            datatype, shape = "FP32", list(tensor.shape)
        described: dict[str, Any] = {"name": output.name, "datatype": datatype, "shape": shape}
        if output.binary:
            if isinstance(data, list):
                raw = b"".join(_LENGTH.pack(len(b)) + b for b in (s.encode() for s in data))
            else:
                raw = data.tobytes()
            described["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            described["data"] = data if isinstance(data, list) else data.ravel()
        outputs.append(described)
    body: dict[str, Any] = {"model_name": entry.name, "model_version": str(entry.version)}
    if parsed.id is not None:
        body["id"] = parsed.id
    body["outputs"] = outputs
    return body, chunks
