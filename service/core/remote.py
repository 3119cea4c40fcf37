"""A front-end worker's view of the engine process (`--workers N`, N >= 2): the models it
serves (`RemoteRegistry` of `RemoteModel`s, kept current by its STATE messages), their queues
(`RemoteBatcher`: admission and a run through shared memory), and repository calls
(`RemoteControl`). The data plane and the protocol adapters use them exactly as they use the
registry of a single process (service/core/serving.py). No engine is imported here: a worker
holds no weights.

A request's tensors live in a region of this worker's arena from admission to answer: its
images, written by the decoder, then its outputs, written by the engine process's batcher. The
region is freed only once the engine process has answered (DONE or FAILED, which it sends for
every admitted request, cancelled ones included), so it is never written after its reuse.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from contract.repository import ModelEntry, ModelMetadata

from . import ipc
from .errors import NotReadyError, QueueFullError, ServiceError, error_from
from .metrics import Metrics
from .serving import ModelState, OutputArrays, Status, resolve
from .settings import Settings
from .tracing import current_record

log = logging.getLogger(__name__)


class EngineLink:
    """This worker's connection to the engine process: requests out, answers and STATE in."""

    def __init__(self, arena: ipc.Arena, board: ipc.StatusBoard) -> None:
        self.arena, self.board = arena, board
        self.channel: ipc.Channel | None = None
        self.state: dict[str, Any] | None = None
        self.watchers: list[Callable[[dict[str, Any]], None]] = []  # told every STATE
        self.on_lost: Callable[[], None] | None = None
        self.alive = False
        self._first_state: asyncio.Future[None] | None = None
        self._tickets: dict[int, RemoteTicket] = {}
        self.images = 0  # of requests admitted here and not answered yet, all models
        self._calls: dict[int, asyncio.Future[Any]] = {}
        self._ids = itertools.count(1)

    async def open(self, sock: Any) -> None:
        """Connect over `sock` and wait for the first STATE."""
        self._first_state = asyncio.get_running_loop().create_future()
        self.channel = await ipc.open_channel(sock, self._received, self._lost)
        self.alive = True
        await self._first_state

    def next_id(self) -> int:
        return next(self._ids) & 0xFFFFFFFF

    def send(self, kind: int, payload: bytes) -> None:
        if self.channel is None or not self.alive:
            raise NotReadyError("the engine process has gone", retry_after_s=1)
        self.channel.send(kind, payload)

    async def call(self, operation: str, name: str = "") -> Any:
        """A repository call (index, load, unload) run by the engine process."""
        request = self.next_id()
        future = asyncio.get_running_loop().create_future()
        self._calls[request] = future
        try:
            self.send(ipc.CONTROL, ipc.pack_json(request, {"op": operation, "name": name}))
            return await future
        finally:
            self._calls.pop(request, None)

    def _received(self, kind: int, payload: bytes) -> None:
        if kind == ipc.ADMITTED:
            admitted = self._tickets.get(ipc.ID.unpack(payload)[0])
            if admitted is not None and not admitted.admitted.done():
                admitted.admitted.set_result(None)
        elif kind == ipc.DONE:
            request, runs = ipc.unpack_done(payload)
            ticket = self._tickets.pop(request, None)
            if ticket is not None:
                ticket.answered(None, runs)
        elif kind == ipc.FAILED:
            request, retry_after, code, message = ipc.unpack_failed(payload)
            error = error_from(code, message, retry_after)
            ticket = self._tickets.pop(request, None)
            if ticket is not None:
                ticket.answered(error, [])
            call = self._calls.get(request)
            if call is not None and not call.done():
                call.set_exception(error)
        elif kind == ipc.CONTROLLED:
            request, result = ipc.unpack_json(payload)
            call = self._calls.get(request)
            if call is not None and not call.done():
                call.set_result(result)
        elif kind == ipc.STATE:
            _, self.state = ipc.unpack_json(payload)
            for watcher in self.watchers:
                watcher(self.state)
            if self._first_state is not None and not self._first_state.done():
                self._first_state.set_result(None)
        else:
            log.error("the engine process sent a message of unknown kind %d", kind)

    def _lost(self) -> None:
        if not self.alive:
            return
        self.alive = False
        log.error("the engine process has gone: this worker stops")
        gone = NotReadyError("the engine process has gone", retry_after_s=1)
        for ticket in list(self._tickets.values()):
            ticket.answered(gone, [])  # nothing writes into the arena any more
        self._tickets.clear()
        for call in self._calls.values():
            if not call.done():
                call.set_exception(gone)
        if self._first_state is not None and not self._first_state.done():
            self._first_state.set_exception(gone)
        if self.on_lost is not None:
            self.on_lost()


