"""Requests whose client has gone: stop working for them.

Starlette does not cancel a handler when its client disconnects, so without this a client that
gives up (a timeout on its side, a closed tab, a load balancer's retry) still has its images
decoded and run, ahead of clients that are still waiting. Once the body has been read, the ASGI
`receive` channel has nothing more to say until `http.disconnect`; waiting on it beside the work
notices the disconnect at once, without polling. The data plane's request context does this for
every protocol (`DataPlane.request(..., disconnected=client_gone(request))`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from starlette.requests import Request

from .errors import ClientDisconnectedError

T = TypeVar("T")


def client_gone(request: Request) -> Callable[[], Awaitable[None]]:
    """A waiter that returns once `request`'s client has disconnected. Start it only after the
    request body has been read."""

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    return disconnected


async def unless_disconnected(
    disconnected: Callable[[], Awaitable[object]], work: Coroutine[Any, Any, T]
) -> T:
    """The result of `work`, or ClientDisconnectedError as soon as `disconnected()` returns, with
    `work` cancelled: its images still waiting for a batch are dropped."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(disconnected())
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
