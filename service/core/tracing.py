"""OpenTelemetry tracing of inference requests, off unless an OTLP endpoint is configured.

One trace per POST request over HTTP (inference, and management calls) and per gRPC ModelInfer,
continuing the caller's W3C `traceparent`:

    receive                 the whole request (SERVER span; model name and version attributes)
    ├── decode              decoding the request's encoded images (absent for tensors)
    ├── queue_wait          from the first of its images entering the batcher to its batch
    ├── batch               the batch that ran its images (attribute batch.size)
    │   └── inference       the engine's run of that batch
    └── respond             from the batch's results to the answer's last byte

The batcher serves many requests at once in its own task; it cannot hold their spans. Instead a
request leaves a `BatchRecord` in a context variable, each of its images carries it into the
queue, and the batcher writes the times of the batch that ran it there; the request then turns
them into spans with those timestamps. When tracing is off, OpenTelemetry is not even imported:
no middleware is installed, the context variable stays None, and what remains per request is one
context-variable lookup per image. The HTTP adapter opens the root span in an ASGI middleware
(service/protocols/http_tracing.py), the gRPC adapter around ModelInfer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from .settings import Settings

SERVICE_NAME = "resnet-serve"
# With the collector unreachable, each export gives up after this, and shutdown waits this long.
EXPORT_TIMEOUT_S = 2
SHUTDOWN_S = 3.0
# Where the OpenTelemetry SDK logs dropped spans and failed exports.
SDK_LOGGERS = (
    "opentelemetry.sdk._shared_internal",
    "opentelemetry.exporter.otlp.proto.grpc.exporter",
)

log = logging.getLogger(__name__)


class _OnceAMinute(logging.Filter):
    """Lets each distinct message through at most once a minute."""

    def __init__(self) -> None:
        super().__init__()
        self._last: dict[tuple[str, object], float] = {}
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        key, now = (record.name, record.msg), time.monotonic()
        with self._lock:
            if now - self._last.get(key, -60.0) < 60.0:
                return False
            self._last[key] = now
        return True


_once_a_minute = _OnceAMinute()
# OpenTelemetry stamps spans in wall-clock nanoseconds, the service measures with monotonic().
_WALL_OFFSET_NS = time.time_ns() - time.monotonic_ns()


def wall_ns(monotonic_s: float) -> int:
    return int(monotonic_s * 1e9) + _WALL_OFFSET_NS


@dataclass(slots=True)
class BatchRecord:
    """What the batcher tells a traced request about the batches that ran its images:
    (enqueued, batch start, inference start, inference end, batch size) per image."""

    tracer: Any
    runs: list[tuple[float, float, float, float, int]] = field(default_factory=list)
    model: str = ""
    version: int = 0


_CURRENT: ContextVar[BatchRecord | None] = ContextVar("resnet_serve_trace", default=None)


def current_record() -> BatchRecord | None:
    """The traced request's record in this context (None when tracing is off): the batcher's
    hook, read once per image it queues."""
    return _CURRENT.get()


def annotate_model(name: str, version: int) -> None:
    """The data plane's hook: the model a traced request resolved to."""
    record = _CURRENT.get()
    if record is not None:
        record.model, record.version = name, version


class NoSpan:
    """A request that is not traced: every call is a no-op."""

    def set_model(self, name: str, version: int) -> None:
        pass

    def set_attribute(self, key: str, value: Any) -> None:
        pass


NO_SPAN = NoSpan()


class RequestSpan:
    def __init__(self, span: Any, record: BatchRecord) -> None:
        self.span, self.record = span, record

    def set_model(self, name: str, version: int) -> None:
        self.record.model, self.record.version = name, version

    def set_attribute(self, key: str, value: Any) -> None:
        self.span.set_attribute(key, value)


