"""The real service (`python -m service`) on 127.0.0.1, spoken to over HTTP, with models exported
by `python -m export`: the real ResNet-20 checkpoint and a random-weight ResNet-18."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image, ImageOps

from tests.support.launcher import Service, poll_until

from .conftest import CIFAR_CHECKPOINT_FILES, PHOTOS, normalize_cifar, require
from .reliability.hostile import png_bomb
from .support.graphs import write_slow
from .support.images import encode, encode_image, sample_images, solid
from .support.service import export, multipart, service_cli, write_tiny_model

MAX_REQUEST_BYTES = 8 * 2**20
CONTENT_TYPES = {".jpg": "image/jpeg", ".png": "image/png"}


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, resnet20_checkpoint: Path) -> Path:
    require(PHOTOS)
    path = tmp_path_factory.mktemp("repo")
    export("cifar_resnet20", str(resnet20_checkpoint), path, "--name", "cifar10")
    export("resnet18", "random:0", path, "--max-batch-size", "8")
    return path


@pytest.fixture(scope="module")
def slow_repo(repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Many models, so that loading lasts long enough to be watched (about a second)."""
    path = tmp_path_factory.mktemp("slow-repo")
    for index in range(12):
        name = f"cifar{index:02d}"
        shutil.copytree(repo / "cifar10", path / name)
        metadata_path = path / name / "1" / "metadata.json"
        metadata = json.loads(metadata_path.read_text())
        metadata["name"] = name
        metadata_path.write_text(json.dumps(metadata))
    (path / "resnet18").symlink_to(repo / "resnet18")
    return path


@pytest.fixture(scope="module")
def server(repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    log = tmp_path_factory.mktemp("logs") / "server.log"
    with Service(
        repo,
        log,
        "--default-model=cifar10",
        "--max-delay-ms=10",
        f"--max-request-bytes={MAX_REQUEST_BYTES}",
        "--max-images-per-request=64",
    ) as service:
        service.wait_ready()
        yield service
        assert service.terminate() == 0, service.log()
    assert "Traceback" not in service.log(), service.log()


@pytest.fixture(scope="module")
def cifar_pngs(cifar_test_set: tuple[np.ndarray, np.ndarray]) -> list[bytes]:
    return [encode(image) for image in cifar_test_set[0]]


def post_all(url: str, bodies: list[list[bytes]], concurrency: int) -> list[httpx.Response]:
    """POST each list of images as one multipart request, `concurrency` connections at once."""

    async def main() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=concurrency)
        async with httpx.AsyncClient(limits=limits, timeout=60) as client:
            gate = asyncio.Semaphore(concurrency)

            async def one(blobs: list[bytes]) -> httpx.Response:
                async with gate:
                    return await client.post(url, files=multipart(blobs))

            return await asyncio.gather(*(one(blobs) for blobs in bodies))

    return asyncio.run(main())


def test_resnet20_classifies_the_cifar10_test_images_with_pytorch_accuracy(
    server: Service, cifar_pngs: list[bytes], cifar_test_set: tuple[np.ndarray, np.ndarray]
) -> None:
    labels = cifar_test_set[1]
    chunks = [cifar_pngs[i : i + 25] for i in range(0, len(cifar_pngs), 25)]
    responses = post_all(f"{server.url}/classify?model=cifar10&top_k=1", chunks, concurrency=8)
    assert all(r.status_code == 200 for r in responses), responses[0].text
    predicted = [p[0]["index"] for r in responses for p in r.json()["predictions"]]
    assert len(predicted) == 2000
    correct = int((np.array(predicted) == labels).sum())
    assert correct == CIFAR_CHECKPOINT_FILES[20][1]  # 1813, PyTorch's count


def test_embeddings_equal_the_exported_graph(
    server: Service,
    repo: Path,
    cifar_pngs: list[bytes],
    cifar_test_set: tuple[np.ndarray, np.ndarray],
) -> None:
    count = 100
    chunks = [cifar_pngs[i : i + 20] for i in range(0, count, 20)]
    responses = post_all(f"{server.url}/embed", chunks, concurrency=5)
    bodies = [r.json() for r in responses]
    assert {(b["model"], b["version"], b["dim"]) for b in bodies} == {("cifar10", 1, 64)}
    served = np.array([e for b in bodies for e in b["embeddings"]])

    session = ort.InferenceSession(repo / "cifar10" / "1" / "model.onnx")
    expected = session.run(["embedding"], {"images": normalize_cifar(cifar_test_set[0][:count])})
    assert served.shape == (count, 64)
    np.testing.assert_allclose(served, expected[0], atol=1e-4, rtol=0)