def worker_images(settings: Settings) -> int:
    """The most images one worker has admitted and not answered at once: a full queue and a
    batch running (its arena is sized for them)."""
    return settings.max_queue_images + settings.max_batch_size


class RemoteTicket:
    """Room for `size` images of one request in the engine process's queue of its model, and
    their region of this worker's arena: inputs [size, *input_shape], then logits and
    embeddings."""

    def __init__(self, link: EngineLink, model: RemoteModel, size: int, offset: int) -> None:
        self._link, self._model, self.size, self._offset = link, model, size, offset
        self.request = link.next_id()
        entry = model.entry
        self._input_bytes = 4 * size * math.prod(entry.input_shape)
        loop = asyncio.get_running_loop()
        self.admitted: asyncio.Future[None] = loop.create_future()  # room in the queue
        self._done: asyncio.Future[None] = loop.create_future()
        self._answered = False
        self._closed = False
        self._sent_run = False
        self._inputs: np.ndarray | None = None
        self.trace = current_record()

    @staticmethod
    def region_bytes(entry: ModelEntry, size: int) -> int:
        per_image = math.prod(entry.input_shape) + entry.num_classes + entry.embedding_dim
        return 4 * size * per_image

    def inputs(self, shape: tuple[int, ...]) -> np.ndarray:
        if self._inputs is None:
            self._inputs = self._link.arena.array(self._offset, (self.size, *shape))
        return self._inputs

    async def run(self, images: np.ndarray) -> OutputArrays:
        if self._sent_run:
            raise RuntimeError("a ticket runs once")
        if len(images) != self.size:
            raise ValueError(f"{len(images)} images for a ticket of {self.size}")
        if not self._done.done():
            if images is not self._inputs:  # tensors given as they are (Open Inference Protocol)
                self.inputs(self._model.entry.input_shape)[...] = images
            self._sent_run = True
            self._link.send(
                ipc.RUN,
                ipc.RUN_BODY.pack(
                    self.request, self.size, self._offset, self._offset + self._input_bytes
                ),
            )
        await self._done  # cancelled (timeout, disconnect): `close` sends CANCEL
        entry, arena = self._model.entry, self._link.arena
        logits_at = self._offset + self._input_bytes
        logits = arena.array(logits_at, (self.size, entry.num_classes)).copy()
        embeddings = arena.array(
            logits_at + 4 * self.size * entry.num_classes, (self.size, entry.embedding_dim)
        ).copy()
        return logits, embeddings

    def answered(self, error: ServiceError | None, runs: list[Any]) -> None:
        """The engine process's last word on this request: from now on nothing writes into
        its region."""
        self._answered = True
        self._link.images -= self.size
        if not self.admitted.done():
            if error is None:
                self.admitted.set_result(None)
            else:
                self.admitted.set_exception(error)
                self.admitted.exception()
        if not self._done.done():
            if error is None:
                if self.trace is not None:
                    self.trace.runs.extend(runs)
                self._done.set_result(None)
            else:
                self._done.set_exception(error)
                self._done.exception()  # seen; `run` re-raises it
        if self._closed:
            self._link.arena.free(self._offset)

    def close(self) -> None:
        """The request is over here. Its region is freed now when the engine process has
        answered, else on its answer to the CANCEL sent now."""
        if self._closed:
            return
        self._closed = True
        if self._answered:
            self._link.arena.free(self._offset)
        elif self._link.alive:
            self._link.channel.send(ipc.CANCEL, ipc.ID.pack(self.request))  # type: ignore[union-attr]
        else:
            self._link.arena.free(self._offset)


