"""The Open Inference Protocol (/v2): Triton's own HTTP client (`tritonclient[http]`) against the
real service with the real ResNet-20 checkpoint, whose answers must equal /classify and /embed;
then every protocol error, in-process on a tiny hand-made graph."""

from __future__ import annotations

import gzip
import io
import json
import socket
import struct
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.core.settings import Settings
from service.protocols.app import create_app
from tests.support.launcher import Service

from .conftest import normalize_cifar
from .support.graphs import slow_graph, write_entry
from .support.images import solid
from .support.service import wait_ready, write_tiny_model

httpclient = pytest.importorskip(
    "tritonclient.http", reason="tritonclient[http] (a dev dependency) is not installed"
)
from tritonclient.utils import InferenceServerException  # noqa: E402

MODEL = "cifar_resnet20"
TOLERANCE = 1e-5
HEADER_LENGTH = "Inference-Header-Content-Length"


@pytest.fixture(scope="module")
def client(server: Service) -> Iterator[Any]:
    triton = httpclient.InferenceServerClient(url=f"127.0.0.1:{server.port}")
    yield triton
    triton.close()


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits.astype(np.float64) - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def preprocessed(samples: list[bytes]) -> np.ndarray:
    """The samples as the model's input, computed here independently of the service."""
    pixels = [np.asarray(Image.open(io.BytesIO(blob)).convert("RGB")) for blob in samples]
    return np.ascontiguousarray(normalize_cifar(np.stack(pixels)))


def tensor_input(images: np.ndarray, *, binary: bool) -> Any:
    infer_input = httpclient.InferInput("images", list(images.shape), "FP32")
    infer_input.set_data_from_numpy(images, binary_data=binary)
    return infer_input


def bytes_input(blobs: list[bytes]) -> Any:
    infer_input = httpclient.InferInput("image_bytes", [len(blobs)], "BYTES")
    infer_input.set_data_from_numpy(np.array(blobs, dtype=np.object_), binary_data=True)
    return infer_input


def outputs(*, binary: bool, class_count: int = 0) -> list[Any]:
    return [
        httpclient.InferRequestedOutput("logits", binary_data=binary, class_count=class_count),
        httpclient.InferRequestedOutput("embedding", binary_data=binary),
    ]


