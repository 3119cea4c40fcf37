"""The load generator's lean HTTP/1.1 client against a real socket server on 127.0.0.1."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from tests.support.wire import WireClient, WireError

Reply = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[bool]]


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    return await reader.readexactly(length)


async def serve(reply: Reply, requests: int, concurrency: int = 1) -> tuple[list[int], int]:
    """Statuses of `requests` POSTs through one client, and how many connections it opened."""
    connections = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        try:
            while await reply(reader, writer):
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    statuses = []
    async with server, WireClient(f"http://127.0.0.1:{port}", concurrency) as client:
        head = client.request_head("/echo?x=1", "text/plain", 5)

        async def one() -> None:
            status, body = await client.post(head, b"hello")
            assert body == b"HELLO"
            statuses.append(status)

        for _ in range(requests // concurrency):
            await asyncio.gather(*(one() for _ in range(concurrency)))
    return statuses, connections


async def content_length(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    body = (await read_request(reader)).upper()
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    return True


async def chunked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    body = (await read_request(reader)).upper()
    writer.write(b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n")
    writer.write(b"2;ext=1\r\n%s\r\n3\r\n%s\r\n0\r\nX-Trailer: t\r\n\r\n" % (body[:2], body[2:]))
    return True


async def closing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    body = (await read_request(reader)).upper()
    writer.write(b"HTTP/1.1 503 Busy\r\nConnection: close\r\nContent-Length: 5\r\n\r\n" + body)
    return False


def test_keep_alive_reuses_connections() -> None:
    statuses, connections = asyncio.run(serve(content_length, requests=12, concurrency=3))
    assert statuses == [200] * 12
    assert connections == 3


def test_chunked_answers_and_trailers_are_read() -> None:
    statuses, connections = asyncio.run(serve(chunked, requests=4))
    assert statuses == [201] * 4 and connections == 1


def test_connection_close_opens_a_new_connection() -> None:
    statuses, connections = asyncio.run(serve(closing, requests=3))
    assert statuses == [503] * 3 and connections == 3


def test_garbage_and_early_close_raise_wire_errors() -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        await read_request(reader)
        writer.write(b"SSH-2.0-nope\r\n\r\n")
        return False

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        await read_request(reader)
        return False

    for reply, message in ((garbage, "not an HTTP/1.x status line"), (hang_up, "closed before")):
        with pytest.raises(WireError, match=message):
            asyncio.run(serve(reply, requests=1))


def test_only_plain_http_urls() -> None:
    with pytest.raises(ValueError, match="plain http"):
        WireClient("https://example.org", 1)
