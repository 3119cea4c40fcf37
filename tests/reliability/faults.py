"""Faults: broken models at start-up, a model whose inference raises, clients that disconnect,
and SIGTERM under load. Each scenario returns its measurements; callers judge them.

Policy for a broken model at start-up: the service refuses to start (exit 2 when the repository
is invalid, before the port opens; exit 1 when a graph fails to load or warm up, right after),
with one CRITICAL line naming the model, the file and the reason. It does not serve the healthy
models alone: `/readyz` promises every model, and a replica that silently lacks one answers 404
for it behind a load balancer while its neighbours answer 200. Failing fast stops a rollout at
the first replica, while the previous version keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import pickle
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx

from tests.support.launcher import Service, poll_until
from tests.support.load import Tally, Target, drive
from tests.support.wire import build, multipart, send

from ..support.graphs import tiny_graph, write_tiny
from ..support.images import solid


def _drop_hash(directory: Path) -> None:
    """So that the service reads the graph (and fails there) instead of refusing its hash."""
    path = directory / "metadata.json"
    metadata = json.loads(path.read_text())
    metadata.pop("model_sha256", None)
    path.write_text(json.dumps(metadata))


def _patch_metadata(directory: Path, **values: Any) -> None:
    path = directory / "metadata.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **values}))


class CodeOnUnpickle:
    """Unpickling this would run code: creates the marker file named in its argument."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


def _corrupt(directory: Path) -> None:
    (directory / "model.onnx").write_bytes(b"\x08\x07garbage, not a protobuf")


def _truncate(directory: Path) -> None:
    graph = directory / "model.onnx"
    graph.write_bytes(graph.read_bytes()[:60])
    _drop_hash(directory)


def _mismatched_graph(directory: Path) -> None:
    (directory / "model.onnx").write_bytes(tiny_graph(crop=32, classes=4))
    _drop_hash(directory)


def _pickle(directory: Path) -> None:
    marker = directory / "UNPICKLED"
    (directory / "model.onnx").write_bytes(pickle.dumps(CodeOnUnpickle(marker)))
    _drop_hash(directory)


def _renamed_pickle(directory: Path) -> None:
    _pickle(directory)
    (directory / "model.onnx").rename(directory / "model.pkl")
    _patch_metadata(directory, model_file="model.pkl")


BROKEN_MODELS: dict[str, tuple[Callable[[Path], None], int]] = {
    "model.onnx missing": (lambda d: (d / "model.onnx").unlink(), 2),
    "model.onnx corrupt (sha256 in metadata)": (_corrupt, 2),
    "model.onnx corrupt (no sha256)": (lambda d: (_corrupt(d), _drop_hash(d)), 1),
    "model.onnx truncated": (_truncate, 1),
    "graph does not fit its metadata": (_mismatched_graph, 1),
    "pickle named model.onnx": (_pickle, 1),
    "metadata.json not JSON": (lambda d: (d / "metadata.json").write_text("{"), 2),
    "model_file outside its directory": (lambda d: _patch_metadata(d, model_file="../x.onnx"), 2),
    "model_file not ONNX": (_renamed_pickle, 2),
}


def broken_model_at_startup(workdir: Path, case: str, deadline_s: float = 60.0) -> dict[str, Any]:
    """A repository with one healthy and one broken model (`BROKEN_MODELS[case]`): how the
    service ends, how fast, what it says, and whether it ever claimed to be ready."""
    breaks, expected_exit = BROKEN_MODELS[case]
    repo = workdir / "repo"
    write_tiny(repo, "healthy")
    directory = write_tiny(repo, "broken")
    breaks(directory)
    service = Service(repo, workdir / "server.log")
    start, ever_ready = time.monotonic(), []

    def exited() -> bool:
        if service.process.poll() is not None:
            return True
        ever_ready.append(httpx.get(f"{service.url}/readyz", timeout=1).status_code == 200)
        return False

    with contextlib.suppress(TimeoutError):
        poll_until(exited, deadline_s, "exited")
    with service:
        exit_code = service.process.poll()
    log = service.log()
    return {
        "case": case,
        "exit_code": exit_code,
        "expected_exit_code": expected_exit,
        "seconds": round(time.monotonic() - start, 2),
        "ever_ready": any(ever_ready),
        "critical": [line for line in log.splitlines() if " CRITICAL " in line],
        "traceback": "Traceback" in log,
        "unpickled": (directory / "UNPICKLED").exists(),
    }


def failing_batch(service: Service, model: str, healthy_model: str) -> dict[str, Any]:
    """A poisoned image (white, see graphs.poison_graph) and a benign one in the same batch of
    `model`, then a benign request to `model` and one to `healthy_model`. The two share a batch
    because they queue while a black image keeps the engine busy."""
    host, poisoned, benign, black = service.host, solid(255), solid(90), solid(0)

    def request(model_name: str, image: bytes) -> bytes:
        ct, body = multipart([image])
        return build("POST", f"/classify?model={model_name}", host=host, body=body, content_type=ct)

    batches = "resnet_serve_batch_size_images_count"
    batches_before = service.metric(batches, model=model)

    async def together() -> list[Any]:
        busy = asyncio.ensure_future(send(host, service.port, request(model, black)))
        await asyncio.to_thread(service.wait_metric, batches, lambda v: v > batches_before,
                                model=model)  # fmt: skip
        pair = [
            asyncio.ensure_future(send(host, service.port, request(model, image)))
            for image in (poisoned, benign)
        ]
        await asyncio.to_thread(
            service.wait_metric, "resnet_serve_queue_depth_images", lambda v: v == 2, model=model
        )
        await busy
        return list(await asyncio.gather(*pair))

    same_batch = asyncio.run(together())
    batches = service.metric(batches, model=model) - batches_before - 1  # the black one's
    after = asyncio.run(send(host, service.port, request(model, benign)))
    other = asyncio.run(send(host, service.port, request(healthy_model, poisoned)))

    def described(outcome: Any) -> dict[str, Any]:
        body = json.loads(outcome.body) if outcome.body else None
        code = body.get("error", {}).get("code") if isinstance(body, dict) else None
        return {
            "status": outcome.status,
            "content_type": outcome.headers.get("content-type"),
            "code": code,
        }

    return {
        "same_batch": [described(o) for o in same_batch],
        "batches": batches,
        "next_request": described(after),
        "other_model": described(other),
        "ready_after": httpx.get(f"{service.url}/readyz").status_code,
    }


