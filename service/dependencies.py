"""The `Server` dependency of both routers (api.py and oip.py): the app's ModelServer."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from .serving import ModelServer


async def _server(request: Request) -> ModelServer:
    """Async on purpose: FastAPI runs sync dependencies in its thread pool, a thread hop per
    request and up to 40 threads under a burst."""
    server: ModelServer = request.app.state.server
    return server


Server = Annotated[ModelServer, Depends(_server)]
