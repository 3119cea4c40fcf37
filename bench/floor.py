"""The Python floor: the least an HTTP request can cost here, served the service's way.

A minimal ASGI app (no framework) that reads the whole request body, counts the multipart parts
it carries and answers a small JSON with one prediction per image, served by the HTTP server
configuration the service itself uses (`service.protocols.http_server.http_config`), so that
whatever server, parser or protocol class the service adopts, the floor follows. It answers
`GET /models` as the service does and 404 everywhere else (`/metrics` included), so `bench http`
drives it unchanged. `python -m bench.floor --port P` serves it; `FloorServer` starts that in
its own process on a free port (`python -m bench floor` measures it).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx

from tests.support.launcher import free_port, poll_until

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

NAME = "floor"
_MODELS = json.dumps({"models": [{"name": NAME, "state": "ready"}]}).encode()
_NOT_FOUND = b'{"error": {"code": 404, "message": "not found"}}'
_ANSWERS: dict[tuple[str, int], bytes] = {}


def _answer(path: str, images: int) -> bytes:
    """The small JSON for `images` images: predictions (or embeddings for /embed), cached."""
    key = (path, images)
    if key not in _ANSWERS:
        if path == "/embed":
            body = {"model": NAME, "version": 1, "dim": 1, "embeddings": [[0.0]] * images}
        else:
            best = [{"index": 0, "label": NAME, "score": 1.0}]
            body = {"model": NAME, "version": 1, "predictions": [best] * images}
        _ANSWERS[key] = json.dumps(body).encode()
    return _ANSWERS[key]


def _images_in(headers: list[tuple[bytes, bytes]], body: bytes) -> int:
    """Multipart parts in `body` (one image each), or 1 for a raw image body."""
    content_type = next((v for k, v in headers if k == b"content-type"), b"")
    _, found, boundary = content_type.partition(b"boundary=")
    if not found:
        return 1
    return body.count(b"--" + boundary.strip(b'"') + b"\r\n")


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    path, method = scope["path"], scope["method"]
    status, answer = 404, _NOT_FOUND
    if method == "POST" and path in ("/classify", "/embed"):
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        status, answer = 200, _answer(path, _images_in(scope["headers"], b"".join(chunks)))
    elif method == "GET" and path == "/models":
        status, answer = 200, _MODELS
    elif method == "GET" and path in ("/healthz", "/readyz"):
        status, answer = 200, b'{"status": "ok"}'
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(answer))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": answer})


def serve(host: str, port: int) -> None:
    """Serve `app` with the service's HTTP server configuration (its Settings, access log off)."""
    import uvicorn

    from service.core.settings import Settings
    from service.protocols.http_server import http_config

    with tempfile.TemporaryDirectory(prefix="bench-floor-") as empty:
        settings = Settings(model_repository=Path(empty), host=host, port=port, access_log=False)
        uvicorn.Server(http_config(app, settings)).run()


class FloorServer:
    """`python -m bench.floor` in its own process on a free 127.0.0.1 port, stopped on exit."""

    def __init__(self, log_path: Path) -> None:
        self.host, self.port = "127.0.0.1", free_port()
        self.url = f"http://{self.host}:{self.port}"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = log_path.open("wb")
        command = [sys.executable, "-m", "bench.floor", "--host", self.host]
        command += ["--port", str(self.port)]
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT)

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_ready(self, deadline_s: float = 60.0) -> None:
        def check() -> bool:
            if self.process.poll() is not None:
                raise RuntimeError(f"the floor server exited ({self.process.returncode})")
            return httpx.get(f"{self.url}/healthz", timeout=2.0).status_code == 200

        poll_until(check, deadline_s, "the floor server listening")

    def __enter__(self) -> FloorServer:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    serve(args.host, args.port)


if __name__ == "__main__":
    main()