class RemoteBatcher:
    """A model's queue in the engine process, as this worker's requests see it."""

    def __init__(self, link: EngineLink, model: RemoteModel, settings: Settings) -> None:
        self._link, self._model = link, model
        self._max_queue_images = settings.max_queue_images
        self._most_images = worker_images(settings)
        self._decoding_allowance = ipc.decoding_allowance(settings)
        self._retry_after_s = settings.retry_after_s

    def ensure_room(self, count: int) -> None:
        """QueueFullError when the engine process's queue for this model (as it last published
        it) has no room for `count` more images."""
        slot = self._model.slot
        if slot is None:
            return  # not published: the engine process decides at ADMIT
        waiting = self._link.board[slot]
        if waiting + count > self._max_queue_images:
            raise QueueFullError(
                f"model {self._model.entry.name}: {waiting} images waiting, {count} more would "
                f"exceed max_queue_images={self._max_queue_images}",
                retry_after_s=self._retry_after_s,
            )

    @asynccontextmanager
    async def admit(self, count: int) -> AsyncIterator[RemoteTicket]:
        link, model = self._link, self._model
        self.ensure_room(count)
        if link.images + count > self._most_images:  # more than the engine could hold anyway
            raise QueueFullError(
                f"model {model.entry.name}: this worker has {link.images} images waiting, "
                f"{count} more would exceed max_queue_images + max_batch_size",
                retry_after_s=self._retry_after_s,
            )
        offset = link.arena.alloc(RemoteTicket.region_bytes(model.entry, count))
        if offset is None:
            raise QueueFullError(
                f"model {model.entry.name}: this worker's shared memory is full",
                retry_after_s=self._retry_after_s,
            )
        ticket = RemoteTicket(link, model, count, offset)
        # Few images in flight here: decode at once, into the room the engine process keeps
        # for that (ipc.decoding_allowance); otherwise only once admitted.
        decoding = link.images + count <= self._decoding_allowance
        if decoding:
            ticket.admitted.set_result(None)
        flags = (ipc.TRACED if ticket.trace is not None else 0) | (ipc.DECODING if decoding else 0)
        link._tickets[ticket.request] = ticket
        link.images += count
        entry = model.entry
        try:
            link.send(
                ipc.ADMIT, ipc.pack_admit(ticket.request, count, entry.version, flags, entry.name)
            )
        except ServiceError:
            link._tickets.pop(ticket.request, None)
            link.images -= count
            link.arena.free(offset)
            raise
        try:
            await ticket.admitted  # nothing is decoded for a request the queue refuses
            yield ticket
        finally:
            ticket.close()


class RemoteModel:
    """One version served by the engine process."""

    def __init__(self, entry: ModelEntry, link: EngineLink, settings: Settings) -> None:
        self.entry = entry
        self.state: ModelState = "loading"
        self.max_batch_size = settings.max_batch_size
        self.slot: int | None = None
        self._view: dict[str, Any] = {}
        self._batcher = RemoteBatcher(link, self, settings)

    @property
    def batcher(self) -> RemoteBatcher | None:
        return self._batcher if self.state == "ready" else None

    @contextmanager
    def use(self) -> Iterator[RemoteModel]:
        yield self  # the engine process holds the version from ADMIT to answer

    def view(self, settings: Settings) -> dict[str, Any]:
        return self._view

    def update(self, facts: dict[str, Any]) -> None:
        self.state = facts["state"]
        self.max_batch_size = facts["max_batch_size"]
        self.slot = facts["slot"]
        self._view = facts["view"]


class RemoteRegistry:
    """The engine process's registry as of its last STATE."""

    def __init__(self, settings: Settings, metrics: Metrics, link: EngineLink) -> None:
        self.settings, self.metrics, self.link = settings, metrics, link
        self.models: dict[str, RemoteModel] = {}
        self.default_model: str | None = None
        self.draining = False  # this worker's own (SIGTERM), or the engine process's
        self.fatal: str | None = None
        self._status: Status = "loading"
        self._loaded = False
        link.watchers.append(self._update)
        if link.state is not None:
            self._update(link.state)

    def _update(self, state: dict[str, Any]) -> None:
        models: dict[str, RemoteModel] = {}
        for name, facts in state["models"].items():
            model = self.models.get(name)
            if model is None or model.entry.version != facts["metadata"]["version"]:
                metadata = ModelMetadata.model_validate(facts["metadata"])
                entry = ModelEntry(Path(facts["path"]), metadata)
                model = RemoteModel(entry, self.link, self.settings)
            model.update(facts)
            models[name] = model
        self.models = models
        self.default_model = state["default_model"]
        self.fatal = state["fatal"]
        self._status = state["status"]
        self._loaded = state["loaded"]
        if state["draining"]:
            self.draining = True

    @property
    def ready(self) -> bool:
        return self.status == "ready"

    @property
    def status(self) -> Status:
        if not self.link.alive:
            return "failed"
        if self.draining and self._status != "failed":
            return "draining"
        return self._status

    @property
    def loaded(self) -> bool:
        return self._loaded

    def resolve(self, name: str | None) -> RemoteModel:
        model: RemoteModel = resolve(self.models, self.default_model, name)
        return model

    def begin_draining(self) -> None:
        self.draining = True

    def start(self) -> None:
        """(the engine process loads the models)"""

    async def stop(self) -> None:
        self.draining = True


class RemoteControl:
    """The repository calls of `ModelControl`, run by the engine process."""

    def __init__(self, registry: RemoteRegistry) -> None:
        self.registry = registry

    def start(self) -> None:
        """(the engine process polls the repository)"""

    async def stop(self) -> None:
        """(nothing of its own to stop)"""

    async def index(self) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = await self.registry.link.call("index")
        return rows

    async def load(self, name: str) -> RemoteModel:
        await self.registry.link.call("load", name)
        return self.registry.resolve(name)  # its STATE came before the answer

    async def unload(self, name: str) -> None:
        await self.registry.link.call("unload", name)
