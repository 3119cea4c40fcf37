"""`bench http --protocol grpc`: the same load through the Open Inference Protocol over gRPC.

Each payload is a serialized `ModelInferRequest` built once up front (encoded images as the
`image_bytes` BYTES input; for `classify`, the classification extension's top 5 on `logits`, as
/classify?top_k=5 answers); one grpc.aio channel (HTTP/2, calls multiplexed) sends them as bytes
and reads each answer's batch size from its output shape. gRPC status codes are recorded as the
HTTP statuses they stand for (UNAVAILABLE 503, DEADLINE_EXCEEDED 504, ...).
"""

from __future__ import annotations

import struct

import grpc
from tritonclient.grpc import service_pb2 as pb

from .wire import Payload

METHOD = "/inference.GRPCInferenceService/ModelInfer"
_LENGTH = struct.Struct("<I")
_STATUSES = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 413,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


def grpc_payloads(payloads: tuple[tuple[bytes, ...], ...], model: str, endpoint: str) -> tuple[
    Payload, ...
]:  # fmt: skip
    """One serialized ModelInferRequest per group of encoded images."""
    built = []
    for blobs in payloads:
        raw = b"".join(_LENGTH.pack(len(b)) + b for b in blobs)
        output = pb.ModelInferRequest.InferRequestedOutputTensor(name="embedding")
        if endpoint == "classify":
            output = pb.ModelInferRequest.InferRequestedOutputTensor(name="logits")
            output.parameters["classification"].int64_param = 5
        request = pb.ModelInferRequest(
            model_name=model,
            inputs=[
                pb.ModelInferRequest.InferInputTensor(
                    name="image_bytes", datatype="BYTES", shape=[len(blobs)]
                )
            ],
            outputs=[output],
            raw_input_contents=[raw],
        )
        built.append(Payload(request.SerializeToString(), "application/grpc", len(blobs)))
    return tuple(built)


class GrpcPoster:
    """Calls ModelInfer on one channel; answers as (status, JSON with one result per image)."""

    def __init__(self, target: str, timeout_s: float) -> None:
        self._channel = grpc.aio.insecure_channel(
            target, options=[("grpc.max_receive_message_length", -1)]
        )
        self._call = self._channel.unary_unary(METHOD)  # bytes in, bytes out
        self._timeout_s = timeout_s

    async def __aenter__(self) -> GrpcPoster:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._channel.close()

    async def post(self, payload: Payload) -> tuple[int, bytes]:
        try:
            answer = await self._call(payload.body, timeout=self._timeout_s)
        except grpc.aio.AioRpcError as exc:
            return _STATUSES.get(exc.code(), 500), b""
        response = pb.ModelInferResponse.FromString(answer)
        count = response.outputs[0].shape[0] if response.outputs else 0
        # The shape `_results` checks for every protocol: one entry per image.
        return 200, b'{"predictions": [' + b",".join([b"0"] * count) + b"]}"
