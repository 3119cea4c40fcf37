"""`python -m service.worker ENGINE_FD ARENA_FD BOARD_FD HTTP_FD INDEX`: one front-end worker of
`--workers N`, started by the engine process (service/processes.py), never by hand.

It reads its settings from the engine process's first message, follows what is served from its
STATE messages, and serves the shared HTTP listener and the gRPC port with the same app as a
single process (`create_app(settings, engine=link)`): requests are parsed, authenticated and
decoded here, and their tensors go to the engine process through this worker's shared memory.
It stops on SIGTERM from the engine process (answering what it accepted first), or at once when
the engine process has gone.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import sys
import warnings

import uvloop

from .core import ipc
from .core.remote import EngineLink
from .core.settings import Settings
from .protocols.app import create_app
from .protocols.http_server import DrainingServer, http_config

log = logging.getLogger("service.worker")


def main(argv: list[str]) -> int:
    engine_fd, arena_fd, board_fd, http_fd, index = (int(a) for a in argv)
    engine = socket.socket(fileno=engine_fd)
    kind, payload = ipc.read_frame(engine)
    if kind != ipc.HELLO:
        raise SystemExit(f"expected the engine process's settings, got a message of kind {kind}")
    settings = Settings(**json.loads(payload))  # service/processes.py, settings_message
    logging.basicConfig(
        level=settings.log_level.upper(),
        format=f"%(asctime)s %(levelname)s [worker {index}] %(name)s: %(message)s",
    )
    warnings.filterwarnings("ignore", module=r"PIL(\..*)?$")  # as in service/__main__.py
    # uvicorn re-raises the stop signal after its graceful shutdown: end in `return` instead.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    arena = ipc.Arena(ipc.map_shared(arena_fd))
    board = ipc.StatusBoard(ipc.map_shared(board_fd))
    os.close(arena_fd)
    os.close(board_fd)
    http = socket.socket(fileno=http_fd)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(serve(settings, engine, EngineLink(arena, board), http))


async def serve(
    settings: Settings, engine: socket.socket, link: EngineLink, http: socket.socket
) -> int:
    engine.setblocking(False)
    await link.open(engine)
    app = create_app(settings, engine=link)
    server = DrainingServer(http_config(app, settings), app.state.plane.registry, drain_ms=0)
    server.on_started = lambda: link.send(ipc.READY, b"")
    link.on_lost = lambda: setattr(server, "should_exit", True)
    await server.serve(sockets=[http])
    return 0 if server.started else 3


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
