"""The data plane, free of HTTP: which models are served, loading and warming them, readiness,
and one inference request (`DataPlane.request` -> `Call`) from image bytes or tensors to
predictions and embeddings: decode -> admit -> batch -> post-process, in one direction.

Construction reads the repository and checks the providers synchronously, so a bad repository
or a CUDA requirement that cannot be met stops start-up before the port opens. Building
sessions and warming them runs afterwards in the background, while `/readyz` answers 503.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any, Literal, TypeVar

import numpy as np

from .batcher import Batcher, Outputs
from .disconnect import unless_disconnected
from .engine import (
    CUDA,
    GPU_PROVIDERS,
    Engine,
    EngineConfig,
    EngineError,
    available_cores,
    create_engine,
    resolve_providers,
    warm,
)
from .errors import (
    InvalidParameterError,
    ModelNotFoundError,
    NotReadyError,
    RequestTimeoutError,
    ServiceError,
)
from .gpu_decode import image_preprocessor
from .host import choice_mismatch
from .metrics import Metrics
from .postprocess import predictions, unit_norm
from .repository import ModelEntry, scan_repository
from .settings import Settings
from .tracing import annotate_model, stage

log = logging.getLogger(__name__)

ModelState = Literal["loading", "ready", "failed", "unloaded"]
DEFAULT_TOP_K = 5
T = TypeVar("T")


def open_entry(entry: ModelEntry, config: EngineConfig) -> Engine:
    """The engine a repository entry's metadata asks for (the benchmark uses it too)."""
    return create_engine(
        entry.model_file,
        config,
        engine=entry.engine,
        precision=entry.precision,
        input_name=entry.input_name,
        output_names=[entry.logits_name, entry.embedding_name],
        input_shape=entry.input_shape,
    )


class ServedModel:
    """A repository entry plus what serving it needs at run time."""

    def __init__(self, entry: ModelEntry, settings: Settings) -> None:
        self.entry = entry
        verified = entry.verified_max_batch_size
        self.max_batch_size = min(settings.max_batch_size, verified or settings.max_batch_size)
        if self.max_batch_size < settings.max_batch_size:
            log.warning(
                "model %s: max_batch_size %d clamped to %d, the largest batch its export verified",
                entry.name,
                settings.max_batch_size,
                self.max_batch_size,
            )
        self.state: ModelState = "loading"
        self.engine: Engine | None = None
        self.batcher: Batcher | None = None
        self.warmed: list[int] = []
        self.users = 0  # requests that resolved to this version and have not answered yet
        self._idle: asyncio.Event | None = None

    async def idle(self) -> None:
        """Until no request holds this version (live model updates release it then)."""
        while self.users:
            self._idle = asyncio.Event()
            await self._idle.wait()

    def _leave(self) -> None:
        self.users -= 1
        if not self.users and self._idle is not None:
            self._idle.set()

    def warmup_sizes(self, provider: str, mode: str = "auto") -> list[int]:
        """Every size the batcher can form on a GPU (a new shape can cost seconds there: cuDNN's
        algorithm search, a CUDA graph capture); on CPU onnxruntime has no per-shape setup worth
        paying for, so the extremes are enough. `mode` (warmup_batch_sizes) overrides."""
        if mode == "all" or (mode == "auto" and provider in GPU_PROVIDERS):
            return list(range(1, self.max_batch_size + 1))
        return sorted({1, self.max_batch_size})

    def describe(self, settings: Settings) -> dict[str, Any]:
        """The `/models` view: metadata plus what is true at run time."""
        entry, engine = self.entry, self.engine
        return {
            "name": entry.name,
            "version": entry.version,
            "arch": entry.metadata.arch,
            "family": entry.metadata.family,
            "precision": entry.precision,
            "engine": entry.engine,
            "trained": entry.trained,
            "state": self.state,
            "num_classes": entry.num_classes,
            "embedding_dim": entry.embedding_dim,
            "input": {
                "name": entry.input_name,
                "shape": [None, *entry.input_shape],
                "dtype": entry.metadata.input.dtype,
            },
            "provider": engine.provider if engine else None,
            "providers": engine.providers if engine else [],
            "io_binding": engine.io_binding if engine else False,
            "max_batch_size": self.max_batch_size,
            "verified_max_batch_size": entry.verified_max_batch_size,
            "max_delay_ms": settings.max_delay_ms,
            "max_queue_images": settings.max_queue_images,
            "warmed_batch_sizes": self.warmed,
            "gpu": gpu_facts(settings, engine),
            "metadata": entry.metadata.model_dump(mode="json"),
        }


