"""The one load generator of the repository: `bench http` and the reliability suite drive it.

One closed loop (`drive`: N workers, each sending its next request when the last one was answered,
bounded by a request count and a duration, optionally sampling the server meanwhile), an open loop
(`open_loop`, fixed arrival rate), and one `Tally` that accounts for every request: its status or
why there was none, its latency, the status it was meant to get.

Two ways to build load on it:
- `bench http` (`LoadSpec`, `closed_loop`, `open_loop`): bodies encoded once up front and sent over
  reused keep-alive connections (the lean wire client, httpx or gRPC), so that on a 2-core machine
  the client spends its CPU on sending, not on building bodies; `Tally.level` is its figures.
- the reliability suite (`Target`, `Target.closed_loop`, `Target.burst`): one connection per
  request (`wire.send`), so each one is accounted for exactly (ok, rejected with or without
  Retry-After, failed, refused, lost) and a client can disconnect on purpose; `Tally.summary`.
Every request is bounded by a total timeout.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit

import httpx
from tqdm import tqdm

from .launcher import Service
from .stats import percentiles, summarize
from .wire import Outcome, Payload, WireClient, build, multipart
from .wire import send as send_on_new_connection

CLIENTS = ("wire", "httpx")


@dataclass(frozen=True)
class LoadSpec:
    url: str  # full endpoint URL with query
    payloads: tuple[Payload, ...]
    requests: int
    duration_s: float
    timeout_s: float
    expect_key: str  # "predictions" | "embeddings": one entry per image in a 200 answer
    client: str = "wire"  # wire: the lean keep-alive client (bench/wire.py) | httpx
    grpc_target: str | None = None  # host:port: payloads are gRPC ModelInfer requests


@dataclass
class Tally:
    """Every request's outcome, the status it was meant to get (None: a client that disconnects
    on purpose) and how many images it carried."""

    outcomes: list[Outcome] = field(default_factory=list)
    expected: list[int | None] = field(default_factory=list)
    images: list[int] = field(default_factory=list)

    def add(self, outcome: Outcome, expected: int | None = 200, images: int = 1) -> None:
        self.outcomes.append(outcome)
        self.expected.append(expected)
        self.images.append(images)

    def level(self, wall_s: float, images_per_request: int) -> dict[str, Any]:
        """bench's figures: answers by status (or error), throughput and latency of the 200s."""
        statuses: Counter[str] = Counter()
        latencies: list[float] = []
        images_ok = 0
        for outcome, images in zip(self.outcomes, self.images, strict=True):
            status = _status(outcome)
            statuses[status] += 1
            if status == "200":
                latencies.append(outcome.latency_s)
                images_ok += images
        ok = statuses.get("200", 0)
        return {
            "requests": len(self.outcomes),
            "images_per_request": images_per_request,
            "ok": ok,
            "errors": len(self.outcomes) - ok,
            "statuses": dict(statuses),
            "wall_s": wall_s,
            "images_per_s": images_ok / wall_s if wall_s > 0 else 0.0,
            "requests_per_s": ok / wall_s if wall_s > 0 else 0.0,
            "latency": summarize(latencies),
        }

    def summary(self, duration_s: float | None = None) -> dict[str, Any]:
        """The reliability suite's account: sent, ok, rejected (503, which must carry
        Retry-After), failed (any other status than the one expected), refused (never
        connected), lost (connected, no answer) and abandoned (disconnected on purpose)."""
        kinds = ("sent", "ok", "rejected", "failed", "lost", "refused", "abandoned")
        counts = dict.fromkeys(kinds, 0)
        ok: list[float] = []
        rejected: list[float] = []
        no_retry_after = 0
        errors: dict[str, int] = {}
        for outcome, expected in zip(self.outcomes, self.expected, strict=True):
            if expected is None:  # a client that disconnects on purpose
                counts["abandoned"] += 1
                continue
            counts["sent"] += 1
            kind = outcome.kind
            if kind == "rejected":
                rejected.append(outcome.latency_s)
                no_retry_after += "retry-after" not in outcome.headers
            elif outcome.status is not None and outcome.status != expected:
                kind = "failed"
                key = f"{outcome.status} (expected {expected})"
                errors[key] = errors.get(key, 0) + 1
            elif outcome.status is not None:
                kind = "ok"
                if expected == 200:
                    ok.append(outcome.latency_s)
            else:
                errors[outcome.error or "?"] = errors.get(outcome.error or "?", 0) + 1
            counts[kind] += 1
        result: dict[str, Any] = {
            **counts,
            "rejected_without_retry_after": no_retry_after,
            "ok_latency_s": percentiles(ok),
            "rejected_latency_s": percentiles(rejected),
            "errors": errors,
        }
        if duration_s:
            result["duration_s"] = round(duration_s, 2)
            result["ok_per_s"] = round(len(ok) / duration_s, 1)
        return result