class Tracing:
    """The service's tracer: `Tracing.off()` (no OpenTelemetry at all), or spans sent to an
    exporter (OTLP, or any SpanExporter given, such as the SDK's in-memory one in tests)."""

    def __init__(self, tracer: Any = None, provider: Any = None) -> None:
        self._tracer = tracer
        self._provider = provider
        self.enabled = tracer is not None
        if self.enabled:
            from opentelemetry.trace import SpanKind
            from opentelemetry.trace.propagation.tracecontext import (
                TraceContextTextMapPropagator,
            )

            self._propagator = TraceContextTextMapPropagator()
            self._server_kind = SpanKind.SERVER

    @classmethod
    def off(cls) -> Tracing:
        return cls()

    @classmethod
    def from_settings(cls, settings: Settings, exporter: Any = None) -> Tracing:
        """Spans to `exporter` when given, else to the OTLP endpoint of the settings (which
        also reads OTEL_EXPORTER_OTLP_ENDPOINT); off when neither is set."""
        endpoint = settings.otlp_endpoint
        if exporter is None and endpoint is None:
            return cls.off()
        try:
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
        except ImportError as exc:
            raise ValueError(
                "tracing is configured (otlp_endpoint) but OpenTelemetry is not installed: "
                'pip install "resnet-serve[tracing]"'
            ) from exc
        provider = TracerProvider(resource=Resource.create({"service.name": SERVICE_NAME}))
        if exporter is not None:
            provider.add_span_processor(SimpleSpanProcessor(exporter))
        else:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            insecure = not str(endpoint).startswith("https://")
            otlp = OTLPSpanExporter(endpoint=endpoint, insecure=insecure, timeout=EXPORT_TIMEOUT_S)
            provider.add_span_processor(
                BatchSpanProcessor(otlp, export_timeout_millis=EXPORT_TIMEOUT_S * 1000)
            )
            for name in SDK_LOGGERS:  # a collector that is down: a line a minute, not a span
                logging.getLogger(name).addFilter(_once_a_minute)
        return cls(provider.get_tracer("resnet_serve"), provider)

    async def shutdown(self, timeout_s: float = SHUTDOWN_S) -> None:
        """Flush what is buffered (the OTLP exporter sends in batches) at exit, for at most
        `timeout_s`: with the collector down, the SDK's own shutdown can wait 30 s. It runs in
        a daemon thread of its own, so that neither the event loop nor the process's exit waits
        for it past that."""
        if self._provider is None:
            return
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()

        def run() -> None:
            self._provider.shutdown()
            loop.call_soon_threadsafe(lambda: done.done() or done.set_result(None))

        threading.Thread(target=run, name="tracing-shutdown", daemon=True).start()
        try:
            await asyncio.wait_for(done, timeout_s)
        except TimeoutError:
            log.warning("tracing: spans not flushed within %.0f s at shutdown (dropped)", timeout_s)

    @contextlib.contextmanager
    def receive(
        self, name: str, headers: Mapping[str, str], *, protocol: str, **attributes: Any
    ) -> Iterator[RequestSpan | NoSpan]:
        """The root span of one request, child of the caller's `traceparent` if it sent one;
        inside it, the batcher's record of this request is collected. Ended by the caller."""
        if not self.enabled:
            yield NO_SPAN
            return
        parent = self._propagator.extract(carrier=headers)
        record = BatchRecord(self._tracer)
        token = _CURRENT.set(record)
        attrs = {"rpc.system" if protocol == "grpc" else "network.protocol.name": protocol}
        attrs.update(attributes)
        span = self._tracer.start_span(
            "receive", context=parent, kind=self._server_kind, attributes=attrs
        )
        handle = RequestSpan(span, record)
        try:
            from opentelemetry.trace import use_span

            with use_span(span, end_on_exit=False, record_exception=True):
                yield handle
        finally:
            _CURRENT.reset(token)
            self.finish(handle)

    def finish(self, handle: RequestSpan, end_s: float | None = None) -> None:
        """The batch spans from the record, then the respond span and the root's end."""
        span, record = handle.span, handle.record
        if record.model:
            span.set_attribute("model.name", record.model)
            span.set_attribute("model.version", record.version)
        from opentelemetry.trace import set_span_in_context

        context = set_span_in_context(span)
        end = time.monotonic() if end_s is None else end_s
        if record.runs:
            batches: dict[float, tuple[float, float, float, int]] = {}
            first_enqueued = min(run[0] for run in record.runs)
            for _, start, infer_start, infer_end, size in record.runs:
                batches[start] = (start, infer_start, infer_end, size)
            last_batch = min(batches)
            wait = self._tracer.start_span(
                "queue_wait", context=context, start_time=wall_ns(first_enqueued)
            )
            wait.end(end_time=wall_ns(last_batch))
            common = {"model.name": record.model, "model.version": record.version}
            for start, infer_start, infer_end, size in batches.values():
                attributes = {**common, "batch.size": size}
                batch = self._tracer.start_span(
                    "batch", context=context, start_time=wall_ns(start), attributes=attributes
                )
                inner = set_span_in_context(batch)
                run = self._tracer.start_span(
                    "inference", context=inner, start_time=wall_ns(infer_start),
                    attributes=attributes,
                )  # fmt: skip
                run.end(end_time=wall_ns(infer_end))
                batch.end(end_time=wall_ns(infer_end))
            respond_start = max(run[3] for run in record.runs)
            respond = self._tracer.start_span(
                "respond", context=context, start_time=wall_ns(respond_start)
            )
            respond.end(end_time=wall_ns(end))
        span.end(end_time=wall_ns(end))


def stage(name: str) -> contextlib.AbstractContextManager[Any]:
    """A child span of the current traced request (the data plane's and gRPC's hook); a no-op
    unless a traced request is running in this context."""
    record = _CURRENT.get()
    if record is None:
        return contextlib.nullcontext()
    return record.tracer.start_as_current_span(name)
