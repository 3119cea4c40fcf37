"""The Open Inference Protocol (KServe v2, as Triton speaks it over HTTP), beside our own API.

Another thin adapter over the data plane in `dataplane`: FP32 tensors (already preprocessed) join
the same per-model batcher as the images of /classify and /embed, and BYTES inputs holding
encoded images are decoded by the same preprocessing, so limits, timeouts, batching and metrics
cover every protocol alike. Errors are `{"error": message}` (see errors.py).

A request has exactly one input, either of:
- the graph's input (`images`): FP32 [N, 3, H, W], preprocessed as the model's metadata says;
- `image_bytes`: BYTES [N] (or [N, 1]), one encoded image (JPEG, PNG, ...) per element.
Outputs are the graph's `logits` [N, classes] and `embedding` [N, dim], FP32. Extensions:
`binary_tensor_data` (the Inference-Header-Content-Length header with `binary_data_size`,
`binary_data` and `binary_data_output` parameters) and `classification` (`{"classification": K}`
on a requested output: BYTES [N, K] of "value:index[:label]", highest first, as Triton answers).
Request bodies may be gzip or deflate compressed (Content-Encoding), as Triton's clients offer.
Encoding and decoding the messages is `oip_codec`'s job; this module routes.
"""

from __future__ import annotations

import asyncio
from functools import partial
from typing import Any

import orjson
from fastapi import APIRouter, Request
from pydantic import BaseModel
from starlette.responses import Response

from .bodies import read_body
from .dataplane import DataPlane
from .dependencies import Server
from .disconnect import client_gone
from .errors import OIP_PREFIX, ModelNotFoundError
from .lifecycle import ServedModel
from .oip_codec import (
    HEADER_LENGTH,
    IMAGE_BYTES,
    ParsedRequest,
    decompress,
    encode_outputs,
    parse_request,
    split,
)
from .repository import ModelEntry
from .schemas import JSONResponse
from .settings import Settings

EXTENSIONS = ("binary_tensor_data", "classification")
PLATFORMS = {"onnxruntime": "onnxruntime_onnx", "openvino": "openvino"}
# Larger or compressed bodies are parsed in a thread: a JSON tensor of many MB (or inflating one)
# would otherwise hold the event loop, and with it every other request and batch, for long.
_PARSE_INLINE_BYTES = 1 << 20


