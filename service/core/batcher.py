"""Dynamic batching for one model: images from concurrent requests share inference runs.

A batch starts as soon as the engine is free and an image is queued: a lone request never waits
for company. While a batch runs (in a thread, off the event loop), the images that arrive queue
up and form the next batch, so under load batches grow by themselves, up to `max_batch_size`.
`max_delay_ms` only holds a batch back while more images are already on their way: admitted
(their request holds queue room) but still being decoded. Then the batch waits for them, up to
`max_delay_ms` after its first image was queued, or until none is on its way any more. (Triton's
dynamic batcher works the same way; its queue delay is an option, 0 by default.)

One way in: `async with batcher.admit(n) as ticket: ... await ticket.run(images)` (or, without a
task of its own per request, as the engine process serves its front-end workers:
`ticket = batcher.ticket(n)`, `ticket.submit(images, outputs)`, `ticket.close()`). Admission
takes room for `n` images in the bounded queue at once, or refuses the whole request (503) before
any decoding is spent on it, so that a burst far above capacity is turned away at once; the room
stays the ticket's while its images are decoded, moves with them into the queue, and whatever was
not used comes back when the block ends. The bound therefore holds by construction, whatever
runs between admission and `run`.

A ticket's results stay a batch: each inference run copies its rows straight into the ticket's
output arrays, and `run` returns them whole ([n, ...] per output, in request order) once every
row is in, even when the request's images span several batches. Images of a ticket whose request
has gone (timed out, client disconnected, a sibling image failed) are dropped before their batch
runs.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass

import numpy as np

from .errors import InferenceError, NotReadyError, QueueFullError, ServiceError
from .metrics import Metrics
from .tracing import current_record

log = logging.getLogger(__name__)

InferFn = Callable[[np.ndarray], Sequence[np.ndarray]]
OutputArrays = tuple[np.ndarray, ...]  # one array per model output, rows in request order


class Ticket:
    """Room for up to `size` images of one request, and their results once run."""

    def __init__(self, batcher: Batcher, size: int) -> None:
        self._batcher = batcher
        self.size = size
        self._held = size  # room not yet handed to the queue: images on their way
        self._images: np.ndarray | None = None
        self._outputs: Sequence[np.ndarray] | None = None
        self._missing = 0
        self._done: asyncio.Future[OutputArrays] = asyncio.get_running_loop().create_future()
        self.trace = current_record()  # the request's, when it is traced (core/tracing.py)

    @property
    def gone(self) -> bool:
        """The request no longer waits for these images (or they failed)."""
        return self._done.done()

    def inputs(self, shape: tuple[int, ...]) -> np.ndarray:
        """An array [size, *shape] to write this ticket's images into."""
        return np.empty((self.size, *shape), dtype=np.float32)

    async def run(self, images: np.ndarray) -> OutputArrays:
        """Outputs for `images` [k <= size, ...]: one array [k, ...] per model output, in order."""
        # Cancelling this await (timeout, disconnect) cancels `_done`: the queued images are
        # dropped before their batch runs.
        return await self.submit(images)

    def submit(
        self, images: np.ndarray, outputs: Sequence[np.ndarray] | None = None
    ) -> asyncio.Future[OutputArrays]:
        """Queue `images` [k <= size, ...]; the future gets their outputs (into `outputs`, one
        array [k, ...] per model output, when given) once every row has run. Cancelling it
        drops the images not run yet."""
        if self._images is not None:
            raise RuntimeError("a ticket runs once")
        if not 0 < len(images) <= self._held:
            raise ValueError(f"{len(images)} images for a ticket of {self._held}")
        batcher = self._batcher
        if batcher._closed:  # admitted before the batcher began to stop; too late now
            raise NotReadyError(
                f"model {batcher.name} is stopping", retry_after_s=batcher._retry_after_s
            )
        self._images, self._missing, self._outputs = images, len(images), outputs
        self._held -= len(images)  # from now on the queue accounts for them
        batcher._enqueue(self, len(images))
        return self._done

    def close(self) -> None:
        """Give back the room not handed to the queue (decoding failed, the client left)."""
        if self._held:
            batcher = self._batcher
            batcher._incoming -= self._held
            batcher._set_waiting(-self._held)
            self._held = 0
            batcher._arrived.set()  # a batch waiting for these stops waiting

    def _deliver(self, index: int, outputs: Sequence[np.ndarray], row: int) -> None:
        if self._outputs is None:
            n = len(self._images) if self._images is not None else 0
            self._outputs = [np.empty((n, *o.shape[1:]), dtype=o.dtype) for o in outputs]
        if len(self._outputs) != len(outputs):
            raise ValueError(f"{len(outputs)} outputs for a ticket expecting {len(self._outputs)}")
        for target, output in zip(self._outputs, outputs, strict=True):
            target[index] = output[row]
        self._missing -= 1
        if self._missing == 0 and not self._done.done():
            self._done.set_result(tuple(self._outputs))

    def _fail(self, error: Exception) -> None:
        if not self._done.done():
            self._done.set_exception(error)
            self._done.exception()  # seen here; `run` re-raises it


