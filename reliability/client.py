"""A minimal HTTP/1.1 client on asyncio streams, one connection per request.

Load generators need thousands of concurrent requests on two shared cores and an exact account of
each one: answered (with which status), or lost (no answer: refused, reset, cut off, timed out).
httpx's pool adds its own queueing and timeouts in between; a raw request does not, and it can
also misbehave on purpose (disconnect early, send slowly), which hostile-input cases need.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

REFUSED = "refused"


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


def multipart(blobs: Sequence[bytes], content_type: str = "image/png") -> tuple[str, bytes]:
    """(Content-Type, body) of a multipart/form-data request with one `file` part per blob."""
    boundary = uuid.uuid4().hex
    parts = []
    for index, blob in enumerate(blobs):
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{index}"\r\n'
            f"Content-Type: {content_type}\r\n\r\n".encode()
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
) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}", "Connection: close"]
    if content_type is not None:
        lines.append(f"Content-Type: {content_type}")
    if body or method in {"POST", "PUT"}:
        lines.append(f"Content-Length: {len(body)}")
    lines += [f"{name}: {value}" for name, value in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    status = int(status_line.split(" ", 2)[1])
    headers: dict[str, str] = {}
    for line in header_lines:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    else:
        body = await reader.read()
    return status, headers, body


async def send(
    host: str,
    port: int,
    request: bytes,
    *,
    timeout_s: float = 60.0,
    disconnect_after_s: float | None = None,
) -> Outcome:
    """Send `request` on a new connection and read the answer; with `disconnect_after_s`, close
    the connection that long after sending instead (a client that gave up)."""
    start = time.monotonic()
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout_s)
    except (OSError, TimeoutError) as exc:
        return Outcome(None, time.monotonic() - start, error=f"{REFUSED}: {exc!r}")
    try:
        async with asyncio.timeout(timeout_s):
            writer.write(request)
            await writer.drain()
            if disconnect_after_s is not None:
                await asyncio.sleep(disconnect_after_s)
                return Outcome(None, time.monotonic() - start, error="disconnected on purpose")
            status, headers, body = await read_response(reader)
    except TimeoutError:
        return Outcome(None, time.monotonic() - start, error=f"no answer within {timeout_s} s")
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
        return Outcome(None, time.monotonic() - start, error=f"{type(exc).__name__}: {exc}")
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    return Outcome(status, time.monotonic() - start, headers, body)