def test_health_and_metadata(client: Any) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready(MODEL)
    assert client.is_model_ready(MODEL, "1")
    assert not client.is_model_ready(MODEL, "2")
    assert not client.is_model_ready("no-such-model")

    server = client.get_server_metadata()
    assert server["name"] == "resnet-serve"
    assert server["version"]
    assert {"binary_tensor_data", "classification"} <= set(server["extensions"])

    for metadata in (client.get_model_metadata(MODEL), client.get_model_metadata(MODEL, "1")):
        assert metadata["name"] == MODEL
        assert metadata["versions"] == ["1"]
        assert metadata["platform"] == "onnxruntime_onnx"
        assert metadata["inputs"] == [
            {"name": "images", "datatype": "FP32", "shape": [-1, 3, 32, 32]},
            {"name": "image_bytes", "datatype": "BYTES", "shape": [-1]},
        ]
        assert metadata["outputs"] == [
            {"name": "logits", "datatype": "FP32", "shape": [-1, 10]},
            {"name": "embedding", "datatype": "FP32", "shape": [-1, 64]},
        ]
    with pytest.raises(InferenceServerException, match="no-such-model") as caught:
        client.get_model_metadata("no-such-model")
    assert caught.value.status() == "404"


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_preprocessed_tensor_gives_the_numbers_of_classify_and_embed(
    client: Any, server: Service, samples: list[bytes], ours: dict[str, Any], binary: bool
) -> None:
    images = preprocessed(samples)
    batches = server.metric("resnet_serve_batch_size_images_sum", model=MODEL)
    result = client.infer(
        MODEL, [tensor_input(images, binary=binary)], outputs=outputs(binary=binary)
    )
    sent = result.get_response()["outputs"]
    assert all(("binary_data_size" in o.get("parameters", {})) == binary for o in sent)
    logits, embeddings = result.as_numpy("logits"), result.as_numpy("embedding")
    assert logits.shape == (len(samples), 10) and logits.dtype == np.float32
    np.testing.assert_allclose(softmax(logits), ours["scores"], rtol=0, atol=TOLERANCE)
    np.testing.assert_allclose(embeddings, ours["embeddings"], rtol=0, atol=TOLERANCE)
    # The tensor went through the model's batcher, like decoded images do.
    after = server.metric("resnet_serve_batch_size_images_sum", model=MODEL)
    assert after - batches == len(samples)
    assert server.metric("resnet_serve_requests_total", endpoint="v2_infer", status="200") >= 1


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_encoded_images_give_the_numbers_of_classify_and_embed(
    client: Any, samples: list[bytes], ours: dict[str, Any], binary: bool
) -> None:
    result = client.infer(MODEL, [bytes_input(samples)], outputs=outputs(binary=binary))
    logits = result.as_numpy("logits")
    np.testing.assert_allclose(softmax(logits), ours["scores"], rtol=0, atol=TOLERANCE)
    np.testing.assert_allclose(result.as_numpy("embedding"), ours["embeddings"], atol=TOLERANCE)

    top3 = client.infer(
        MODEL, [bytes_input(samples)], outputs=outputs(binary=binary, class_count=3)
    )
    classes = top3.as_numpy("logits")
    assert classes.shape == (len(samples), 3)
    for row, ranked, row_logits in zip(classes, ours["ranked"], logits, strict=True):
        # Binary BYTES come back as bytes, JSON ones as str (the client's behaviour with Triton).
        fields = [(e.decode() if isinstance(e, bytes) else e).split(":", 2) for e in row]
        assert [(int(index), label) for _, index, label in fields] == ranked[:3]
        values = [float(value) for value, _, _ in fields]
        np.testing.assert_allclose(values, row_logits[[int(f[1]) for f in fields]], atol=1e-6)


def test_compressed_request_and_request_id(client: Any, samples: list[bytes]) -> None:
    result = client.infer(
        MODEL,
        [bytes_input(samples[:2])],
        outputs=[httpclient.InferRequestedOutput("embedding")],
        request_id="req-7",
        request_compression_algorithm="gzip",
    )
    assert result.get_response()["id"] == "req-7"
    assert result.as_numpy("embedding").shape == (2, 64)
    assert result.as_numpy("logits") is None  # only what was asked for


@pytest.mark.parametrize(
    ("inputs", "status", "message"),
    [
        (lambda s: [_input("images", [1, 3, 16, 16], "FP32")], "400", "takes [-1, 3, 32, 32]"),
        (lambda s: [_input("images", [1, 3, 32, 32], "FP64")], "400", "must be FP32"),
        (lambda s: [_input("pixels", [1, 3, 32, 32], "FP32")], "400", "unknown input 'pixels'"),
        (lambda s: [bytes_input([b"not an image"])], "400", "image 0: not an image"),
        (lambda s: [bytes_input(s[:1]), bytes_input(s[:1])], "400", "exactly one input"),
    ],
    ids=["shape", "datatype", "name", "undecodable", "two-inputs"],
)
def test_client_sees_errors_with_their_status(
    client: Any, samples: list[bytes], inputs: Any, status: str, message: str
) -> None:
    with pytest.raises(InferenceServerException) as caught:
        client.infer(MODEL, inputs(samples))
    assert caught.value.status() == status
    assert message in caught.value.message()


