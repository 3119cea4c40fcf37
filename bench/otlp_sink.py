"""`python -m bench.otlp_sink --port 4317`: an OTLP/gRPC trace receiver that only counts spans,
so that `bench http` can measure the service with tracing on (RESNET_SERVE_OTLP_ENDPOINT) on a
machine without a collector. Prints the count every 5 s and at exit."""

from __future__ import annotations

import argparse
import signal
import threading
from concurrent import futures
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


class _Counter(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.spans = 0

    def Export(self, request: Any, context: Any) -> Any:  # noqa: N802 (the protocol's name)
        self.spans += sum(
            len(scope.spans)
            for resource in request.resource_spans
            for scope in resource.scope_spans
        )
        return trace_service_pb2.ExportTraceServiceResponse()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.otlp_sink", description=__doc__)
    parser.add_argument("--port", type=int, default=4317)
    args = parser.parse_args()
    counter = _Counter()
    server = grpc.server(futures.ThreadPoolExecutor(2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(counter, server)
    server.add_insecure_port(f"127.0.0.1:{args.port}")
    server.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    while not stop.wait(5):
        print(f"spans received: {counter.spans}", flush=True)
    server.stop(0)
    print(f"spans received: {counter.spans}", flush=True)


if __name__ == "__main__":
    main()
