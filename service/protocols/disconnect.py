"""HTTP requests whose client has gone: the data plane stops working for them.

Starlette does not cancel a handler when its client disconnects, so without this a client that
gives up (a timeout on its side, a closed tab, a load balancer's retry) still has its images
decoded and run, ahead of clients that are still waiting. Once the body has been read, the ASGI
`receive` channel has nothing more to say until `http.disconnect`; waiting on it beside the work
notices the disconnect at once, without polling. The HTTP routes hand this waiter to
`DataPlane.request`; gRPC needs none, since grpc.aio cancels the handler of a call its client
cancelled, which the data plane counts the same way (499).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from starlette.requests import Request


def client_gone(request: Request) -> Callable[[], Awaitable[None]]:
    """A waiter that returns once `request`'s client has disconnected. Start it only after the
    request body has been read."""

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    return disconnected
