"""The served models, free of HTTP: which version of each model is served (`ServedModel`),
building and warming its engine and starting its batcher, readiness, swapping a new version in
and retiring the old one, draining and stopping (`ModelRegistry`).

The request path over them is `dataplane.DataPlane`, which is given a registry; live updates
(poll, explicit) are `model_control.ModelControl`, which loads versions through `load` and
publishes them through `swap` and `remove`.

Construction reads the repository and checks the providers synchronously, so a bad repository
or a CUDA requirement that cannot be met stops start-up before the port opens. Building engines
and warming them runs afterwards in the background, while `/readyz` answers 503.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from contract.cpu import choice_mismatch
from contract.repository import ModelEntry, scan_repository
from runtime.engines import (
    CUDA,
    GPU_PROVIDERS,
    Engine,
    EngineError,
    open_entry,
    resolve_providers,
    warm,
)

from .batcher import Batcher
from .errors import ModelNotFoundError
from .metrics import Metrics
from .serving import ModelState, Status, resolve
from .settings import Settings

log = logging.getLogger(__name__)


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
        self._users = 0  # requests that resolved to this version and have not answered yet
        self._idle: asyncio.Event | None = None

    @contextmanager
    def use(self) -> Iterator[ServedModel]:
        """Hold this version for one request: it is not released (after a swap or an unload)
        before the request has answered."""
        self.acquire()
        try:
            yield self
        finally:
            self.release()

    def acquire(self) -> None:
        """`use` without a block (the engine process holds a version per worker request)."""
        self._users += 1

    def release(self) -> None:
        self._users -= 1
        if not self._users and self._idle is not None:
            self._idle.set()

    async def idle(self) -> None:
        """Until no request holds this version."""
        while self._users:
            self._idle = asyncio.Event()
            await self._idle.wait()

    def warmup_sizes(self, provider: str, mode: str = "auto") -> list[int]:
        """Every size the batcher can form on a GPU (a new shape can cost seconds there: cuDNN's
        algorithm search, a CUDA graph capture); on CPU onnxruntime has no per-shape setup worth
        paying for, so the extremes are enough. `mode` (warmup_batch_sizes) overrides."""
        if mode == "all" or (mode == "auto" and provider in GPU_PROVIDERS):
            return list(range(1, self.max_batch_size + 1))
        return sorted({1, self.max_batch_size})

    def view(self, settings: Settings) -> dict[str, Any]:
        """The `/models` view, one of each: the entry's name and version, what is true at run
        time, and the metadata as validated (arch, precision, engine, input, labels, weights
        and whether they are trained, the batch its export verified, ...) once, under
        "metadata"."""
        engine = self.engine
        return {
            "name": self.entry.name,
            "version": self.entry.version,
            "state": self.state,
            "provider": engine.provider if engine else None,
            "providers": engine.providers if engine else [],
            "io_binding": engine.io_binding if engine else False,
            "max_batch_size": self.max_batch_size,
            "max_delay_ms": settings.max_delay_ms,
            "max_queue_images": settings.max_queue_images,
            "warmed_batch_sizes": self.warmed,
            "gpu": gpu_facts(settings, engine),
            "metadata": self.entry.metadata.model_dump(mode="json"),
        }

    async def stop(self) -> None:
        """Finish its queued images, then let the engine go."""
        if self.batcher is not None:
            await self.batcher.stop()
        self.engine, self.batcher = None, None


def gpu_facts(settings: Settings, engine: Engine | None) -> dict[str, Any]:
    """The settings that only matter on a GPU, and what the engine made of them."""
    return {
        "io_binding_setting": settings.io_binding,
        "warmup_batch_sizes_setting": settings.warmup_batch_sizes,
        "cudnn_conv_algo_search": settings.cudnn_conv_algo_search,
        "cuda_tf32": settings.cuda_tf32,
        "cuda_graph": settings.cuda_graph,
        "cuda_graph_in_use": engine.cuda_graph if engine else False,
        "tensorrt": settings.tensorrt,
        "jpeg_decoder": settings.jpeg_decoder,
        "allow_fp16_on_cpu": settings.allow_fp16_on_cpu,
        "bound_batch_sizes": engine.bound_batch_sizes if engine else [],
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


class ModelRegistry:
    """Every served model and the service's readiness: what is loaded, warmed, swapped, drained
    and stopped. Model names from requests are only ever looked up in `models`."""

    def __init__(
        self, settings: Settings, metrics: Metrics, *, on_fatal: Callable[[], None] | None = None
    ) -> None:
        self.settings, self.metrics = settings, metrics
        self.engine_config = settings.engine_config()
        self.providers = resolve_providers(self.engine_config)
        entries = scan_repository(settings.model_repository)
        if settings.default_model is not None and settings.default_model not in entries:
            raise ValueError(
                f"default_model {settings.default_model!r} is not in the repository "
                f"(models: {sorted(entries)})"
            )
        for entry in entries.values():
            check_fp16_device(entry, self.providers[0], settings)
        self.models = {name: ServedModel(entry, settings) for name, entry in entries.items()}
        # The model of requests that name none, decided once: the configured default, or the
        # only model found at start. Models added later (poll, explicit load) never change it.
        self.default_model = settings.default_model or (
            next(iter(entries)) if len(entries) == 1 else None
        )
        self.draining = False
        self.fatal: str | None = None
        self._on_fatal = on_fatal
        self._load_task: asyncio.Task[None] | None = None
        self._loaded: asyncio.Event | None = None
        self._retiring: set[asyncio.Task[None]] = set()
        self._stopping = threading.Event()  # read by the warm-up thread
        self.watchers: list[Callable[[], None]] = []  # called by `changed`
        log.info(
            "serving %s from %s with providers %s",
            ", ".join(f"{m.entry.name} v{m.entry.version}" for m in self.models.values()),
            settings.model_repository,
            self.providers,
        )

    @property
    def ready(self) -> bool:
        """Every served model loaded and warmed, and at least one of them (a service whose
        every model was unloaded answers nothing but 404s: not ready)."""
        return (
            not self.draining
            and self.fatal is None
            and bool(self.models)
            and all(m.state == "ready" for m in self.models.values())
        )

    @property
    def status(self) -> Status:
        if self.fatal is not None:
            return "failed"
        if self.draining:
            return "draining"
        return "ready" if self.ready else "loading"

    def start(self) -> None:
        self._loaded = asyncio.Event()
        self._load_task = asyncio.create_task(self._load_all(), name="load-models")

    @property
    def loaded(self) -> bool:
        """Whether the models found at start have been loaded (or one failed)."""
        return self._loaded is not None and self._loaded.is_set()

    async def started(self) -> None:
        """Until the models found at start are loaded (or one failed)."""
        assert self._loaded is not None, "start() first"
        await self._loaded.wait()

    def begin_draining(self) -> None:
        """Stop reporting ready at once (SIGTERM); accepted and new requests are still served
        until the servers stop taking them."""
        if not self.draining:
            log.info("draining: /readyz now answers 503")
        self.draining = True
        self.metrics.ready.set(0)
        self.changed()

    async def stop(self) -> None:
        """Drain, stop loading (a warm-up in progress ends after its current run), finish the
        queued images; never blocks the event loop."""
        self.begin_draining()
        self._stopping.set()
        if self._load_task is not None and not self._load_task.done():
            self._load_task.cancel()
            await asyncio.gather(self._load_task, return_exceptions=True)
        await asyncio.gather(*self._retiring, return_exceptions=True)
        for model in list(self.models.values()):
            await model.stop()

    async def _load_all(self) -> None:
        try:
            for model in list(self.models.values()):
                try:
                    await self.load(model)
                except Exception as exc:
                    model.state = "failed"
                    self.fatal = f"model {model.entry.name} failed to load: {exc}"
                    # EngineError already names the file and what is wrong with it.
                    expected = isinstance(exc, EngineError)
                    log.critical("%s", self.fatal, exc_info=None if expected else exc)
                    if self._on_fatal is not None:
                        self._on_fatal()
                    return
            self.metrics.ready.set(0 if self.draining else 1)
            log.info("ready: every model is loaded and warmed")
        finally:
            assert self._loaded is not None
            self._loaded.set()
            self.changed()

    async def load(self, model: ServedModel) -> None:
        """Build its engine, warm it up and start its batcher (at start-up, and for a new
        version before it is swapped in)."""
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
        self.changed()
        log.info(
            "model %s v%d: warmed batch sizes %s, ready after %.1f s",
            entry.name,
            entry.version,
            model.warmed,
            time.monotonic() - started,
        )

    def resolve(self, name: str | None) -> ServedModel:
        """The model a request names, or the default one when it names none."""
        model: ServedModel = resolve(self.models, self.default_model, name)
        return model

    def changed(self) -> None:
        """Tell the watchers (the engine process's front-end workers) that what is served, or
        its readiness, changed."""
        for watcher in self.watchers:
            watcher()

    def swap(self, new: ServedModel) -> ServedModel | None:
        """Serve `new` (loaded and ready) under its name from now on; the version it replaces
        finishes its requests and is then released. One assignment, no await: every request
        resolving the name after this call gets `new`."""
        name = new.entry.name
        old = self.models.get(name)
        self.models[name] = new
        if old is not None:
            self.retire(old)
        self.changed()
        return old

    def remove(self, name: str) -> ServedModel:
        """Stop serving `name`; its requests finish, then it is released."""
        model = self.models.pop(name, None)
        if model is None:
            raise ModelNotFoundError(f"no model named {name!r} is loaded")
        self.retire(model)
        self.changed()
        return model

    def retire(self, model: ServedModel) -> None:
        since = time.monotonic()

        async def release() -> None:
            await model.idle()
            await model.stop()  # finishes queued images (none should be left)
            model.state = "unloaded"
            log.info(
                "model %s: version %d released after %.2f s",
                model.entry.name,
                model.entry.version,
                time.monotonic() - since,
            )

        task = asyncio.create_task(release(), name=f"release-{model.entry.name}")
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)
