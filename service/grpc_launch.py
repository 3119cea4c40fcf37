"""Whether and how the gRPC port is served: `grpc_server` needs the `grpc` extra (grpcio and
tritonclient[grpc]); without it, an explicitly configured gRPC port refuses to start, and the
default one is skipped with a warning."""

from __future__ import annotations

import importlib.util
import logging
from typing import TYPE_CHECKING, Any

from .settings import Settings

if TYPE_CHECKING:
    from .auth import AccessPolicy
    from .dataplane import DataPlane
    from .tracing import Tracing

log = logging.getLogger(__name__)


def grpc_wanted(settings: Settings) -> bool:
    """True when the gRPC port is to be served; raises ValueError when it is configured but
    the `grpc` extra is missing."""
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


async def start_grpc(
    settings: Settings,
    server: DataPlane,
    access: AccessPolicy,
    tracing: Tracing,
    *,
    name: str,
    version: str,
) -> tuple[Any, int] | None:
    """(the started grpc.aio server, its port), or None when gRPC is not served."""
    if not grpc_wanted(settings):
        return None
    from .grpc_server import serve

    return await serve(settings, server, access, tracing, name=name, version=version)