def _status(outcome: Outcome) -> str:
    """bench's key for an outcome: the status, or the error that took its place."""
    if outcome.status is None:
        return outcome.error or "?"
    return str(outcome.status) if outcome.error is None else f"{outcome.status} {outcome.error}"


async def drive(
    step: Callable[[int], Awaitable[bool | None]],
    concurrency: int,
    *,
    requests: int | None = None,
    duration_s: float | None = None,
    on_sample: Callable[[], None] | None = None,
) -> float:
    """The closed loop: `concurrency` workers, each running `step(i)` for the next request
    number i as soon as its last step returned, until `requests` were started, `duration_s`
    passed, or a step returned False; `on_sample` runs every half second meanwhile. The wall
    time in seconds."""
    tickets = itertools.count()
    start = time.perf_counter()
    deadline = start + duration_s if duration_s is not None else float("inf")
    limit = requests if requests is not None else float("inf")
    done = asyncio.Event()

    async def worker() -> None:
        while (i := next(tickets)) < limit and time.perf_counter() < deadline:
            if await step(i) is False:
                break

    async def sampler() -> None:
        while on_sample is not None and not done.is_set() and time.perf_counter() < deadline:
            on_sample()
            await asyncio.sleep(0.5)

    sampling = asyncio.ensure_future(sampler())
    try:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    finally:
        done.set()
        await sampling
    return time.perf_counter() - start


def image_groups(
    images: list[tuple[str, bytes]], per_request: int
) -> tuple[tuple[bytes, ...], ...]:
    """The encoded images of each request, cycling through all images (as `build_payloads`)."""
    if per_request < 1:
        raise ValueError("images per request must be >= 1")
    stream = itertools.cycle(images)
    return tuple(
        tuple(next(stream)[1] for _ in range(per_request)) for _ in range(max(1, len(images)))
    )


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
    if spec.grpc_target is not None:
        from .grpc_client import GrpcPoster

        return GrpcPoster(spec.grpc_target, spec.timeout_s)
    if spec.client == "wire":
        return _WirePoster(spec.url, connections)
    if spec.client == "httpx":
        return _HttpxPoster(spec.url, connections, spec.timeout_s)
    raise ValueError(f"unknown client {spec.client!r}; choose one of {CLIENTS}")


async def send(
    client: Poster,
    spec: LoadSpec,
    payload: Payload,
    tally: Tally,
    started: float | None = None,
) -> None:
    """One request; latency from `started` (open loop: its scheduled time) to the full answer."""
    t0 = time.perf_counter() if started is None else started
    try:
        code, body = await asyncio.wait_for(client.post(payload), timeout=spec.timeout_s)
        outcome = Outcome(code, time.perf_counter() - t0)
        if code == 200 and _results(body, spec.expect_key) != payload.images:
            outcome.error = "with a wrong body"
    except (httpx.HTTPError, TimeoutError, OSError, asyncio.IncompleteReadError) as exc:
        outcome = Outcome(None, time.perf_counter() - t0, error=type(exc).__name__)
    tally.add(outcome, images=payload.images)


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
    tally = Tally()
    progress = tqdm(total=spec.requests, desc=desc, unit="req", file=sys.stderr, disable=None)
    async with _poster(spec, concurrency) as client:

        async def step(i: int) -> None:
            await send(client, spec, spec.payloads[i % len(spec.payloads)], tally)
            progress.update()

        wall = await drive(step, concurrency, requests=spec.requests, duration_s=spec.duration_s)
    progress.close()
    return {"concurrency": concurrency, **tally.level(wall, spec.payloads[0].images)}


