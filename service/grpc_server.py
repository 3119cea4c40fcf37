"""The Open Inference Protocol over gRPC (KServe v2 `inference.GRPCInferenceService`), served by
the same process and event loop as HTTP (grpc.aio), through the same data plane.

The protocol definition is Triton's `grpc_service.proto` as compiled in `tritonclient.grpc`
(`service_pb2` / `service_pb2_grpc`): it is KServe's `grpc_predict_v2.proto` (same package
`inference`, same service name, same messages and field numbers) plus Triton's extensions, so
KServe and Triton clients both speak to it. Reusing the generated, released stubs avoids a code
generation step and generated code in this repository; the RPCs beyond KServe's set answer
UNIMPLEMENTED (the servicer's base class does that).

A ModelInfer request is turned into the shape the HTTP codec validates (`oip_codec.parse_request`:
every tensor as raw bytes), so both protocols share one set of checks; its outputs come back
as `raw_output_contents`, the classification extension included. Errors map to status codes as
Triton maps them; 503s carry `retry-after` in the trailing metadata.
"""

from __future__ import annotations

import logging
import struct
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from .auth import AccessPolicy, Scope
from .errors import (
    MalformedRequestError,
    ModelNotFoundError,
    ServiceError,
    UnavailableError,
)
from .oip import EXTENSIONS, describe
from .oip_codec import IMAGE_BYTES, ParsedRequest, parse_request
from .settings import Settings
from .tracing import Tracing

if TYPE_CHECKING:
    from .dataplane import DataPlane
from .lifecycle import ServedModel

log = logging.getLogger(__name__)

_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    499: grpc.StatusCode.CANCELLED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}
_LENGTH = struct.Struct("<I")
ENDPOINT = "grpc_infer"


def status_code(error: ServiceError) -> grpc.StatusCode:
    return _CODES.get(error.status, grpc.StatusCode.INTERNAL)


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """The KServe v2 RPCs over one DataPlane."""

    def __init__(
        self,
        server: DataPlane,
        access: AccessPolicy,
        tracing: Tracing,
        *,
        name: str,
        version: str,
    ) -> None:
        self.server, self.access, self.tracing = server, access, tracing
        self.name, self.version = name, version

    # Probes are open, as /healthz and /readyz are on HTTP.
    async def ServerLive(self, request: Any, context: Any) -> Any:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: Any) -> Any:
        return pb.ServerReadyResponse(ready=self.server.ready)

    async def ModelReady(self, request: Any, context: Any) -> Any:
        await self._authorize(context, "inference")
        try:  # an unknown model or version is not ready, as on HTTP (where it is a 404)
            model = _check_version(self.server.resolve(request.name), request.version)
        except ServiceError:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=model.state == "ready")

    async def ServerMetadata(self, request: Any, context: Any) -> Any:
        await self._authorize(context, "inference")
        return pb.ServerMetadataResponse(
            name=self.name, version=self.version, extensions=list(EXTENSIONS)
        )

    async def ModelMetadata(self, request: Any, context: Any) -> Any:
        await self._authorize(context, "inference")
        model = await self._find(context, request.name, request.version)
        meta = describe(model.entry)
        return pb.ModelMetadataResponse(
            name=meta["name"],
            versions=meta["versions"],
            platform=meta["platform"],
            inputs=[pb.ModelMetadataResponse.TensorMetadata(**t) for t in meta["inputs"]],
            outputs=[pb.ModelMetadataResponse.TensorMetadata(**t) for t in meta["outputs"]],
        )

    async def ModelInfer(self, request: Any, context: Any) -> Any:
        await self._authorize(context, "inference")
        server = self.server
        metadata = dict(context.invocation_metadata() or ())
        with self.tracing.receive("ModelInfer", metadata, protocol="grpc") as span:
            try:
                async with server.request(request.model_name, ENDPOINT) as call:
                    entry = _check_version(call.model, request.model_version).entry
                    span.set_model(entry.name, entry.version)
                    parsed = _parse(request, entry, server.settings)
                    if parsed.images is not None:
                        logits, embeddings = await call.infer_tensors(parsed.images)
                    else:
                        logits, embeddings = await call.infer(parsed.blobs)
                return _response(entry, request, parsed, logits, embeddings)
            except ServiceError as exc:
                await _abort(context, exc)
                raise  # unreachable: abort raises

    async def _authorize(self, context: Any, scope: Scope) -> None:
        if not self.access.enabled:
            return
        authorization = None
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                authorization = value.encode() if isinstance(value, str) else value
        reason = self.access.check(scope, authorization)
        if reason is not None:
            self.access.refused("grpc", reason, "gRPC")
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                f"{reason} bearer token: send metadata 'authorization: Bearer <{scope} token>'",
            )

    async def _find(self, context: Any, name: str, version: str) -> ServedModel:
        try:
            return _check_version(self.server.resolve(name), version)
        except ServiceError as exc:
            await _abort(context, exc)
            raise  # unreachable


