"""The one raw HTTP/1.1 client of the repository: bench's load generator, the tests and the
reliability suite build requests as bytes and read answers from asyncio streams with it.

Two ways to send: `WireClient` reuses keep-alive connections (the load generator: on a 2-core
machine it shares the cores with the service it measures, and its CPU per request is a small
fraction of httpx's; `make bench-ablations` and `bench http`'s "client CPU s" column measure it);
`send` opens one connection per request and accounts for each one exactly (answered with which
status, or lost: refused, reset, cut off, timed out), and can misbehave on purpose (disconnect
early), which hostile-input and fault cases need. `multipart` is the one multipart/form-data
encoder of bench and the tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

REFUSED = "refused"


class WireError(ConnectionError):
    """The server closed the connection or sent something that is not HTTP/1.1."""


@dataclass(frozen=True)
class Payload:
    """A request body built once: its bytes, content type, and the images it carries."""

    body: bytes
    content_type: str
    images: int


@dataclass
class Outcome:
    """One request: its status and answer, or why there was none."""

    status: int | None
    latency_s: float
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    error: str | None = None

    @property
    def kind(self) -> str:
        """ok (200), rejected (503), failed (any other status), refused (no connection: never
        accepted) or lost (connected, and no answer)."""
        if self.status is None:
            return "refused" if (self.error or "").startswith(REFUSED) else "lost"
        return {200: "ok", 503: "rejected"}.get(self.status, "failed")


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    reusable: bool  # the connection may carry another request


def multipart(
    blobs: Sequence[bytes],
    content_type: str | Sequence[str] = "image/png",
    filenames: Sequence[str] | None = None,
) -> tuple[str, bytes]:
    """(Content-Type, body) of a multipart/form-data request with one `file` part per blob
    (`content_type`: one for all parts, or one per part)."""
    boundary = uuid.uuid4().hex
    types = [content_type] * len(blobs) if isinstance(content_type, str) else list(content_type)
    names = list(filenames) if filenames is not None else [str(i) for i in range(len(blobs))]
    parts = []
    for blob, kind, name in zip(blobs, types, names, strict=True):
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
            f"Content-Type: {kind}\r\n\r\n".encode()
            + blob
            + b"\r\n"
        )
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return f"multipart/form-data; boundary={boundary}", body


def build(
    method: str,
    target: str,
    *,
    host: str,
    body: bytes = b"",
    content_type: str | None = None,
    headers: Sequence[tuple[str, str]] = (),
    keep_alive: bool = False,
    content_length: int | None = None,
) -> bytes:
    """A complete request (head and body) as bytes; with `content_length`, the head of a body
    sent separately."""
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}"]
    if not keep_alive:
        lines.append("Connection: close")
    if content_type is not None:
        lines.append(f"Content-Type: {content_type}")
    if content_length is not None:
        lines.append(f"Content-Length: {content_length}")
    elif body or method in {"POST", "PUT"}:
        lines.append(f"Content-Length: {len(body)}")
    lines += [f"{name}: {value}" for name, value in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


async def read_response(reader: asyncio.StreamReader) -> Answer:
    """One answer: status line, headers, and a Content-Length, chunked or close-delimited body."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        raise WireError("connection closed before an answer") from exc
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    version, _, rest = status_line.partition(" ")
    if not version.startswith("HTTP/1.") or len(rest) < 3 or not rest[:3].isdigit():
        raise WireError(f"not an HTTP/1.x status line: {status_line!r}")
    headers: dict[str, str] = {}
    for line in header_lines:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    reusable = headers.get("connection", "").lower() != "close" and version == "HTTP/1.1"
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = await _read_chunked(reader)
    elif "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    else:
        body, reusable = await reader.read(), False  # delimited by the server closing
    return Answer(int(rest[:3]), headers, body, reusable)


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    chunks = []
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        if size == 0:
            while (await reader.readuntil(b"\r\n")) != b"\r\n":  # trailers
                pass
            return b"".join(chunks)
        chunks.append(await reader.readexactly(size))
        await reader.readexactly(2)


async def send(
    host: str,
    port: int,
    request: bytes,
    *,
    timeout_s: float = 60.0,
    disconnect_after_s: float | None = None,
    disconnect_when: Callable[[], Awaitable[object]] | None = None,
) -> Outcome:
    """Send `request` on a new connection and read the answer; with `disconnect_after_s`, close
    the connection that long after sending instead (a client that gave up); with
    `disconnect_when`, once that returns."""
    start = time.monotonic()
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout_s)
    except (OSError, TimeoutError) as exc:
        return Outcome(None, time.monotonic() - start, error=f"{REFUSED}: {exc!r}")
    try:
        async with asyncio.timeout(timeout_s):
            writer.write(request)
            await writer.drain()
            if disconnect_after_s is not None or disconnect_when is not None:
                if disconnect_when is not None:
                    await disconnect_when()
                else:
                    await asyncio.sleep(disconnect_after_s or 0.0)
                return Outcome(None, time.monotonic() - start, error="disconnected on purpose")
            answer = await read_response(reader)
    except TimeoutError:
        return Outcome(None, time.monotonic() - start, error=f"no answer within {timeout_s} s")
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
        return Outcome(None, time.monotonic() - start, error=f"{type(exc).__name__}: {exc}")
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    return Outcome(answer.status, time.monotonic() - start, answer.headers, answer.body)


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    def close(self) -> None:
        self.writer.close()


class WireClient:
    """POSTs to one origin over at most `connections` reused keep-alive connections."""

    def __init__(self, url: str, connections: int) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"the lean client speaks plain http://host:port only, got {url!r}")
        self.host, self.port = parts.hostname, parts.port or 80
        self._authority = parts.netloc
        self._idle: list[_Connection] = []
        self._slots = asyncio.Semaphore(connections)

    async def __aenter__(self) -> WireClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        for connection in self._idle:
            connection.close()
        self._idle.clear()

    def request_head(self, target: str, content_type: str, length: int) -> bytes:
        """The head of a keep-alive POST whose body (`length` bytes) `post` sends after it."""
        return build(
            "POST",
            target,
            host=self._authority,
            content_type=content_type,
            headers=[("Accept", "application/json")],
            keep_alive=True,
            content_length=length,
        )

    async def post(self, head: bytes, body: bytes) -> tuple[int, bytes]:
        """Send a request built by `request_head` + `body`; (status, response body)."""
        async with self._slots:
            connection = self._idle.pop() if self._idle else await self._connect()
            try:
                connection.writer.write(head)
                connection.writer.write(body)
                answer = await read_response(connection.reader)
            except BaseException:
                connection.close()
                raise
            if answer.reusable:
                self._idle.append(connection)
            else:
                connection.close()
            return answer.status, answer.body

    async def _connect(self) -> _Connection:
        reader, writer = await asyncio.open_connection(self.host, self.port, limit=2**20)
        return _Connection(reader, writer)
