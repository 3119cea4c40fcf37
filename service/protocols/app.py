"""`create_app(settings)`: the service's parts put together, behind HTTP and (when installed)
gRPC on the same event loop.

The serving core (service/core: registry, data plane, model control, metrics, tracing) knows no
protocol; this module builds it, mounts the HTTP routers (our API, the Open Inference Protocol,
the repository extension), the middlewares (bearer tokens outermost, then tracing) and the error
handlers, and starts and stops everything in the app's lifespan. No app exists until
`create_app` is called. `app.state` holds `plane` (the data plane, and through it the registry
and the settings), `access`, `tracing`, `model_control` and `grpc_port`.

Given an `engine` (a front-end worker's link to the engine process, `--workers N`), the models
are the engine process's (`RemoteRegistry`, `RemoteControl`): the same routes, adapters and data
plane, with no engine in this process.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from importlib import metadata as package_metadata
from typing import Any

from fastapi import FastAPI

from ..core.dataplane import DataPlane
from ..core.metrics import Metrics
from ..core.model_control import ModelControl
from ..core.registry import ModelRegistry
from ..core.remote import EngineLink, RemoteControl, RemoteRegistry
from ..core.settings import Settings
from ..core.tracing import Tracing
from .auth import AccessPolicy, BearerAuth
from .docs_assets import install_offline_docs
from .fast_lane import FastLane, ServiceApp
from .http import router
from .http_errors import install_error_handlers
from .http_tracing import TracingMiddleware
from .oip_http import router as oip_router
from .repository_http import router as repository_router
from .responses import JSONResponse

log = logging.getLogger(__name__)


def create_app(
    settings: Settings,
    *,
    on_fatal: Callable[[], None] | None = None,
    span_exporter: Any = None,
    engine: EngineLink | None = None,
) -> FastAPI:
    """The service for `settings`. Reads the repository now (a bad one raises here); engines
    are built and warmed in the background once the app starts. `on_fatal` is called when that
    fails, so that the process can exit non-zero instead of never becoming ready. Spans go to
    `span_exporter` when given (tests), else as the settings say (service/core/tracing.py)."""
    metrics = Metrics()
    registry: ModelRegistry | RemoteRegistry
    control: ModelControl | RemoteControl
    if engine is None:
        registry = ModelRegistry(settings, metrics, on_fatal=on_fatal)
        control = ModelControl(registry, settings)
    else:
        registry = RemoteRegistry(settings, metrics, engine)
        control = RemoteControl(registry)
    plane = DataPlane(registry, settings, metrics)
    access = AccessPolicy.from_settings(settings, metrics)
    if engine is None:
        log.info("access control: %s", access.describe())
    tracing = Tracing.from_settings(settings, span_exporter)
    serve_grpc = grpc_wanted(settings)  # configured but not installed: refused now

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        plane.start()
        registry.start()
        control.start()
        grpc_server = None
        if serve_grpc:  # the same event loop, data plane, tokens and tracer
            from .oip_grpc import serve

            grpc_server, app.state.grpc_port = await serve(
                settings,
                plane,
                access,
                tracing,
                name=app.title,
                version=app.version,
                shared_port=engine is not None,
            )
        try:
            yield
        finally:
            if grpc_server is not None:  # no new calls; accepted ones finish (SIGTERM drain)
                await grpc_server.stop(settings.request_timeout_ms / 1000.0)
            await control.stop()
            await registry.stop()
            await plane.stop()
            await tracing.shutdown()

    app = ServiceApp(
        title="resnet-serve",
        version=_version(),
        description="ResNet image classification and embeddings, served from ONNX graphs "
        "with dynamic batching.",
        lifespan=lifespan,
        default_response_class=JSONResponse,
    )
    app.fast_lane = FastLane(plane, access, tracing)  # the hot routes, before FastAPI's stack
    app.retry_after_s = settings.retry_after_s
    app.state.plane, app.state.access, app.state.tracing = plane, access, tracing
    app.state.model_control, app.state.grpc_port = control, None
    install_offline_docs(app)  # Swagger UI and ReDoc from this install, not a CDN
    install_error_handlers(app)
    app.include_router(router)
    app.include_router(oip_router)
    if settings.model_control_mode == "explicit":  # management endpoints: off unless enabled
        app.include_router(repository_router)
    if tracing.enabled:
        app.add_middleware(TracingMiddleware, tracing=tracing)
    if access.enabled:  # outermost: a refused request is neither traced nor read
        app.add_middleware(BearerAuth, policy=access)
    return app


def grpc_wanted(settings: Settings) -> bool:
    """True when the gRPC port is to be served; raises ValueError when it is configured but
    the `grpc` extra (grpcio, tritonclient[grpc]) is missing. Without the extra, the default
    port is skipped with a warning."""
    if settings.grpc_port == 0:
        return False
    installed = all(importlib.util.find_spec(m) for m in ("grpc", "tritonclient"))
    if installed and importlib.util.find_spec("tritonclient.grpc") is not None:
        return True
    if "grpc_port" in settings.model_fields_set:
        raise ValueError(
            f"grpc_port={settings.grpc_port} but gRPC is not installed: "
            'pip install "resnet-serve[grpc]", or set grpc_port=0'
        )
    log.warning('gRPC off: not installed (pip install "resnet-serve[grpc]" serves it on 8001)')
    return False


def _version() -> str:
    try:
        return package_metadata.version("resnet-serve")
    except package_metadata.PackageNotFoundError:
        return "0+unknown"
