"""The Open Inference Protocol's inference messages, free of HTTP routing: request bodies (JSON,
with the binary tensor data extension, optionally compressed) -> validated inputs for the data
plane, and model outputs -> response bodies (with the classification extension).

Tensor data is untrusted: sizes, shapes and element counts are checked against the model before
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


@dataclass(frozen=True, slots=True)
class RequestedOutput:
    name: str
    classes: int  # top-k of the classification extension; 0: the tensor itself
    binary: bool


@dataclass(frozen=True, slots=True)
class InferenceRequest:
    """A validated request: `images` (preprocessed float32 [N, 3, H, W]) or else `blobs`
    (encoded images), and the outputs to answer with."""

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
) -> InferenceRequest:
    """Validate an inference request against the model; the tensor or images it carries."""
    if not isinstance(payload, dict):
        raise _bad("the inference request must be a JSON object")
    request_id = payload.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise _bad('"id" must be a string')
    parameters = _object(payload.get("parameters"), '"parameters"')
    binary_output = parameters.get("binary_data_output", False)
    if not isinstance(binary_output, bool):
        raise _bad('"binary_data_output" must be a boolean')
    inputs = payload.get("inputs")
    accepted = (
        f"{entry.input_name!r} (FP32 {[-1, *entry.input_shape]}) or {IMAGE_BYTES!r} (BYTES [-1])"
    )
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise _bad(f'"inputs" must hold exactly one input object: {accepted}')
    spec = inputs[0]
    name, shape = spec.get("name"), spec.get("shape")
    if name not in (entry.input_name, IMAGE_BYTES):
        raise _bad(f"unknown input {name!r}; model {entry.name} takes {accepted}")
    if not isinstance(shape, list) or not shape or not all(_is_int(d) and d >= 0 for d in shape):
        raise _bad(f"input {name!r}: shape must be a list of non-negative integers")
    if shape[0] < 1:
        raise _bad(f"input {name!r}: the batch is empty")
    if shape[0] > max_images:
        raise TooManyImagesError(f"{shape[0]} images exceed max_images_per_request={max_images}")
    raw = _raw_data(spec, binary)
    images, blobs = None, []
    if name == entry.input_name:
        images = _fp32_tensor(spec, shape, raw, entry)
    else:
        blobs = _encoded_images(spec, shape, raw)
    outputs = _requested_outputs(payload.get("outputs"), entry, binary_output)
    return InferenceRequest(request_id, images, blobs, outputs)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _object(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _bad(f"{what} must be a JSON object")
    return value


def _raw_data(spec: dict[str, Any], binary: memoryview) -> memoryview | None:
    """The input's binary tensor data (then it is all of it), or None when it is in JSON."""
    size = _object(spec.get("parameters"), "input parameters").get("binary_data_size")
    if size is None:
        if len(binary):
            raise _bad(f"{len(binary)} bytes of binary data, but no input has binary_data_size")
        if "data" not in spec:
            raise _bad(f"input {spec['name']!r} has neither data nor binary_data_size")
        return None
    if not _is_int(size) or size != len(binary):
        raise _bad(f"binary_data_size {size!r} is not the {len(binary)} bytes after the JSON")
    return binary


def _fp32_tensor(
    spec: dict[str, Any], shape: list[int], raw: memoryview | None, entry: ModelEntry
) -> np.ndarray:
    name, datatype = spec["name"], spec.get("datatype")
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
            array = np.asarray(spec["data"], dtype=np.float32)
        except (TypeError, ValueError) as exc:
            raise _bad(f"input {name!r}: data is not an array of numbers: {exc}") from None
        if array.size != count:
            raise _bad(f"input {name!r}: {array.size} values for shape {shape}")
    if not np.isfinite(array).all():
        raise _bad(f"input {name!r} holds NaN or infinite values")
    return array.reshape(shape)


def _encoded_images(spec: dict[str, Any], shape: list[int], raw: memoryview | None) -> list[bytes]:
    datatype = spec.get("datatype")
    if datatype != "BYTES":
        raise _bad(f"input {IMAGE_BYTES!r} must be BYTES, not {datatype!r}")
    if len(shape) > 2 or math.prod(shape) != shape[0]:
        raise _bad(f"input {IMAGE_BYTES!r} has shape {shape}; it takes [-1] (or [-1, 1])")
    count = shape[0]
    if raw is not None:
        blobs = _deserialize_bytes(raw, count)
    else:
        elements = _flatten(spec["data"])
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


def _requested_outputs(
    requested: Any, entry: ModelEntry, binary_output: bool
) -> list[RequestedOutput]:
    sizes = {entry.logits_name: entry.num_classes, entry.embedding_name: entry.embedding_dim}
    if requested is None or requested == []:
        return [RequestedOutput(name, 0, binary_output) for name in sizes]
    if not isinstance(requested, list) or not all(isinstance(o, dict) for o in requested):
        raise _bad('"outputs" must be a list of objects')
    outputs: list[RequestedOutput] = []
    for item in requested:
        name = item.get("name")
        if name not in sizes:
            raise _bad(f"unknown output {name!r}; model {entry.name} has {list(sizes)}")
        if any(o.name == name for o in outputs):
            raise _bad(f"output {name!r} is requested twice")
        parameters = _object(item.get("parameters"), f"output {name!r} parameters")
        classes = parameters.get("classification", 0)
        if not _is_int(classes) or not 0 <= classes <= sizes[name]:
            raise _bad(f"output {name!r}: classification must be an integer in 0..{sizes[name]}")
        binary = parameters.get("binary_data", binary_output)
        if not isinstance(binary, bool):
            raise _bad(f"output {name!r}: binary_data must be a boolean")
        outputs.append(RequestedOutput(name, classes, binary))
    return outputs


def encode_outputs(
    entry: ModelEntry, parsed: InferenceRequest, results: dict[str, np.ndarray]
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
