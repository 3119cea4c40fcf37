"""Dynamic batching for one model: images from concurrent requests share inference runs.

A batch closes at `max_batch_size` images or `max_delay_ms` after its first image arrived,
whichever comes first; while a batch runs (in a thread, off the event loop), the next one fills
up, so under load batches grow by themselves and at low load an image waits at most
`max_delay_ms`. Waiting images (reserved while they are decoded, queued, or in the batch being
formed) are bounded: a request that does not fit is refused whole (503), never half-queued, and
before any decoding is spent on it, so that a burst far above capacity is turned away at once.
Each image has its own future; a request awaits its images' futures in order, so results come
back in request order even when its images span several batches. An image whose request has
gone (timed out, client disconnected) is dropped before its batch runs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from .errors import InferenceError, NotReadyError, QueueFullError, ServiceError
from .metrics import Metrics
from .tracing import BatchRecord, current_record

log = logging.getLogger(__name__)

InferFn = Callable[[np.ndarray], Sequence[np.ndarray]]
Outputs = tuple[np.ndarray, ...]


@dataclass(eq=False, slots=True)
class _Item:
    image: np.ndarray
    future: asyncio.Future[Outputs]
    enqueued: float
    trace: BatchRecord | None  # the request's, when it is traced (service/tracing.py)


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
                f"{max_batch_size}, {max_queue_images}, {max_delay_ms}"
            )
        self.name = name
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_ms / 1000.0
        self.max_queue_images = max_queue_images
        self._infer = infer
        self._retry_after_s = retry_after_s
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._closed = False
        self._waiting = 0  # images admitted and not yet running: reserved, queued or forming
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
            await self._queue.join()
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def ensure_room(self, count: int) -> None:
        """Raise QueueFullError unless `count` more images fit the queue now."""
        if self._waiting + count > self.max_queue_images:
            raise QueueFullError(
                f"model {self.name}: {self._waiting} images waiting, "
                f"{count} more would exceed max_queue_images={self.max_queue_images}",
                retry_after_s=self._retry_after_s,
            )

    def reserve(self, count: int) -> None:
        """Count `count` images as waiting before they exist (while their request is decoded),
        or raise NotReadyError / QueueFullError; `release(count)` gives the room back."""
        if self._closed or self._task is None:
            raise NotReadyError(
                f"model {self.name} is not serving", retry_after_s=self._retry_after_s
            )
        self.ensure_room(count)
        self._set_waiting(count)

    def release(self, count: int) -> None:
        self._set_waiting(-count)

    async def submit(self, images: np.ndarray) -> list[Outputs]:
        """Outputs for each image of `images` [N, ...], in order; N must fit the queue whole."""
        self.reserve(len(images))
        loop = asyncio.get_running_loop()
        now, trace = time.monotonic(), current_record()
        futures: list[asyncio.Future[Outputs]] = []
        for image in images:
            future: asyncio.Future[Outputs] = loop.create_future()
            self._queue.put_nowait(_Item(image, future, now, trace))
            futures.append(future)
        try:
            return list(await asyncio.gather(*futures))
        finally:
            for future in futures:
                # After a timeout or a failed image the rest need not run; gather re-raised only
                # the first error, so mark the others as seen.
                if not future.cancel() and not future.cancelled():
                    future.exception()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            try:
                await self._run_batch(loop, batch)
            finally:
                for _ in batch:
                    self._queue.task_done()

    async def _collect(self) -> list[_Item]:
        batch: list[_Item] = []
        deadline: float | None = None
        while len(batch) < self.max_batch_size:
            if deadline is None:
                item = await self._queue.get()
            else:
                try:
                    item = self._queue.get_nowait()
                except asyncio.QueueEmpty:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    try:
                        async with asyncio.timeout(remaining):
                            item = await self._queue.get()
                    except TimeoutError:
                        break
            if item.future.done():  # its request gave up (timeout, error in a sibling image)
                self._set_waiting(-1)
                self._queue.task_done()
                continue
            if deadline is None:
                deadline = item.enqueued + self.max_delay_s
            batch.append(item)
        return batch

    async def _run_batch(self, loop: asyncio.AbstractEventLoop, batch: list[_Item]) -> None:
        start = time.monotonic()
        self._set_waiting(-len(batch))
        # Requests can give up while their batch forms (up to max_delay_ms): skip their images.
        batch = [item for item in batch if not item.future.done()]
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
            error = InferenceError(f"model {self.name}: inference failed: {exc}")
            error.__cause__ = exc
            self._fail(batch, error)
        else:
            for index, item in enumerate(batch):
                if not item.future.done():
                    item.future.set_result(tuple(output[index] for output in outputs))
        finally:
            self._inference_latency.observe(time.monotonic() - start)

    def _set_waiting(self, change: int) -> None:
        self._waiting += change
        self._queue_depth.set(self._waiting)

    @staticmethod
    def _fail(batch: list[_Item], error: Exception) -> None:
        for item in batch:
            if not item.future.done():
                item.future.set_exception(error)


def _record(batch: list[_Item], start: float, infer_start: float, infer_end: float) -> None:
    """Tell traced requests which batch ran their images, and when (service/tracing.py)."""
    for item in batch:
        if item.trace is not None:
            item.trace.runs.append((item.enqueued, start, infer_start, infer_end, len(batch)))
