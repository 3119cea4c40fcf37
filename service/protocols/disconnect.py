"""HTTP requests whose client has gone: the data plane stops working for them.

Starlette does not cancel a handler when its client disconnects, so without this a client that
gives up (a timeout on its side, a closed tab, a load balancer's retry) still has its images
decoded and run, ahead of clients that are still waiting. The data plane is given a *watch*: a
function that registers a callback to call when the client has gone, and returns the function
that unregisters it (service/core/dataplane.py, `unless_disconnected`).

- Under the service's own HTTP server (http_server.BoundedHttpToolsProtocol), the connection
  itself calls the callbacks when it is lost: no task, no wait per request. The server offers
  this as an ASGI scope extension, `DISCONNECT_EXTENSION`.
- Under any other server (tests' TestClient, another ASGI server), once the body has been read
  the ASGI `receive` channel has nothing more to say until `http.disconnect`: a task waiting on
  it calls the callback.

gRPC needs neither: grpc.aio cancels the handler of a call its client cancelled, which the data
plane counts the same way (499).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from starlette.requests import Request

from ..core.dataplane import Watch

DISCONNECT_EXTENSION = "resnet_serve.on_disconnect"


def client_gone(request: Request) -> Watch:
    """The watch of `request`'s client. Use it only after the request body has been read."""
    extension = request.scope.get("extensions", {}).get(DISCONNECT_EXTENSION)
    if extension is not None:
        watch: Watch = extension
        return watch

    def watch_receive(callback: Callable[[], None]) -> Callable[[], None]:
        async def disconnected() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass
            callback()

        task = asyncio.get_running_loop().create_task(disconnected())
        return task.cancel

    return watch_receive
