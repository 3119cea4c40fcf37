"""Every error a request can end with: a class carrying its status (HTTP's; gRPC maps it) and a
stable code, free of any web framework. The protocol adapters render them: one handler for HTTP
(service/protocols/http_errors.py), one status map for gRPC (service/protocols/oip_grpc.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

# A message goes into an answer body, a log line and a gRPC status: what a client sent is quoted
# clipped (`clip`), and no message is longer than this, whatever went into it.
MAX_MESSAGE_CHARS = 1024


def clip(value: object, limit: int = 80) -> str:
    """repr(value), cut to `limit` characters: how client input is quoted in messages."""
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[: limit - 30]}... ({len(text)} characters)"


def capped(message: str) -> str:
    if len(message) <= MAX_MESSAGE_CHARS:
        return message
    return message[: MAX_MESSAGE_CHARS - 40] + f"... ({len(message)} characters in all)"


class ServiceError(Exception):
    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"

    def __init__(self, message: str, *, headers: Mapping[str, str] | None = None) -> None:
        message = capped(message)
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


class TooManyConnectionsError(UnavailableError):
    """More connections or requests at once than max_connections (per front-end process)."""

    code = "too_many_connections"


class StaleVersionError(UnavailableError):
    """A front-end worker named a model version the engine process no longer serves (it was
    swapped out a moment before); the data plane retries on the new version."""

    code = "stale_version"


class RequestTimeoutError(ServiceError):
    status, code = 504, "timeout"


class ModelLoadError(ServiceError):
    """A version was refused: its metadata, graph or warm-up failed (Triton answers 400)."""

    status, code = 400, "load_failed"


class ClientDisconnectedError(ServiceError):
    """The client went away before its answer. Nobody reads this response; its status (nginx's
    499) keeps the metrics and the log honest about why the request ended."""

    status, code = 499, "client_closed_request"


def error_from(code: str, message: str, retry_after_s: int | None) -> ServiceError:
    """The error a code names (as the engine process reports it to a front-end worker)."""
    kind = _KINDS.get(code)
    if kind is None:
        return InferenceError(message)
    if issubclass(kind, UnavailableError):
        return kind(message, retry_after_s=retry_after_s or 0)
    return kind(message)


def _every(kind: type[ServiceError]) -> list[type[ServiceError]]:
    return [kind] + [k for sub in kind.__subclasses__() for k in _every(sub)]


_KINDS: dict[str, type[ServiceError]] = {kind.code: kind for kind in _every(ServiceError)}
