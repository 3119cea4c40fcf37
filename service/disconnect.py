"""Requests whose client has gone: stop working for them.

Starlette does not cancel a handler when its client disconnects, so without this a client that
gives up (a timeout on its side, a closed tab, a load balancer's retry) still has its images
decoded and run, ahead of clients that are still waiting. Once the body has been read, the ASGI
`receive` channel has nothing more to say until `http.disconnect`; waiting on it beside the work
notices the disconnect at once, without polling.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

from starlette.requests import Request

from .errors import ClientDisconnectedError

T = TypeVar("T")


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, work: Coroutine[Any, Any, T]) -> T:
    """The result of `work`, or ClientDisconnectedError as soon as the client disconnects, with
    `work` cancelled: its images still waiting for a batch are dropped. Call it only after the
    request body has been read."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:
        # Also reached when this request is cancelled (its timeout): neither task outlives it.
        for pending in (task, watcher):
            pending.cancel()
        await asyncio.gather(task, watcher, return_exceptions=True)
    if task.cancelled():
        raise ClientDisconnectedError("client disconnected before its answer was ready")
    return task.result()