def gpu_facts(settings: Settings, engine: Engine | None) -> dict[str, Any]:
    """The settings that only matter on a GPU, and what the engine made of them."""
    return {
        "io_binding_setting": settings.io_binding,
        "warmup_batch_sizes_setting": settings.warmup_batch_sizes,
        "cudnn_conv_algo_search": settings.cudnn_conv_algo_search,
        "cuda_tf32": settings.cuda_tf32,
        "cuda_graph": settings.cuda_graph,
        "cuda_graph_in_use": bool(getattr(engine, "cuda_graph", False)),
        "tensorrt": settings.tensorrt,
        "jpeg_decoder": settings.jpeg_decoder,
        "allow_fp16_on_cpu": settings.allow_fp16_on_cpu,
        "bound_batch_sizes": list(getattr(engine, "bound_batch_sizes", [])),
    }


def check_fp16_device(entry: ModelEntry, provider: str, settings: Settings) -> None:
    """An fp16 export is made and gated for CUDA; on the CPU provider onnxruntime computes
    many fp16 operators in float32 behind inserted casts, so it differs from what was gated
    and is refused unless `allow_fp16_on_cpu`."""
    if entry.precision != "fp16" or provider in GPU_PROVIDERS or settings.allow_fp16_on_cpu:
        return
    gate = entry.metadata.precision_gate
    device = (gate.model_extra or {}).get("device", "?") if gate is not None else "?"
    raise EngineError(
        f"model {entry.name} v{entry.version} is fp16 (gated on {device}) and "
        f"would run on {provider}: serve it on a GPU, or pass --allow-fp16-on-cpu "
        "(RESNET_SERVE_ALLOW_FP16_ON_CPU=true) to accept CPU fp16 arithmetic"
    )


def warn_if_chosen_elsewhere(entry: ModelEntry) -> None:
    """One warning when `--precision auto` chose this version on a CPU with other flags."""
    choice = entry.metadata.precision_choice
    if choice is None:
        return
    why = choice_mismatch(choice.host.model_dump())
    if why is not None:
        log.warning(
            "model %s v%d serves %s (precision auto) %s",
            entry.name,
            entry.version,
            choice.chosen,
            why,
        )


