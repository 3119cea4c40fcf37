"""The engine process's side of `--workers N`: every front-end worker's requests, served by the
one registry (engines, batchers) of this process.

Each worker is attached with its end of a socketpair and its shared-memory arena
(service/core/ipc.py). A request arrives as ADMIT (room in its model's queue: the batcher's own
ticket, so the queue bound and the max-delay policy cover every worker's images together;
answered ADMITTED, after which the worker decodes) and RUN (its images are in the arena: they
join the batcher's queue, and the batch writes their
outputs straight back into the arena); it ends in exactly one DONE or FAILED, also when the
worker cancels it (CANCEL) or is gone. No task is made per request: the batcher's future
carries it to its answer.

What is served goes to every worker as STATE whenever it changes (the registry's `changed`),
before anything that follows the change, and each model's queue depth is published on a shared
`StatusBoard` so that workers refuse a full queue before reading a body. Repository calls
(CONTROL) run the process's `ModelControl`; its answer follows the STATE of the change it made.
"""

from __future__ import annotations

import asyncio
import logging
import mmap
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import ipc
from .batcher import Ticket
from .errors import (
    ClientDisconnectedError,
    InferenceError,
    InvalidParameterError,
    NotReadyError,
    QueueFullError,
    ServiceError,
    StaleVersionError,
)
from .model_control import ModelControl
from .registry import ModelRegistry, ServedModel
from .tracing import BatchRecord

log = logging.getLogger(__name__)


@dataclass(slots=True, eq=False)
class _Request:
    model: ServedModel
    ticket: Ticket
    future: asyncio.Future[Any] | None = None