@dataclass(eq=False, slots=True)
class _Item:
    ticket: Ticket
    index: int
    enqueued: float

    @property
    def image(self) -> np.ndarray:
        images = self.ticket._images
        assert images is not None
        return images[self.index]


class Batcher:
    """Queue + one runner task + one inference thread for one model."""

    def __init__(
        self,
        name: str,
        infer: InferFn,
        *,
        max_batch_size: int,
        max_delay_ms: float,
        max_queue_images: int,
        retry_after_s: int,
        metrics: Metrics,
    ) -> None:
        if max_batch_size < 1 or max_queue_images < max_batch_size or max_delay_ms < 0:
            raise ValueError(
                "need 1 <= max_batch_size <= max_queue_images and max_delay_ms >= 0, got "
                f"{max_batch_size}, {max_delay_ms}, {max_queue_images}"
            )
        self.name = name
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_ms / 1000.0
        self.max_queue_images = max_queue_images
        self._infer = infer
        self._retry_after_s = retry_after_s
        self._items: collections.deque[_Item] = collections.deque()
        self._arrived = asyncio.Event()  # an image was queued, or room held for one came back
        self._idle = asyncio.Event()  # nothing queued and no batch running
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._closed = False
        self._waiting = 0  # images admitted and not yet running: held, queued or forming
        self._incoming = 0  # of those, held by tickets: still being decoded
        self.on_waiting: Callable[[int], None] | None = None  # told every change of `waiting`
        self._queue_wait = metrics.queue_wait.labels(name)
        self._queue_depth = metrics.queue_depth.labels(name)
        self._batch_size = metrics.batch_size.labels(name)
        self._inference_latency = metrics.inference_latency.labels(name)

    def start(self) -> None:
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"infer-{self.name}")
        self._task = asyncio.create_task(self._run(), name=f"batcher-{self.name}")

    async def stop(self) -> None:
        """Refuse new images, finish every queued one, then stop the runner."""
        self._closed = True
        if self._task is not None:
            await self._idle.wait()
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._executor is not None:
            await asyncio.to_thread(self._executor.shutdown, wait=True)
            self._executor = None

    @property
    def waiting(self) -> int:
        """Images admitted and not yet running: held by tickets, queued, or in a forming batch."""
        return self._waiting

    def ensure_room(self, count: int) -> None:
        """Raise QueueFullError unless `count` more images fit the queue now (a check only: it
        takes nothing; the service uses it to refuse before reading a request's body)."""
        if self._waiting + count > self.max_queue_images:
            raise QueueFullError(
                f"model {self.name}: {self._waiting} images waiting, "
                f"{count} more would exceed max_queue_images={self.max_queue_images}",
                retry_after_s=self._retry_after_s,
            )

    def ticket(self, count: int) -> Ticket:
        """Room for `count` images from now until they have run (give back what is not used
        with `Ticket.close`), or NotReadyError / QueueFullError (nothing taken)."""
        if self._closed or self._task is None:
            raise NotReadyError(
                f"model {self.name} is not serving", retry_after_s=self._retry_after_s
            )
        self.ensure_room(count)
        ticket = Ticket(self, count)
        self._set_waiting(count)
        self._incoming += count
        return ticket

    @asynccontextmanager
    async def admit(self, count: int) -> AsyncIterator[Ticket]:
        """A ticket for `count` images, whose unused room comes back when the block ends,
        however it ends."""
        ticket = self.ticket(count)
        try:
            yield ticket
        finally:
            ticket.close()

    def _enqueue(self, ticket: Ticket, count: int) -> None:
        now = time.monotonic()
        self._items.extend(_Item(ticket, index, now) for index in range(count))
        self._incoming -= count
        self._idle.clear()
        self._arrived.set()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._items:
                self._idle.set()
                self._arrived.clear()
                await self._arrived.wait()
            batch = await self._collect()
            await self._run_batch(loop, batch)

    def _take(self, count: int) -> list[_Item]:
        """Up to `count` queued images, skipping (and releasing) those of gone requests."""
        taken: list[_Item] = []
        while self._items and len(taken) < count:
            item = self._items.popleft()
            if item.ticket.gone:  # its request gave up (timeout, error in a sibling image)
                self._set_waiting(-1)
            else:
                taken.append(item)
        return taken

    async def _collect(self) -> list[_Item]:
        """The next batch: what is queued now, and, while more images are on their way, what
        arrives until `max_delay_ms` after the first."""
        batch = self._take(self.max_batch_size)
        if not batch:
            return batch
        deadline = batch[0].enqueued + self.max_delay_s
        while len(batch) < self.max_batch_size and self._incoming > 0:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._arrived.clear()
            try:
                async with asyncio.timeout(remaining):
                    await self._arrived.wait()
            except TimeoutError:
                break
            batch += self._take(self.max_batch_size - len(batch))
        return batch

    async def _run_batch(self, loop: asyncio.AbstractEventLoop, batch: list[_Item]) -> None:
        start = time.monotonic()
        self._set_waiting(-len(batch))
        # Requests can give up while their batch forms (up to max_delay_ms): skip their images.
        batch = [item for item in batch if not item.ticket.gone]
        if not batch:
            return
        for item in batch:
            self._queue_wait.observe(start - item.enqueued)
        self._batch_size.observe(len(batch))
        try:
            images = np.stack([item.image for item in batch])
            infer_start = time.monotonic()
            outputs = await loop.run_in_executor(self._executor, self._infer, images)
            _record(batch, start, infer_start, time.monotonic())
            sizes = [len(output) for output in outputs]
            if not outputs or any(size != len(batch) for size in sizes):
                raise InferenceError(
                    f"model {self.name}: {len(batch)} inputs gave outputs of sizes {sizes}"
                )
        except ServiceError as exc:
            self._fail(batch, exc)
        except Exception as exc:
            # The engine's own text (paths, node names, shapes) stays in the log.
            log.error(
                "model %s: inference of a batch of %d failed", self.name, len(batch), exc_info=exc
            )
            error = InferenceError(f"model {self.name}: inference failed (see the service log)")
            error.__cause__ = exc
            self._fail(batch, error)
        else:
            for row, item in enumerate(batch):
                if not item.ticket.gone:
                    try:
                        item.ticket._deliver(item.index, outputs, row)
                    except ValueError as exc:  # outputs unlike the model's metadata
                        log.error("model %s: %s", self.name, exc)
                        item.ticket._fail(
                            InferenceError(f"model {self.name}: outputs unlike its metadata")
                        )
        finally:
            self._inference_latency.observe(time.monotonic() - start)

    def _set_waiting(self, change: int) -> None:
        self._waiting += change
        self._queue_depth.set(self._waiting)
        if self.on_waiting is not None:
            self.on_waiting(self._waiting)

    @staticmethod
    def _fail(batch: list[_Item], error: Exception) -> None:
        for item in batch:
            item.ticket._fail(error)


def _record(batch: list[_Item], start: float, infer_start: float, infer_end: float) -> None:
    """Tell traced requests which batch ran their images, and when (core/tracing.py)."""
    for item in batch:
        trace = item.ticket.trace
        if trace is not None:
            trace.runs.append((item.enqueued, start, infer_start, infer_end, len(batch)))
