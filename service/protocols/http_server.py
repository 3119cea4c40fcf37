"""The HTTP server around the app: uvicorn on uvloop with httptools' parser, a bounded request
head (size and time), a cap on connections, and a drain on SIGTERM.

- httptools (llhttp, C) and uvloop (libuv, C) take about a quarter off the event loop's time per
  request against h11 and asyncio's own loop (README "The serving tax"). httptools alone buffers
  a header line without limit (one connection sending a 256 MiB header took 320 MB of RSS,
  docs/reliability.md): `BoundedHttpToolsProtocol` answers 431 and closes a connection whose
  incomplete request head passes 16 KiB, as h11 does.
- uvicorn arms no timer until a connection's first response, so a head that never completes
  would hold its connection forever: the protocol closes a connection whose request head is not
  complete `request_head_timeout_ms` after it opened (or after its last response).
- `max_connections`: a connection made while that many are open (or a request past that many in
  progress) gets 503 with Retry-After and the service's JSON error body (`OVER_LIMIT`), not
  uvicorn's plain one, and is closed; the connections within the limit are served as usual.
- A lost connection tells the request it carried at once (the ASGI scope extension of
  service/protocols/disconnect.py), so that the data plane stops working for it without a task
  per request waiting for `http.disconnect`.
- `DrainingServer`: on the first SIGTERM /readyz turns 503; after `drain_delay_ms` the listener
  closes and accepted requests finish.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from ..core.serving import Models
from ..core.settings import Settings
from .disconnect import DISCONNECT_EXTENSION

ACCEPTED_GRACE_S = 0.25


MAX_HEAD_BYTES = 16 * 1024  # what h11 allows an incomplete request head
# The ASGI scope extension of a request that came past max_connections (its value: the limit);
# the app answers it 503 (fast_lane.ServiceApp).
OVER_LIMIT = "resnet_serve.over_connection_limit"
FLUSH_AT_BYTES = 64 * 1024


class CoalescedWrites:
    """A request's view of its connection, through which a response's writes (uvicorn writes
    its head, then its body) leave in one send instead of one each: collected, and sent when the
    response is complete (`flush`), when the connection closes, at the end of the event loop's
    current iteration (a streamed response), or past FLUSH_AT_BYTES."""

    __slots__ = ("_loop", "_pending", "_scheduled", "_size", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport, self._loop = transport, loop
        self._pending: list[bytes] = []
        self._size = 0
        self._scheduled = False

    def write(self, data: bytes) -> None:
        self._pending.append(data)
        self._size += len(data)
        if self._size >= FLUSH_AT_BYTES:
            self.flush()
        elif not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        if self._pending:
            data = self._pending[0] if len(self._pending) == 1 else b"".join(self._pending)
            self._pending.clear()
            self._size = 0
            self._transport.write(data)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """httptools with a size and a deadline on every request head."""

    head_timeout_s = 10.0
    max_connections = 1024

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._gone_callbacks: list[Callable[[], None]] = []  # the current request's
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_bytes = 0  # received while the head was incomplete, before this read
        self._in_head = True
        super().connection_made(transport)
        # Past max_connections, the connections made beyond it are refused, not every request
        # (uvicorn's own rule): a burst of connections is served up to the limit.
        self._over_limit = len(self.connections) > self.max_connections
        self._await_head()

    def data_received(self, data: bytes) -> None:
        if self._in_head and self._head_bytes > MAX_HEAD_BYTES:
            return  # refused already; the connection is closing
        super().data_received(data)
        if self._in_head and not self.transport.is_closing():
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                self._refuse_head()

    def on_headers_complete(self) -> None:
        self._in_head, self._head_bytes = False, 0
        self._head_received()
        limit = self.max_connections
        over = self._over_limit or len(self.tasks) >= limit
        super().on_headers_complete()
        if self.cycle is not None and self.cycle.transport is self.transport:
            self.cycle.transport = CoalescedWrites(self.transport, self.loop)  # type: ignore[assignment]
            self._gone_callbacks = []
            extensions = self.scope.setdefault("extensions", {})
            extensions[DISCONNECT_EXTENSION] = self._watch_client
            if over:
                extensions[OVER_LIMIT] = limit

    def _watch_client(self, callback: Callable[[], None]) -> Callable[[], None]:
        """The request's disconnect watch (service/protocols/disconnect.py): `callback` is
        called if the connection is lost before the returned function is."""
        callbacks = self._gone_callbacks
        if self.transport.is_closing():
            self.loop.call_soon(callback)
            return lambda: None
        callbacks.append(callback)

        def unwatch() -> None:
            if callback in callbacks:
                callbacks.remove(callback)

        return unwatch

    def on_response_complete(self) -> None:
        self._gone_callbacks = []
        self._in_head, self._head_bytes = True, 0
        transport = self.cycle.transport if self.cycle is not None else None
        if isinstance(transport, CoalescedWrites):
            transport.flush()  # the answer leaves now, before anything of the next request
        super().on_response_complete()
        self._await_head()  # the next request's head (keep-alive)

    def connection_lost(self, exc: Exception | None) -> None:
        self._head_received()
        super().connection_lost(exc)
        callbacks, self._gone_callbacks = self._gone_callbacks, []
        for callback in callbacks:
            callback()

    def _refuse_head(self) -> None:
        body = b"Request head over 16 KiB"
        self.transport.write(
            b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: text/plain\r\n"
            + b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body)
            + body
        )
        self.transport.close()

    def _await_head(self) -> None:
        if self._head_timer is None and not self.transport.is_closing():
            self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_overdue)

    def _head_received(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_overdue(self) -> None:
        self._head_timer = None
        if self._in_head:
            self.transport.close()


def http_config(app: Any, settings: Settings) -> uvicorn.Config:
    protocol = type(
        "BoundedHttpToolsProtocol",
        (BoundedHttpToolsProtocol,),
        {
            "head_timeout_s": settings.request_head_timeout_ms / 1000.0,
            "max_connections": settings.max_connections,
        },
    )
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        log_level=settings.log_level,
        access_log=settings.access_log,
        http=protocol,
        loop="uvloop",
        limit_concurrency=None,  # max_connections, answered by the app (OVER_LIMIT)
        # Every accepted request ends by its own timeout; this only bounds a stuck shutdown.
        timeout_graceful_shutdown=settings.request_timeout_ms / 1000.0 + 5.0,
    )


class DrainingServer(uvicorn.Server):
    """uvicorn with a readiness flip on the first stop signal, and an optional drain delay
    between that flip and closing the listener."""

    def __init__(self, config: uvicorn.Config, registry: Models, drain_ms: int) -> None:
        super().__init__(config)
        self._registry = registry
        self._drain_s = drain_ms / 1000.0
        self._stop_at: float | None = None
        self.on_started: Callable[[], None] | None = None  # once the listeners accept

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started and self.on_started is not None:
            self.on_started()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._registry.begin_draining()
        if self._drain_s > 0 and self._stop_at is None:
            self._stop_at = time.monotonic() + self._drain_s
            return
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        if self._stop_at is not None and time.monotonic() >= self._stop_at:
            self.should_exit = True
        return await super().on_tick(counter)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """Close the listener, then let connections accepted just before deliver their request.

        uvicorn closes every connection with no request in progress at once; one accepted a
        moment earlier, whose request is still on its way, would be closed unanswered (seen
        under load in the container test: 1 of 75). After `ACCEPTED_GRACE_S` its request is
        in progress and is answered like any other.
        """
        for server in self.servers:
            server.close()
        for sock in sockets or []:
            sock.close()
        await asyncio.sleep(ACCEPTED_GRACE_S)
        await super().shutdown(sockets)
