"""The Open Inference Protocol (KServe v2, as Triton speaks it over HTTP), beside our own API.

A thin adapter: the body is turned into the neutral `InferRequest` once (oip_codec), run through
the same data plane, batcher, limits, timeouts and metrics as /classify and /embed, and the
outputs are encoded once. The binary tensor data extension uses the
Inference-Header-Content-Length header with the `binary_data_size`, `binary_data` and
`binary_data_output` parameters; request bodies may be gzip or deflate compressed
(Content-Encoding), as Triton's clients offer. Errors are `{"error": message}`
(service/protocols/http_errors.py).
"""

from __future__ import annotations

import asyncio
from functools import partial
from typing import Any

import orjson
from fastapi import APIRouter, Request
from pydantic import BaseModel
from starlette.responses import Response

from contract.repository import ModelEntry

from ..core.dataplane import DataPlane
from ..core.errors import ModelNotFoundError
from ..core.serving import Model
from ..core.settings import Settings
from .bodies import Body, held_body
from .dependencies import Plane
from .disconnect import client_gone
from .http_errors import OIP_PREFIX
from .oip_codec import (
    EXTENSIONS,
    HEADER_LENGTH,
    InferRequest,
    check_version,
    decompress,
    encode_http,
    model_metadata,
    parse_http,
    split,
)
from .responses import JSONResponse

# Larger or compressed bodies are parsed in a thread: a JSON tensor of many MB (or inflating one)
# would otherwise hold the event loop, and with it every other request and batch, for long.
_PARSE_INLINE_BYTES = 1 << 20


class MetadataTensor(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ServerMetadataResponse(BaseModel):
    name: str
    version: str
    extensions: list[str]


class ModelMetadataResponse(BaseModel):
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


@router.get("", response_model=ServerMetadataResponse, summary="Server metadata")
async def server_metadata(request: Request) -> Response:
    app = request.app
    return JSONResponse({"name": app.title, "version": app.version, "extensions": EXTENSIONS})


@router.get("/health/live", response_class=Response, summary="Server live (empty body)")
async def server_live() -> Response:
    return Response(status_code=200)


@router.get("/health/ready", response_class=Response, responses=_HEALTH, summary="Server ready")
async def server_ready(plane: Plane) -> Response:
    return Response(status_code=200 if plane.registry.ready else 400)


@router.get("/models/{name}/ready", response_class=Response, responses=_HEALTH)
async def model_ready(name: str, plane: Plane) -> Response:
    return _model_ready(plane, name, None)


@router.get("/models/{name}/versions/{version}/ready", response_class=Response, responses=_HEALTH)
async def model_version_ready(name: str, version: str, plane: Plane) -> Response:
    return _model_ready(plane, name, version)


@router.get("/models/{name}", response_model=ModelMetadataResponse, responses={404: _ERRORS[404]})
async def get_model_metadata(name: str, plane: Plane) -> Response:
    return JSONResponse(model_metadata(_find(plane, name, None).entry))


@router.get(
    "/models/{name}/versions/{version}",
    response_model=ModelMetadataResponse,
    responses={404: _ERRORS[404]},
)
async def get_model_version_metadata(name: str, version: str, plane: Plane) -> Response:
    return JSONResponse(model_metadata(_find(plane, name, version).entry))


@router.post("/models/{name}/infer", responses=_ERRORS, openapi_extra=_INFER_BODY)
async def infer(request: Request, name: str, plane: Plane) -> Response:
    return await infer_answer(request, plane, name, None)


@router.post(
    "/models/{name}/versions/{version}/infer", responses=_ERRORS, openapi_extra=_INFER_BODY
)
async def infer_version(request: Request, name: str, version: str, plane: Plane) -> Response:
    return await infer_answer(request, plane, name, version)


def _find(plane: DataPlane, name: str, version: str | None) -> Model:
    return check_version(plane.registry.resolve(name), version)


def _model_ready(plane: DataPlane, name: str, version: str | None) -> Response:
    try:
        model = _find(plane, name, version)
    except ModelNotFoundError:
        return Response(status_code=404)
    return Response(status_code=200 if model.state == "ready" else 400)


async def infer_answer(
    request: Request, plane: DataPlane, name: str, version: str | None
) -> Response:
    """An inference answer (the fast lane, service/protocols/fast_lane.py, serves it too)."""
    settings = plane.settings
    async with plane.request(name, "v2_infer", disconnected=client_gone(request)) as call:
        entry = check_version(call.model, version).entry
        async with held_body(request, plane.bodies, settings.max_request_bytes) as body:
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
    header, chunks = encode_http(entry, parsed, results)
    if not chunks:
        return JSONResponse(header)
    head = orjson.dumps(header, option=orjson.OPT_SERIALIZE_NUMPY)
    return Response(
        head + b"".join(chunks),
        media_type="application/octet-stream",
        headers={HEADER_LENGTH: str(len(head))},
    )


def _parse(
    body: Body, encoding: str, header_length: str | None, entry: ModelEntry, settings: Settings
) -> InferRequest:
    body = decompress(body, encoding, settings.max_request_bytes)
    payload, binary = split(body, header_length, settings.max_json_bytes)
    return parse_http(payload, binary, entry, settings.max_images_per_request)