class MetadataTensor(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[MetadataTensor]
    outputs: list[MetadataTensor]


class ErrorMessage(BaseModel):
    error: str


router = APIRouter(prefix=OIP_PREFIX, tags=["Open Inference Protocol (KServe v2)"])
_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorMessage, "description": "malformed request, bad shape or datatype"},
    404: {"model": ErrorMessage, "description": "unknown model or version"},
    413: {"model": ErrorMessage, "description": "body or batch over the configured limits"},
    415: {"model": ErrorMessage, "description": "unsupported Content-Encoding"},
    503: {"model": ErrorMessage, "description": "queue full or not ready; see Retry-After"},
    504: {"model": ErrorMessage, "description": "not answered within the request timeout"},
}
_HEALTH: dict[int | str, dict[str, Any]] = {
    200: {"description": "true (empty body)"},
    400: {"description": "false: loading, draining or failed (empty body)"},
    404: {"description": "unknown model or version (empty body)"},
}
_INFER_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "an inference request object (JSON); with the binary tensor data "
        f"extension, the JSON ({HEADER_LENGTH} bytes) followed by the tensor's bytes",
        "content": {
            "application/json": {"schema": {"type": "object"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


@router.get("", response_model=ServerMetadata, summary="Server metadata")
async def server_metadata(request: Request) -> Response:
    app = request.app
    return JSONResponse({"name": app.title, "version": app.version, "extensions": EXTENSIONS})


@router.get("/health/live", response_class=Response, summary="Server live (empty body)")
async def server_live() -> Response:
    return Response(status_code=200)


@router.get("/health/ready", response_class=Response, responses=_HEALTH, summary="Server ready")
async def server_ready(server: Server) -> Response:
    return Response(status_code=200 if server.ready else 400)


@router.get("/models/{name}/ready", response_class=Response, responses=_HEALTH)
async def model_ready(name: str, server: Server) -> Response:
    return _model_ready(server, name, None)


@router.get("/models/{name}/versions/{version}/ready", response_class=Response, responses=_HEALTH)
async def model_version_ready(name: str, version: str, server: Server) -> Response:
    return _model_ready(server, name, version)


@router.get("/models/{name}", response_model=ModelMetadata, responses={404: _ERRORS[404]})
async def model_metadata(name: str, server: Server) -> Response:
    return JSONResponse(describe(_find(server, name, None).entry))


@router.get(
    "/models/{name}/versions/{version}", response_model=ModelMetadata, responses={404: _ERRORS[404]}
)
async def model_version_metadata(name: str, version: str, server: Server) -> Response:
    return JSONResponse(describe(_find(server, name, version).entry))


@router.post("/models/{name}/infer", responses=_ERRORS, openapi_extra=_INFER_BODY)
async def infer(request: Request, name: str, server: Server) -> Response:
    return await _infer(request, server, name, None)


@router.post(
    "/models/{name}/versions/{version}/infer", responses=_ERRORS, openapi_extra=_INFER_BODY
)
async def infer_version(request: Request, name: str, version: str, server: Server) -> Response:
    return await _infer(request, server, name, version)


def describe(entry: ModelEntry) -> dict[str, Any]:
    """Model metadata. Both inputs are listed; a request sends exactly one of them."""
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


def _find(server: DataPlane, name: str, version: str | None) -> ServedModel:
    return _check_version(server.resolve(name), version)


def _check_version(model: ServedModel, version: str | None) -> ServedModel:
    if version is not None and version != str(model.entry.version):
        raise ModelNotFoundError(
            f"model {model.entry.name!r} has no version {version!r}; "
            f"it serves version {model.entry.version}"
        )
    return model


def _model_ready(server: DataPlane, name: str, version: str | None) -> Response:
    try:
        model = _find(server, name, version)
    except ModelNotFoundError:
        return Response(status_code=404)
    return Response(status_code=200 if model.state == "ready" else 400)


async def _infer(request: Request, server: DataPlane, name: str, version: str | None) -> Response:
    settings = server.settings
    async with server.request(name, "v2_infer", disconnected=client_gone(request)) as call:
        entry = _check_version(call.model, version).entry
        body = await read_body(request, settings.max_request_bytes)
        headers = request.headers
        encoding = headers.get("content-encoding", "identity").strip().lower()
        parse = partial(_parse, body, encoding, headers.get(HEADER_LENGTH), entry, settings)
        inline = len(body) <= _PARSE_INLINE_BYTES and encoding in ("", "identity")
        parsed = parse() if inline else await asyncio.to_thread(parse)
        if parsed.images is not None:
            logits, embeddings = await call.infer_tensors(parsed.images)
        else:
            logits, embeddings = await call.infer(parsed.blobs)
    results = {entry.logits_name: logits, entry.embedding_name: embeddings}
    header, chunks = encode_outputs(entry, parsed, results)
    if not chunks:
        return JSONResponse(header)
    head = orjson.dumps(header, option=orjson.OPT_SERIALIZE_NUMPY)
    return Response(
        head + b"".join(chunks),
        media_type="application/octet-stream",
        headers={HEADER_LENGTH: str(len(head))},
    )


def _parse(
    body: bytes, encoding: str, header_length: str | None, entry: ModelEntry, settings: Settings
) -> ParsedRequest:
    body = decompress(body, encoding, settings.max_request_bytes)
    payload, binary = split(body, header_length)
    return parse_request(payload, binary, entry, settings.max_images_per_request)
