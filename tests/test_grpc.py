"""The Open Inference Protocol over gRPC: Triton's own client (`tritonclient[grpc]`) against the
real service and the real ResNet-20 checkpoint, whose answers must equal /classify and /embed
(FP32 tensors, encoded images, the classification extension); then errors as gRPC status codes,
tokens (UNAUTHENTICATED), and the SIGTERM drain, on a tiny hand-made graph."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tests.support.launcher import Service

from .support.graphs import write_slow
from .support.images import sample_images, solid
from .test_oip import MODEL, TOLERANCE, preprocessed, softmax


@pytest.fixture(scope="module")
def client(server: Service) -> Iterator[Any]:
    triton = grpcclient.InferenceServerClient(url=f"127.0.0.1:{server.grpc_port}")
    yield triton
    triton.close()


def tensor_input(images: np.ndarray) -> Any:
    infer_input = grpcclient.InferInput("images", list(images.shape), "FP32")
    infer_input.set_data_from_numpy(images)
    return infer_input


def bytes_input(blobs: list[bytes]) -> Any:
    infer_input = grpcclient.InferInput("image_bytes", [len(blobs)], "BYTES")
    infer_input.set_data_from_numpy(np.array(blobs, dtype=np.object_))
    return infer_input


def outputs(class_count: int = 0) -> list[Any]:
    return [
        grpcclient.InferRequestedOutput("logits", class_count=class_count),
        grpcclient.InferRequestedOutput("embedding"),
    ]


def test_health_and_metadata(client: Any) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(MODEL) and client.is_model_ready(MODEL, "1")
    assert not client.is_model_ready(MODEL, "2")
    assert not client.is_model_ready("no-such-model")
    server = client.get_server_metadata(as_json=True)
    assert server["name"] == "resnet-serve"
    assert {"binary_tensor_data", "classification"} <= set(server["extensions"])
    metadata = client.get_model_metadata(MODEL, as_json=True)
    assert metadata["versions"] == ["1"] and metadata["platform"] == "onnxruntime_onnx"
    assert [(t["name"], t["datatype"], t["shape"]) for t in metadata["inputs"]] == [
        ("images", "FP32", ["-1", "3", "32", "32"]),
        ("image_bytes", "BYTES", ["-1"]),
    ]
    with pytest.raises(InferenceServerException) as caught:
        client.get_model_metadata("no-such-model")
    assert caught.value.status() == "StatusCode.NOT_FOUND"


def test_tensor_and_image_inputs_give_the_numbers_of_classify_and_embed(
    client: Any, server: Service, samples: list[bytes], ours: dict[str, Any]
) -> None:
    batches = server.metric("resnet_serve_batch_size_images_sum", model=MODEL)
    for infer_input in (tensor_input(preprocessed(samples)), bytes_input(samples)):
        result = client.infer(MODEL, [infer_input], outputs=outputs(), request_id="r1")
        assert result.get_response().id == "r1"
        assert result.get_response().model_version == "1"
        logits, embeddings = result.as_numpy("logits"), result.as_numpy("embedding")
        assert logits.shape == (len(samples), 10) and logits.dtype == np.float32
        np.testing.assert_allclose(softmax(logits), ours["scores"], rtol=0, atol=TOLERANCE)
        np.testing.assert_allclose(embeddings, ours["embeddings"], rtol=0, atol=TOLERANCE)
    # Through the same batcher and metrics as HTTP.
    after = server.metric("resnet_serve_batch_size_images_sum", model=MODEL)
    assert after - batches == 2 * len(samples)
    assert server.metric("resnet_serve_requests_total", endpoint="grpc_infer", status="200") >= 2


def test_classification_extension(client: Any, samples: list[bytes], ours: dict[str, Any]) -> None:
    result = client.infer(MODEL, [bytes_input(samples)], outputs=outputs(class_count=3))
    classes = result.as_numpy("logits")
    assert classes.shape == (len(samples), 3)
    for row, ranked in zip(classes, ours["ranked"], strict=True):
        fields = [entry.decode().split(":", 2) for entry in row]
        assert [(int(index), label) for _, index, label in fields] == ranked[:3]
    assert result.as_numpy("embedding").shape == (len(samples), 64)


@pytest.mark.parametrize(
    ("build", "code", "message"),
    [
        (lambda: [tensor_input(np.zeros((1, 3, 16, 16), np.float32))], "INVALID_ARGUMENT",
         "takes [-1, 3, 32, 32]"),
        (lambda: [tensor_input(np.full((1, 3, 32, 32), np.nan, np.float32))], "INVALID_ARGUMENT",
         "NaN"),
        (lambda: [bytes_input([b"not an image"])], "INVALID_ARGUMENT", "image 0"),
        (lambda: [bytes_input([b"x"] * 65)], "RESOURCE_EXHAUSTED", "max_images_per_request"),
        (lambda: [bytes_input([b"x"]), bytes_input([b"y"])], "INVALID_ARGUMENT",
         "exactly one input"),
    ],
)  # fmt: skip
def test_errors_map_to_grpc_status_codes(client: Any, build: Any, code: str, message: str) -> None:
    with pytest.raises(InferenceServerException) as caught:
        client.infer(MODEL, build())
    assert caught.value.status() == f"StatusCode.{code}", caught.value.message()
    assert message in caught.value.message()


def test_unknown_model_and_version(client: Any, samples: list[bytes]) -> None:
    for name, version in (("nope", ""), (MODEL, "7")):
        with pytest.raises(InferenceServerException) as caught:
            client.infer(name, [bytes_input(samples[:1])], model_version=version)
        assert caught.value.status() == "StatusCode.NOT_FOUND"


TOKEN = "grpc-token-0123456789abcdef"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    root = tmp_path_factory.mktemp("tiny")
    write_slow(root / "repo", "tiny")  # a black image keeps its engine busy for a while
    env = {"RESNET_SERVE_INFERENCE_TOKEN": TOKEN}
    flags = ("--no-protect-metrics",)
    with Service(root / "repo", root / "server.log", *flags, env=env) as service:
        service.wait_ready()
        yield service
    assert "Traceback" not in service.log() and TOKEN not in service.log(), service.log()


def test_tokens_on_grpc(tiny: Service) -> None:
    client = grpcclient.InferenceServerClient(url=f"127.0.0.1:{tiny.grpc_port}")
    blobs = sample_images(1)
    assert client.is_server_live() and client.is_server_ready()  # probes stay open
    for headers in (None, {"authorization": "Bearer wrong"}, {"authorization": TOKEN}):
        with pytest.raises(InferenceServerException) as caught:
            client.infer("tiny", [bytes_input(blobs)], headers=headers)
        assert caught.value.status() == "StatusCode.UNAUTHENTICATED"
        with pytest.raises(InferenceServerException):
            client.get_model_metadata("tiny", headers=headers)
    assert tiny.metric("resnet_serve_preprocess_duration_seconds_count") == 0
    assert tiny.metric("resnet_serve_unauthorized_total", protocol="grpc") == 6
    good = {"authorization": f"Bearer {TOKEN}"}
    result = client.infer("tiny", [bytes_input(blobs)], headers=good)
    assert result.as_numpy("logits").shape == (1, 4)
    client.close()


def test_sigterm_drains_accepted_grpc_calls(tiny: Service) -> None:
    """Calls queued when SIGTERM arrives (behind a black image that keeps the engine busy) are
    answered."""
    client = grpcclient.InferenceServerClient(url=f"127.0.0.1:{tiny.grpc_port}")
    good = {"authorization": f"Bearer {TOKEN}"}
    results: list[Any] = []
    done = threading.Event()

    def callback(result: Any, error: Any) -> None:
        results.append(error or result)
        if len(results) == 5:
            done.set()

    batches = tiny.metric("resnet_serve_batch_size_images_count")
    client.async_infer("tiny", [bytes_input([solid(0)])], callback, headers=good)
    tiny.wait_metric("resnet_serve_batch_size_images_count", lambda v: v > batches)  # busy
    for blob in sample_images(4, seed=3):
        client.async_infer("tiny", [bytes_input([blob])], callback, headers=good)
    tiny.wait_metric("resnet_serve_queue_depth_images", lambda v: v == 4)
    assert tiny.terminate() == 0, tiny.log()
    assert done.wait(30)
    assert all(not isinstance(r, InferenceServerException) for r in results), results
    assert all(r.as_numpy("logits").shape == (1, 4) for r in results)
    client.close()
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{tiny.url}/healthz", timeout=2)


def test_a_full_queue_is_unavailable_on_grpc(tmp_path: Path) -> None:
    """The batcher's bound holds for gRPC too: a call that does not fit is refused whole."""
    write_slow(tmp_path / "repo", "tiny")
    flags = ("--max-queue-images=2", "--max-batch-size=2", "--max-images-per-request=2")
    with Service(tmp_path / "repo", tmp_path / "server.log", *flags) as service:
        service.wait_ready()
        client = grpcclient.InferenceServerClient(url=f"127.0.0.1:{service.grpc_port}")
        answered = threading.Event()
        busy = threading.Event()
        client.async_infer("tiny", [bytes_input([solid(0)])], lambda **_: busy.set())
        service.wait_metric("resnet_serve_batch_size_images_count", lambda v: v == 1)
        client.async_infer(
            "tiny", [bytes_input(sample_images(1))], lambda **_: answered.set()
        )  # one image waits while the black one runs
        service.wait_metric("resnet_serve_queue_depth_images", lambda v: v == 1)
        with pytest.raises(InferenceServerException) as caught:
            client.infer("tiny", [bytes_input(sample_images(2, seed=1))])
        assert caught.value.status() == "StatusCode.UNAVAILABLE"
        assert "max_queue_images" in caught.value.message()
        assert answered.wait(30) and busy.wait(30)
        assert (
            service.metric("resnet_serve_requests_total", endpoint="grpc_infer", status="503") == 1
        )
        client.close()
        assert service.terminate() == 0
