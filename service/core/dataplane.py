"""The data plane, free of HTTP and gRPC: one inference request (`DataPlane.request` -> `Call`)
from encoded images or tensors to outputs, over the models it is given: a `ModelRegistry` (engines
in this process) or a front-end worker's `RemoteRegistry` (engines in the engine process).

`request` resolves the model, holds its version for the request, checks readiness and queue
room (a full queue refuses before the body is read), enforces the timeout, stops working for a
client that has gone (499), and records the outcome in the metrics. Inside it, `Call` runs one
way: admit (queue room for every image, or 503) -> decode into the request's input array in the
decode pool -> batch -> outputs; post-processing (`postprocess`) is the adapters' last step.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import numpy as np
from PIL import Image

from contract.cpu import usable_cores
from contract.repository import ModelEntry
from runtime.gpu_decode import image_preprocessor
from runtime.preprocess import (
    OversizedImageError,
    PixelBudget,
    PlainPng,
    UndecodableImageError,
    probe,
)

from .budget import ByteBudget
from .errors import (
    ClientDisconnectedError,
    ImageTooLargeError,
    InvalidImageError,
    InvalidParameterError,
    NotReadyError,
    RequestTimeoutError,
    ServiceError,
    StaleVersionError,
)
from .metrics import Metrics
from .postprocess import predictions, unit_norm
from .serving import Model, Models, OutputArrays, Queue
from .settings import Settings
from .tracing import annotate_model, stage

DEFAULT_TOP_K = 5
# Images up to this many pixels (64 x 64) are decoded on the event loop: tens of microseconds,
# less than a hop to a decode thread and back costs.
INLINE_PIXELS = 64 * 64
STALE_ATTEMPTS = 3
T = TypeVar("T")
# A client's disconnect, as the protocol adapter knows it: `watch(callback)` calls `callback` once
# the client has gone, until the function it returns is called.
Watch = Callable[[Callable[[], None]], Callable[[], None]]


class DataPlane:
    """The request path over a registry's models, and the thread pool that decodes images."""

    def __init__(self, registry: Models, settings: Settings, metrics: Metrics) -> None:
        self.registry, self.settings, self.metrics = registry, settings, metrics
        self._preprocess_into = image_preprocessor(
            settings.jpeg_decoder, dct_scaling=settings.jpeg_dct_scaling
        )
        self._pillow = settings.jpeg_decoder == "pillow"  # small images decode inline
        self._decode_pool: ThreadPoolExecutor | None = None
        self._series: dict[tuple[Any, ...], Any] = {}
        self.bodies = ByteBudget(
            settings.max_inflight_bytes,
            retry_after_s=settings.retry_after_s,
            gauge=metrics.inflight_bytes,
        )

    def series(self, metric: Any, *labels: object) -> Any:
        """`metric.labels(*labels)`, looked up once per label set (models, endpoints and
        statuses are few): prometheus_client's own lookup takes a lock and builds keys."""
        key = (metric, *labels)
        child = self._series.get(key)
        if child is None:
            child = self._series[key] = metric.labels(*(str(label) for label in labels))
        return child

    def start(self) -> None:
        workers = self.settings.decode_workers or usable_cores()
        self._decode_pool = ThreadPoolExecutor(workers, thread_name_prefix="decode")

    async def stop(self) -> None:
        """Release the decode threads (after the registry stopped: nothing is queued)."""
        if self._decode_pool is not None:
            await asyncio.to_thread(self._decode_pool.shutdown, wait=True, cancel_futures=True)

    @asynccontextmanager
    async def request(
        self, name: str | None, endpoint: str, *, disconnected: Watch | None = None
    ) -> AsyncIterator[Call]:
        """One inference request: resolves its model, enforces readiness and the timeout, stops
        working for it once `disconnected()` completes (its client has gone: 499) or once the
        protocol cancels it (a gRPC client that cancelled: 499 as well), and records its
        outcome in the metrics. A full queue refuses here, before the body is read."""
        try:
            model = self.registry.resolve(name)
        except ServiceError as exc:
            self.series(self.metrics.requests, "", endpoint, exc.status).inc()
            raise
        label, start, status = model.entry.name, time.monotonic(), 500
        annotate_model(label, model.entry.version)
        in_flight = self.series(self.metrics.in_flight, label)
        in_flight.inc()
        timeout = asyncio.timeout(self.settings.request_timeout_ms / 1000.0)
        try:
            with model.use():
                if model.state != "ready" or model.batcher is None:
                    raise NotReadyError(
                        f"model {label} is {model.state}",
                        retry_after_s=self.settings.retry_after_s,
                    )
                model.batcher.ensure_room(1)
                async with timeout:
                    yield Call(self, model, disconnected)
            status = 200
        except TimeoutError:
            if not timeout.expired():
                raise
            status = RequestTimeoutError.status
            raise RequestTimeoutError(
                f"no answer within request_timeout_ms={self.settings.request_timeout_ms}"
            ) from None
        except ServiceError as exc:
            status = exc.status
            raise
        except asyncio.CancelledError:
            status = ClientDisconnectedError.status  # the protocol gave up on it (gRPC cancel)
            raise
        finally:
            in_flight.dec()
            self.series(self.metrics.requests, label, endpoint, status).inc()
            self.series(self.metrics.request_latency, label, endpoint).observe(
                time.monotonic() - start
            )

    async def decode(self, model: Model, blobs: Sequence[bytes], images: np.ndarray) -> None:
        """Each encoded image's model input written into its row of `images`: small images
        (at most INLINE_PIXELS, such as CIFAR's 32x32) right here, where decoding them costs
        less than handing them to a thread and back; the others in the decode pool. Once this
        returns, raises or is cancelled, no thread writes into `images` any more (`_Rows`): it
        may be shared memory that another request uses next."""
        loop = asyncio.get_running_loop()
        budget = PixelBudget(self.settings.max_request_pixels)
        rows = _Rows()
        jobs: list[asyncio.Future[None]] = []
        try:
            for index, (blob, out) in enumerate(zip(blobs, images, strict=True)):
                small = probe(blob, INLINE_PIXELS) if self._pillow else None
                if small is not None:
                    self._preprocess(model, index, blob, out, budget, small)
                else:
                    job = loop.run_in_executor(
                        self._decode_pool, self._decode_row, model, index, blob, out, budget, rows
                    )
                    job.add_done_callback(_seen)
                    jobs.append(job)
            if jobs:
                await asyncio.wait(jobs)
                for job in jobs:  # the first failure, in image order
                    job.result()
        finally:
            rows.close()
            for job in jobs:
                job.cancel()  # those not started yet

    def _decode_row(
        self,
        model: Model,
        index: int,
        blob: bytes,
        out: np.ndarray,
        budget: PixelBudget,
        rows: _Rows,
    ) -> None:
        """In a decode thread: decode into a buffer of its own, then copy it into the request's
        row while the request still wants it."""
        if not rows.open:
            return
        row = np.empty_like(out)
        self._preprocess(model, index, blob, row, budget)
        with rows.lock:
            if rows.open:
                out[...] = row

    def _preprocess(
        self,
        model: Model,
        index: int,
        blob: bytes,
        out: np.ndarray,
        budget: PixelBudget,
        opened: Image.Image | PlainPng | None = None,
    ) -> None:
        start = time.monotonic()
        try:
            extra = {"opened": opened} if opened is not None else {}
            self._preprocess_into(
                blob,
                model.entry.preprocessing,
                out,
                max_pixels=self.settings.max_image_pixels,
                budget=budget,
                **extra,
            )
        except UndecodableImageError as exc:
            raise InvalidImageError(f"image {index}: {exc}") from None
        except OversizedImageError as exc:
            raise ImageTooLargeError(f"image {index}: {exc}") from None
        self.series(self.metrics.preprocess_latency, model.entry.name).observe(
            time.monotonic() - start
        )


