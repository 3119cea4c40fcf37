"""The `Plane` dependency of the HTTP routers: the app's DataPlane (and through it the
registry and the settings)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from ..core.dataplane import DataPlane


async def _plane(request: Request) -> DataPlane:
    """Async on purpose: FastAPI runs sync dependencies in its thread pool, a thread hop per
    request and up to 40 threads under a burst."""
    plane: DataPlane = request.app.state.plane
    return plane


Plane = Annotated[DataPlane, Depends(_plane)]
