"""`bench http`: closed-loop and open-loop load against a running service.

Request bodies are encoded once up front, so the client spends its CPU on sending, not on
building multipart bodies: on a 2-core machine the client shares the cores with the service.
Every level is bounded by a request count and a duration; every request by a total timeout.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit

import httpx
from tqdm import tqdm

from .stats import summarize
from .wire import WireClient, multipart

CLIENTS = ("wire", "httpx")


@dataclass(frozen=True)
class Payload:
    body: bytes
    content_type: str
    images: int


@dataclass(frozen=True)
class LoadSpec:
    url: str  # full endpoint URL with query
    payloads: tuple[Payload, ...]
    requests: int
    duration_s: float
    timeout_s: float
    expect_key: str  # "predictions" | "embeddings": one entry per image in a 200 answer
    client: str = "wire"  # wire: the lean keep-alive client (bench/wire.py) | httpx


@dataclass
class Recorder:
    latencies_s: list[float] = field(default_factory=list)
    statuses: Counter[str] = field(default_factory=Counter)
    images_ok: int = 0
    sent: int = 0

    def level(self, wall_s: float, images_per_request: int) -> dict[str, Any]:
        ok = self.statuses.get("200", 0)
        return {
            "requests": self.sent,
            "images_per_request": images_per_request,
            "ok": ok,
            "errors": self.sent - ok,
            "statuses": dict(self.statuses),
            "wall_s": wall_s,
            "images_per_s": self.images_ok / wall_s if wall_s > 0 else 0.0,
            "requests_per_s": ok / wall_s if wall_s > 0 else 0.0,
            "latency": summarize(self.latencies_s),
        }


def build_payloads(
    images: list[tuple[str, bytes]], per_request: int, *, raw: bool = False
) -> tuple[Payload, ...]:
    """Bodies cycling through all images, `per_request` images each (raw: one image body)."""
    if per_request < 1:
        raise ValueError("images per request must be >= 1")
    if raw and per_request != 1:
        raise ValueError("a raw image body carries exactly one image")
    stream = itertools.cycle(images)
    payloads = []
    for _ in range(max(1, len(images))):
        chosen = [next(stream) for _ in range(per_request)]
        if raw:
            name, data = chosen[0]
            payloads.append(Payload(data, _image_type(name), 1))
        else:
            content_type, body = multipart(
                [data for _, data in chosen],
                [_image_type(name) for name, _ in chosen],
                [name for name, _ in chosen],
            )
            payloads.append(Payload(body, content_type, per_request))
    return tuple(payloads)


def _image_type(name: str) -> str:
    return "image/png" if name.lower().endswith(".png") else "image/jpeg"


class Poster(Protocol):
    async def __aenter__(self) -> Poster: ...
    async def __aexit__(self, *exc: object) -> None: ...
    async def post(self, payload: Payload) -> tuple[int, bytes]: ...


class _WirePoster:
    def __init__(self, url: str, connections: int) -> None:
        parts = urlsplit(url)
        self._target = parts.path + (f"?{parts.query}" if parts.query else "")
        self._client = WireClient(url, connections)

    async def __aenter__(self) -> _WirePoster:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._client.__aexit__(*exc)

    async def post(self, payload: Payload) -> tuple[int, bytes]:
        head = self._client.request_head(self._target, payload.content_type, len(payload.body))
        return await self._client.post(head, payload.body)


class _HttpxPoster:
    def __init__(self, url: str, connections: int, timeout_s: float) -> None:
        self._url = url
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        self._client = httpx.AsyncClient(limits=limits, timeout=timeout_s)

    async def __aenter__(self) -> _HttpxPoster:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._client.aclose()

    async def post(self, payload: Payload) -> tuple[int, bytes]:
        headers = {"content-type": payload.content_type}
        response = await self._client.post(self._url, content=payload.body, headers=headers)
        return response.status_code, response.content


def _poster(spec: LoadSpec, connections: int) -> Poster:
    if spec.client == "wire":
        return _WirePoster(spec.url, connections)
    if spec.client == "httpx":
        return _HttpxPoster(spec.url, connections, spec.timeout_s)
    raise ValueError(f"unknown client {spec.client!r}; choose one of {CLIENTS}")


async def send(
    client: Poster,
    spec: LoadSpec,
    payload: Payload,
    recorder: Recorder,
    started: float | None = None,
) -> None:
    """One request; latency from `started` (open loop: its scheduled time) to the full answer."""
    t0 = time.perf_counter() if started is None else started
    recorder.sent += 1
    try:
        code, body = await asyncio.wait_for(client.post(payload), timeout=spec.timeout_s)
        elapsed = time.perf_counter() - t0
        status = str(code)
        if status == "200" and _results(body, spec.expect_key) != payload.images:
            status = "200 with a wrong body"
    except (httpx.HTTPError, TimeoutError, OSError, asyncio.IncompleteReadError) as exc:
        elapsed, status = time.perf_counter() - t0, type(exc).__name__
    recorder.statuses[status] += 1
    if status == "200":
        recorder.latencies_s.append(elapsed)
        recorder.images_ok += payload.images


def _results(body: bytes, key: str) -> int | None:
    """How many per-image results a 200 answer holds; None if it is not the expected JSON."""
    try:
        data = json.loads(body)
    except ValueError:
        return None
    results = data.get(key) if isinstance(data, dict) else None
    return len(results) if isinstance(results, list) else None


async def closed_loop(spec: LoadSpec, concurrency: int, desc: str) -> dict[str, Any]:
    """`concurrency` workers, each sending its next request when the last one was answered."""
    recorder = Recorder()
    tickets = itertools.count()
    progress = tqdm(total=spec.requests, desc=desc, unit="req", file=sys.stderr, disable=None)
    async with _poster(spec, concurrency) as client:
        start = time.perf_counter()
        deadline = start + spec.duration_s

        async def worker() -> None:
            while (i := next(tickets)) < spec.requests and time.perf_counter() < deadline:
                await send(client, spec, spec.payloads[i % len(spec.payloads)], recorder)
                progress.update()

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    progress.close()
    return {"concurrency": concurrency, **recorder.level(wall, spec.payloads[0].images)}


async def open_loop(
    spec: LoadSpec, rate_per_s: float, max_connections: int, desc: str
) -> dict[str, Any]:
    """Requests start at a fixed rate whether or not earlier ones were answered.

    Latency counts from each request's scheduled start, so queueing in the client (or a slow
    service) shows up in it instead of silently lowering the offered load.
    """
    if rate_per_s <= 0:
        raise ValueError("the arrival rate must be positive")
    recorder = Recorder()
    count = min(spec.requests, max(1, int(spec.duration_s * rate_per_s)))
    progress = tqdm(total=count, desc=desc, unit="req", file=sys.stderr, disable=None)
    tasks: list[asyncio.Task[None]] = []
    async with _poster(spec, max_connections) as client:
        start = time.perf_counter()
        for i in range(count):
            scheduled = start + i / rate_per_s
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            payload = spec.payloads[i % len(spec.payloads)]
            task = asyncio.create_task(send(client, spec, payload, recorder, started=scheduled))
            task.add_done_callback(lambda _: progress.update())
            tasks.append(task)
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - start
    progress.close()
    level = recorder.level(wall, spec.payloads[0].images)
    return {"rate_per_s": rate_per_s, **level, "achieved_rate_per_s": recorder.sent / wall}


async def warm_up(spec: LoadSpec, requests: int, concurrency: int) -> dict[str, int]:
    """A few untimed requests (connections, the service's first batches); their statuses."""
    if requests <= 0:
        return {}
    warm = dataclasses.replace(spec, requests=requests)
    level = await closed_loop(warm, max(1, min(concurrency, requests)), "warm-up")
    return level["statuses"]
