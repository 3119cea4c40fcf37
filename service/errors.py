"""Every error the API can answer with: a class carrying its HTTP status and a stable code.

One handler renders them all as `{"error": {"code": ..., "message": ...}}`; FastAPI's own
validation errors and Starlette's HTTP errors (unknown route, wrong method) take the same shape,
so clients parse one format. Under `/v2` (the Open Inference Protocol, service/oip.py) the body is
`{"error": message}`, as that protocol requires. Client errors are logged in one line, without a
traceback.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from http import HTTPStatus
from typing import Any, ClassVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from .schemas import JSONResponse

log = logging.getLogger(__name__)

OIP_PREFIX = "/v2"


class ServiceError(Exception):
    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"

    def __init__(self, message: str, *, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = dict(headers or {})


class InvalidImageError(ServiceError):
    status, code = 400, "invalid_image"


class EmptyRequestError(ServiceError):
    status, code = 400, "empty_request"


class MalformedRequestError(ServiceError):
    status, code = 400, "malformed_request"


class ModelNotFoundError(ServiceError):
    status, code = 404, "model_not_found"


class RequestTooLargeError(ServiceError):
    status, code = 413, "request_too_large"


class ImageTooLargeError(ServiceError):
    status, code = 413, "image_too_large"


class TooManyImagesError(ServiceError):
    status, code = 413, "too_many_images"


class UnsupportedMediaTypeError(ServiceError):
    status, code = 415, "unsupported_media_type"


class InvalidParameterError(ServiceError):
    status, code = 422, "invalid_parameter"


class InferenceError(ServiceError):
    status, code = 500, "inference_failed"


class UnavailableError(ServiceError):
    """503s tell the client when to come back."""

    status, code = 503, "unavailable"

    def __init__(self, message: str, *, retry_after_s: int) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after_s)})


class NotReadyError(UnavailableError):
    code = "not_ready"


class QueueFullError(UnavailableError):
    code = "queue_full"


class RequestTimeoutError(ServiceError):
    status, code = 504, "timeout"


class ClientDisconnectedError(ServiceError):
    """The client went away before its answer. Nobody reads this response; its status (nginx's
    499) keeps the metrics and the log honest about why the request ended."""

    status, code = 499, "client_closed_request"


def error_response(
    request: Request,
    status: int,
    code: str,
    message: str,
    headers: Mapping[str, str] | None = None,
) -> Response:
    """Our error body, or `{"error": message}` under the Open Inference Protocol's prefix."""
    path = request.url.path
    body: dict[str, Any] = {"error": {"code": code, "message": message}}
    if path == OIP_PREFIX or path.startswith(OIP_PREFIX + "/"):
        body = {"error": message}
    return JSONResponse(body, status_code=status, headers=dict(headers or {}))


def _log(request: Request, status: int, code: str, message: str, exc: BaseException) -> None:
    where = f"{request.method} {request.url.path}"
    if status >= 500 and not isinstance(exc, UnavailableError | RequestTimeoutError):
        log.error("%s -> %d %s: %s", where, status, code, message, exc_info=exc)
    elif status >= 500:
        log.warning("%s -> %d %s: %s", where, status, code, message)
    else:
        log.info("%s -> %d %s: %s", where, status, code, message)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError) -> Response:
        _log(request, exc.status, exc.code, exc.message, exc)
        return error_response(request, exc.status, exc.code, exc.message, exc.headers)

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
        _log(request, 500, ServiceError.code, str(exc), exc)
        return error_response(request, 500, ServiceError.code, "internal server error")
