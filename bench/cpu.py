"""The serving tax in CPU: what a server process spends per request, and what the same model's
inference alone costs, so that `bench http` can say how much CPU a request takes outside
inference.

- `process_cpu_s(pid)`: utime + stime of a process (every thread) and of its descendants (the
  workers of a multi-process front end), from /proc/PID/stat, in seconds. Sampled before and
  after a load level; the difference over the level's requests is the server's CPU per request.
- `inference_cost(...)`: the served model's engine, opened in a fresh process that does nothing
  else (`open_entry` with the service's own settings, parsed from the same flags), timed at the
  batch sizes the service actually formed: process CPU per batch (`time.process_time()`, every
  thread of that process) and the wall-clock p50 per batch. The service's CPU per request minus
  the interpolated inference CPU per request is its CPU outside inference.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from tests.support.stats import summarize

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _own_cpu_s(pid: int) -> float:
    """utime + stime of one process (all its threads), seconds; 0 once it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = text[text.rindex(")") + 2 :].split()  # after "pid (comm) ": field 3 onwards
    return (int(fields[11]) + int(fields[12])) / _TICKS  # fields 14 and 15: utime, stime


def process_cpu_s(pid: int) -> float:
    """CPU seconds of `pid` and every live descendant (worker processes), all threads."""
    try:
        children = [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        children = []
    return sum(_own_cpu_s(p) for p in (pid, *children))


@dataclass(frozen=True)
class InferenceJob:
    """What the measuring process needs: the repository and model the service serves, the
    service flags it was started with (so the engine settings are the service's), and the
    encoded images to fill the batches with."""

    repository: Path
    model: str
    batch_sizes: tuple[int, ...]
    images: tuple[bytes, ...]
    service_args: tuple[str, ...] = ()
    min_runs: int = 5
    min_seconds: float = 0.5


def _measure(job: InferenceJob) -> dict[str, Any]:
    """Runs in the fresh process: per batch size, CPU seconds per batch and wall-clock summary."""
    from contract.repository import scan_repository
    from runtime.engines import open_entry
    from runtime.preprocess import preprocess_into
    from service.__main__ import parse_settings

    settings = parse_settings(["--model-repository", str(job.repository), *job.service_args])
    entry = scan_repository(job.repository)[job.model]
    engine = open_entry(entry, settings.engine_config())
    largest = max(job.batch_sizes)
    pool = np.empty((largest, *entry.input_shape), dtype=np.float32)
    for i in range(largest):
        data = job.images[i % len(job.images)]
        preprocess_into(data, entry.preprocessing, pool[i], max_pixels=settings.max_image_pixels)
    rows: dict[str, Any] = {}
    for size in sorted(set(job.batch_sizes)):
        batch = np.ascontiguousarray(pool[:size])
        engine.run(batch)  # warm: this shape's first run
        engine.run(batch)
        walls: list[float] = []
        cpu0, start = time.process_time(), time.perf_counter()
        while len(walls) < job.min_runs or time.perf_counter() - start < job.min_seconds:
            t0 = time.perf_counter()
            engine.run(batch)
            walls.append(time.perf_counter() - t0)
        cpu = time.process_time() - cpu0
        rows[str(size)] = {
            "runs": len(walls),
            "cpu_ms_per_batch": 1000 * cpu / len(walls),
            "wall": summarize(walls),
        }
    return {
        "model": job.model,
        "model_sha256": entry.metadata.model_sha256,
        "providers": list(getattr(engine, "providers", [])),
        "batches": rows,
        "method": "the served model's engine (open_entry, the service's settings) in a fresh "
        "process doing nothing else, after the load: process CPU (time.process_time, all "
        "threads) per batch at the sizes the service formed; per request, interpolated at the "
        "level's mean batch",
    }


def inference_cost(job: InferenceJob) -> dict[str, Any]:
    """`_measure` in a fresh (spawned) process, so nothing else runs in the one measured."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_measure, job).result()


def batch_sizes_for(mean_batches: list[float], one_request: int = 1) -> tuple[int, ...]:
    """The batch of one request (the c=1 comparison) and the whole sizes around each mean."""
    sizes = {one_request}
    for mean in mean_batches:
        sizes |= {max(1, math.floor(mean)), max(1, math.ceil(mean))}
    return tuple(sorted(sizes))


def inference_ms_per_image(cost: dict[str, Any], mean_batch: float) -> float:
    """CPU per image at a (fractional) mean batch: CPU per batch interpolated linearly between
    the whole sizes around it, divided by the mean batch."""
    batches = cost["batches"]
    low, high = max(1, math.floor(mean_batch)), max(1, math.ceil(mean_batch))
    at_low = batches[str(low)]["cpu_ms_per_batch"]
    at_high = batches[str(high)]["cpu_ms_per_batch"]
    per_batch = at_low + (mean_batch - low) * (at_high - at_low) if high > low else at_low
    return per_batch / max(mean_batch, 1.0)