def disconnects(target: Target, clients: int = 8) -> dict[str, Any]:
    """`clients` clients that disconnect once their two images are queued, and as many that
    disconnect halfway through their upload, then one that waits. A black image keeps the engine
    (a `slow_graph`) busy meanwhile, so that the early ones' images still wait for their batch
    when they go."""
    service, model = target.service, target.model
    inferred = "resnet_serve_batch_size_images_sum"
    target.warm_each_process()
    before = {
        "images": service.metric(inferred, model=model),
        "closed": service.metric("resnet_serve_requests_total", model=model, status="499"),
        "fds": service.settled_fds(),
    }

    async def scenario() -> None:
        black = target.request_with(solid(0))
        busy = asyncio.ensure_future(target.send(black))
        await asyncio.to_thread(
            service.wait_metric, "resnet_serve_batch_size_images_count", lambda v: v >= 1,
            model=model,
        )  # fmt: skip
        requests = [target.request(i, images=2) for i in range(clients)]
        everyone_queued = _queued(service, model, 2 * clients)
        queued = [target.send(r, disconnect_when=everyone_queued) for r in requests]
        halves = [_half_upload(target, r) for r in requests]
        await asyncio.gather(*queued, *halves)
        await busy

    asyncio.run(scenario())
    idle_after_s = service.wait_idle(model)
    before["images"] += 1  # the black image that kept the engine busy
    of_disconnected = service.metric(inferred, model=model) - before["images"]
    waiting = asyncio.run(target.send(target.request(0, images=2)))
    after = {
        "images": service.metric(inferred, model=model),
        "closed": service.metric("resnet_serve_requests_total", model=model, status="499"),
        "fds": service.settled_fds(at_most=before["fds"]),
    }
    return {
        "disconnected_requests": 2 * clients,
        "answered_499": after["closed"] - before["closed"],
        "images_run_for_disconnected": of_disconnected,
        "waiting_client_status": waiting.status,
        "images_run_for_waiting_client": after["images"] - before["images"] - of_disconnected,
        "queue_depth": service.metric("resnet_serve_queue_depth_images", model=model),
        "in_flight": service.metric("resnet_serve_requests_in_flight", model=model),
        "idle_after_s": round(idle_after_s, 2),
        "fds": [before["fds"], after["fds"]],
    }


def _queued(service: Service, model: str, images: int) -> Callable[[], Awaitable[None]]:
    """A waiter that returns once `images` images wait in `model`'s queue."""

    async def wait() -> None:
        depth = "resnet_serve_queue_depth_images"
        await asyncio.to_thread(service.wait_metric, depth, lambda v: v >= images, model=model)

    return wait


async def _half_upload(target: Target, request: bytes) -> None:
    _, writer = await asyncio.open_connection(target.service.host, target.service.port)
    writer.write(request[: len(request) // 2])
    await writer.drain()
    await asyncio.sleep(0.05)
    writer.close()


def sigterm_under_load(
    target: Target, *, concurrency: int, load_s: float, poll_s: float = 0.05, balancer: bool = True
) -> dict[str, Any]:
    """Closed-loop load, SIGTERM after `load_s`, and a load balancer's behaviour: once /readyz
    stops answering 200, no new request is sent (with `balancer`; without, clients go on until
    a connection is refused). Run the service with --drain-delay-ms well above `poll_s`. Every
    request sent must be answered; the process must exit 0."""
    service = target.service
    tally = Tally()

    async def scenario() -> float:
        routed = asyncio.Event()
        routed.set()

        async def step(i: int) -> bool:
            if not routed.is_set():
                return False
            outcome = await target.send(target.request(i))
            tally.add(outcome)
            return outcome.kind != "refused"

        async def watch_readiness() -> None:
            probe = build("GET", "/readyz", host=service.host)
            while (await send(service.host, service.port, probe, timeout_s=5)).status == 200:
                await asyncio.sleep(poll_s)
            if balancer:
                routed.clear()

        async def terminate() -> float:
            await asyncio.sleep(load_s)
            service.process.terminate()
            return time.monotonic()

        clients = asyncio.ensure_future(drive(step, concurrency))
        signalled, _ = await asyncio.gather(terminate(), watch_readiness())
        await clients
        return time.monotonic() - signalled

    last_answer_after_s = asyncio.run(scenario())
    exit_code = service.process.wait(60)
    return {
        **tally.summary(),
        "last_answer_after_signal_s": round(last_answer_after_s, 2),
        "exit_code": exit_code,
        "traceback": "Traceback" in service.log(),
    }