class EngineHost:
    """Serves the attached workers from `registry` (and `control`, for repository calls)."""

    def __init__(
        self, registry: ModelRegistry, control: ModelControl, board: ipc.StatusBoard
    ) -> None:
        self.registry, self.control, self.board = registry, control, board
        self.settings = registry.settings
        # Queue room kept for images the workers decode before they are admitted.
        self.kept_for_decoding = self.settings.workers * ipc.decoding_allowance(self.settings)
        self.workers: set[WorkerConnection] = set()
        self._slots: dict[ServedModel, int] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.on_ready: Callable[[WorkerConnection], None] | None = None  # a worker serves now
        registry.watchers.append(self._changed)

    async def attach(self, sock: Any, arena_fd: int, name: str) -> WorkerConnection:
        """Serve one worker over `sock`, its requests' tensors in the memory of `arena_fd`."""
        worker = WorkerConnection(self, ipc.map_shared(arena_fd), name)
        worker.channel = await ipc.open_channel(sock, worker.received, worker.lost)
        self.workers.add(worker)
        worker.channel.send(ipc.STATE, ipc.pack_json(0, self.state()))
        return worker

    def state(self) -> dict[str, Any]:
        registry = self.registry
        return {
            "status": registry.status,
            "draining": registry.draining,
            "fatal": registry.fatal,
            "loaded": registry.loaded,
            "default_model": registry.default_model,
            "models": {
                name: {
                    "path": str(model.entry.path),
                    "metadata": model.entry.metadata.model_dump(mode="json"),
                    "state": model.state,
                    "max_batch_size": model.max_batch_size,
                    "view": model.view(self.settings),
                    "slot": self._slots.get(model),
                }
                for name, model in registry.models.items()
            },
        }

    def _changed(self) -> None:
        self._publish_depths()
        if self.workers:
            message = ipc.pack_json(0, self.state())
            for worker in self.workers:
                worker.channel.send(ipc.STATE, message)

    def _publish_depths(self) -> None:
        """One board slot per served model with a batcher; slots of models no longer served
        are given back."""
        served = {m for m in self.registry.models.values() if m.batcher is not None}
        for model in [m for m in self._slots if m not in served]:
            slot = self._slots.pop(model)
            if model.batcher is not None:
                model.batcher.on_waiting = None
            self.board.give_back(slot)
        for model in served - self._slots.keys():
            slot = self.board.take()
            if slot is None:
                continue  # more than StatusBoard.SLOTS models: workers ask instead
            self._slots[model] = slot
            assert model.batcher is not None
            model.batcher.on_waiting = self._writer(slot)
            self.board[slot] = model.batcher.waiting

    def _writer(self, slot: int) -> Any:
        values = self.board.values

        def write(waiting: int) -> None:
            values[slot] = waiting

        return write

    def run_control(self, worker: WorkerConnection, request: int, call: dict[str, Any]) -> None:
        task = asyncio.get_running_loop().create_task(self._control(worker, request, call))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _control(self, worker: WorkerConnection, request: int, call: dict[str, Any]) -> None:
        try:
            operation, name = call.get("op"), str(call.get("name", ""))
            if operation == "index":
                result: Any = await self.control.index()
            elif operation == "load":
                model = await self.control.load(name)
                result = {"name": model.entry.name, "version": model.entry.version}
            elif operation == "unload":
                await self.control.unload(name)
                result = {}
            else:
                raise InvalidParameterError(f"unknown repository operation {operation!r}")
        except ServiceError as exc:
            worker.fail(request, exc)
        except Exception as exc:
            log.error("repository call %s failed", call, exc_info=exc)
            worker.fail(request, InferenceError("the repository call failed (see the log)"))
        else:
            worker.channel.send(ipc.CONTROLLED, ipc.pack_json(request, result))

    async def stop(self) -> None:
        """Close every worker's connection (they have stopped, or are to)."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for worker in list(self.workers):
            worker.channel.close()


class WorkerConnection:
    """One worker's requests in the engine process."""

    channel: ipc.Channel

    def __init__(self, host: EngineHost, memory: mmap.mmap, name: str) -> None:
        self.host, self.memory, self.name = host, memory, name
        self.requests: dict[int, _Request] = {}

    def received(self, kind: int, payload: bytes) -> None:
        if kind == ipc.ADMIT:
            self._admit(*ipc.unpack_admit(payload))
        elif kind == ipc.RUN:
            self._run(*ipc.RUN_BODY.unpack(payload))
        elif kind == ipc.CANCEL:
            self._cancel(ipc.ID.unpack(payload)[0])
        elif kind == ipc.CONTROL:
            self.host.run_control(self, *ipc.unpack_json(payload))
        elif kind == ipc.READY:
            if self.host.on_ready is not None:
                self.host.on_ready(self)
        else:
            log.error("worker %s sent a message of unknown kind %d", self.name, kind)

    def _admit(self, request: int, images: int, version: int, flags: int, name: str) -> None:
        model = self.host.registry.models.get(name)
        decoding = bool(flags & ipc.DECODING)
        try:
            if model is None or model.entry.version != version:
                raise StaleVersionError(
                    f"model {name} v{version} is no longer served",
                    retry_after_s=self.host.settings.retry_after_s,
                )
            if model.state != "ready" or model.batcher is None:
                raise NotReadyError(
                    f"model {name} is {model.state}", retry_after_s=self.host.settings.retry_after_s
                )
            batcher, kept = model.batcher, self.host.kept_for_decoding
            if not decoding and batcher.waiting + images + kept > batcher.max_queue_images:
                # The room kept for images already being decoded stays theirs.
                raise QueueFullError(
                    f"model {name}: {batcher.waiting} images waiting, {images} more would "
                    f"exceed max_queue_images={batcher.max_queue_images} ({kept} of it kept "
                    "for images the workers are decoding)",
                    retry_after_s=self.host.settings.retry_after_s,
                )
            ticket = batcher.ticket(images)
        except ServiceError as exc:
            self.fail(request, exc)
            return
        if flags & ipc.TRACED:
            ticket.trace = BatchRecord(tracer=None)
        model.acquire()  # this version stays until the request is answered
        self.requests[request] = _Request(model, ticket)
        if not decoding:
            self.channel.send(ipc.ADMITTED, ipc.ID.pack(request))

    def _run(self, request: int, images: int, inputs: int, outputs: int) -> None:
        pending = self.requests.get(request)
        if pending is None:  # refused at ADMIT (FAILED is on its way) or cancelled
            return
        entry = pending.model.entry
        try:
            batch = ipc.view(self.memory, inputs, (images, *entry.input_shape))
            logits = ipc.view(self.memory, outputs, (images, entry.num_classes))
            embeddings = ipc.view(
                self.memory, outputs + 4 * images * entry.num_classes, (images, entry.embedding_dim)
            )
            future = pending.ticket.submit(batch, (logits, embeddings))
        except (ServiceError, ValueError) as exc:
            self._end(request, pending)
            self.fail(request, exc if isinstance(exc, ServiceError) else InferenceError(str(exc)))
            return
        pending.future = future
        future.add_done_callback(lambda done: self._answer(request, done))

    def _answer(self, request: int, done: asyncio.Future[Any]) -> None:
        pending = self.requests.pop(request, None)
        if pending is None:
            return
        self._end(request, pending)
        if done.cancelled():
            self.fail(request, ClientDisconnectedError("cancelled"))
            return
        error = done.exception()
        if error is None:
            trace = pending.ticket.trace
            self.channel.send(ipc.DONE, ipc.pack_done(request, trace.runs if trace else None))
        elif isinstance(error, ServiceError):
            self.fail(request, error)
        else:
            self.fail(request, InferenceError("inference failed (see the service log)"))

    def _cancel(self, request: int) -> None:
        pending = self.requests.get(request)
        if pending is None:
            return  # answered already: its DONE or FAILED is on its way
        if pending.future is not None:
            pending.future.cancel()  # _answer sends FAILED
        else:
            del self.requests[request]
            self._end(request, pending)
            self.fail(request, ClientDisconnectedError("cancelled"))

    def _end(self, request: int, pending: _Request) -> None:
        self.requests.pop(request, None)
        pending.ticket.close()
        pending.model.release()

    def fail(self, request: int, error: ServiceError) -> None:
        retry = error.headers.get("Retry-After")
        self.channel.send(
            ipc.FAILED,
            ipc.pack_failed(request, int(retry) if retry else None, error.code, error.message),
        )

    def lost(self) -> None:
        """The worker has gone (exited, killed): its requests are dropped, unanswered."""
        self.host.workers.discard(self)
        if self.requests:
            log.info("worker %s gone: %d of its requests dropped", self.name, len(self.requests))
        for request, pending in list(self.requests.items()):
            if pending.future is not None:
                pending.future.cancel()
            else:
                self._end(request, pending)
