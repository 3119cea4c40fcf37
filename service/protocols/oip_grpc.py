"""The Open Inference Protocol over gRPC (KServe v2 `inference.GRPCInferenceService`), served by
the same process and event loop as HTTP (grpc.aio), through the same data plane.

The protocol definition is Triton's `grpc_service.proto` as compiled in `tritonclient.grpc`
(`service_pb2`): it is KServe's `grpc_predict_v2.proto` (same package `inference`, same service
name, same messages and field numbers) plus Triton's extensions, so KServe and Triton clients
both speak to it. Reusing the generated, released messages avoids a code generation step. Only
KServe's RPCs are registered; Triton's extensions answer UNIMPLEMENTED (grpc does that for an
unknown method, without calling any code of ours).

ModelInfer arrives as bytes: the message is deserialized here (in a thread when it is large, so
that a big message cannot hold the event loop), converted once into the neutral `InferRequest`
(oip_codec) with the same checks as HTTP, run, and its outputs built straight into a
`ModelInferResponse` (`raw_output_contents`, the classification extension included). Errors
map to status codes as Triton maps them; 503s carry `retry-after` in the trailing metadata. A
client that cancels its call ends its request as a departed HTTP client does (499).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import grpc
import numpy as np
from google.protobuf.message import DecodeError
from tritonclient.grpc import service_pb2 as pb

from contract.repository import ModelEntry

from ..core.dataplane import DataPlane
from ..core.errors import MalformedRequestError, ServiceError, UnavailableError, clip
from ..core.serving import Model
from ..core.settings import Settings
from ..core.tracing import Tracing
from .auth import AccessPolicy
from .oip_codec import (
    EXTENSIONS,
    IMAGE_BYTES,
    MAX_DIMS,
    InferRequest,
    bytes_shape,
    check_count,
    check_input,
    check_version,
    deserialize_bytes,
    finite,
    fp32_from_raw,
    fp32_shape,
    model_metadata,
    output_sizes,
    output_tensors,
    requested_outputs,
    serialize,
)

log = logging.getLogger(__name__)

SERVICE = "inference.GRPCInferenceService"
OPEN_METHODS = frozenset({"ServerLive", "ServerReady"})  # probes, as /healthz and /readyz
ENDPOINT = "grpc_infer"
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
# HTTP/2 streams one connection may have open at once (grpc's default is unlimited).
GRPC_STREAMS_PER_CONNECTION = 128
# Messages above this are deserialized and converted in a thread, off the event loop.
_PARSE_INLINE_BYTES = 1 << 20


def status_code(error: ServiceError) -> grpc.StatusCode:
    return _CODES.get(error.status, grpc.StatusCode.INTERNAL)


# -- proto <-> the neutral request -------------------------------------------------------------


def parse_grpc(request: Any, entry: ModelEntry, max_images: int) -> InferRequest:
    """A ModelInferRequest, checked against the model as HTTP requests are. Every repeated
    field's length is checked (an O(1) question) before any of it is converted."""
    if len(request.inputs) != 1:
        raise MalformedRequestError(
            f"a request holds exactly one input ({entry.input_name!r} FP32 or "
            f"{IMAGE_BYTES!r} BYTES), not {len(request.inputs)}"
        )
    tensor = request.inputs[0]
    if len(tensor.shape) > MAX_DIMS:
        raise MalformedRequestError(
            f"input {clip(tensor.name)}: shape has more than {MAX_DIMS} dims"
        )
    shape = list(tensor.shape)
    check_input(entry, tensor.name, shape, max_images)
    raws = request.raw_input_contents
    if len(raws) > 1:
        raise MalformedRequestError(f"{len(raws)} raw_input_contents for one input")
    if raws and tensor.HasField("contents"):
        raise MalformedRequestError("an input has both contents and raw_input_contents")
    contents = tensor.contents
    images, blobs = None, []
    if tensor.name == entry.input_name:
        count = fp32_shape(entry, tensor.name, tensor.datatype, shape)
        if raws:
            images = fp32_from_raw(tensor.name, raws[0], shape)
        elif len(contents.fp32_contents) == count:
            values = np.asarray(contents.fp32_contents, dtype=np.float32)
            images = finite(tensor.name, values, shape)
        elif contents.fp32_contents:
            raise MalformedRequestError(
                f"input {clip(tensor.name)}: {len(contents.fp32_contents)} values for shape {shape}"
            )
        else:
            raise MalformedRequestError(f"input {clip(tensor.name)} has no data")
    else:
        count = bytes_shape(tensor.datatype, shape)
        if raws:
            found = deserialize_bytes(raws[0], count)
        elif contents.bytes_contents:
            if len(contents.bytes_contents) != count:
                check_count([b""] * min(len(contents.bytes_contents), count + 1), count, shape)
            found = list(contents.bytes_contents)
        else:
            raise MalformedRequestError(f"input {clip(tensor.name)} has no data")
        blobs = check_count(found, count, shape)
    return InferRequest(request.id or None, images, blobs, _outputs(request, entry))


