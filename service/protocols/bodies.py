"""Request bodies -> encoded images, within the configured limits.

Two forms: multipart/form-data with one or more parts named `file`, or one raw image with an
`image/*` content type. A body is read into one buffer sized by its Content-Length (checked
against `max_request_bytes` first, then while streaming, so chunked uploads are bounded too),
under the service's budget of bytes in flight (`ByteBudget`: a body that does not fit is refused
with 503 before it is read).

Multipart is split here, strictly, by `bytes.find` (C speed) rather than stepped through byte by
byte: RFC 2046 forbids the boundary delimiter inside a part, so `CRLF--boundary` followed by
anything but `--` or the end of its line ends the body as malformed at once. A body built to
make a tolerant parser look at every byte (`\\r\\n--aX` repeated) costs what any body of its size
costs to search, not seconds of interpreter time. Parts are counted as they are found; their
headers are bounded in size and number.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from python_multipart.multipart import parse_options_header
from starlette.requests import ClientDisconnect, Request

from ..core.budget import ByteBudget
from ..core.errors import (
    ClientDisconnectedError,
    EmptyRequestError,
    MalformedRequestError,
    RequestTooLargeError,
    TooManyImagesError,
    UnsupportedMediaTypeError,
)

FILE_PART = "file"
# Parts that are not images are bounded too, and so are part headers (python-multipart's limits).
MAX_OTHER_PARTS = 16
MAX_PART_HEADER_BYTES = 4096
MAX_PART_HEADERS = 8
CRLF = b"\r\n"


def content_type(request: Request) -> tuple[str, dict[bytes, bytes]]:
    """The request's media type (lower case) and its parameters."""
    media_type, options = parse_options_header(request.headers.get("content-type"))
    return media_type.decode("latin-1").lower(), options


def check_image_body(media: str, options: dict[bytes, bytes]) -> bytes | None:
    """Refuse (415, 400) what cannot hold images before any of the body is read; the
    multipart boundary, or None for a raw image."""
    if media != "multipart/form-data" and not media.startswith("image/"):
        raise UnsupportedMediaTypeError(
            f"unsupported Content-Type {media or '(none)'!r}: send multipart/form-data with parts "
            f"named {FILE_PART!r}, or one image with an image/* Content-Type"
        )
    if media.startswith("image/"):
        return None
    boundary = options.get(b"boundary")
    if not boundary:
        raise MalformedRequestError("multipart/form-data without a boundary parameter")
    if len(boundary) > 70:  # RFC 2046: 1 to 70 characters
        raise MalformedRequestError("multipart boundary longer than 70 characters")
    return boundary


def declared_length(request: Request, max_bytes: int) -> int | None:
    """The Content-Length, refused (413) above `max_bytes` before anything is read."""
    declared = request.headers.get("content-length")
    if declared is None or not (declared.isascii() and declared.isdigit()) or len(declared) > 19:
        return None
    if int(declared) > max_bytes:
        raise RequestTooLargeError(f"request body of {declared} bytes exceeds {max_bytes} bytes")
    return int(declared)


Body = bytes | bytearray


async def read_body(request: Request, max_bytes: int) -> Body:
    """The whole body, at most `max_bytes`, in one buffer (no list of chunks joined after)."""
    declared = declared_length(request, max_bytes)
    body = bytearray()
    if declared:
        body = bytearray(declared)
    size = 0
    try:
        async for chunk in request.stream():
            end = size + len(chunk)
            if end > max_bytes:
                raise RequestTooLargeError(f"request body exceeds {max_bytes} bytes")
            if end <= len(body):
                body[size:end] = chunk
            else:
                del body[size:]
                body += chunk
            size = end
    except ClientDisconnect:
        raise ClientDisconnectedError(
            f"client disconnected after {size} bytes of the request body"
        ) from None
    if size < len(body):
        del body[size:]
    return body


