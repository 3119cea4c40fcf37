"""Overload and soak, short: the real service over capacity on purpose (a synthetic graph of
tunable cost), then a sustained mix with memory sampled. `python -m reliability overload|soak`
runs the same scenarios longer, on an exported ResNet-18."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.core.settings import Settings
from service.protocols.app import create_app
from tests.support.launcher import Service
from tests.support.load import Target

from .reliability.capacity import overload, soak
from .support.graphs import write_conv, write_tiny
from .support.images import sample_images, solid
from .support.service import wait_ready

QUEUE, BATCH = 32, 16


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    repo = tmp_path_factory.mktemp("repo")
    write_conv(repo, "conv", layers=4)
    log = tmp_path_factory.mktemp("logs") / "server.log"
    flags = (f"--max-queue-images={QUEUE}", f"--max-batch-size={BATCH}")
    with Service(repo, log, *flags, f"--max-images-per-request={QUEUE}") as service:
        service.wait_ready()
        yield Target(service, "conv", sample_images(16))
        assert service.terminate() == 0
    assert "Traceback" not in service.log(), service.log()


def test_a_burst_far_above_capacity_is_refused_fast_and_the_service_recovers(
    target: Target,
) -> None:
    async def warm_up() -> None:  # every thread pool at its full size
        await asyncio.gather(*(target.send(target.request(i)) for i in range(16)))

    asyncio.run(warm_up())
    threads_before = target.service.resources()["threads"]
    result = overload(
        target, burst_requests=300, phase_s=1.5, max_queue_images=QUEUE, max_batch_size=BATCH
    )
    burst = result["burst"]
    for phase in (result["baseline"], burst, result["recovery"]):  # nothing lost, ever
        assert phase["lost"] == phase["refused"] == phase["failed"] == 0, result
    # A queue of 32 one-image requests cannot hold a burst of 300: most are refused, none lost.
    assert burst["ok"] > 0 and burst["rejected"] >= 150, result
    assert burst["rejected_without_retry_after"] == 0, result
    assert result["decoded_in_burst"] == burst["ok"], result  # refused ones were never decoded
    assert burst["ok_latency_s"]["max"] <= result["accepted_latency_bound_s"], result
    assert burst["rejected_latency_s"]["p50"] <= burst["ok_latency_s"]["p50"], result
    assert result["recovered_ratio"] >= 0.7, result  # throughput recovers (noisy 2 cores)
    # Route dependencies run on the event loop: no thread pool grows with the burst.
    assert target.service.resources()["threads"] <= threads_before + 2


def test_a_sustained_mix_keeps_memory_flat(target: Target) -> None:
    result = soak(target, duration_s=8.0, warmup_s=3.0, concurrency=4)
    shown = {k: v for k, v in result.items() if k != "samples"}
    assert result["lost"] == result["refused"] == result["failed"] == 0, shown
    assert result["rejected"] == 0, shown  # no 503 below capacity
    assert result["memory"]["growth_after_warmup_mb"] <= 8.0, shown  # RSS flat after warm-up
    assert result["idle_after"]["fds"] <= result["idle_before"]["fds"] + 2, shown
    assert result["abandoned"] > 0  # some clients disconnected mid-request
    assert result["sent"] > 100


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    write_tiny(tmp_path, "tiny")
    settings = Settings(
        model_repository=tmp_path, max_queue_images=8, max_batch_size=8, max_images_per_request=8
    )
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        wait_ready(client)
        yield client


def test_a_full_queue_refuses_before_reading_the_body(client: TestClient) -> None:
    batcher = client.app.state.plane.registry.models["tiny"].batcher  # type: ignore[attr-defined]
    portal = client.portal  # type: ignore[attr-defined]
    with portal.wrap_async_context_manager(batcher.admit(8)):  # as if 8 were being decoded
        refused = client.post("/classify", content=b"not even an image", headers=_png())
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["code"] == "queue_full"
        assert refused.headers["retry-after"] == "1"
    assert client.post("/classify", content=solid(90), headers=_png()).status_code == 200
    assert client.get("/metrics").text.count('resnet_serve_queue_depth_images{model="tiny"} 0.0')


def test_refused_images_are_not_counted_as_sent_to_inference(client: TestClient) -> None:
    batcher = client.app.state.plane.registry.models["tiny"].batcher  # type: ignore[attr-defined]
    portal = client.portal  # type: ignore[attr-defined]
    tensors = {"name": "images", "datatype": "FP32", "shape": [2, 3, 16, 16]}
    body = {"inputs": [{**tensors, "data": [0.0] * (2 * 3 * 16 * 16)}]}
    with portal.wrap_async_context_manager(batcher.admit(7)):  # room for 1 image, not 2
        refused = client.post("/v2/models/tiny/infer", json=body)
        assert refused.status_code == 503, refused.text
    sent = 'resnet_serve_images_total{model="tiny"}'
    assert sent not in client.get("/metrics").text  # never incremented
    assert client.post("/v2/models/tiny/infer", json=body).status_code == 200
    assert f"{sent} 2.0" in client.get("/metrics").text


def _png() -> dict[str, str]:
    return {"content-type": "image/png"}
