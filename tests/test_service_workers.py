"""`--workers N`: N front-end processes on the same ports, one engine process holding the models.

Every test starts the real service (`python -m service --workers 2`) and talks to it over
127.0.0.1. A connection is pinned to one worker by stopping the other (SIGSTOP) while it
connects (`Service.connect_to_worker`), so a test knows which worker serves what. The engine is
held busy on demand by a graph that is slow on a black image (tests/support/graphs.slow_graph):
what is sent meanwhile waits in the engine process's queue, without any wait on time.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
import pytest

from tests.support.launcher import Service, poll_until

from .support.graphs import write_slow
from .support.images import solid
from .support.service import write_tiny_model

BLACK, GRAY = solid(0), solid(128)
QUEUED = "resnet_serve_queue_depth_images"
TOKEN = "inference-token-0123456789abcdef"
MANAGEMENT = "management-token-0123456789abcdef"


def post(
    connection: http.client.HTTPConnection,
    blob: bytes,
    model: str,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, Any], dict[str, str]]:
    connection.request(
        "POST",
        f"/classify?model={model}",
        blob,
        {"Content-Type": "image/png", **(headers or {})},
    )
    answer = connection.getresponse()
    body = answer.read()
    return answer.status, json.loads(body or b"{}"), dict(answer.getheaders())


class Background:
    """Requests sent from threads, their answers collected."""

    def __init__(self) -> None:
        self.threads: list[threading.Thread] = []
        self.answers: dict[str, Any] = {}

    def send(self, name: str, call: Callable[[], Any]) -> None:
        def run() -> None:
            try:
                self.answers[name] = call()
            except Exception as exc:
                self.answers[name] = exc

        thread = threading.Thread(target=run, name=name, daemon=True)
        thread.start()
        self.threads.append(thread)

    def join(self, timeout_s: float = 60.0) -> dict[str, Any]:
        for thread in self.threads:
            thread.join(timeout_s)
        return self.answers


def maps(pid: int, library: str) -> bool:
    """Whether process `pid` has a shared library whose path contains `library` mapped."""
    return library in Path(f"/proc/{pid}/maps").read_text()


@pytest.fixture
def slow_service(tmp_path: Path) -> Iterator[Service]:
    write_slow(tmp_path / "repo", "slow")
    with Service(tmp_path / "repo", tmp_path / "server.log", "--workers=2") as service:
        service.wait_ready()
        service.wait_workers(2)
        yield service


def hold_engine(service: Service, connection: http.client.HTTPConnection, out: Background) -> None:
    """A black image running in the engine (seconds): what follows queues behind it."""
    before = service.metric("resnet_serve_images_total", model="slow")
    out.send("black", lambda: post(connection, BLACK, "slow"))
    service.wait_metric("resnet_serve_images_total", lambda n: n == before + 1, model="slow")
    service.wait_metric(QUEUED, lambda n: n == 0, model="slow")  # taken into its batch


def queue_one_from_each(
    service: Service, first: int, second: int
) -> tuple[Background, http.client.HTTPConnection]:
    """The engine held by a black image from worker `first`, then a gray image queued from each
    worker behind it (answered as "first" and "second"); returns the answers and the connection
    to `second`."""
    held, from_first, from_second = (
        service.connect_to_worker(first),
        service.connect_to_worker(first),
        service.connect_to_worker(second),
    )
    out = Background()
    hold_engine(service, held, out)
    out.send("first", lambda: post(from_first, GRAY, "slow"))
    out.send("second", lambda: post(from_second, GRAY, "slow"))
    service.wait_metric(QUEUED, lambda n: n == 2, model="slow")  # both, in one queue
    return out, from_second


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_one_engine_process_batches_the_images_of_every_worker(slow_service: Service) -> None:
    service = slow_service
    engine, workers = service.process.pid, service.workers()
    # One copy of the weights: onnxruntime is loaded in the engine process only; the engine
    # process serves no protocol (no gRPC library in it), every worker does.
    assert maps(engine, "onnxruntime")
    assert not any(maps(pid, "onnxruntime") for pid in workers)
    assert not maps(engine, "cygrpc")
    assert all(maps(pid, "cygrpc") for pid in workers)

    out, _ = queue_one_from_each(service, *workers)
    answers = out.join()
    assert [answers[k][0] for k in ("black", "first", "second")] == [200, 200, 200], answers
    assert answers["first"][1]["predictions"] == answers["second"][1]["predictions"]
    # Two batches: the black image alone, then one image from each worker together.
    assert service.metric("resnet_serve_batch_size_images_count", model="slow") == 2
    assert service.metric("resnet_serve_batch_size_images_sum", model="slow") == 3
    # One view across processes: every request counted once, whichever worker answered it.
    assert service.metric("resnet_serve_requests_total", model="slow", status="200") == 3
    assert service.metric("resnet_serve_requests_in_flight", model="slow") == 0


def test_a_killed_worker_is_replaced_and_the_others_lose_nothing(slow_service: Service) -> None:
    service = slow_service
    victim, survivor = service.workers()
    out, other = queue_one_from_each(service, victim, survivor)

    os.kill(victim, signal.SIGKILL)
    answers = out.join()
    assert isinstance(answers["black"], (ConnectionError, http.client.HTTPException))
    assert isinstance(answers["first"], (ConnectionError, http.client.HTTPException))
    status, body, _ = answers["second"]
    assert status == 200, body
    service.wait_metric(QUEUED, lambda n: n == 0, model="slow")  # the victim's image dropped

    replacement = poll_until(
        lambda: [p for p in service.workers() if p not in (victim, survivor)], 60, "replaced"
    )[0]
    assert sorted(service.wait_workers(2)) == sorted([survivor, replacement])
    assert post(service.connect_to_worker(replacement), GRAY, "slow")[0] == 200
    assert post(other, GRAY, "slow")[0] == 200  # the survivor's connection lives on
    assert re.search(r"worker \d: exited \(killed by SIGKILL\); starting a new one", service.log())


def test_sigterm_drains_every_worker_and_loses_nothing(tmp_path: Path) -> None:
    write_slow(tmp_path / "repo", "slow")
    with Service(
        tmp_path / "repo", tmp_path / "server.log", "--workers=2", "--drain-delay-ms=500"
    ) as service:
        service.wait_ready()
        first, second = service.wait_workers(2)
        out, _ = queue_one_from_each(service, first, second)
        service.process.send_signal(signal.SIGTERM)
        ready = poll_until(
            lambda: (r := httpx.get(f"{service.url}/readyz", timeout=5)).status_code == 503 and r,
            10,
            "draining",
        )
        assert ready.json()["status"] == "draining"
        assert service.process.wait(60) == 0
        answers = out.join()
    assert [answers[k][0] for k in ("black", "first", "second")] == [200, 200, 200], answers
    assert gone(first) and gone(second)


def test_limits_and_errors_hold_across_workers(tmp_path: Path) -> None:
    """The queue bound is the engine process's, for all workers together: 503 with Retry-After
    past it; a request whose client left is counted 499; one not answered in time gets 504."""
    write_slow(tmp_path / "repo", "slow")
    flags = (
        "--workers=2",
        "--max-queue-images=2",
        "--max-batch-size=2",
        "--max-images-per-request=2",
    )
    with Service(tmp_path / "repo", tmp_path / "server.log", *flags) as service:
        service.wait_ready()
        first, second = service.wait_workers(2)
        held, a, b, c = (
            service.connect_to_worker(first),
            service.connect_to_worker(first),
            service.connect_to_worker(second),
            service.connect_to_worker(second),
        )
        out = Background()
        hold_engine(service, held, out)
        out.send("a", lambda: post(a, GRAY, "slow"))
        out.send("b", lambda: post(b, GRAY, "slow"))
        service.wait_metric(QUEUED, lambda n: n == 2, model="slow")
        status, body, headers = post(c, GRAY, "slow")
        assert (status, body["error"]["code"]) == (503, "queue_full"), body
        assert headers["retry-after"] == "1"

        answers = out.join()
        assert [answers[k][0] for k in ("black", "a", "b")] == [200, 200, 200], answers

        # A client that leaves while its image waits: 499, and its room comes back.
        hold_engine(service, held, out)
        leaving = socket.create_connection((service.host, service.port))
        leaving.sendall(
            f"POST /classify?model=slow HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
            f"Content-Length: {len(GRAY)}\r\n\r\n".encode()
            + GRAY
        )
        service.wait_metric(QUEUED, lambda n: n == 1, model="slow")
        leaving.close()
        service.wait_metric("resnet_serve_requests_total", lambda n: n == 1, status="499")
        service.wait_metric(QUEUED, lambda n: n == 0, model="slow")
        out.join()
    with Service(
        tmp_path / "repo", tmp_path / "timeout.log", "--workers=2", "--request-timeout-ms=300"
    ) as service:
        service.wait_ready()
        status, body, _ = post(service.connect_to_worker(service.workers()[0]), BLACK, "slow")
        assert (status, body["error"]["code"]) == (504, "timeout")


def test_tokens_and_explicit_model_updates_reach_every_worker(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    write_tiny_model(repo, "tiny", version=1)
    env = {"RESNET_SERVE_INFERENCE_TOKEN": TOKEN, "RESNET_SERVE_MANAGEMENT_TOKEN": MANAGEMENT}
    flags = ("--workers=2", "--model-control-mode=explicit")
    with Service(repo, tmp_path / "server.log", *flags, env=env) as service:
        service.wait_ready()
        first, second = service.wait_workers(2)
        a, b = service.connect_to_worker(first), service.connect_to_worker(second)
        auth = {"Authorization": f"Bearer {TOKEN}"}
        for connection in (a, b):
            assert post(connection, GRAY, "tiny")[0] == 401
            status, body, _ = post(connection, GRAY, "tiny", auth)
            assert (status, body["version"]) == (200, 1)

        write_tiny_model(repo, "tiny", version=2)
        a.request(
            "POST",
            "/v2/repository/models/tiny/load",
            headers={"Authorization": f"Bearer {MANAGEMENT}"},
        )
        loaded = a.getresponse()
        assert (loaded.status, json.loads(loaded.read())) == (200, {"name": "tiny", "version": "2"})
        assert post(a, GRAY, "tiny", auth)[1]["version"] == 2
        poll_until(lambda: post(b, GRAY, "tiny", auth)[1]["version"] == 2, 10, "v2 on b")
        b.request("POST", "/v2/repository/index", headers={"Authorization": f"Bearer {TOKEN}"})
        refused = b.getresponse()
        refused.read()
        assert refused.status == 401  # the management token, not the inference one


def test_grpc_is_served_by_the_workers(tmp_path: Path) -> None:
    grpc_client = pytest.importorskip("tritonclient.grpc")
    write_tiny_model(tmp_path / "repo", "tiny")
    with Service(tmp_path / "repo", tmp_path / "server.log", "--workers=2") as service:
        service.wait_ready()
        client = grpc_client.InferenceServerClient(f"127.0.0.1:{service.grpc_port}")
        assert client.is_server_ready()
        image = grpc_client.InferInput("image_bytes", [1], "BYTES")
        image.set_data_from_numpy(np.array([GRAY], dtype=np.object_))
        result = client.infer("tiny", [image])
        assert result.as_numpy("logits").shape == (1, 4)


def test_start_up_failures_stop_the_service(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    write_tiny_model(repo, "tiny")
    # The gRPC port taken by another program: exit 3 before any worker starts.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with Service(repo, tmp_path / "port.log", "--workers=2", f"--grpc-port={port}") as service:
            assert service.process.wait(60) == 3
            assert "cannot listen" in service.log()
    # A model that fails to load: exit 1, the workers stopped.
    broken = tmp_path / "broken"
    (write_tiny_model(broken, "tiny", model_sha256=None) / "model.onnx").write_bytes(b"no graph")
    with Service(broken, tmp_path / "broken.log", "--workers=2") as service:
        assert service.process.wait(60) == 1
    # The engine process killed: its workers notice and exit.
    with Service(repo, tmp_path / "killed.log", "--workers=2") as service:
        service.wait_ready()
        workers = service.wait_workers(2)
        service.process.kill()
        poll_until(lambda: all(gone(pid) for pid in workers), 30, "workers gone")