SINGLES = "resnet_serve_batch_size_images_bucket"  # with le="1.0": batches of one image


def test_concurrent_results_equal_sequential_ones_and_batches_form(
    server: Service, cifar_pngs: list[bytes]
) -> None:
    images = cifar_pngs[:64]
    url = f"{server.url}/classify?model=cifar10&top_k=10"

    def log_probabilities(response: httpx.Response) -> np.ndarray:
        """The logits up to their per-image constant (log-softmax), in class order."""
        assert response.status_code == 200, response.text
        (predictions,) = response.json()["predictions"]
        scores = sorted((p["index"], p["score"]) for p in predictions)
        return np.log([score for _, score in scores])

    with httpx.Client(timeout=30) as client:
        sequential = [log_probabilities(client.post(url, files=multipart([b]))) for b in images]
        sequential_embeddings = [
            client.post(f"{server.url}/embed", files=multipart([b])).json()["embeddings"][0]
            for b in images
        ]
    batches_before = server.metric("resnet_serve_batch_size_images_count", model="cifar10")
    singles_before = server.metric(SINGLES, model="cifar10", le="1.0")

    concurrent = [log_probabilities(r) for r in post_all(url, [[b] for b in images], 64)]
    embed_responses = post_all(f"{server.url}/embed", [[b] for b in images], 64)
    concurrent_embeddings = [r.json()["embeddings"][0] for r in embed_responses]

    assert np.abs(np.array(concurrent) - np.array(sequential)).max() <= 1e-4
    assert np.abs(np.array(concurrent_embeddings) - np.array(sequential_embeddings)).max() <= 1e-4
    batches = server.metric("resnet_serve_batch_size_images_count", model="cifar10")
    singles = server.metric(SINGLES, model="cifar10", le="1.0")
    assert batches - batches_before > singles - singles_before  # some batches held > 1 image
    assert batches - batches_before < 128  # 128 images in fewer batches


def test_every_photo_is_accepted_by_an_imagenet_model(server: Service) -> None:
    photos = sorted(p for p in PHOTOS.iterdir() if p.suffix in CONTENT_TYPES)
    assert len(photos) >= 21
    url = f"{server.url}/classify?model=resnet18&top_k=5"
    with httpx.Client(timeout=60) as client:
        single = []
        for photo in photos:
            headers = {"content-type": CONTENT_TYPES[photo.suffix]}
            response = client.post(url, content=photo.read_bytes(), headers=headers)
            assert response.status_code == 200, (photo.name, response.text)
            (predictions,) = response.json()["predictions"]
            assert len(predictions) == 5
            single.append(predictions[0]["index"])
        together = client.post(url, files=multipart([p.read_bytes() for p in photos]))
        assert together.status_code == 200, together.text
        assert [p[0]["index"] for p in together.json()["predictions"]] == single


def test_exif_orientation_is_applied_over_http(server: Service) -> None:
    photo = PHOTOS / "n02951585_can_opener.jpg"  # EXIF Orientation 6
    stored = Image.open(photo)
    upright = ImageOps.exif_transpose(stored)
    assert upright.size != stored.size
    url = f"{server.url}/embed?model=resnet18"
    with httpx.Client(timeout=30) as client:

        def embed(data: bytes, content_type: str) -> np.ndarray:
            response = client.post(url, content=data, headers={"content-type": content_type})
            return np.array(response.json()["embeddings"][0])

        served = embed(photo.read_bytes(), "image/jpeg")
        as_displayed = embed(encode_image(upright, "PNG"), "image/png")
        as_stored = embed(encode_image(stored.convert("RGB"), "PNG"), "image/png")
    np.testing.assert_allclose(served, as_displayed, atol=1e-4)
    assert np.abs(served - as_stored).max() > 100 * np.abs(served - as_displayed).max()