def _outputs(request: Any, entry: ModelEntry) -> list[Any]:
    known = len(output_sizes(entry))
    if len(request.outputs) > known:
        raise MalformedRequestError(
            f"{len(request.outputs)} outputs requested; model {entry.name} has {known}"
        )
    asked = []
    for output in request.outputs:
        classes = 0
        if "classification" in output.parameters:
            parameter = output.parameters["classification"]
            if parameter.WhichOneof("parameter_choice") != "int64_param":
                raise MalformedRequestError(
                    f"output {clip(output.name)}: classification must be an int64 parameter"
                )
            classes = parameter.int64_param
        asked.append((output.name, classes, True))
    return requested_outputs(entry, asked, default_binary=True)


def encode_grpc(entry: ModelEntry, request: InferRequest, results: dict[str, np.ndarray]) -> Any:
    """The ModelInferResponse: every output as raw contents."""
    tensors = output_tensors(entry, request, results)
    return pb.ModelInferResponse(
        model_name=entry.name,
        model_version=str(entry.version),
        id=request.id or "",
        outputs=[
            pb.ModelInferResponse.InferOutputTensor(name=o.name, datatype=datatype, shape=shape)
            for o, datatype, shape, _ in tensors
        ],
        raw_output_contents=[serialize(data) for *_, data in tensors],
    )


def _deserialize(raw: bytes, max_images: int) -> Any:
    check_wire(raw, max_images)
    try:
        return pb.ModelInferRequest.FromString(raw)
    except DecodeError as exc:
        raise MalformedRequestError(f"not a ModelInferRequest: {exc}") from None


# -- the message's shape, checked on the wire before protobuf builds anything ------------------
#
# Protobuf turns two bytes on the wire into a whole message object (an empty `outputs` entry) or
# eight bytes (a one-byte varint of a packed int64 field), so a 60 MB message can take gigabytes
# to parse, holding the interpreter throughout. A legitimate ModelInferRequest has a handful of
# fields, one input, at most one BYTES element per image and its floats packed: `check_wire` walks
# the fields of the request, its inputs, outputs and contents (skipping every payload by its
# length, which costs nothing) and refuses any message with more fields than that, or with
# tensor contents of a kind the models do not take, before it is parsed.
_MAX_FIELDS = 64  # per message: names, parameters, one input, two outputs, raw contents
_MAX_PACKED_SHAPE_BYTES = MAX_DIMS * 10  # one varint of at most 10 bytes per dimension
_CONTENTS_TAKEN = {6: "fp32_contents", 8: "bytes_contents"}


def check_wire(raw: bytes, max_images: int) -> None:
    for number, wire, value in _fields(memoryview(raw), _MAX_FIELDS, "the request"):
        if number == 5 and wire == 2:
            _check_input(value, max_images)  # type: ignore[arg-type]
        elif number == 6 and wire == 2:
            for _ in _fields(value, _MAX_FIELDS, "a requested output"):  # type: ignore[arg-type]
                pass


def _check_input(tensor: memoryview, max_images: int) -> None:
    for number, wire, value in _fields(tensor, _MAX_FIELDS, "an input"):
        if number == 3 and wire == 2 and len(value) > _MAX_PACKED_SHAPE_BYTES:  # type: ignore[arg-type]
            raise MalformedRequestError(f"an input's shape has more than {MAX_DIMS} dims")
        if number == 5 and wire == 2:
            limit = max_images + _MAX_FIELDS  # one bytes_contents element per image
            for kind, _, _ in _fields(value, limit, "an input's contents"):  # type: ignore[arg-type]
                if kind not in _CONTENTS_TAKEN:
                    raise MalformedRequestError(
                        "input contents must be fp32_contents or bytes_contents (the models take "
                        "FP32 tensors or encoded images)"
                    )


