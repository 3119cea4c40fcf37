"""Overload and soak against a running service, with bounded request counts and time.

Every request is accounted for: ok (200), rejected (503, which must carry Retry-After), failed
(any other status, or a status other than the one the request was built to get), lost (no answer
at all: refused, reset, cut off or timed out). Lost must be 0 whatever the load.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bench.launcher import Service
from bench.wire import Outcome, build, multipart, send


@dataclass(frozen=True)
class Target:
    """What the load is made of: a served model and the images sent to it."""

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

    async def send(self, request: bytes, **options: Any) -> Outcome:
        options.setdefault("timeout_s", self.timeout_s)
        return await send(self.service.host, self.service.port, request, **options)


@dataclass
class Tally:
    """Outcomes by kind, and latencies of answered requests."""

    outcomes: list[Outcome] = field(default_factory=list)
    expected: list[int | None] = field(default_factory=list)

    def add(self, outcome: Outcome, expected: int | None = 200) -> None:
        self.outcomes.append(outcome)
        self.expected.append(expected)

    def summary(self, duration_s: float | None = None) -> dict[str, Any]:
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


def percentiles(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    array = np.asarray(values)
    return {
        "p50": round(float(np.percentile(array, 50)), 4),
        "p99": round(float(np.percentile(array, 99)), 4),
        "max": round(float(array.max()), 4),
    }


async def closed_loop(
    target: Target,
    concurrency: int,
    duration_s: float,
    plan: Callable[[int], tuple[bytes, int | None]] | None = None,
    on_sample: Callable[[], None] | None = None,
) -> tuple[Tally, float]:
    """`concurrency` clients, each sending its next request when the last one is answered,
    for `duration_s`. `plan(i)` gives request i and the status it must get (None: the client
    disconnects 10 ms after sending it); `on_sample` runs every half second."""
    plan = plan or (lambda i: (target.request(i), 200))
    tally, counter = Tally(), iter(range(10**12))
    start = time.monotonic()
    end = start + duration_s

    async def client() -> None:
        while time.monotonic() < end:
            request, expected = plan(next(counter))
            disconnect = 0.01 if expected is None else None
            tally.add(await target.send(request, disconnect_after_s=disconnect), expected)

    async def sampler() -> None:
        while on_sample is not None and time.monotonic() < end:
            on_sample()
            await asyncio.sleep(0.5)

    await asyncio.gather(sampler(), *(client() for _ in range(concurrency)))
    return tally, time.monotonic() - start


async def burst(target: Target, count: int) -> tuple[Tally, float]:
    """`count` one-image requests sent at once, each on its own connection."""
    requests = [target.request(i) for i in range(count)]
    start = time.monotonic()
    outcomes = await asyncio.gather(*(target.send(r) for r in requests))
    tally = Tally()
    for outcome in outcomes:
        tally.add(outcome)
    return tally, time.monotonic() - start


def wait_idle(service: Service, model: str, deadline_s: float = 60.0) -> float:
    """Seconds until no image waits and no request is in flight."""
    start = time.monotonic()
    for gauge in ("resnet_serve_queue_depth_images", "resnet_serve_requests_in_flight"):
        service.wait_metric(gauge, lambda v: v == 0, deadline_s, model=model)
    return time.monotonic() - start


def overload(
    target: Target,
    *,
    burst_requests: int,
    concurrency: int = 8,
    phase_s: float = 5.0,
    max_queue_images: int,
    max_batch_size: int,
) -> dict[str, Any]:
    """Baseline throughput, a burst far above what can be queued, then the same closed loop again:
    the burst's overflow must get 503 + Retry-After quickly, every accepted request must complete
    within what its queue explains, and throughput must come back."""
    baseline_tally, baseline_s = asyncio.run(closed_loop(target, concurrency, phase_s))
    baseline = baseline_tally.summary(baseline_s)
    decoded = "resnet_serve_preprocess_duration_seconds_count"
    decoded_before = target.service.metric(decoded, model=target.model)
    burst_tally, burst_s = asyncio.run(burst(target, burst_requests))
    drained_s = wait_idle(target.service, target.model)
    decoded_in_burst = target.service.metric(decoded, model=target.model) - decoded_before
    recovery_tally, recovery_s = asyncio.run(closed_loop(target, concurrency, phase_s))
    recovery = recovery_tally.summary(recovery_s)
    spike = burst_tally.summary()
    rate = max(baseline["ok_per_s"], 1e-9)
    # The worst an accepted image can wait: a full queue ahead of it and one batch running.
    queue_s = (max_queue_images + max_batch_size) / rate
    return {
        "concurrency": concurrency,
        "baseline": baseline,
        "burst": {**spike, "wall_s": round(burst_s, 2), "drained_after_s": round(drained_s, 2)},
        "recovery": recovery,
        "decoded_in_burst": int(decoded_in_burst),
        "queue_drain_s": round(queue_s, 3),
        "accepted_latency_bound_s": round(2 * queue_s + 1.0, 3),
        "recovered_ratio": round(recovery["ok_per_s"] / rate, 3),
    }


def soak(
    target: Target,
    *,
    duration_s: float,
    warmup_s: float,
    concurrency: int = 4,
    seed: int = 0,
) -> dict[str, Any]:
    """A sustained mix (classify and embed of 1-4 images, bad images, unknown models, clients
    that disconnect) with the server's RSS, threads and open files sampled every 0.5 s; the trend
    after warm-up must be flat."""
    rng = random.Random(seed)
    bad_image = b"\x89PNG\r\n\x1a\n" + bytes(64)
    host = target.service.host

    def plan(index: int) -> tuple[bytes, int | None]:
        roll = rng.random()
        if roll < 0.05:
            return build("POST", f"/classify?model={target.model}", host=host, body=bad_image,
                         content_type="image/png"), 400  # fmt: skip
        if roll < 0.10:
            return target.request(index, model="no-such-model"), 404
        if roll < 0.15:
            return target.request(index, images=2), None
        if roll < 0.35:
            return target.request(index, images=rng.randint(1, 2), endpoint="embed"), 200
        return target.request(index, images=rng.randint(1, 4)), 200

    service = target.service
    idle_before = {**service.resources(), "fds": service.settled_fds()}
    samples: list[tuple[float, dict[str, float]]] = []
    start = time.monotonic()

    def sample() -> None:
        samples.append((time.monotonic() - start, service.resources()))

    tally, elapsed = asyncio.run(closed_loop(target, concurrency, duration_s, plan, sample))
    wait_idle(service, target.model)
    idle_after = {**service.resources(), "fds": service.settled_fds(at_most=idle_before["fds"])}
    return {
        **tally.summary(elapsed),
        "concurrency": concurrency,
        "idle_before": idle_before,
        "idle_after": idle_after,
        "memory": memory_trend(samples, warmup_s),
        "samples": [{"t_s": round(t, 2), **r} for t, r in samples],
    }


def memory_trend(samples: list[tuple[float, dict[str, float]]], warmup_s: float) -> dict[str, Any]:
    """RSS after warm-up: a least-squares slope, and the last fifth against the first fifth."""
    after = [(t, r["rss_mb"]) for t, r in samples if t >= warmup_s]
    if len(after) < 10:
        raise ValueError(f"only {len(after)} RSS samples after warm-up: run the soak longer")
    times = np.array([t for t, _ in after])
    rss = np.array([m for _, m in after])
    fifth = max(len(rss) // 5, 1)
    slope = float(np.polyfit(times, rss, 1)[0]) * 60.0
    return {
        "rss_start_mb": round(samples[0][1]["rss_mb"], 1),
        "rss_after_warmup_mb": round(float(np.median(rss[:fifth])), 1),
        "rss_end_mb": round(float(np.median(rss[-fifth:])), 1),
        "rss_peak_mb": round(float(max(r["rss_mb"] for _, r in samples)), 1),
        "growth_after_warmup_mb": round(float(np.median(rss[-fifth:]) - np.median(rss[:fifth])), 2),
        "slope_mb_per_min": round(slope, 3),
        "window_s": round(float(times[-1] - times[0]), 1),
    }