class _Rows:
    """Whether a request still takes rows from its decode threads: `close` (the request decoded
    everything, failed or gave up) waits at most for a row being copied now, and no row is
    written after it."""

    __slots__ = ("lock", "open")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.open = True

    def close(self) -> None:
        with self.lock:
            self.open = False


def _seen(job: asyncio.Future[None]) -> None:
    """Retrieve a decode job's failure, also when its request no longer waits for it."""
    if not job.cancelled():
        job.exception()


class Call:
    """What one request may ask of its model: admit -> decode -> batch, in one direction. Every
    method stops at once when the client disconnects."""

    def __init__(self, plane: DataPlane, model: Model, disconnected: Watch | None) -> None:
        assert model.batcher is not None
        self._plane, self.model = plane, model
        self._batcher: Queue = model.batcher
        self._disconnected = disconnected

    @property
    def entry(self) -> ModelEntry:
        return self.model.entry

    def top_k(self, k: int | None) -> int:
        """The number of classes to answer with: `k`, or 5 (all if fewer) when not given."""
        classes = self.entry.num_classes
        if k is None:
            return min(DEFAULT_TOP_K, classes)
        if k > classes:
            raise InvalidParameterError(f"top_k={k} exceeds the model's {classes} classes")
        return k

    async def classify(self, blobs: Sequence[bytes], k: int) -> list[list[dict[str, Any]]]:
        logits, _ = await self.infer(blobs)
        return predictions(logits, self.entry.labels, k)

    async def embed(self, blobs: Sequence[bytes], *, normalize: bool) -> np.ndarray:
        _, embeddings = await self.infer(blobs)
        embeddings = unit_norm(embeddings) if normalize else embeddings
        return np.ascontiguousarray(embeddings, dtype=np.float32)

    async def infer(self, blobs: Sequence[bytes]) -> OutputArrays:
        """(logits [N, classes], embeddings [N, dim]) for encoded images, in order."""
        work = self._on_current_version(self._decode_and_run, blobs)
        return await self._unless_disconnected(work)

    async def infer_tensors(self, images: np.ndarray) -> OutputArrays:
        """The same for inputs already preprocessed, float32 [N, *input_shape] (Open Inference
        Protocol tensors): they join the same batcher as decoded images."""
        return await self._unless_disconnected(self._on_current_version(self._run, images))

    async def _on_current_version(
        self, work: Callable[[Any], Coroutine[Any, Any, OutputArrays]], argument: Any
    ) -> OutputArrays:
        """`work(argument)`, again on the model's new version when the version this request
        resolved was swapped out in the engine process before its images reached it (a
        front-end worker's view of the versions lags the engine process's by one message)."""
        for attempt in range(STALE_ATTEMPTS):
            try:
                return await work(argument)
            except StaleVersionError:
                if attempt == STALE_ATTEMPTS - 1:
                    raise
                model = self._plane.registry.resolve(self.entry.name)
                if model.state != "ready" or model.batcher is None:
                    raise NotReadyError(
                        f"model {model.entry.name} is {model.state}",
                        retry_after_s=self._plane.settings.retry_after_s,
                    ) from None
                self.model, self._batcher = model, model.batcher
                annotate_model(model.entry.name, model.entry.version)
        raise AssertionError("unreachable")

    async def _decode_and_run(self, blobs: Sequence[bytes]) -> OutputArrays:
        # The room is the ticket's while decoding: a burst is refused (503) before any decoding
        # is spent on it.
        async with self._batcher.admit(len(blobs)) as ticket:
            images = ticket.inputs(self.entry.input_shape)
            with stage("decode"):
                await self._plane.decode(self.model, blobs, images)
            self._count(len(images))
            return await ticket.run(images)

    async def _run(self, images: np.ndarray) -> OutputArrays:
        async with self._batcher.admit(len(images)) as ticket:
            self._count(len(images))
            return await ticket.run(images)

    def _count(self, images: int) -> None:
        """Images sent to inference: counted once admitted and decoded, never when refused."""
        plane = self._plane
        plane.series(plane.metrics.images, self.entry.name).inc(images)

    async def _unless_disconnected(self, work: Coroutine[Any, Any, T]) -> T:
        if self._disconnected is None:
            return await work
        return await unless_disconnected(self._disconnected, work)


async def unless_disconnected(watch: Watch, work: Coroutine[Any, Any, T]) -> T:
    """The result of `work` (awaited in this task), or ClientDisconnectedError as soon as the
    client has gone: the watch then cancels this task, so that `work` stops where it is and its
    images still waiting for a batch are dropped."""
    task = asyncio.current_task()
    assert task is not None
    gone = False

    def cancel() -> None:
        nonlocal gone
        if not task.done():
            gone = True
            task.cancel()

    unwatch = watch(cancel)
    try:
        return await work
    except asyncio.CancelledError:
        if not gone:  # a timeout, a shutdown: not ours to turn into an answer
            raise
        task.uncancel()
        raise ClientDisconnectedError("client disconnected before its answer was ready") from None
    finally:
        unwatch()
