"""Overload and soak against a running service, with bounded request counts and time, driven by
the shared load generator (`tests.support.load.Target`).

Every request is accounted for: ok (200), rejected (503, which must carry Retry-After), failed
(any other status, or a status other than the one the request was built to get), lost (no answer
at all: refused, reset, cut off or timed out). Lost must be 0 whatever the load.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import numpy as np

from tests.support.load import Target
from tests.support.wire import build


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
    baseline_tally, baseline_s = asyncio.run(target.closed_loop(concurrency, phase_s))
    baseline = baseline_tally.summary(baseline_s)
    decoded = "resnet_serve_preprocess_duration_seconds_count"
    decoded_before = target.service.metric(decoded, model=target.model)
    burst_tally, burst_s = asyncio.run(target.burst(burst_requests))
    drained_s = target.service.wait_idle(target.model)
    decoded_in_burst = target.service.metric(decoded, model=target.model) - decoded_before
    recovery_tally, recovery_s = asyncio.run(target.closed_loop(concurrency, phase_s))
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
    target.warm_each_process()
    idle_before = {**service.resources(), "fds": service.settled_fds()}
    samples: list[tuple[float, dict[str, float]]] = []
    start = time.monotonic()

    def sample() -> None:
        samples.append((time.monotonic() - start, service.resources()))

    tally, elapsed = asyncio.run(target.closed_loop(concurrency, duration_s, plan, sample))
    service.wait_idle(target.model)
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