def _fields(
    message: memoryview, limit: int, what: str
) -> Iterator[tuple[int, int, memoryview | int]]:
    """(field number, wire type, value) of each field of a serialized protobuf message."""
    position, count, size = 0, 0, len(message)
    while position < size:
        count += 1
        if count > limit:
            raise MalformedRequestError(f"{what} has more than {limit} protobuf fields")
        key, position = _varint(message, position)
        number, wire = key >> 3, key & 7
        value: memoryview | int
        if wire == 0:
            value, position = _varint(message, position)
        elif wire == 2:
            length, position = _varint(message, position)
            value, position = message[position : position + length], position + length
        elif wire in (1, 5):
            width = 8 if wire == 1 else 4
            value, position = message[position : position + width], position + width
        else:
            raise MalformedRequestError(f"{what}: protobuf wire type {wire} is not expected")
        if position > size:
            raise MalformedRequestError(f"{what} is truncated")
        yield number, wire, value


def _varint(message: memoryview, position: int) -> tuple[int, int]:
    result = shift = 0
    for index in range(position, min(position + 10, len(message))):
        byte = message[index]
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, index + 1
        shift += 7
    raise MalformedRequestError("a protobuf varint is malformed or truncated")


# -- the servicer ------------------------------------------------------------------------------


class TokenInterceptor(grpc.aio.ServerInterceptor):
    """Checks the inference token from the call's metadata before grpc reads the message: a
    refused call is answered UNAUTHENTICATED by a handler that takes no message, so nothing of
    it is received into memory or parsed. The probes (ServerLive, ServerReady) stay open."""

    def __init__(self, access: AccessPolicy) -> None:
        self.access = access

    async def intercept_service(
        self, continuation: Callable[[Any], Awaitable[Any]], details: Any
    ) -> Any:
        method = str(details.method).rsplit("/", 1)[-1]
        if method in OPEN_METHODS or not self.access.enabled:
            return await continuation(details)
        authorization = None
        for key, value in details.invocation_metadata or ():
            if key == "authorization":
                authorization = value.encode() if isinstance(value, str) else value
        reason = self.access.check("inference", authorization)
        if reason is None:
            return await continuation(details)
        self.access.refused("grpc", reason, f"gRPC {clip(method)}")
        message = f"{reason} bearer token: send metadata 'authorization: Bearer <inference token>'"

        async def refuse(requests: Any, context: Any) -> None:  # never iterates `requests`
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

        return grpc.stream_unary_rpc_method_handler(refuse)


class InferenceServicer:
    """KServe's v2 RPCs over one DataPlane."""

    def __init__(
        self, plane: DataPlane, access: AccessPolicy, tracing: Tracing, *, name: str, version: str
    ) -> None:
        self.plane, self.access, self.tracing = plane, access, tracing
        self.name, self.version = name, version

    # Probes are open, as /healthz and /readyz are on HTTP.
    async def ServerLive(self, request: Any, context: Any) -> Any:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: Any) -> Any:
        return pb.ServerReadyResponse(ready=self.plane.registry.ready)

    async def ModelReady(self, request: Any, context: Any) -> Any:
        try:  # an unknown model or version is not ready, as on HTTP (where it is a 404)
            model = check_version(self.plane.registry.resolve(request.name), request.version)
        except ServiceError:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=model.state == "ready")

    async def ServerMetadata(self, request: Any, context: Any) -> Any:
        return pb.ServerMetadataResponse(
            name=self.name, version=self.version, extensions=list(EXTENSIONS)
        )

    async def ModelMetadata(self, request: Any, context: Any) -> Any:
        model = await self._find(context, request.name, request.version)
        meta = model_metadata(model.entry)
        return pb.ModelMetadataResponse(
            name=meta["name"],
            versions=meta["versions"],
            platform=meta["platform"],
            inputs=[pb.ModelMetadataResponse.TensorMetadata(**t) for t in meta["inputs"]],
            outputs=[pb.ModelMetadataResponse.TensorMetadata(**t) for t in meta["outputs"]],
        )

    async def ModelInfer(self, raw: bytes, context: Any) -> Any:
        """`raw` is the serialized ModelInferRequest (see `handlers`); its token was checked
        before it was read (`TokenInterceptor`)."""
        metadata = dict(context.invocation_metadata() or ())
        with self.tracing.receive("ModelInfer", metadata, protocol="grpc") as span:
            try:
                with self.plane.bodies.hold(len(raw)):
                    return await self._infer(raw, span)
            except ServiceError as exc:
                await _abort(context, exc)
                raise  # unreachable: abort raises
            except Exception as exc:  # a bug: logged once with its traceback, details kept in
                log.error("ModelInfer failed unexpectedly", exc_info=exc)
                await context.abort(grpc.StatusCode.INTERNAL, "internal error")
                raise  # unreachable

    async def _infer(self, raw: bytes, span: Any) -> Any:
        plane, limit = self.plane, self.plane.settings.max_images_per_request
        large = len(raw) > _PARSE_INLINE_BYTES
        request = (
            await asyncio.to_thread(_deserialize, raw, limit) if large else _deserialize(raw, limit)
        )
        async with plane.request(request.model_name, ENDPOINT) as call:
            entry = check_version(call.model, request.model_version).entry
            span.set_model(entry.name, entry.version)
            if large:
                parsed = await asyncio.to_thread(parse_grpc, request, entry, limit)
            else:
                parsed = parse_grpc(request, entry, limit)
            if parsed.images is not None:
                logits, embeddings = await call.infer_tensors(parsed.images)
            else:
                logits, embeddings = await call.infer(parsed.blobs)
        results = {entry.logits_name: logits, entry.embedding_name: embeddings}
        return encode_grpc(entry, parsed, results)

    async def _find(self, context: Any, name: str, version: str) -> Model:
        try:
            return check_version(self.plane.registry.resolve(name), version)
        except ServiceError as exc:
            await _abort(context, exc)
            raise  # unreachable