@pytest.mark.parametrize(
    ("name", "request_kwargs", "status", "code"),
    [
        ("corrupt bytes", {"content": b"\xff\xd8\xff\xe0" + bytes(500),
                           "headers": {"content-type": "image/jpeg"}}, 400, "invalid_image"),
        ("text as an image", {"content": b"just text", "headers": {"content-type": "image/png"}},
         400, "invalid_image"),
        ("text", {"content": b"just text", "headers": {"content-type": "text/plain"}},
         415, "unsupported_media_type"),
        ("empty body", {"content": b"", "headers": {"content-type": "image/png"}},
         400, "empty_request"),
        ("decompression bomb", {"content": png_bomb(20_000),
                                "headers": {"content-type": "image/png"}}, 413, "image_too_large"),
        ("too many images", {"files": multipart([b"x"] * 65)}, 413, "too_many_images"),
        ("body too large", {"content": bytes(MAX_REQUEST_BYTES + 1),
                            "headers": {"content-type": "image/png"}}, 413, "request_too_large"),
        ("unknown model", {"params": {"model": "resnet1000"}, "files": multipart([b"x"])},
         404, "model_not_found"),
        ("top_k out of range", {"params": {"top_k": 11}, "files": multipart([b"x"])},
         422, "invalid_parameter"),
    ],
)  # fmt: skip
def test_bad_requests_get_their_documented_error_and_the_server_stays_healthy(
    server: Service,
    cifar_pngs: list[bytes],
    name: str,
    request_kwargs: dict[str, Any],
    status: int,
    code: str,
) -> None:
    with httpx.Client(base_url=server.url, timeout=30) as client:
        response = client.post("/classify", **request_kwargs)
        assert response.status_code == status, (name, response.text)
        assert response.headers["content-type"] == "application/json"
        assert response.json()["error"]["code"] == code
        assert client.get("/healthz").status_code == 200
        assert client.get("/readyz").status_code == 200
        healthy = client.post("/classify", files=multipart(cifar_pngs[:2]))
        assert healthy.status_code == 200


def test_models_show_the_provider_in_use(server: Service) -> None:
    models = {m["name"]: m for m in httpx.get(f"{server.url}/models").json()["models"]}
    assert set(models) == {"cifar10", "resnet18"}
    for model in models.values():
        assert model["provider"] == "CPUExecutionProvider"
        assert model["state"] == "ready"
        assert model["metadata"]["precision"] == "fp32"
    assert models["resnet18"]["max_batch_size"] == 8  # what its export verified
    assert models["cifar10"]["max_batch_size"] == 32
    assert models["cifar10"]["metadata"]["embedding_dim"] == 64
    assert "session on CPUExecutionProvider" in server.log()


def test_readyz_is_503_until_every_model_is_loaded_and_warmed(
    slow_repo: Path, tmp_path: Path, cifar_pngs: list[bytes]
) -> None:
    with Service(slow_repo, tmp_path / "server.log", "--max-delay-ms=5") as service:
        service.wait_listening()
        seen: list[int] = []
        refused_while_loading: list[int] = []

        def ready_yet() -> bool:
            ready = httpx.get(f"{service.url}/readyz")
            seen.append(ready.status_code)
            if ready.status_code == 200:
                return True
            assert ready.headers["retry-after"] == "1"
            assert ready.json()["status"] == "loading"
            if ready.json()["models"]["resnet18"] == "loading":
                response = httpx.post(
                    f"{service.url}/classify?model=resnet18", files=multipart(cifar_pngs[:1])
                )
                if response.status_code == 503:  # else it became ready meanwhile
                    assert response.json()["error"]["code"] == "not_ready"
                    assert response.headers["retry-after"] == "1"
                    refused_while_loading.append(503)
            return False

        poll_until(ready_yet, 60, "/readyz 200", every_s=0)
        assert seen[0] == 503 and seen[-1] == 200, seen
        assert refused_while_loading
        models = httpx.get(f"{service.url}/models").json()["models"]
        assert all(m["state"] == "ready" and m["warmed_batch_sizes"] for m in models)
        assert service.terminate() == 0


