"""Errors as HTTP answers: one handler renders every `ServiceError` (service/core/errors.py) as
`{"error": {"code": ..., "message": ...}}`; FastAPI's validation errors and Starlette's HTTP
errors (unknown route, wrong method) take the same shape, so clients parse one format. Under
`/v2` (the Open Inference Protocol) the body is `{"error": message}`, as that protocol
requires. Client errors are logged in one line, without a traceback.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from ..core.errors import (
    InvalidParameterError,
    RequestTimeoutError,
    ServiceError,
    UnavailableError,
    capped,
)
from .responses import JSONResponse

log = logging.getLogger(__name__)

OIP_PREFIX = "/v2"


def is_oip(path: str) -> bool:
    return path == OIP_PREFIX or path.startswith(OIP_PREFIX + "/")


def error_body(path: str, code: str, message: str) -> dict[str, Any]:
    """Our error body, or `{"error": message}` under the Open Inference Protocol's prefix."""
    if is_oip(path):
        return {"error": message}
    return {"error": {"code": code, "message": message}}


def error_response(
    request: Request,
    status: int,
    code: str,
    message: str,
    headers: Mapping[str, str] | None = None,
) -> Response:
    body = error_body(request.url.path, code, message)
    return JSONResponse(body, status_code=status, headers=dict(headers or {}))


def _log(request: Request, status: int, code: str, message: str, exc: BaseException) -> None:
    where = f"{request.method} {request.url.path}"
    if status >= 500 and not isinstance(exc, UnavailableError | RequestTimeoutError):
        log.error("%s -> %d %s: %s", where, status, code, message, exc_info=exc)
    elif status >= 500:
        log.warning("%s -> %d %s: %s", where, status, code, message)
    else:
        log.info("%s -> %d %s: %s", where, status, code, message)


def service_error_answer(request: Request, exc: ServiceError) -> Response:
    """The answer to a request that ended in `exc`, logged."""
    _log(request, exc.status, exc.code, exc.message, exc)
    return error_response(request, exc.status, exc.code, exc.message, exc.headers)


def unexpected_error_answer(request: Request, exc: Exception) -> Response:
    """500, with the exception logged and its text kept out of the answer."""
    _log(request, 500, ServiceError.code, capped(str(exc)), exc)
    return error_response(request, 500, ServiceError.code, "internal server error")


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError) -> Response:
        return service_error_answer(request, exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        parts = []
        for error in exc.errors():
            where = ".".join(str(p) for p in error.get("loc", ()))
            parts.append(f"{where}: {error.get('msg', 'invalid')}")
        message = "; ".join(parts) or "invalid request"
        _log(request, 422, InvalidParameterError.code, message, exc)
        return error_response(request, 422, InvalidParameterError.code, message)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        phrase = HTTPStatus(exc.status_code).phrase
        code = phrase.lower().replace(" ", "_").replace("-", "_")
        message = exc.detail if isinstance(exc.detail, str) else phrase
        _log(request, exc.status_code, code, message, exc)
        return error_response(request, exc.status_code, code, message, exc.headers)

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, exc: Exception) -> Response:
        return unexpected_error_answer(request, exc)