async def _abort(context: Any, error: ServiceError) -> None:
    if isinstance(error, UnavailableError):
        context.set_trailing_metadata((("retry-after", error.headers.get("Retry-After", "1")),))
    await context.abort(status_code(error), error.message)


def handlers(servicer: InferenceServicer) -> grpc.GenericRpcHandler:
    """KServe's RPCs; ModelInfer takes its message as bytes, deserialized by the servicer."""

    def unary(method: Any, request: Any, response: Any) -> grpc.RpcMethodHandler:
        return grpc.unary_unary_rpc_method_handler(
            method,
            request_deserializer=request.FromString if request is not None else None,
            response_serializer=response.SerializeToString,
        )

    s = servicer
    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "ServerLive": unary(s.ServerLive, pb.ServerLiveRequest, pb.ServerLiveResponse),
            "ServerReady": unary(s.ServerReady, pb.ServerReadyRequest, pb.ServerReadyResponse),
            "ModelReady": unary(s.ModelReady, pb.ModelReadyRequest, pb.ModelReadyResponse),
            "ServerMetadata": unary(
                s.ServerMetadata, pb.ServerMetadataRequest, pb.ServerMetadataResponse
            ),
            "ModelMetadata": unary(
                s.ModelMetadata, pb.ModelMetadataRequest, pb.ModelMetadataResponse
            ),
            "ModelInfer": unary(s.ModelInfer, None, pb.ModelInferResponse),
        },
    )


async def serve(
    settings: Settings,
    plane: DataPlane,
    access: AccessPolicy,
    tracing: Tracing,
    *,
    name: str,
    version: str,
    shared_port: bool = False,
) -> tuple[grpc.aio.Server, int]:
    """The gRPC server on `settings.grpc_port`, started on the running loop, and its port.
    With `shared_port` (the front-end workers of `--workers N`) every worker binds the port
    with SO_REUSEPORT and the kernel spreads connections over them; otherwise a port already
    taken is an error."""
    server = grpc.aio.server(
        interceptors=[TokenInterceptor(access)],
        # Calls past this many at once are refused at once (RESOURCE_EXHAUSTED); with the
        # receive limit, it bounds what grpc can hold in memory before a handler runs.
        maximum_concurrent_rpcs=settings.grpc_max_concurrent_rpcs,
        options=[
            # A message over this is refused from its length prefix, unread.
            ("grpc.max_receive_message_length", settings.grpc_max_message_bytes),
            ("grpc.max_send_message_length", -1),
            ("grpc.max_concurrent_streams", GRPC_STREAMS_PER_CONNECTION),
            # Identity only: a compressed message is refused (UNIMPLEMENTED, "Compression
            # algorithm 'gzip' is disabled") unread. grpcio inflates on the event loop's thread
            # with the GIL held: a gzip bomb inflated up to the receive limit held every request
            # of the process for 150-190 ms (docs/reliability.md, H1). Images and float
            # tensors hardly compress; tritonclient sends uncompressed by default.
            ("grpc.compression_enabled_algorithms_bitset", 1),
            ("grpc.so_reuseport", int(shared_port)),
        ],
    )
    servicer = InferenceServicer(plane, access, tracing, name=name, version=version)
    server.add_generic_rpc_handlers((handlers(servicer),))
    host = f"[{settings.host}]" if ":" in settings.host else settings.host  # IPv6 in brackets
    address = f"{host}:{settings.grpc_port}"
    port = server.add_insecure_port(address)
    await server.start()
    log.info("Open Inference Protocol over gRPC on %s", address)
    return server, port
