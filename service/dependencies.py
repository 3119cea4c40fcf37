"""The `Server` dependency of both routers (api.py and oip.py): the app's DataPlane."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from .dataplane import DataPlane


async def _server(request: Request) -> DataPlane:
    """Async on purpose: FastAPI runs sync dependencies in its thread pool, a thread hop per
    request and up to 40 threads under a burst."""
    server: DataPlane = request.app.state.server
    return server


Server = Annotated[DataPlane, Depends(_server)]
