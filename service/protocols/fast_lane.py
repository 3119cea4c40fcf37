"""The hot path: `POST /classify`, `/embed` and `/v2/models/NAME[/versions/V]/infer`, served
without FastAPI's per-request machinery.

Under load, FastAPI's routing, dependency solving, parameter validation and middleware stack took
about half of the event loop's time for a small image (README "The serving tax"). These routes
take three query parameters between them, so the lane parses those itself, with the same rules
and the same 422 answers, and calls the very functions the FastAPI routes call
(`http.classify_answer`, `http.embed_answer`, `oip_http.infer_answer`), behind the same token
check (`BearerAuth`) and tracing (`TracingMiddleware`), with errors rendered by the same
`http_errors` functions. The FastAPI routes stay: they document these endpoints in OpenAPI, and
tests/test_fast_lane.py checks that both answer alike. Everything else goes to FastAPI.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qsl

from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import Response

from ..core.dataplane import DataPlane
from ..core.errors import InvalidParameterError, ServiceError, TooManyConnectionsError, clip
from .auth import AccessPolicy, BearerAuth
from .http import classify_answer, embed_answer
from .http_errors import error_response, service_error_answer, unexpected_error_answer
from .http_server import OVER_LIMIT
from .http_tracing import TracingMiddleware
from .oip_http import infer_answer

ASGIApp = Callable[[dict[str, Any], Any, Any], Awaitable[None]]
# pydantic's words for booleans in a query string (what FastAPI accepts for `normalize`).
_TRUE = frozenset({"1", "true", "t", "yes", "y", "on"})
_FALSE = frozenset({"0", "false", "f", "no", "n", "off"})


class FastLane:
    """The ASGI app of the hot routes, for `ServiceApp` to call before FastAPI."""

    def __init__(self, plane: DataPlane, access: AccessPolicy, tracing: Any) -> None:
        self.plane = plane
        app: ASGIApp = self._serve
        if tracing.enabled:
            app = TracingMiddleware(app, tracing)
        if access.enabled:  # outermost: a refused request is neither traced nor read
            app = BearerAuth(app, access)
        self.app = app

    @staticmethod
    def takes(scope: dict[str, Any]) -> bool:
        if scope["type"] != "http" or scope["method"] != "POST":
            return False
        path: str = scope["path"]
        if path in ("/classify", "/embed"):
            return True
        return path.startswith("/v2/models/") and path.endswith("/infer") and bool(_oip(path)[0])

    async def _serve(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        request = Request(scope, receive, send)
        try:
            response = await self._answer(request, scope["path"])
        except ServiceError as exc:
            response = service_error_answer(request, exc)
        except Exception as exc:
            response = unexpected_error_answer(request, exc)
        await response(scope, receive, send)

    async def _answer(self, request: Request, path: str) -> Response:
        plane = self.plane
        query = dict(parse_qsl(request.scope["query_string"].decode("latin-1"), True))
        if path == "/classify":
            top_k = _positive_int(query.get("top_k"), "top_k")
            return await classify_answer(request, plane, query.get("model"), top_k)
        if path == "/embed":
            normalize = _boolean(query.get("normalize"), "normalize")
            return await embed_answer(request, plane, query.get("model"), normalize)
        name, version = _oip(path)
        assert name is not None  # `takes` checked it
        return await infer_answer(request, plane, name, version)


def _positive_int(text: str | None, name: str) -> int | None:
    if text is None:
        return None
    stripped = text.strip()
    if not (stripped.lstrip("+-").isascii() and stripped.lstrip("+-").isdigit()):
        raise InvalidParameterError(
            f"query.{name}: Input should be a valid integer, unable to parse string as an "
            f"integer (got {clip(text)})"
        )
    if len(stripped) > 18:  # past int64: more classes than any model has
        raise InvalidParameterError(f"query.{name}: {clip(text)} is out of range")
    value = int(stripped)
    if value < 1:
        raise InvalidParameterError(f"query.{name}: Input should be greater than or equal to 1")
    return value


def _boolean(text: str | None, name: str) -> bool:
    if text is None:
        return False
    word = text.strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise InvalidParameterError(
        f"query.{name}: Input should be a valid boolean, unable to interpret input "
        f"(got {clip(text)})"
    )


def _oip(path: str) -> tuple[str | None, str | None]:
    """(name, version) of /v2/models/NAME/infer or /v2/models/NAME/versions/V/infer."""
    parts = path[len("/v2/models/") : -len("/infer")].split("/")
    if len(parts) == 1 and parts[0]:
        return parts[0], None
    if len(parts) == 3 and parts[0] and parts[1] == "versions" and parts[2]:
        return parts[0], parts[2]
    return None, None


class ServiceApp(FastAPI):
    """FastAPI, with the hot routes taken by the `FastLane` before its middleware stack, and
    requests past max_connections answered 503 before anything else."""

    fast_lane: FastLane | None = None
    retry_after_s = 1

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        extensions = scope.get("extensions")
        if extensions and OVER_LIMIT in extensions:
            refused = TooManyConnectionsError(
                f"more than max_connections={extensions[OVER_LIMIT]} connections or requests "
                "at once",
                retry_after_s=self.retry_after_s,
            )
            headers = {**refused.headers, "Connection": "close"}
            answer = error_response(
                Request(scope), refused.status, refused.code, refused.message, headers
            )
            await answer(scope, receive, send)
            return
        lane = self.fast_lane
        if lane is not None and FastLane.takes(scope):
            await lane.app(scope, receive, send)
            return
        await super().__call__(scope, receive, send)  # type: ignore[arg-type]