def test_client_sees_unknown_models_and_outputs(client: Any, samples: list[bytes]) -> None:
    with pytest.raises(InferenceServerException) as caught:
        client.infer("no-such-model", [bytes_input(samples[:1])])
    assert caught.value.status() == "404"
    with pytest.raises(InferenceServerException) as caught:
        client.infer(MODEL, [bytes_input(samples[:1])], model_version="3")
    assert caught.value.status() == "404"
    with pytest.raises(InferenceServerException, match="unknown output 'probs'") as caught:
        client.infer(
            MODEL, [bytes_input(samples[:1])], outputs=[httpclient.InferRequestedOutput("probs")]
        )
    assert caught.value.status() == "400"


def _input(name: str, shape: list[int], datatype: str) -> Any:
    infer_input = httpclient.InferInput(name, shape, datatype)
    dtype = np.float64 if datatype == "FP64" else np.float32
    infer_input.set_data_from_numpy(np.zeros(shape, dtype=dtype))
    return infer_input


# In-process, on a tiny graph: what a well-behaved client never sends.


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    repo = tmp_path_factory.mktemp("tiny-repo")
    write_tiny_model(repo, "tiny", num_classes=4)
    settings = Settings(
        model_repository=repo, max_delay_ms=1, intra_op_threads=1, max_images_per_request=4
    )
    with TestClient(create_app(settings), raise_server_exceptions=False) as test_client:
        wait_ready(test_client, path="/v2/health/ready")
        yield test_client


def tensor(shape: list[int], **extra: Any) -> dict[str, Any]:
    values = np.zeros(shape, dtype=np.float32).ravel().tolist() if min(shape) >= 0 else []
    return {"name": "images", "datatype": "FP32", "shape": shape, "data": values} | extra


def encoded(shape: list[int], **extra: Any) -> dict[str, Any]:
    return {"name": "image_bytes", "datatype": "BYTES", "shape": shape} | extra


def request(*inputs: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"inputs": list(inputs), **extra}


def as_json(body: dict[str, Any]) -> tuple[bytes, dict[str, str]]:
    return json.dumps(body).encode(), {}


def as_binary(header: dict[str, Any], data: bytes) -> tuple[bytes, dict[str, str]]:
    text = json.dumps(header).encode()
    return text + data, {HEADER_LENGTH: str(len(text))}