@asynccontextmanager
async def held_body(request: Request, budget: ByteBudget, max_bytes: int) -> AsyncIterator[Body]:
    """The body, read within `budget` (its Content-Length, or `max_bytes` when it has none),
    and held there until the block ends."""
    declared = declared_length(request, max_bytes)
    with budget.hold(max_bytes if declared is None else declared):
        yield await read_body(request, max_bytes)


def split_images(body: Body, boundary: bytes | None, max_images: int) -> list[Body]:
    """The encoded images of a /classify or /embed body, in order."""
    if not body:
        raise EmptyRequestError("the request body is empty; send at least one image")
    if boundary is None:
        return [body]
    images = parse_multipart(body, boundary, max_images)
    if not images:
        raise EmptyRequestError(f"the multipart body has no part named {FILE_PART!r}")
    return images


def parse_multipart(body: Body, boundary: bytes, max_images: int) -> list[Body]:
    """The `file` parts of a multipart/form-data body (RFC 7578), strictly."""
    delimiter = b"--" + boundary
    inner = CRLF + delimiter
    view = memoryview(body)
    if body.startswith(delimiter):
        position = 0
    else:  # a preamble before the first delimiter, which must start a line
        position = body.find(inner)
        if position < 0:
            raise MalformedRequestError("malformed multipart body: no boundary delimiter")
        position += len(CRLF)
    images: list[Body] = []
    parts = 0
    while True:
        after = position + len(delimiter)
        if body[after : after + 2] == b"--":  # the close delimiter: done (an epilogue is ignored)
            return images
        line_end = _line_end(body, after)
        parts += 1
        if parts > max_images + MAX_OTHER_PARTS:
            raise RequestTooLargeError(
                f"more than {max_images + MAX_OTHER_PARTS} parts in the multipart body "
                f"(max_images_per_request={max_images} images and {MAX_OTHER_PARTS} others)"
            )
        headers_end = body.find(CRLF + CRLF, line_end - len(CRLF), line_end + MAX_PART_HEADER_BYTES)
        if headers_end < 0:
            raise MalformedRequestError(
                f"malformed multipart body: part headers missing or over {MAX_PART_HEADER_BYTES} "
                "bytes"
            )
        name = _part_name(body[line_end:headers_end])
        start = headers_end + 2 * len(CRLF)
        end = body.find(inner, start)
        if end < 0:
            raise MalformedRequestError(
                "malformed multipart body: it ends before its closing boundary"
            )
        if name == FILE_PART:
            if len(images) >= max_images:
                raise TooManyImagesError(f"more than max_images_per_request={max_images} images")
            images.append(view[start:end].tobytes())
        position = end + len(CRLF)


def _line_end(body: Body, after: int) -> int:
    """Where the line of a delimiter ends (after its CRLF). Only transport padding (spaces,
    tabs) may follow a delimiter on its line: anything else means the boundary occurs inside a
    part, which RFC 2046 forbids."""
    end = body.find(CRLF, after, after + 1024)
    if end < 0 or body[after:end].strip(b" \t"):
        raise MalformedRequestError(
            "malformed multipart body: the boundary delimiter occurs inside a part (RFC 2046 "
            "forbids it): choose a boundary that is not in the data"
        )
    return end + len(CRLF)


def _part_name(head: Body) -> str | None:
    """The `name` of a part's Content-Disposition, from its header lines."""
    if not head:
        return None
    lines = bytes(head).split(CRLF)
    if len(lines) > MAX_PART_HEADERS:
        raise MalformedRequestError(f"a multipart part has more than {MAX_PART_HEADERS} headers")
    for line in lines:
        field, colon, value = line.partition(b":")
        if not colon:
            raise MalformedRequestError("malformed multipart body: a part header has no ':'")
        if field.strip().lower() == b"content-disposition":
            _, options = parse_options_header(value.strip())
            name = options.get(b"name")
            return name.decode("utf-8", "replace") if name is not None else None
    return None
