"""A lean HTTP/1.1 client for the load generator: keep-alive connections over asyncio streams.

On a 2-core machine the load generator shares the cores with the service it measures, so its
own CPU time is subtracted from the figures. On the 2-core CI machine httpx spent 2.6 ms of CPU
per request and this client 0.17 ms (`make bench-ablations`, the "client CPU s" column of
`bench http`): it writes a pre-built request and reads the status line, the headers and a
Content-Length or chunked body. `--client httpx` keeps the general client for comparison.
"""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit


class WireError(ConnectionError):
    """The server closed the connection or sent something that is not HTTP/1.1."""


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    def close(self) -> None:
        self.writer.close()


class WireClient:
    """POSTs to one origin over at most `connections` reused connections."""

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
        return (
            f"POST {target} HTTP/1.1\r\nHost: {self._authority}\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: {length}\r\n"
            "Accept: application/json\r\n\r\n"
        ).encode("latin-1")

    async def post(self, head: bytes, body: bytes) -> tuple[int, bytes]:
        """Send a request built by `request_head` + `body`; (status, response body)."""
        async with self._slots:
            connection = self._idle.pop() if self._idle else await self._connect()
            try:
                connection.writer.write(head)
                connection.writer.write(body)
                status, payload, keep = await self._read_response(connection.reader)
            except BaseException:
                connection.close()
                raise
            if keep:
                self._idle.append(connection)
            else:
                connection.close()
            return status, payload

    async def _connect(self) -> _Connection:
        reader, writer = await asyncio.open_connection(self.host, self.port, limit=2**20)
        return _Connection(reader, writer)

    @staticmethod
    async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as exc:
            raise WireError("connection closed before an answer") from exc
        lines = head.decode("latin-1").split("\r\n")
        version, _, rest = lines[0].partition(" ")
        if not version.startswith("HTTP/1.") or len(rest) < 3 or not rest[:3].isdigit():
            raise WireError(f"not an HTTP/1.x status line: {lines[0]!r}")
        headers = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        keep = headers.get("connection", "").lower() != "close" and version == "HTTP/1.1"
        if headers.get("transfer-encoding", "").lower() == "chunked":
            return int(rest[:3]), await _read_chunked(reader), keep
        if "content-length" in headers:
            return int(rest[:3]), await reader.readexactly(int(headers["content-length"])), keep
        return int(rest[:3]), await reader.read(), False  # delimited by the server closing


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
