"""`--workers N` (N >= 2): this process becomes the engine process, and N front-end workers serve
the ports.

    clients ──HTTP──> listening socket (made here, shared) ──> worker 1 ... worker N
            ──gRPC──> the port, bound by every worker (SO_REUSEPORT)
                                                                  │ socketpair: ADMIT, RUN, ...
                                                                  │ arena: images, outputs
                                                                  v
                      engine process: registry (one copy of each model), one batcher per
                      model, model control (poll, explicit), EngineHost; supervises workers

Workers (`python -m service.worker`, service/worker.py) parse, authenticate, decode, and run the
same FastAPI app, fast lane and gRPC servicer as a single process, over a `RemoteRegistry`;
this process never imports a web or RPC framework (an import-linter contract keeps it so).

- Start-up: the repository is read and the models load here (as with one process); the ports
  are opened here before any worker starts, so a port in use stops start-up (exit 3), and
  connections wait in the listening socket's backlog until a worker accepts them.
- A worker that exits after it was serving is replaced at once; requests on its connections
  are lost with it, the other workers' requests are not touched (its admitted images are
  dropped from the queue). A worker that exits before it was serving stops the service (exit 3).
- SIGTERM or SIGINT: /readyz turns 503 on every worker at once; after `drain_delay_ms` this
  process closes its copy of the listening socket and sends the workers SIGTERM: each closes
  the listener, answers what it accepted (its images still batched here) and exits; then the
  batchers finish and this process exits 0. A second signal skips the drain delay.
- A model that fails to load stops the service with exit status 1, as with one process.
- Metrics: every process writes prometheus_client's multiprocess files into a directory of its
  own made here and removed at exit; /metrics on any worker shows the sum.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from contract.repository import ModelEntry

from .core import ipc
from .core.engine_host import EngineHost, WorkerConnection
from .core.metrics import Metrics, enable_multiprocess, forget_process
from .core.model_control import ModelControl
from .core.registry import ModelRegistry
from .core.remote import worker_images
from .core.settings import Settings

log = logging.getLogger("service.engine")

BACKLOG = 2048
STOP_GRACE_S = 10.0  # beyond request_timeout_ms, for a worker to finish and exit
# Every worker's arena holds at least this much per queued image: an ImageNet input and its
# outputs (3x224x224 floats, 1000 logits, a 2048-float embedding).
MIN_IMAGE_BYTES = 4 * (3 * 224 * 224 + 1000 + 2048)


@dataclass(eq=False)
class Worker:
    index: int
    process: subprocess.Popen[bytes]
    connection: WorkerConnection | None = None
    ready: bool = False
    started_at: float = field(default_factory=time.monotonic)


def settings_message(settings: Settings) -> bytes:
    """The settings as a worker rebuilds them (`Settings(**values)`): every field, the secrets
    included (the socket is private to the two processes; never a command line)."""
    values = settings.model_dump(mode="json")
    for name in ("inference_token", "management_token"):
        secret = getattr(settings, name)
        values[name] = secret.get_secret_value() if secret is not None else None
    return json.dumps(values).encode()


def listening_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family, backlog=BACKLOG)
    sock.setblocking(False)
    return sock


def reserved_port(host: str, port: int) -> socket.socket:
    """A socket bound (not listening) to the gRPC port with SO_REUSEPORT: the workers bind the
    same port beside it; a process without SO_REUSEPORT cannot take it meanwhile."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def arena_bytes(entries: list[ModelEntry], settings: Settings) -> int:
    """One worker's shared memory: the images it may have admitted at once (a full queue and a
    running batch, `worker_images`), at the largest model's size, with their outputs (pages are
    only taken when written)."""
    per_image = max(
        [MIN_IMAGE_BYTES]
        + [4 * (int(np.prod(e.input_shape)) + e.num_classes + e.embedding_dim) for e in entries]
    )
    return worker_images(settings) * per_image + 2**20


