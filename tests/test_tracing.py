"""OpenTelemetry tracing: the stages of a request as spans (the SDK's in-memory exporter, real
app and engine in process), the caller's W3C traceparent continued, gRPC traced alike, spans
sent to a real OTLP/gRPC receiver by the real service, and no OpenTelemetry at all when off."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from fastapi.testclient import TestClient
from opentelemetry.sdk.trace.export import in_memory_span_exporter as sdk_export

from service.core.settings import Settings
from service.protocols.app import create_app
from tests.support.launcher import Service, free_port

from .conftest import ROOT
from .support.graphs import write_tiny
from .support.images import sample_images, solid
from .support.service import wait_ready

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"
STAGES = ["receive", "decode", "queue_wait", "batch", "inference", "respond"]


@pytest.fixture(scope="module")
def traced(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TestClient, Any, int]]:
    repo = tmp_path_factory.mktemp("repo")
    write_tiny(repo, "tiny")
    exporter = sdk_export.InMemorySpanExporter()
    port = free_port()
    settings = Settings(model_repository=repo, grpc_port=port, max_delay_ms=20)
    app = create_app(settings, span_exporter=exporter)
    with TestClient(app) as client:
        wait_ready(client)
        yield client, exporter, port


def spans_of(exporter: Any, trace_id: int) -> dict[str, Any]:
    spans = [s for s in exporter.get_finished_spans() if s.context.trace_id == trace_id]
    return {s.name: s for s in spans}


def test_http_request_stages_are_spans_of_the_callers_trace(
    traced: tuple[TestClient, Any, int],
) -> None:
    client, exporter, _ = traced
    exporter.clear()
    files = [("file", (f"{i}.png", blob, "image/png")) for i, blob in enumerate(sample_images(3))]
    response = client.post("/classify?model=tiny", files=files, headers={"traceparent": PARENT})
    assert response.status_code == 200
    spans = spans_of(exporter, int(TRACE_ID, 16))
    assert sorted(spans) == sorted(STAGES)
    root = spans["receive"]
    assert root.parent is not None and root.parent.span_id == int("00f067aa0ba902b7", 16)
    assert root.attributes["model.name"] == "tiny" and root.attributes["model.version"] == 1
    assert root.attributes["http.response.status_code"] == 200
    for name in STAGES[1:]:
        parent = spans["batch"] if name == "inference" else root
        assert spans[name].parent.span_id == parent.context.span_id, name
        assert root.start_time <= spans[name].start_time <= spans[name].end_time <= root.end_time
    assert spans["batch"].attributes["batch.size"] == 3
    assert spans["inference"].attributes["model.version"] == 1
    # In order: decode, then the queue, then the batch, then the answer.
    assert spans["decode"].end_time <= spans["batch"].start_time
    assert spans["queue_wait"].end_time == spans["batch"].start_time
    assert spans["inference"].end_time <= spans["respond"].start_time


def test_requests_without_traceparent_start_their_own_trace(
    traced: tuple[TestClient, Any, int],
) -> None:
    client, exporter, _ = traced
    exporter.clear()
    headers = {"content-type": "image/png"}
    assert client.post("/embed?model=tiny", content=solid(70), headers=headers).status_code == 200
    roots = [s for s in exporter.get_finished_spans() if s.name == "receive"]
    assert len(roots) == 1 and roots[0].parent is None
    assert client.get("/healthz").status_code == 200  # probes are not traced
    assert len([s for s in exporter.get_finished_spans() if s.name == "receive"]) == 1


def test_grpc_requests_are_traced_alike(traced: tuple[TestClient, Any, int]) -> None:
    _, exporter, port = traced
    exporter.clear()
    triton = grpcclient.InferenceServerClient(url=f"127.0.0.1:{port}")
    tensor = grpcclient.InferInput("images", [2, 3, 16, 16], "FP32")
    tensor.set_data_from_numpy(np.zeros((2, 3, 16, 16), np.float32))
    triton.infer("tiny", [tensor], headers={"traceparent": PARENT})
    triton.close()
    spans = spans_of(exporter, int(TRACE_ID, 16))
    # A tensor needs no decoding; every other stage is there.
    assert sorted(spans) == sorted(set(STAGES) - {"decode"})
    assert spans["receive"].attributes["rpc.system"] == "grpc"
    assert spans["batch"].attributes["batch.size"] == 2


class _Receiver:
    """A real OTLP/gRPC trace receiver (the collector's protocol, from opentelemetry-proto)."""

    def __init__(self) -> None:
        from opentelemetry.proto.collector.trace.v1 import (
            trace_service_pb2,
            trace_service_pb2_grpc,
        )

        self.names: list[str] = []
        self.received = threading.Event()
        receiver = self

        class Servicer(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request: Any, context: Any) -> Any:  # noqa: N802 (the protocol's)
                for resource_spans in request.resource_spans:
                    for scope_spans in resource_spans.scope_spans:
                        receiver.names += [span.name for span in scope_spans.spans]
                receiver.received.set()
                return trace_service_pb2.ExportTraceServiceResponse()

        self.server = grpc.server(futures.ThreadPoolExecutor(2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Servicer(), self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()


@pytest.mark.parametrize("workers", [1, 2])
def test_the_service_sends_spans_to_an_otlp_endpoint(tmp_path: Path, workers: int) -> None:
    """With front-end workers too: the batch and inference spans come from the engine
    process's timings, sent back with each answer."""
    receiver = _Receiver()
    write_tiny(tmp_path / "repo", "tiny")
    endpoint = f"http://127.0.0.1:{receiver.port}"
    flags = (f"--otlp-endpoint={endpoint}", f"--workers={workers}")
    with Service(tmp_path / "repo", tmp_path / "log", *flags) as service:
        service.wait_ready()
        import httpx

        response = httpx.post(
            f"{service.url}/classify?model=tiny", content=solid(60),
            headers={"content-type": "image/png", "traceparent": PARENT}, timeout=30,
        )  # fmt: skip
        assert response.status_code == 200
        assert service.terminate() == 0  # flushes the exporter's batch
    assert receiver.received.wait(10), service.log()
    receiver.server.stop(0)
    assert set(STAGES) <= set(receiver.names), receiver.names


def test_tracing_off_builds_no_tracer(tmp_path: Path) -> None:
    """Off: no SDK, no exporter, no middleware. (FastAPI itself imports the OpenTelemetry API
    when it is installed; the SDK is what would cost.)"""
    write_tiny(tmp_path / "repo", "tiny")
    code = (
        "import sys; from service.protocols.app import create_app;"
        "from service.core.settings import Settings;"
        "from service.protocols.http_tracing import TracingMiddleware;"
        f"app = create_app(Settings(model_repository={str(tmp_path / 'repo')!r}, grpc_port=0));"
        "assert not app.state.tracing.enabled;"
        "assert all(m.cls is not TracingMiddleware for m in app.user_middleware);"
        "sdk = ('opentelemetry.sdk', 'opentelemetry.exporter');"
        "assert not [m for m in sys.modules if m.startswith(sdk)], 'imported'"
    )
    env = {"PATH": "/usr/bin:/bin"}
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60, env=env)