async def open_loop(
    spec: LoadSpec, rate_per_s: float, max_connections: int, desc: str
) -> dict[str, Any]:
    """Requests start at a fixed rate whether or not earlier ones were answered.

    Latency counts from each request's scheduled start, so queueing in the client (or a slow
    service) shows up in it instead of silently lowering the offered load.
    """
    if rate_per_s <= 0:
        raise ValueError("the arrival rate must be positive")
    tally = Tally()
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
            task = asyncio.create_task(send(client, spec, payload, tally, started=scheduled))
            task.add_done_callback(lambda _: progress.update())
            tasks.append(task)
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - start
    progress.close()
    level = tally.level(wall, spec.payloads[0].images)
    return {"rate_per_s": rate_per_s, **level, "achieved_rate_per_s": len(tally.outcomes) / wall}


async def warm_up(spec: LoadSpec, requests: int, concurrency: int) -> dict[str, int]:
    """A few untimed requests (connections, the service's first batches); their statuses."""
    if requests <= 0:
        return {}
    warm = dataclasses.replace(spec, requests=requests)
    level = await closed_loop(warm, max(1, min(concurrency, requests)), "warm-up")
    return level["statuses"]


@dataclass(frozen=True)
class Target:
    """The reliability suite's load: a served model and the images sent to it, one connection
    per request."""

    service: Service
    model: str
    images: list[bytes]
    timeout_s: float = 60.0

    def request(
        self, index: int, *, images: int = 1, endpoint: str = "classify", model: str | None = None
    ) -> bytes:
        blobs = [self.images[(index + k) % len(self.images)] for k in range(images)]
        content_type, body = multipart(blobs)
        target = f"/{endpoint}?model={model or self.model}"
        return build("POST", target, host=self.service.host, body=body, content_type=content_type)

    def request_with(self, blob: bytes, *, endpoint: str = "classify") -> bytes:
        """A request carrying exactly `blob`."""
        content_type, body = multipart([blob])
        target = f"/{endpoint}?model={self.model}"
        return build("POST", target, host=self.service.host, body=body, content_type=content_type)

    async def send(self, request: bytes, **options: Any) -> Outcome:
        options.setdefault("timeout_s", self.timeout_s)
        service = self.service
        return await send_on_new_connection(service.host, service.port, request, **options)

    def warm_each_process(self) -> None:
        """One answered request, one refused and one of each endpoint through every process of
        the service (each front-end worker, with --workers N): what a process sets up for its
        first requests (metric files among them) is not counted as growth afterwards."""

        def warm() -> None:
            for request in (
                self.request(0),
                self.request(0, endpoint="embed"),
                self.request(0, model="no-such-model"),
            ):
                asyncio.run(self.send(request))

        self.service.on_each_worker(warm)

    async def closed_loop(
        self,
        concurrency: int,
        duration_s: float,
        plan: Callable[[int], tuple[bytes, int | None]] | None = None,
        on_sample: Callable[[], None] | None = None,
    ) -> tuple[Tally, float]:
        """`concurrency` clients for `duration_s`. `plan(i)` gives request i and the status it
        must get (None: the client disconnects 10 ms after sending it); `on_sample` runs every
        half second."""
        plan = plan or (lambda i: (self.request(i), 200))
        tally = Tally()

        async def step(i: int) -> None:
            request, expected = plan(i)
            disconnect = 0.01 if expected is None else None
            tally.add(await self.send(request, disconnect_after_s=disconnect), expected)

        wall = await drive(step, concurrency, duration_s=duration_s, on_sample=on_sample)
        return tally, wall

    async def burst(self, count: int) -> tuple[Tally, float]:
        """`count` one-image requests, built first and then sent at once, each on its own
        connection."""
        requests = [self.request(i) for i in range(count)]
        tally = Tally()

        async def step(i: int) -> None:
            tally.add(await self.send(requests[i]))

        return tally, await drive(step, count, requests=count)