class DataPlane:
    """Every served model, the decode pool, and the service's readiness."""

    def __init__(
        self, settings: Settings, metrics: Metrics, *, on_fatal: Callable[[], None] | None = None
    ) -> None:
        self.settings, self.metrics = settings, metrics
        self.engine_config = EngineConfig.from_settings(settings)
        self.providers = resolve_providers(self.engine_config)
        entries = scan_repository(settings.model_repository)
        if settings.default_model is not None and settings.default_model not in entries:
            raise ValueError(
                f"default_model {settings.default_model!r} is not in the repository "
                f"(models: {sorted(entries)})"
            )
        for entry in entries.values():
            check_fp16_device(entry, self.providers[0], settings)
        self.preprocess_into = image_preprocessor(
            settings.jpeg_decoder, dct_scaling=settings.jpeg_dct_scaling
        )
        self.models = {name: ServedModel(entry, settings) for name, entry in entries.items()}
        self.draining = False
        self.fatal: str | None = None
        self._on_fatal = on_fatal
        self._load_task: asyncio.Task[None] | None = None
        self._decode_pool: ThreadPoolExecutor | None = None
        self._stopping = threading.Event()  # read by the warm-up thread
        log.info(
            "serving %s from %s with providers %s",
            ", ".join(f"{m.entry.name} v{m.entry.version}" for m in self.models.values()),
            settings.model_repository,
            self.providers,
        )

    @property
    def ready(self) -> bool:
        return (
            not self.draining
            and self.fatal is None
            and all(m.state == "ready" for m in self.models.values())
        )

    @property
    def status(self) -> Literal["ready", "loading", "draining", "failed"]:
        if self.fatal is not None:
            return "failed"
        if self.draining:
            return "draining"
        return "ready" if self.ready else "loading"

    def start(self) -> None:
        workers = self.settings.decode_workers or available_cores()
        self._decode_pool = ThreadPoolExecutor(workers, thread_name_prefix="decode")
        self._load_task = asyncio.create_task(self._load_all(), name="load-models")

    def begin_draining(self) -> None:
        """Stop reporting ready at once (SIGTERM); accepted and new requests are still served
        until the HTTP server stops taking them."""
        if not self.draining:
            log.info("draining: /readyz now answers 503")
        self.draining = True
        self.metrics.ready.set(0)

    async def stop(self) -> None:
        """Drain, stop loading (a warm-up in progress ends after its current run), finish the
        queued images, release the threads; never blocks the event loop."""
        self.begin_draining()
        self._stopping.set()
        if self._load_task is not None and not self._load_task.done():
            self._load_task.cancel()
            await asyncio.gather(self._load_task, return_exceptions=True)
        for model in self.models.values():
            if model.batcher is not None:
                await model.batcher.stop()
        if self._decode_pool is not None:
            await asyncio.to_thread(self._decode_pool.shutdown, wait=True, cancel_futures=True)

    async def _load_all(self) -> None:
        for model in self.models.values():
            try:
                await self._load(model)
            except Exception as exc:
                model.state = "failed"
                self.fatal = f"model {model.entry.name} failed to load: {exc}"
                # EngineError already names the file and what is wrong with it: no traceback.
                expected = isinstance(exc, EngineError)
                log.critical("%s", self.fatal, exc_info=None if expected else exc)
                if self._on_fatal is not None:
                    self._on_fatal()
                return
        self.metrics.ready.set(0 if self.draining else 1)
        log.info("ready: every model is loaded and warmed")

    async def _load(self, model: ServedModel) -> None:
        entry, started = model.entry, time.monotonic()
        engine = await asyncio.to_thread(open_entry, entry, self.engine_config)
        model.engine = engine
        check_fp16_device(entry, engine.provider, self.settings)
        warn_if_chosen_elsewhere(entry)
        if CUDA in self.providers and engine.provider not in GPU_PROVIDERS:
            log.warning(
                "model %s runs on %s although CUDA is available", entry.name, engine.provider
            )
        log.info(
            "model %s v%d: session on %s (providers %s, io binding %s)",
            entry.name,
            entry.version,
            engine.provider,
            engine.providers,
            engine.io_binding,
        )
        sizes = model.warmup_sizes(engine.provider, self.settings.warmup_batch_sizes)
        model.warmed = await asyncio.to_thread(
            warm, engine, sizes, entry.input_shape, stop=self._stopping
        )
        model.batcher = Batcher(
            entry.name,
            engine.run,
            max_batch_size=model.max_batch_size,
            max_delay_ms=self.settings.max_delay_ms,
            max_queue_images=self.settings.max_queue_images,
            retry_after_s=self.settings.retry_after_s,
            metrics=self.metrics,
        )
        model.batcher.start()
        model.state = "ready"
        log.info(
            "model %s v%d: warmed batch sizes %s, ready after %.1f s",
            entry.name,
            entry.version,
            model.warmed,
            time.monotonic() - started,
        )

    def describe(self, model: ServedModel) -> dict[str, Any]:
        return model.describe(self.settings)

    def resolve(self, name: str | None) -> ServedModel:
        """The model a request names (only ever looked up in the dict), or the default one."""
        if name is None:
            name = self.settings.default_model
            if name is None:
                if len(self.models) != 1:
                    raise InvalidParameterError(
                        f"several models are served; name one with ?model= "
                        f"(choices: {sorted(self.models)})"
                    )
                name = next(iter(self.models))
        model = self.models.get(name)
        if model is None:
            raise ModelNotFoundError(f"no model named {name!r} (served: {sorted(self.models)})")
        return model

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
