"""Our own HTTP API: thin routes over the data plane (service/core/dataplane.py): `/classify`,
`/embed`, `/models`, `/healthz`, `/readyz`, `/metrics`. The app itself is `app.create_app`.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Query, Request
from starlette.responses import Response

from contract.repository import ModelEntry

from ..core.dataplane import DataPlane
from .bodies import FILE_PART, Body, check_image_body, content_type, held_body, split_images
from .dependencies import Plane
from .disconnect import client_gone
from .responses import (
    ClassifyResponse,
    EmbedResponse,
    ErrorResponse,
    HealthResponse,
    JSONResponse,
    ModelInfo,
    ModelsResponse,
    ReadyResponse,
)

NPY = "application/x-npy"
# Multipart bodies above this are split in a thread (the search and the copies are C code, but a
# large body's copies would still hold the event loop for milliseconds).
SPLIT_INLINE_BYTES = 1 << 20

_IMAGE_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": f"multipart/form-data with one or more parts named `{FILE_PART}`, or one "
        "raw image (JPEG, PNG, WebP, GIF, BMP or TIFF) with an image/* Content-Type",
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        FILE_PART: {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                        }
                    },
                    "required": [FILE_PART],
                }
            },
            "image/*": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    descriptions = {
        400: "undecodable image, empty or malformed body",
        404: "unknown model",
        413: "body, image pixels or image count over the configured limits",
        415: "unsupported Content-Type",
        422: "invalid parameter",
        503: "queue full or not ready; see Retry-After",
        504: "not answered within the request timeout",
    }
    return {s: {"model": ErrorResponse, "description": descriptions[s]} for s in statuses}


_INFERENCE_ERRORS = _errors(400, 404, 413, 415, 422, 503, 504)

ModelParam = Annotated[
    str | None,
    Query(description="model name; optional when one model is served or a default is set"),
]


router = APIRouter()


@router.post(
    "/classify",
    response_model=ClassifyResponse,
    responses=_INFERENCE_ERRORS,
    openapi_extra=_IMAGE_BODY,
    summary="Top-k classes per image",
)
async def classify(
    request: Request,
    plane: Plane,
    model: ModelParam = None,
    top_k: Annotated[
        int | None,
        Query(ge=1, description="classes per image, highest first (default: 5, or all if fewer)"),
    ] = None,
) -> Response:
    return await classify_answer(request, plane, model, top_k)


async def classify_answer(
    request: Request, plane: DataPlane, model: str | None, top_k: int | None
) -> Response:
    """/classify's answer (the fast lane, service/protocols/fast_lane.py, serves it too)."""
    async with plane.request(model, "classify", disconnected=client_gone(request)) as call:
        k = call.top_k(top_k)
        async with _images(request, plane) as blobs:
            predictions = await call.classify(blobs, k)
    return JSONResponse({**_answered_by(call.entry), "predictions": predictions})


@router.post(
    "/embed",
    response_model=EmbedResponse,
    responses={
        **_INFERENCE_ERRORS,
        200: {
            "content": {NPY: {}},
            "description": "JSON by default; with `Accept: application/x-npy`, the float32 "
            "[N, dim] array in NumPy's .npy format (model, version and trained in X-Model "
            "headers)",
        },
    },
    openapi_extra=_IMAGE_BODY,
    summary="Pooled embedding per image",
)
async def embed(
    request: Request,
    plane: Plane,
    model: ModelParam = None,
    normalize: Annotated[bool, Query(description="scale each embedding to unit L2 norm")] = False,
) -> Response:
    return await embed_answer(request, plane, model, normalize)


async def embed_answer(
    request: Request, plane: DataPlane, model: str | None, normalize: bool
) -> Response:
    """/embed's answer (the fast lane, service/protocols/fast_lane.py, serves it too)."""
    gone = client_gone(request)
    async with (
        plane.request(model, "embed", disconnected=gone) as call,
        _images(request, plane) as blobs,
    ):
        embeddings = await call.embed(blobs, normalize=normalize)
    entry = call.entry
    if wants_npy(request.headers.get("accept", "")):
        # Binary for clients that ask: no float formatting or parsing at either end.
        buffer = io.BytesIO()
        np.save(buffer, embeddings, allow_pickle=False)
        headers = {
            "X-Model": entry.name,
            "X-Model-Version": str(entry.version),
            "X-Model-Trained": "true" if entry.trained else "false",
        }
        return Response(buffer.getvalue(), media_type=NPY, headers=headers)
    body = {**_answered_by(entry), "dim": int(embeddings.shape[1]), "embeddings": embeddings}
    return JSONResponse(body)


def _answered_by(entry: ModelEntry) -> dict[str, Any]:
    """Which model answered, and whether its weights were trained (random weights answer too,
    with predictions that mean nothing)."""
    return {"model": entry.name, "version": entry.version, "trained": entry.trained}


@router.get("/models", response_model=ModelsResponse, summary="Every served model")
async def list_models(plane: Plane) -> Response:
    models = [m.view(plane.settings) for m in plane.registry.models.values()]
    return JSONResponse({"models": models})


@router.get("/models/{name}", response_model=ModelInfo, responses=_errors(404), summary="One model")
async def get_model(name: str, plane: Plane) -> Response:
    return JSONResponse(plane.registry.resolve(name).view(plane.settings))


@router.get("/healthz", response_model=HealthResponse, summary="The process is alive")
async def healthz() -> Response:
    return JSONResponse({"status": "ok"})


@router.get(
    "/readyz",
    response_model=ReadyResponse,
    responses={503: {"model": ReadyResponse, "description": "loading, draining or failed"}},
    summary="200 only when every model is loaded and warmed",
)
async def readyz(request: Request, plane: Plane) -> Response:
    registry = plane.registry
    body: dict[str, Any] = {"status": registry.status}
    access = request.app.state.access  # the probe is open; the model names are not
    if access.check("inference", request.headers.get("authorization", "").encode()) is None:
        body["models"] = {n: m.state for n, m in registry.models.items()}
    if registry.ready:
        return JSONResponse(body)
    headers = {"Retry-After": str(plane.settings.retry_after_s)}
    return JSONResponse(body, status_code=503, headers=headers)


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}},
    summary="Prometheus metrics",
)
async def metrics(plane: Plane) -> Response:
    return Response(plane.metrics.render(), media_type=plane.metrics.content_type)


@asynccontextmanager
async def _images(request: Request, plane: DataPlane) -> AsyncIterator[list[Body]]:
    """The request's encoded images, held in memory (within the bytes-in-flight budget) until
    the block ends; a large multipart body is split in a thread."""
    settings = plane.settings
    boundary = check_image_body(*content_type(request))
    async with held_body(request, plane.bodies, settings.max_request_bytes) as body:
        limit = settings.max_images_per_request
        if len(body) > SPLIT_INLINE_BYTES:
            yield await asyncio.to_thread(split_images, body, boundary, limit)
        else:
            yield split_images(body, boundary, limit)


def wants_npy(accept: str) -> bool:
    """Whether an Accept header prefers .npy to JSON (RFC 9110 media ranges with q-values): .npy
    only when named explicitly with q > 0 and at least JSON's q; JSON otherwise."""
    npy = json = 0.0
    named_npy = named_json = False
    for media_range in accept.split(","):
        media, *params = (part.strip().lower() for part in media_range.split(";"))
        q = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        if media == NPY:
            npy, named_npy = q, True
        elif media == "application/json":
            json, named_json = q, True
        elif media in ("application/*", "*/*") and not named_json:
            json = max(json, q)
    return named_npy and npy > 0 and npy >= json
