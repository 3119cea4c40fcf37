"""The HTTP adapter: thin routes over the data plane in `dataplane` (`DataPlane`), and
`create_app(settings)`.

No app exists until `create_app` is called; everything an app needs hangs off `app.state.server`.
"""

from __future__ import annotations

import io
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from importlib import metadata as package_metadata
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, FastAPI, Query, Request
from starlette.responses import Response

from .auth import AccessPolicy, BearerAuth
from .bodies import FILE_PART, read_images
from .dataplane import DataPlane
from .dependencies import Server
from .disconnect import client_gone
from .docs_assets import install_offline_docs
from .errors import install_error_handlers
from .grpc_launch import grpc_wanted, start_grpc
from .metrics import Metrics
from .model_control import ModelControl
from .model_control import router as repository_router
from .oip import router as oip_router
from .repository import ModelEntry
from .schemas import (
    ClassifyResponse,
    EmbedResponse,
    ErrorResponse,
    HealthResponse,
    JSONResponse,
    ModelInfo,
    ModelsResponse,
    ReadyResponse,
)
from .settings import Settings
from .tracing import Tracing, TracingMiddleware

NPY = "application/x-npy"

log = logging.getLogger(__name__)

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
    server: Server,
    model: ModelParam = None,
    top_k: Annotated[
        int | None,
        Query(ge=1, description="classes per image, highest first (default: 5, or all if fewer)"),
    ] = None,
) -> Response:
    async with server.request(model, "classify", disconnected=client_gone(request)) as call:
        k = call.top_k(top_k)
        blobs = await _images(request, server.settings)
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
    server: Server,
    model: ModelParam = None,
    normalize: Annotated[bool, Query(description="scale each embedding to unit L2 norm")] = False,
) -> Response:
    async with server.request(model, "embed", disconnected=client_gone(request)) as call:
        blobs = await _images(request, server.settings)
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
async def list_models(server: Server) -> Response:
    models = [server.describe(m) for m in server.models.values()]
    return JSONResponse({"models": models})


@router.get("/models/{name}", response_model=ModelInfo, responses=_errors(404), summary="One model")
async def get_model(name: str, server: Server) -> Response:
    return JSONResponse(server.describe(server.resolve(name)))


@router.get("/healthz", response_model=HealthResponse, summary="The process is alive")
async def healthz() -> Response:
    return JSONResponse({"status": "ok"})


@router.get(
    "/readyz",
    response_model=ReadyResponse,
    responses={503: {"model": ReadyResponse, "description": "loading, draining or failed"}},
    summary="200 only when every model is loaded and warmed",
)
async def readyz(server: Server) -> Response:
    body = {"status": server.status, "models": {n: m.state for n, m in server.models.items()}}
    if server.ready:
        return JSONResponse(body)
    headers = {"Retry-After": str(server.settings.retry_after_s)}
    return JSONResponse(body, status_code=503, headers=headers)


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}},
    summary="Prometheus metrics",
)
async def metrics(server: Server) -> Response:
    return Response(server.metrics.render(), media_type=server.metrics.content_type)


async def _images(request: Request, settings: Settings) -> list[bytes]:
    return await read_images(
        request,
        max_bytes=settings.max_request_bytes,
        max_images=settings.max_images_per_request,
    )


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


def create_app(
    settings: Settings,
    *,
    on_fatal: Callable[[], None] | None = None,
    span_exporter: Any = None,
) -> FastAPI:
    """The service for `settings`. Reads the repository now (a bad one raises here); sessions
    are built and warmed in the background once the app starts. `on_fatal` is called when that
    fails, so that the process can exit non-zero instead of never becoming ready. Spans go to
    `span_exporter` when given (tests), else as the settings say (service/tracing.py)."""
    server = DataPlane(settings, Metrics(), on_fatal=on_fatal)
    access = AccessPolicy.from_settings(settings, server.metrics)
    tracing = Tracing.from_settings(settings, span_exporter)
    control = ModelControl(server, settings)
    grpc_wanted(settings)  # configured but not installed: refuse now, before anything loads

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        server.start()
        control.start()
        # gRPC shares this event loop, the data plane, the tokens and the tracer.
        grpc = await start_grpc(
            settings, server, access, tracing, name=app.title, version=app.version
        )
        app.state.grpc_port = grpc[1] if grpc else None
        try:
            yield
        finally:
            if grpc is not None:  # no new calls; accepted ones finish (SIGTERM drain)
                await grpc[0].stop(settings.request_timeout_ms / 1000.0)
            await control.stop()
            await server.stop()
            tracing.shutdown()

    app = FastAPI(
        title="resnet-serve",
        version=_version(),
        description="ResNet image classification and embeddings, served from ONNX graphs "
        "with dynamic batching.",
        lifespan=lifespan,
        default_response_class=JSONResponse,
    )
    app.state.server = server
    install_offline_docs(app)  # Swagger UI and ReDoc from this install, not a CDN
    install_error_handlers(app)
    app.include_router(router)
    app.include_router(oip_router)
    app.state.access, app.state.tracing, app.state.model_control = access, tracing, control
    if settings.model_control_mode == "explicit":  # management endpoints: off unless enabled
        app.include_router(repository_router)
    if tracing.enabled:
        app.add_middleware(TracingMiddleware, tracing=tracing)
    if access.enabled:  # outermost: a refused request is neither traced nor read
        app.add_middleware(BearerAuth, policy=access)
    return app


def _version() -> str:
    try:
        return package_metadata.version("resnet-serve")
    except package_metadata.PackageNotFoundError:
        return "0+unknown"
