"""The data plane, free of HTTP: one inference request (`DataPlane.request` -> `Call`) from
image bytes or tensors to predictions and embeddings: resolve the model, readiness, admission,
timeout, disconnects, metrics; then decode -> admit -> batch -> post-process, in one direction.
Which models are served, and loading, warming, draining and stopping them, is `lifecycle`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import numpy as np

from .batcher import Batcher, Outputs
from .disconnect import unless_disconnected
from .errors import (
    InvalidParameterError,
    NotReadyError,
    RequestTimeoutError,
    ServiceError,
)
from .gpu_decode import image_preprocessor
from .lifecycle import ModelLifecycle, ServedModel
from .metrics import Metrics
from .postprocess import predictions, unit_norm
from .repository import ModelEntry
from .settings import Settings
from .tracing import annotate_model, stage

DEFAULT_TOP_K = 5
T = TypeVar("T")


class DataPlane(ModelLifecycle):
    """The request path over the served models (their lifecycle is `ModelLifecycle`'s)."""

    def __init__(
        self, settings: Settings, metrics: Metrics, *, on_fatal: Callable[[], None] | None = None
    ) -> None:
        super().__init__(settings, metrics, on_fatal=on_fatal)
        self.preprocess_into = image_preprocessor(
            settings.jpeg_decoder, dct_scaling=settings.jpeg_dct_scaling
        )

    @asynccontextmanager
    async def request(
        self,
        name: str | None,
        endpoint: str,
        *,
        disconnected: Callable[[], Awaitable[object]] | None = None,
    ) -> AsyncIterator[Call]:
        """One inference request: resolves its model, enforces readiness and the timeout, stops
        working for it once `disconnected()` completes (its client has gone: 499), and records
        its outcome in the metrics. A full queue refuses here, before the body is read."""
        try:
            model = self.resolve(name)
        except ServiceError as exc:
            self.metrics.requests.labels("", endpoint, str(exc.status)).inc()
            raise
        label, start, status = model.entry.name, time.monotonic(), 500
        annotate_model(label, model.entry.version)
        in_flight = self.metrics.in_flight.labels(label)
        in_flight.inc()
        model.users += 1
        timeout = asyncio.timeout(self.settings.request_timeout_ms / 1000.0)
        try:
            if model.state != "ready" or model.batcher is None:
                raise NotReadyError(
                    f"model {label} is {model.state}", retry_after_s=self.settings.retry_after_s
                )
            model.batcher.ensure_room(1)
            async with timeout:
                yield Call(self, model, model.batcher, disconnected)
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
        finally:
            model._leave()
            in_flight.dec()
            self.metrics.requests.labels(label, endpoint, str(status)).inc()
            self.metrics.request_latency.labels(label, endpoint).observe(time.monotonic() - start)

    async def _decode(self, model: ServedModel, blobs: list[bytes], images: np.ndarray) -> None:
        loop = asyncio.get_running_loop()
        jobs = [
            loop.run_in_executor(self._decode_pool, self._preprocess, model, index, blob, out)
            for index, (blob, out) in enumerate(zip(blobs, images, strict=True))
        ]
        for result in await asyncio.gather(*jobs, return_exceptions=True):
            if isinstance(result, BaseException):
                raise result

    def _preprocess(self, model: ServedModel, index: int, blob: bytes, out: np.ndarray) -> None:
        start = time.monotonic()
        try:
            self.preprocess_into(
                blob, model.entry.preprocessing, out, max_pixels=self.settings.max_image_pixels
            )
        except ServiceError as exc:
            exc.message = f"image {index}: {exc.message}"
            raise
        self.metrics.preprocess_latency.labels(model.entry.name).observe(time.monotonic() - start)


class Call:
    """What one request may ask of its model: decode -> admit -> batch -> post-process, in one
    direction. Every method stops at once when the client disconnects."""

    def __init__(
        self,
        plane: DataPlane,
        model: ServedModel,
        batcher: Batcher,
        disconnected: Callable[[], Awaitable[object]] | None,
    ) -> None:
        self._plane, self.model, self._batcher = plane, model, batcher
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

    async def classify(self, blobs: list[bytes], k: int) -> list[list[dict[str, Any]]]:
        logits, _ = await self.infer(blobs)
        return predictions(logits, self.entry.labels, k)

    async def embed(self, blobs: list[bytes], *, normalize: bool) -> np.ndarray:
        _, embeddings = await self.infer(blobs)
        embeddings = unit_norm(embeddings) if normalize else embeddings
        return np.ascontiguousarray(embeddings, dtype=np.float32)

    async def infer(self, blobs: list[bytes]) -> Outputs:
        """(logits [N, classes], embeddings [N, dim]) for encoded images, in order."""
        return await self._unless_disconnected(self._decode_and_run(blobs))

    async def infer_tensors(self, images: np.ndarray) -> Outputs:
        """The same for inputs already preprocessed, float32 [N, *input_shape] (Open Inference
        Protocol tensors): they join the same batcher as decoded images."""
        return await self._unless_disconnected(self._run(images))

    async def _decode_and_run(self, blobs: list[bytes]) -> Outputs:
        # The room is the ticket's while decoding: a burst is refused (503) before any decoding
        # is spent on it.
        async with self._batcher.admit(len(blobs)) as ticket:
            images = np.empty((len(blobs), *self.entry.input_shape), dtype=np.float32)
            with stage("decode"):
                await self._plane._decode(self.model, blobs, images)
            self._count(len(images))
            return await ticket.run(images)

    async def _run(self, images: np.ndarray) -> Outputs:
        async with self._batcher.admit(len(images)) as ticket:
            self._count(len(images))
            return await ticket.run(images)

    def _count(self, images: int) -> None:
        """Images sent to inference: counted once admitted and decoded, never when refused."""
        self._plane.metrics.images.labels(self.entry.name).inc(images)

    async def _unless_disconnected(self, work: Coroutine[Any, Any, T]) -> T:
        if self._disconnected is None:
            return await work
        return await unless_disconnected(self._disconnected, work)
