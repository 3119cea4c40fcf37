"""Latency summaries: percentiles in milliseconds from samples in seconds."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

PERCENTILES = (50, 90, 99)


def summarize(samples_s: Sequence[float]) -> dict[str, float | int]:
    """n, mean and p50/p90/p99 in ms (linear interpolation; with few samples p99 is near max)."""
    if not samples_s:
        return {"n": 0}
    ms = np.asarray(samples_s, dtype=np.float64) * 1e3
    summary: dict[str, float | int] = {"n": int(ms.size), "mean_ms": float(ms.mean())}
    for q, value in zip(PERCENTILES, np.percentile(ms, PERCENTILES), strict=True):
        summary[f"p{q}_ms"] = float(value)
    summary["min_ms"] = float(ms.min())
    summary["max_ms"] = float(ms.max())
    return summary


def percentiles(samples_s: Sequence[float]) -> dict[str, float] | None:
    """p50, p99 and max in seconds, rounded to 0.1 ms (the reliability suite's account)."""
    if not samples_s:
        return None
    array = np.asarray(samples_s)
    return {
        "p50": round(float(np.percentile(array, 50)), 4),
        "p99": round(float(np.percentile(array, 99)), 4),
        "max": round(float(array.max()), 4),
    }
