"""Request bodies -> encoded images, within the configured limits.

Two forms: multipart/form-data with one or more parts named `file`, or one raw image with an
`image/*` content type. The body is read into memory up to `max_request_bytes` (checked against
Content-Length first, then while streaming, so chunked uploads are bounded too) and parsed with
python-multipart's streaming parser; parts are counted as they arrive.
"""

from __future__ import annotations

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request

from ..core.errors import (
    ClientDisconnectedError,
    EmptyRequestError,
    MalformedRequestError,
    RequestTooLargeError,
    TooManyImagesError,
    UnsupportedMediaTypeError,
)

FILE_PART = "file"


async def read_images(request: Request, *, max_bytes: int, max_images: int) -> list[bytes]:
    """The encoded images of a /classify or /embed request, in order."""
    media_type, options = parse_options_header(request.headers.get("content-type"))
    media = media_type.decode("latin-1").lower()
    if media != "multipart/form-data" and not media.startswith("image/"):
        raise UnsupportedMediaTypeError(
            f"unsupported Content-Type {media or '(none)'!r}: send multipart/form-data with parts "
            f"named {FILE_PART!r}, or one image with an image/* Content-Type"
        )
    body = await read_body(request, max_bytes)
    if not body:
        raise EmptyRequestError("the request body is empty; send at least one image")
    if media.startswith("image/"):
        return [body]
    boundary = options.get(b"boundary")
    if not boundary:
        raise MalformedRequestError("multipart/form-data without a boundary parameter")
    images = _parse_multipart(body, boundary, max_images)
    if not images:
        raise EmptyRequestError(f"the multipart body has no part named {FILE_PART!r}")
    return images


async def read_body(request: Request, max_bytes: int) -> bytes:
    declared = request.headers.get("content-length")
    if (
        declared is not None
        and declared.isascii()
        and declared.isdigit()
        and int(declared) > max_bytes
    ):
        raise RequestTooLargeError(f"request body of {declared} bytes exceeds {max_bytes} bytes")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_bytes:
                raise RequestTooLargeError(f"request body exceeds {max_bytes} bytes")
            chunks.append(chunk)
    except ClientDisconnect:
        raise ClientDisconnectedError(
            f"client disconnected after {size} bytes of the request body"
        ) from None
    return b"".join(chunks)


# Every part costs Python callbacks on the event loop: a body of tiny fields would stall all other
# requests for seconds (1.5 s per 10 MB on our 2-core machine), so parts that are not images are
# bounded too. (python-multipart bounds the headers of each part itself.)
MAX_OTHER_PARTS = 16


class _Parts:
    """Collects the `file` parts of a multipart body through python-multipart's callbacks."""

    def __init__(self, max_images: int) -> None:
        self.max_images = max_images
        self.images: list[bytes] = []
        self._parts = 0
        self.finished = False
        self._field = bytearray()
        self._value = bytearray()
        self._name: str | None = None
        self._data: list[bytes] = []

    def on_part_begin(self) -> None:
        self._parts += 1
        if self._parts > self.max_images + MAX_OTHER_PARTS:
            raise RequestTooLargeError(
                f"more than {self.max_images + MAX_OTHER_PARTS} parts in the multipart body "
                f"(max_images_per_request={self.max_images} images and {MAX_OTHER_PARTS} others)"
            )
        self._name, self._data = None, []

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def on_header_end(self) -> None:
        if self._field.decode("latin-1").lower() == "content-disposition":
            _, options = parse_options_header(bytes(self._value))
            name = options.get(b"name")
            self._name = name.decode("utf-8", "replace") if name is not None else None
        self._field.clear()
        self._value.clear()

    def on_headers_finished(self) -> None:
        if self._name == FILE_PART and len(self.images) >= self.max_images:
            raise TooManyImagesError(f"more than max_images_per_request={self.max_images} images")

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._name == FILE_PART:
            self._data.append(data[start:end])

    def on_part_end(self) -> None:
        if self._name == FILE_PART:
            self.images.append(b"".join(self._data))

    def on_end(self) -> None:
        self.finished = True


def _parse_multipart(body: bytes, boundary: bytes, max_images: int) -> list[bytes]:
    parts = _Parts(max_images)
    callbacks = {
        name: getattr(parts, name)
        for name in (
            "on_part_begin",
            "on_header_field",
            "on_header_value",
            "on_header_end",
            "on_headers_finished",
            "on_part_data",
            "on_part_end",
            "on_end",
        )
    }
    try:
        parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]
        parser.write(body)
        parser.finalize()
    except FormParserError as exc:  # parse errors, and a boundary longer than it allows
        raise MalformedRequestError(f"malformed multipart body: {exc}") from None
    if not parts.finished:
        raise MalformedRequestError("malformed multipart body: it ends before its closing boundary")
    return parts.images
