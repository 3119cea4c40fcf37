"""The HTTP side of tracing: the `receive` span of each POST request (service/core/tracing.py)."""

from __future__ import annotations

from typing import Any

from ..core.tracing import Tracing


class TracingMiddleware:
    """ASGI middleware opening the `receive` span of each POST request; installed only when
    tracing is on. The respond span ends with the answer's last byte."""

    def __init__(self, app: Any, tracing: Tracing) -> None:
        self.app, self.tracing = app, tracing

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        attributes = {"http.request.method": "POST", "url.path": scope["path"]}
        status = [0]

        async def send_traced(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        with self.tracing.receive("receive", headers, protocol="http", **attributes) as handle:
            await self.app(scope, receive, send_traced)
            handle.set_attribute("http.response.status_code", status[0])