ONE = [1, 3, 8, 8]
NANS = np.full(192, np.nan, dtype=np.float32).tobytes()
TOP5 = [{"name": "logits", "parameters": {"classification": 5}}]
TWICE = [{"name": "logits"}, {"name": "logits"}]
TOP_NEG = [{"name": "logits", "parameters": {"classification": -1}}]
TOP_STR = [{"name": "logits", "parameters": {"classification": "3"}}]
PROTOCOL_ERRORS = {
    "not-json": ((b"[1, 2", {}), 400, "not valid JSON"),
    "not-object": ((b"[]", {}), 400, "must be a JSON object"),
    "no-input": (as_json(request()), 400, "exactly one input"),
    "datatype": (as_json(request(tensor(ONE, datatype="INT8"))), 400, "must be FP32"),
    "shape": (as_json(request(tensor([1, 3, 4, 4]))), 400, "takes [-1, 3, 8, 8]"),
    "empty-batch": (as_json(request(tensor([0, 3, 8, 8]))), 400, "batch is empty"),
    "negative-dim": (as_json(request(tensor([1, -3, 8, 8]))), 400, "non-negative integers"),
    "too-many": (as_json(request(tensor([5, 3, 8, 8]))), 413, "max_images_per_request=4"),
    "count": (as_json(request(tensor(ONE, data=[1.0]))), 400, "1 values for shape"),
    "ragged": (as_json(request(tensor(ONE, data=[[1], [2, 3]]))), 400, "not an array"),
    "id": (as_json(request(tensor(ONE), id=7)), 400, '"id" must be a string'),
    "twice": (as_json(request(tensor(ONE), outputs=TWICE)), 400, "requested twice"),
    "top-k": (as_json(request(tensor(ONE), outputs=TOP5)), 400, "an integer in 0..4"),
    "json-bytes": (as_json(request(encoded([1], data=[1]))), 400, "JSON data must be strings"),
    # Structure errors (pydantic's `InferenceRequest`, strict), each as a message naming the field.
    "binary-output": (
        as_json(request(tensor(ONE), parameters={"binary_data_output": 1})),
        400,
        '"binary_data_output" must be a boolean',
    ),
    "outputs-object": (
        as_json(request(tensor(ONE), outputs={"name": "logits"})),
        400,
        '"outputs" must be a list of objects',
    ),
    "top-k-negative": (as_json(request(tensor(ONE), outputs=TOP_NEG)), 400, "an integer in 0..4"),
    "top-k-string": (as_json(request(tensor(ONE), outputs=TOP_STR)), 400, "an integer in 0..4"),
    "shape-bool": (
        as_json(request(tensor(ONE) | {"shape": [True, 3, 8, 8]})),  # JSON true is not 1
        400,
        "non-negative integers",
    ),
    "input-parameters": (
        as_json(request(tensor(ONE, parameters=[]))),
        400,
        "input 'images': parameters must be a JSON object",
    ),
    "no-name": (as_json(request({"datatype": "FP32", "shape": ONE})), 400, "unknown input None"),
    "bytes-shape": (as_json(request(encoded([2, 2], data=[]))), 400, "takes [-1] (or [-1, 1])"),
    "binary-size": (
        as_binary(request(tensor(ONE, parameters={"binary_data_size": 4})), bytes(4)),
        400,
        "4 bytes of binary data for 192 FP32 values",
    ),
    "binary-mismatch": (
        as_binary(request(tensor(ONE, parameters={"binary_data_size": 8})), bytes(4)),
        400,
        "binary_data_size 8 is not the 4 bytes",
    ),
    "binary-undeclared": (
        as_binary(request(tensor(ONE)), bytes(4)),
        400,
        "no input has binary_data_size",
    ),
    "nan": (
        as_binary(request(tensor(ONE, parameters={"binary_data_size": 768})), NANS),
        400,
        "NaN or infinite",
    ),
    "bytes-truncated": (
        as_binary(
            request(encoded([1], parameters={"binary_data_size": 6})), struct.pack("<I", 9) + b"ab"
        ),
        400,
        "ends inside an element",
    ),
    "header-length": ((b"{}", {HEADER_LENGTH: "99"}), 400, "is not in 1..2"),
    "encoding": ((b"{}", {"Content-Encoding": "br"}), 415, "unsupported Content-Encoding"),
    "not-gzip": ((b"{}", {"Content-Encoding": "gzip"}), 400, "not valid gzip"),
    "cut-gzip": (
        (gzip.compress(b"{}")[:-6], {"Content-Encoding": "gzip"}),
        400,
        "ends before its end of stream",
    ),
}


@pytest.mark.parametrize(
    ("sent", "status", "message"), PROTOCOL_ERRORS.values(), ids=PROTOCOL_ERRORS.keys()
)
def test_protocol_errors(
    tiny: TestClient, sent: tuple[bytes, dict[str, str]], status: int, message: str
) -> None:
    body, headers = sent
    response = tiny.post("/v2/models/tiny/infer", content=body, headers=headers)
    assert response.status_code == status, response.text
    assert set(response.json()) == {"error"}
    assert message in response.json()["error"]