def test_sigterm_while_loading_exits_cleanly(slow_repo: Path, tmp_path: Path) -> None:
    with Service(slow_repo, tmp_path / "server.log") as service:
        service.wait_listening()
        assert httpx.get(f"{service.url}/readyz").status_code == 503
        assert service.terminate(timeout_s=30) == 0, service.log()
        assert "Traceback" not in service.log(), service.log()


def test_sigterm_finishes_every_accepted_request(tmp_path: Path) -> None:
    """Timeline: a black image keeps the engine busy (a `slow_graph`) while 8 images queue;
    SIGTERM; /readyz turns 503 while requests are still accepted for the drain delay; the
    listener closes; then the queued images run and every accepted request is answered before
    the process exits 0. Each step waits on what it needs (a metric, an answer, a refused
    connection), never on a fixed sleep."""
    write_slow(tmp_path / "repo", "slow")
    with Service(
        tmp_path / "repo",
        tmp_path / "server.log",
        "--max-queue-images=12",
        "--max-batch-size=12",
        "--max-images-per-request=8",
        "--drain-delay-ms=300",
    ) as service:
        service.wait_ready()
        url = f"{service.url}/classify?top_k=1"
        pool = ThreadPoolExecutor(5)
        images = sample_images(18)

        def post(blobs: list[bytes]) -> httpx.Response:
            return httpx.post(url, files=multipart(blobs), timeout=60)

        accepted = [pool.submit(post, [solid(0)])]  # runs at once and keeps the engine busy
        service.wait_metric("resnet_serve_batch_size_images_count", lambda v: v == 1)
        accepted.append(pool.submit(post, images[:8]))
        queued = "resnet_serve_queue_depth_images"
        service.wait_metric(queued, lambda depth: depth == 8, model="slow")
        refused = post(images[8:16])  # 8 more do not fit in 12
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "queue_full"
        assert refused.headers["retry-after"] == "1"
        accepted.append(pool.submit(post, images[16:17]))  # 1 more does
        service.wait_metric(queued, lambda depth: depth == 9, model="slow")

        service.process.send_signal(signal.SIGTERM)
        ready = poll_until(
            lambda: (r := httpx.get(f"{service.url}/readyz")).status_code == 503 and r, 10, "503"
        )
        assert ready.json()["status"] == "draining"
        accepted.append(pool.submit(post, images[17:18]))  # still accepted while draining
        service.wait_metric(queued, lambda depth: depth == 10, model="slow")

        def listener_closed() -> bool:
            try:
                httpx.get(f"{service.url}/healthz", timeout=1)
            except httpx.ConnectError:
                return True
            return False

        poll_until(listener_closed, 10, "the listener closed")  # after the drain delay...
        assert service.process.poll() is None  # ...but the accepted requests are not done yet

        responses = [future.result() for future in accepted]
        pool.shutdown()
        assert [r.status_code for r in responses] == [200] * 4, responses[0].text
        assert [len(r.json()["predictions"]) for r in responses] == [1, 8, 1, 1]
        assert service.process.wait(30) == 0, service.log()
        assert "Traceback" not in service.log(), service.log()


@pytest.mark.skipif(
    "CUDAExecutionProvider" in ort.get_available_providers(), reason="CUDA is available here"
)
def test_requiring_cuda_without_it_fails_start_up(tmp_path: Path) -> None:
    write_tiny_model(tmp_path)
    result = service_cli("--model-repository", str(tmp_path), "--require-cuda")
    assert result.returncode == 2
    assert "CUDA is required" in result.stderr


def test_requests_in_parallel_threads_do_not_interfere(
    server: Service, cifar_pngs: list[bytes]
) -> None:
    """Mixed models and endpoints at once: every answer matches its own request."""
    barrier = threading.Barrier(8)

    def work(index: int) -> tuple[int, Any]:
        barrier.wait()
        model = "resnet18" if index % 2 else "cifar10"
        response = httpx.post(
            f"{server.url}/embed?model={model}", files=multipart(cifar_pngs[index : index + 3])
        )
        return index, response.json()

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(work, range(8)))
    for index, body in results:
        assert body["model"] == ("resnet18" if index % 2 else "cifar10")
        assert body["dim"] == (512 if index % 2 else 64)
        assert len(body["embeddings"]) == 3
