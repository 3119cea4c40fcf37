"""The app in-process on tiny hand-made graphs: API shapes, every error, timeouts, failures.

The real server over HTTP with real models is tested in test_service_e2e.py.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from contract.preprocessing import Preprocessing
from runtime.engines.onnxruntime_engine import OrtEngine
from service.core.settings import Settings
from service.protocols.app import create_app
from service.protocols.responses import ModelInfo
from tests.support.launcher import metric_value, poll_until

from .reliability.hostile import png_bomb
from .support.images import encode
from .support.service import multipart, wait_ready, write_tiny_model

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def solid(colour: tuple[int, int, int], size: int = 8) -> bytes:
    return encode(np.full((size, size, 3), colour, dtype=np.uint8))


def expected_embedding(colour: tuple[int, int, int]) -> np.ndarray:
    prep = Preprocessing(resize_shorter=8, crop=8)
    return (np.array(colour) / 255.0 - np.array(prep.mean)) / np.array(prep.std)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    write_tiny_model(tmp_path, "tiny", num_classes=4)  # random weights: trained false
    write_tiny_model(tmp_path, "other", num_classes=3, weights={"source": "t", "trained": True})
    return tmp_path


@contextlib.contextmanager
def started(repo: Path, **values: Any) -> Iterator[TestClient]:
    settings = Settings(model_repository=repo, max_delay_ms=1, intra_op_threads=1, **values)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        wait_ready(client)
        yield client


@pytest.fixture
def client(repo: Path) -> Iterator[TestClient]:
    with started(
        repo,
        default_model="tiny",
        max_images_per_request=3,
        max_request_bytes=20_000,
        max_image_pixels=50_000_000,
    ) as client:
        yield client


def test_classify_and_embed(client: TestClient) -> None:
    blobs = [solid(RED), solid(GREEN), solid(BLUE)]
    response = client.post("/classify?top_k=4", files=multipart(blobs))
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["model"], body["version"], body["trained"]) == ("tiny", 1, False)
    assert len(body["predictions"]) == 3
    for predictions in body["predictions"]:
        scores = [p["score"] for p in predictions]
        assert scores == sorted(scores, reverse=True)
        assert sum(scores) == pytest.approx(1.0)
        assert {p["label"] for p in predictions} == {f"class{i}" for i in range(4)}

    response = client.post("/embed?model=tiny", files=multipart(blobs))
    body = response.json()
    assert (body["dim"], body["trained"]) == (3, False)
    for embedding, colour in zip(body["embeddings"], (RED, GREEN, BLUE), strict=True):
        np.testing.assert_allclose(embedding, expected_embedding(colour), atol=1e-5)

    raw = client.post(
        "/embed?model=other&normalize=true",
        content=solid(RED),
        headers={"content-type": "image/png"},
    )
    assert (raw.json()["model"], raw.json()["trained"]) == ("other", True)
    trained = client.post("/classify?model=other", files=multipart(blobs)).json()["trained"]
    assert trained is True
    assert np.linalg.norm(raw.json()["embeddings"][0]) == pytest.approx(1.0, abs=1e-6)


def test_embed_as_npy_when_asked(client: TestClient) -> None:
    blobs = [solid(RED), solid(BLUE)]
    as_json = client.post("/embed?model=tiny", files=multipart(blobs)).json()["embeddings"]
    response = client.post(
        "/embed?model=tiny", files=multipart(blobs), headers={"accept": "application/x-npy"}
    )
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/x-npy"
    assert (response.headers["x-model"], response.headers["x-model-version"]) == ("tiny", "1")
    assert response.headers["x-model-trained"] == "false"
    array = np.load(io.BytesIO(response.content), allow_pickle=False)
    assert array.dtype == np.float32
    assert array.shape == (2, 3)
    np.testing.assert_array_equal(array, np.asarray(as_json, dtype=np.float32))


@pytest.mark.parametrize(
    ("accept", "npy"),
    [
        ("application/x-npy", True),
        ("application/json;q=0.5, application/x-npy", True),
        ("*/*;q=0.1, Application/X-Npy", True),
        ("application/x-npy;q=0", False),
        ("application/x-npy; q=0.0, application/json", False),
        ("application/json, application/x-npy;q=0.5", False),
        ("text/html, application/x-npy-other", False),
        ("", False),
    ],
)
def test_accept_q_values_choose_between_npy_and_json(
    client: TestClient, accept: str, npy: bool
) -> None:
    response = client.post(
        "/embed?model=tiny", files=multipart([solid(RED)]), headers={"accept": accept}
    )
    assert response.status_code == 200
    expected = "application/x-npy" if npy else "application/json"
    assert response.headers["content-type"] == expected


def test_models_report_runtime_facts(client: TestClient) -> None:
    models = {m["name"]: m for m in client.get("/models").json()["models"]}
    assert set(models) == {"tiny", "other"}
    tiny = client.get("/models/tiny").json()
    assert tiny == models["tiny"]
    assert tiny["provider"] == "CPUExecutionProvider"
    assert tiny["state"] == "ready"
    assert tiny["max_batch_size"] == 16  # clamped to what the export verified
    assert tiny["metadata"]["max_batch_size"] == 16
    assert tiny["warmed_batch_sizes"] == [1, 16]
    metadata = tiny["metadata"]
    assert metadata["labels"][0] == "class0"
    assert metadata["input"] == {"name": "images", "shape": [None, 3, 8, 8], "dtype": "float32"}
    # One view: the metadata once, under "metadata"; beside it only name, version and what is
    # true at run time.
    runtime = {"state", "provider", "providers", "io_binding", "max_batch_size", "max_delay_ms"}
    runtime |= {"max_queue_images", "warmed_batch_sizes", "gpu"}
    assert set(tiny) == {"name", "version", "metadata"} | runtime
    assert (tiny["name"], tiny["version"]) == (metadata["name"], metadata["version"])
    assert ModelInfo.model_validate(tiny).metadata.weights.trained is False


def _too_many() -> dict[str, Any]:
    return {"files": multipart([solid(RED)] * 4)}


@pytest.mark.parametrize(
    ("method", "url", "kwargs", "status", "code"),
    [
        ("post", "/classify", {"content": b"abc", "headers": {"content-type": "image/png"}},
         400, "invalid_image"),
        ("post", "/classify", {"content": b"", "headers": {"content-type": "image/png"}},
         400, "empty_request"),
        ("post", "/classify", {"files": [("other", ("a.png", solid(RED), "image/png"))]},
         400, "empty_request"),
        ("post", "/classify", {"content": b"--x--", "headers": {
            "content-type": "multipart/form-data"}}, 400, "malformed_request"),
        ("post", "/classify", {"content": b"--x\r\nContent-Disp", "headers": {
            "content-type": "multipart/form-data; boundary=x"}}, 400, "malformed_request"),
        ("post", "/classify?model=resnet", {"files": multipart([solid(RED)])},
         404, "model_not_found"),
        ("get", "/models/resnet", {}, 404, "model_not_found"),
        ("get", "/nowhere", {}, 404, "not_found"),
        ("get", "/classify", {}, 405, "method_not_allowed"),
        ("post", "/classify", _too_many(), 413, "too_many_images"),
        ("post", "/classify", {"content": bytes(30_000), "headers": {"content-type": "image/png"}},
         413, "request_too_large"),
        ("post", "/classify", {"content": png_bomb(8_000), "headers": {
            "content-type": "image/png"}}, 413, "image_too_large"),
        ("post", "/classify", {"content": b"hello", "headers": {"content-type": "text/plain"}},
         415, "unsupported_media_type"),
        ("post", "/classify", {"json": {"image": "x"}}, 415, "unsupported_media_type"),
        ("post", "/classify?top_k=0", {"files": multipart([solid(RED)])}, 422, "invalid_parameter"),
        ("post", "/classify?top_k=5", {"files": multipart([solid(RED)])}, 422, "invalid_parameter"),
        ("post", "/classify?top_k=x", {"files": multipart([solid(RED)])}, 422, "invalid_parameter"),
        ("post", "/embed?normalize=maybe", {"files": multipart([solid(RED)])},
         422, "invalid_parameter"),
    ],
)  # fmt: skip
def test_every_error_has_its_status_and_one_json_shape(
    client: TestClient,
    caplog: pytest.LogCaptureFixture,
    method: str,
    url: str,
    kwargs: dict[str, Any],
    status: int,
    code: str,
) -> None:
    with caplog.at_level(logging.INFO, logger="service.protocols.http_errors"):
        response = client.request(method.upper(), url, **kwargs)
    (record,) = [r for r in caplog.records if r.name == "service.protocols.http_errors"]
    assert record.exc_info is None  # client errors: one line, no traceback
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert error["code"] == code
    assert isinstance(error["message"], str) and error["message"]
    assert client.post("/classify", files=multipart([solid(RED)])).status_code == 200


def test_error_names_the_bad_image(client: TestClient) -> None:
    response = client.post("/classify", files=multipart([solid(RED), b"junk"]))
    assert response.status_code == 400
    assert response.json()["error"]["message"].startswith("image 1:")


def test_a_model_must_be_named_when_several_are_served(repo: Path) -> None:
    with started(repo) as client:
        response = client.post("/classify", files=multipart([solid(RED)]))
        assert response.status_code == 422
        assert "tiny" in response.json()["error"]["message"]


@pytest.fixture
def patched_run(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """OrtEngine.run, made slow or failing on demand after warm-up."""
    behaviour: dict[str, Any] = {"sleep_s": 0.0, "error": None, "calls": threading.Event()}
    original = OrtEngine.run

    def run(self: OrtEngine, batch: np.ndarray) -> list[np.ndarray]:
        time.sleep(behaviour["sleep_s"])
        if behaviour["error"] is not None:
            raise behaviour["error"]
        return original(self, batch)

    monkeypatch.setattr(OrtEngine, "run", run)
    return behaviour


def test_slow_requests_time_out_with_504(repo: Path, patched_run: dict[str, Any]) -> None:
    with started(repo, default_model="tiny", request_timeout_ms=200) as client:

        def batches_run() -> float:
            text = client.get("/metrics").text
            return metric_value(text, "resnet_serve_inference_duration_seconds_count")

        before = batches_run()
        patched_run["sleep_s"] = 0.5
        response = client.post("/classify", files=multipart([solid(RED)]))
        assert response.status_code == 504
        assert response.json()["error"]["code"] == "timeout"
        patched_run["sleep_s"] = 0.0
        poll_until(lambda: batches_run() == before + 1, 30, "the abandoned batch finished")
        assert client.post("/classify", files=multipart([solid(RED)])).status_code == 200


def test_inference_failure_is_a_500_and_the_service_recovers(
    repo: Path, patched_run: dict[str, Any]
) -> None:
    with started(repo, default_model="tiny") as client:
        patched_run["error"] = RuntimeError("device lost")
        response = client.post("/classify", files=multipart([solid(RED), solid(BLUE)]))
        assert response.status_code == 500
        assert response.json()["error"]["code"] == "inference_failed"
        patched_run["error"] = None
        assert client.post("/classify", files=multipart([solid(RED)])).status_code == 200
        assert client.get("/readyz").status_code == 200


def test_a_model_that_cannot_load_is_fatal(tmp_path: Path) -> None:
    directory = write_tiny_model(tmp_path, "broken")
    (directory / "model.onnx").write_bytes(b"not onnx")
    metadata = json.loads((directory / "metadata.json").read_text())
    del metadata["model_sha256"]  # so that the graph is read, and fails there
    (directory / "metadata.json").write_text(json.dumps(metadata))
    called = threading.Event()
    settings = Settings(model_repository=tmp_path)
    with TestClient(create_app(settings, on_fatal=called.set)) as client:
        assert called.wait(30)
        ready = client.get("/readyz")
        assert ready.status_code == 503
        assert ready.json() == {"status": "failed", "models": {"broken": "failed"}}
        assert client.get("/models/broken").json()["state"] == "failed"
        assert client.get("/healthz").status_code == 200


def test_openapi_documents_bodies_responses_and_errors(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    classify = spec["paths"]["/classify"]["post"]
    assert set(classify["requestBody"]["content"]) == {"multipart/form-data", "image/*"}
    ok = classify["responses"]["200"]["content"]["application/json"]["schema"]
    assert ok["$ref"].endswith("/ClassifyResponse")
    for status in ("400", "404", "413", "415", "422", "503", "504"):
        error = classify["responses"][status]["content"]["application/json"]["schema"]
        assert error["$ref"].endswith("/ErrorResponse")
    assert {p["name"] for p in classify["parameters"]} == {"model", "top_k"}
    schemas = spec["components"]["schemas"]
    assert {"EmbedResponse", "ModelInfo", "ModelsResponse", "ReadyResponse"} <= set(schemas)
    assert "/metrics" in spec["paths"] and "/healthz" in spec["paths"]


def test_metrics_count_requests_by_model_and_status(client: TestClient) -> None:
    client.post("/classify", files=multipart([solid(RED)]))
    client.post("/classify?model=nope", files=multipart([solid(RED)]))
    text = client.get("/metrics").text
    assert 'resnet_serve_requests_total{endpoint="classify",model="tiny",status="200"}' in text
    assert 'resnet_serve_requests_total{endpoint="classify",model="",status="404"}' in text
    assert "resnet_serve_ready 1.0" in text