class EngineProcess:
    """The registry, the host serving the workers, the workers and their replacement."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._metrics_dir = Path(tempfile.mkdtemp(prefix="resnet-serve-metrics-"))
        enable_multiprocess(self._metrics_dir)
        self.metrics = Metrics()
        try:
            self.registry = ModelRegistry(settings, self.metrics, on_fatal=self._fatal)
        except BaseException:
            shutil.rmtree(self._metrics_dir, ignore_errors=True)
            raise
        self.control = ModelControl(self.registry, settings)
        self._board_fd = ipc.shared_memory(ipc.StatusBoard.size(), "resnet-serve-board")
        board = ipc.StatusBoard(ipc.map_shared(self._board_fd))
        self.host = EngineHost(self.registry, self.control, board)
        self.host.on_ready = self._worker_ready
        entries = [m.entry for m in self.registry.models.values()]
        self._arena_bytes = arena_bytes(entries, settings)
        self.workers: dict[int, Worker] = {}
        self._http: socket.socket | None = None
        self._grpc: socket.socket | None = None
        self._stop = asyncio.Event()
        self._stopping = False
        self._signals = 0
        self.exit_status = 0

    def open_ports(self) -> None:
        """The HTTP listener and the gRPC reservation; OSError when a port is taken."""
        settings = self.settings
        self._http = listening_socket(settings.host, settings.port)
        grpc_port = settings.grpc_port
        if grpc_port:
            self._grpc = reserved_port(settings.host, grpc_port)
        log.info(
            "engine process %d: HTTP on %s:%d%s; %d workers",
            os.getpid(),
            settings.host,
            self._http.getsockname()[1],
            f", gRPC on {grpc_port}" if grpc_port else "",
            settings.workers,
        )

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._signalled, sig)
        self.registry.start()
        self.control.start()
        try:
            for index in range(1, self.settings.workers + 1):
                await self._spawn(index)
            await self._stop.wait()
            await self._drain()
        finally:
            await self._shut_down()
        return self.exit_status

    # -- workers -------------------------------------------------------------------------------

    async def _spawn(self, index: int) -> None:
        assert self._http is not None
        if self._stopping:
            return
        engine_end, worker_end = socket.socketpair()
        arena_fd = ipc.shared_memory(self._arena_bytes, f"resnet-serve-worker-{index}")
        fds = (worker_end.fileno(), arena_fd, self._board_fd, self._http.fileno())
        command = [sys.executable, "-m", "service.worker", *map(str, fds), str(index)]
        process = subprocess.Popen(command, pass_fds=fds, start_new_session=True)
        worker_end.close()
        worker = Worker(index, process)
        self.workers[index] = worker
        engine_end.sendall(ipc.frame(ipc.HELLO, settings_message(self.settings)))
        engine_end.setblocking(False)
        name = f"{index} (pid {process.pid})"
        worker.connection = await self.host.attach(engine_end, arena_fd, name)
        os.close(arena_fd)  # mapped
        loop = asyncio.get_running_loop()
        threading.Thread(
            target=lambda: (process.wait(), loop.call_soon_threadsafe(self._exited, worker)),
            name=f"watch-worker-{index}",
            daemon=True,
        ).start()
        log.info("worker %d: pid %d started", index, process.pid)

    def _worker_ready(self, connection: WorkerConnection) -> None:
        for worker in self.workers.values():
            if worker.connection is connection:
                worker.ready = True
                log.info("worker %d: serving", worker.index)

    def _exited(self, worker: Worker) -> None:
        status = worker.process.returncode
        forget_process(worker.process.pid)
        if self.workers.get(worker.index) is not worker:
            return
        if self._stopping:
            log.info("worker %d: exited (%s)", worker.index, _describe(status))
            return
        if not worker.ready:
            log.critical(
                "worker %d exited before it was serving (%s): stopping",
                worker.index,
                _describe(status),
            )
            self.exit_status = 3
            self._stop.set()
            return
        log.error("worker %d: exited (%s); starting a new one", worker.index, _describe(status))
        task = asyncio.get_running_loop().create_task(self._spawn(worker.index))
        task.add_done_callback(_log_failure)

    # -- stopping ------------------------------------------------------------------------------

    def _signalled(self, sig: int) -> None:
        self._signals += 1
        if self._signals == 1:
            log.info("%s: draining", signal.Signals(sig).name)
            self.registry.begin_draining()
        self._stop.set()

    def _fatal(self) -> None:
        self.exit_status = 1
        self._stop.set()

    async def _drain(self) -> None:
        self.registry.begin_draining()
        delay = self.settings.drain_delay_ms / 1000.0
        if delay > 0 and self.exit_status == 0:
            deadline = time.monotonic() + delay
            while self._signals < 2 and time.monotonic() < deadline:
                await asyncio.sleep(min(0.05, deadline - time.monotonic()))

    async def _shut_down(self) -> None:
        self._stopping = True
        if self._http is not None:
            self._http.close()  # the workers hold the listener now; they close it next
        for worker in self.workers.values():
            with contextlib.suppress(ProcessLookupError):
                worker.process.send_signal(signal.SIGTERM)
        deadline = self.settings.request_timeout_ms / 1000.0 + STOP_GRACE_S
        workers = list(self.workers.values())
        waiting = [asyncio.to_thread(w.process.wait, deadline) for w in workers]
        results = await asyncio.gather(*waiting, return_exceptions=True)
        for worker, result in zip(workers, results, strict=True):
            if isinstance(result, subprocess.TimeoutExpired):
                log.error("worker %d did not stop within %.0f s: killed", worker.index, deadline)
                worker.process.kill()
        await self.host.stop()
        await self.control.stop()
        await self.registry.stop()
        if self._grpc is not None:
            self._grpc.close()
        os.close(self._board_fd)
        shutil.rmtree(self._metrics_dir, ignore_errors=True)
        if self.registry.fatal is not None:
            log.critical("exiting: %s", self.registry.fatal)
            self.exit_status = 1


def _describe(status: int | None) -> str:
    if status is None:
        return "running"
    if status < 0:
        return f"killed by {signal.Signals(-status).name}"
    return f"exit status {status}"


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("starting a worker failed", exc_info=task.exception())


def serve(engine: EngineProcess) -> int:
    """Run the engine process and its workers until stopped; the exit status."""
    import uvloop

    try:
        engine.open_ports()
    except OSError as exc:
        log.critical("cannot listen: %s", exc)
        return 3
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(engine.run())
