"""`python -m service`'s uvicorn subclass, in-process: the overrides of uvicorn internals it
relies on (`handle_exit`, `on_tick`) still take effect with the installed uvicorn."""

from __future__ import annotations

import signal
import socket
import threading
import time
from pathlib import Path

import httpx
import uvicorn
from PIL import Image

from service.core.settings import Settings
from service.protocols.app import create_app
from service.protocols.http_server import DrainingServer
from tests.support.launcher import poll_until

from .support.images import encode_image
from .support.service import write_tiny_model


def _start(repo: Path, drain_ms: int) -> tuple[DrainingServer, threading.Thread, str]:
    write_tiny_model(repo)
    app = create_app(Settings(model_repository=repo, intra_op_threads=1))
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_config=None, http="h11")
    server = DrainingServer(config, app.state.plane.registry, drain_ms)
    thread = threading.Thread(target=server.run, name="uvicorn")  # no signal handlers off main
    thread.start()
    poll_until(lambda: server.started, 30, "uvicorn started")
    port = server.servers[0].sockets[0].getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    poll_until(lambda: httpx.get(f"{url}/readyz").status_code == 200, 30, "ready")
    return server, thread, url


def test_a_stop_signal_drains_for_the_delay_then_closes(tmp_path: Path) -> None:
    drain_s = 3.0
    server, thread, url = _start(tmp_path, int(drain_s * 1000))
    signalled = time.monotonic()
    server.handle_exit(signal.SIGTERM, None)  # what uvicorn's signal handler calls
    ready = httpx.get(f"{url}/readyz")  # still listening, no longer ready
    assert (ready.status_code, ready.json()["status"]) == (503, "draining")
    assert not server.should_exit
    thread.join(60)
    assert not thread.is_alive()
    assert time.monotonic() - signalled >= drain_s  # on_tick closed it, not before the delay


def test_without_a_drain_delay_a_stop_signal_closes_at_once(tmp_path: Path) -> None:
    server, thread, _ = _start(tmp_path, 0)
    server.handle_exit(signal.SIGTERM, None)
    assert server.should_exit
    thread.join(60)
    assert not thread.is_alive()


def test_a_request_on_a_connection_accepted_before_the_stop_is_answered(tmp_path: Path) -> None:
    """A client that connected just before the listener closed, and sends its request just
    after, still gets its answer: the connection was accepted, so the request is not lost."""
    server, thread, url = _start(tmp_path, 0)
    port = int(url.rsplit(":", 1)[1])
    body = encode_image(Image.new("RGB", (8, 8), "red"), "PNG")
    request = (
        f"POST /classify?model=tiny HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body
    with socket.create_connection(("127.0.0.1", port), timeout=30) as accepted:
        poll_until(lambda: len(server.server_state.connections) == 1, 30, "accepted")
        server.handle_exit(signal.SIGTERM, None)
        poll_until(lambda: not _listening(port), 30, "listener closed")
        accepted.sendall(request)
        answer = b""
        while chunk := accepted.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    thread.join(60)
    assert not thread.is_alive()


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True