def test_json_and_binary_bodies_and_classification_format(tiny: TestClient) -> None:
    rng = np.random.default_rng(0)
    images = rng.normal(size=(2, 3, 8, 8)).astype(np.float32)
    as_json = tensor([2, 3, 8, 8], data=images.tolist())  # nested, as the spec allows
    answer = tiny.post("/v2/models/tiny/infer", json=request(as_json, id="a"))
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert (body["model_name"], body["model_version"], body["id"]) == ("tiny", "1", "a")
    logits = np.array(body["outputs"][0]["data"], dtype=np.float32).reshape(2, 4)
    embedding = np.array(body["outputs"][1]["data"], dtype=np.float32).reshape(2, 3)
    np.testing.assert_allclose(embedding, images.mean(axis=(2, 3)), atol=1e-6)

    header = request(
        tensor([2, 3, 8, 8], parameters={"binary_data_size": images.nbytes}),
        parameters={"binary_data_output": True},
        outputs=[
            {"name": "logits", "parameters": {"classification": 2, "binary_data": False}},
            {"name": "embedding"},
        ],
    )
    content, headers = as_binary(header, images.tobytes())
    answer = tiny.post("/v2/models/tiny/infer", content=content, headers=headers)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "application/octet-stream"
    size = int(answer.headers[HEADER_LENGTH])
    head = json.loads(answer.content[:size])
    top2, raw = head["outputs"]
    assert top2["datatype"] == "BYTES" and top2["shape"] == [2, 2]
    for row, strings in zip(logits, np.array(top2["data"]).reshape(2, 2), strict=True):
        best = np.argsort(-row)[:2]
        assert [s.split(":", 1)[1] for s in strings] == [f"{i}:class{i}" for i in best]
        assert [np.float32(s.split(":")[0]) for s in strings] == list(row[best])
    assert raw["parameters"] == {"binary_data_size": 2 * 3 * 4}
    values = np.frombuffer(answer.content[size:], dtype="<f4").reshape(2, 3)
    np.testing.assert_array_equal(values, embedding)


def test_health_answers_have_empty_bodies(tiny: TestClient) -> None:
    for path, status in [
        ("/v2/health/live", 200),
        ("/v2/health/ready", 200),
        ("/v2/models/tiny/ready", 200),
        ("/v2/models/tiny/versions/1/ready", 200),
        ("/v2/models/tiny/versions/2/ready", 404),
        ("/v2/models/nope/ready", 404),
    ]:
        response = tiny.get(path)
        assert (response.status_code, response.content) == (status, b""), path
    assert tiny.get("/v2/models/nope").json() == {
        "error": "no model named 'nope' (served: ['tiny'])"
    }
    assert tiny.get("/v2/no/such/route").json() == {"error": "Not Found"}
    assert tiny.get("/models/nope").json()["error"]["code"] == "model_not_found"  # ours unchanged


def test_a_departed_oip_client_ends_as_499_and_its_images_never_run(tmp_path: Path) -> None:
    """As for /classify: the disconnect is noticed while the images wait for their batch
    (behind a black image that keeps the engine busy), they are dropped, and the request is
    counted as 499."""
    write_entry(tmp_path / "repo", "tiny", slow_graph(8, 4), crop=8, classes=4, dim=3)
    with Service(tmp_path / "repo", tmp_path / "server.log") as service:
        service.wait_ready()
        busy = ThreadPoolExecutor(1).submit(
            httpx.post, f"{service.url}/classify", content=solid(0),
            headers={"content-type": "image/png"}, timeout=60,
        )  # fmt: skip
        service.wait_metric("resnet_serve_batch_size_images_count", lambda v: v == 1)
        body = json.dumps({"inputs": [tensor([2, 3, 8, 8])]}).encode()
        head = (
            f"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: {service.host}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        with socket.create_connection((service.host, service.port)) as sock:
            sock.sendall(head + body)
            service.wait_metric("resnet_serve_queue_depth_images", lambda v: v == 2, model="tiny")
        closed = {"model": "tiny", "endpoint": "v2_infer", "status": "499"}
        service.wait_metric("resnet_serve_requests_total", lambda v: v == 1, **closed)
        assert busy.result().status_code == 200
        service.wait_metric("resnet_serve_queue_depth_images", lambda v: v == 0, model="tiny")
        assert service.metric("resnet_serve_batch_size_images_sum", model="tiny") == 1  # black
        assert service.metric("resnet_serve_images_total", model="tiny") == 3  # admitted, sent
        assert service.terminate() == 0, service.log()