async def _abort(context: Any, error: ServiceError) -> None:
    if isinstance(error, UnavailableError):
        context.set_trailing_metadata((("retry-after", error.headers.get("Retry-After", "1")),))
    await context.abort(status_code(error), error.message)


def _check_version(model: ServedModel, version: str) -> ServedModel:
    if version and version != str(model.entry.version):
        raise ModelNotFoundError(
            f"model {model.entry.name!r} has no version {version!r}; "
            f"it serves version {model.entry.version}"
        )
    return model


def _parameter(value: Any) -> Any:
    kind = value.WhichOneof("parameter_choice")
    return None if kind is None else getattr(value, kind)


def _parse(request: Any, entry: Any, settings: Settings) -> ParsedRequest:
    """The request in the codec's terms (validated by the same `InferenceRequest` model and
    checks as HTTP): one input as raw bytes, outputs as asked."""
    if len(request.inputs) != 1:
        raise MalformedRequestError(
            f"a request holds exactly one input ({entry.input_name!r} FP32 or "
            f"{IMAGE_BYTES!r} BYTES), not {len(request.inputs)}"
        )
    tensor = request.inputs[0]
    if request.raw_input_contents:
        if len(request.raw_input_contents) != 1:
            raise MalformedRequestError(
                f"{len(request.raw_input_contents)} raw_input_contents for one input"
            )
        if tensor.HasField("contents"):
            raise MalformedRequestError("an input has both contents and raw_input_contents")
        raw = request.raw_input_contents[0]
    elif tensor.contents.fp32_contents:
        raw = np.asarray(tensor.contents.fp32_contents, dtype="<f4").tobytes()
    elif tensor.contents.bytes_contents:
        raw = b"".join(_LENGTH.pack(len(b)) + b for b in tensor.contents.bytes_contents)
    else:
        raise MalformedRequestError(f"input {tensor.name!r} has no data")
    outputs = []
    for output in request.outputs:
        parameters = {k: _parameter(v) for k, v in output.parameters.items()}
        outputs.append({"name": output.name, "parameters": parameters})
    payload = {
        "id": request.id or None,
        "parameters": {"binary_data_output": True},
        "inputs": [
            {
                "name": tensor.name,
                "datatype": tensor.datatype,
                "shape": list(tensor.shape),
                "parameters": {"binary_data_size": len(raw)},
            }
        ],
        "outputs": [{**o, "parameters": {**o["parameters"], "binary_data": True}} for o in outputs],
    }
    return parse_request(payload, memoryview(raw), entry, settings.max_images_per_request)


def _response(
    entry: Any, request: Any, parsed: Any, logits: np.ndarray, embeddings: np.ndarray
) -> Any:
    from .oip_codec import encode_outputs

    results = {entry.logits_name: logits, entry.embedding_name: embeddings}
    header, chunks = encode_outputs(entry, parsed, results)
    return pb.ModelInferResponse(
        model_name=entry.name,
        model_version=str(entry.version),
        id=request.id,
        outputs=[
            pb.ModelInferResponse.InferOutputTensor(
                name=o["name"], datatype=o["datatype"], shape=o["shape"]
            )
            for o in header["outputs"]
        ],
        raw_output_contents=chunks,
    )


async def serve(
    settings: Settings,
    server: DataPlane,
    access: AccessPolicy,
    tracing: Tracing,
    *,
    name: str,
    version: str,
) -> tuple[grpc.aio.Server, int]:
    """The gRPC server on `settings.grpc_port`, started on the running loop, and its port."""
    limit = settings.max_request_bytes
    grpc_server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", -1),
            ("grpc.so_reuseport", 0),
        ]
    )
    servicer = InferenceServicer(server, access, tracing, name=name, version=version)
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, grpc_server)
    address = f"{settings.host}:{settings.grpc_port}"
    port = grpc_server.add_insecure_port(address)
    await grpc_server.start()
    log.info("Open Inference Protocol over gRPC on %s", address)
    return grpc_server, port
