"""`bench engine`: onnxruntime latency per model and batch size, in process.

Inference goes through `service.lifecycle.open_entry`, configured from the service's own
`Settings` (same engine per model, session options, threads, spinning, providers, IO binding on
CUDA), so the figures are the service's ceiling. With a PyTorch reference, the two run
alternately within each iteration (the order flips every iteration), so drifting machine load
hits both alike.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from contract.repository import ModelEntry, scan_repository
from runtime.engines import EngineConfig, open_entry
from runtime.engines.onnxruntime_engine import session_options
from service.core.settings import Settings
from tests.support.stats import summarize

Runner = Callable[[], Any]
# Targets of the benchmark issue: onnxruntime speed-up over PyTorch eager per batch size.
SPEEDUP_TARGETS = {1: 1.8, 8: 1.4}


@dataclass(frozen=True)
class Budget:
    """When a row stops: `iterations` timed runs, or `max_seconds`, but never under `min`."""

    iterations: int = 20
    warmup: int = 1
    min_iterations: int = 3
    max_seconds: float = 3.0

    def __post_init__(self) -> None:
        if self.iterations < 1 or self.warmup < 0 or self.min_iterations < 1:
            raise ValueError("need iterations >= 1, warmup >= 0, min_iterations >= 1")
        if self.max_seconds <= 0:
            raise ValueError("max_seconds must be positive")


@dataclass(frozen=True)
class EngineOptions:
    batch_sizes: tuple[int, ...] = (1, 8, 32)
    budget: Budget = Budget()
    compare_torch: bool = False
    images: tuple[bytes, ...] = ()  # non-empty: also time decoding + preprocessing + inference
    seed: int = 0


def service_config(repository: Path, overrides: dict[str, Any]) -> tuple[EngineConfig, Settings]:
    """The Settings the service would read (RESNET_SERVE_* included) and its EngineConfig."""
    settings = Settings(model_repository=repository, **overrides)
    return settings.engine_config(), settings


def time_interleaved(
    runners: dict[str, Runner], budget: Budget
) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Seconds per call of each runner, and each runner's first output (for a sanity check)."""
    names = list(runners)
    first: dict[str, Any] = {}
    for _ in range(budget.warmup):
        for name in names:
            output = runners[name]()
            first.setdefault(name, output)
    samples: dict[str, list[float]] = {name: [] for name in names}
    minimum = min(budget.min_iterations, budget.iterations)
    start = time.perf_counter()
    for i in range(budget.iterations):
        if i >= minimum and time.perf_counter() - start >= budget.max_seconds:
            break
        for name in names if i % 2 == 0 else reversed(names):
            t0 = time.perf_counter()
            output = runners[name]()
            samples[name].append(time.perf_counter() - t0)
            first.setdefault(name, output)
    return samples, first


def select_models(entries: dict[str, ModelEntry], only: list[str] | None) -> list[ModelEntry]:
    """The entries to measure, ImageNet first, then by depth."""
    if only:
        missing = sorted(set(only) - set(entries))
        if missing:
            raise KeyError(f"models {missing} are not in the repository (it has {sorted(entries)})")
        chosen = [entries[name] for name in only]
    else:
        chosen = list(entries.values())
    order = {"imagenet": 0, "cifar": 1}
    return sorted(
        chosen,
        key=lambda e: (order.get(e.metadata.family, 2), e.metadata.depth or 0, e.name),
    )


def _row_base(entry: ModelEntry, batch_size: int) -> dict[str, Any]:
    meta = entry.metadata
    return {
        "model": entry.name,
        "version": entry.version,
        "arch": meta.arch,
        "family": meta.family,
        "depth": meta.depth,
        "params": meta.params,
        "macs": meta.macs,
        "precision": entry.precision,
        "engine": entry.engine,
        "trained": entry.trained,
        "model_sha256": meta.model_sha256,
        "batch_size": batch_size,
    }


def _throughput(row: dict[str, Any], key: str, summary: dict[str, Any]) -> None:
    row[key] = summary
    if summary.get("n"):
        summary["images_per_s"] = row["batch_size"] / (summary["mean_ms"] / 1e3)
        if row.get("macs"):
            summary["gflops"] = 2 * row["macs"] * summary["images_per_s"] / 1e9


def _max_abs_diff(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return float(np.max(np.abs(np.asarray(a[0]) - np.asarray(b[0]))))


class _Pipeline:
    """Decode + preprocess a batch of encoded images, then run the session on it."""

    def __init__(
        self,
        preprocess: Callable[[list[bytes]], np.ndarray],
        infer: Callable[[np.ndarray], Any],
        batches: Iterable[list[bytes]],
    ) -> None:
        self.preprocess, self.infer = preprocess, infer
        self.batches = iter(batches)
        self.preprocess_s: list[float] = []

    def __call__(self) -> Any:
        t0 = time.perf_counter()
        batch = self.preprocess(next(self.batches))
        self.preprocess_s.append(time.perf_counter() - t0)
        return self.infer(batch)


def bench_entry(
    entry: ModelEntry,
    config: EngineConfig,
    options: EngineOptions,
    *,
    decode_workers: int,
    on_row: Callable[[dict[str, Any]], None],
) -> None:
    """Measure one model at every batch size; hand each finished row to `on_row`."""
    engine = open_entry(entry, config)
    providers = engine.providers
    torch_runner: Callable[[np.ndarray], Runner] | None = None
    device = None
    if options.compare_torch:
        from . import reference as ref

        device = ref.torch_device(providers)
        module = ref.build_reference(entry.metadata, device)
        torch_runner = functools.partial(ref.torch_runner, module, device=device)
    preprocessor = None
    if options.images:
        from .images import Preprocessor, cycle_batches

        preprocessor = Preprocessor(entry.preprocessing, decode_workers)
    rng = np.random.default_rng(options.seed)
    try:
        for batch_size in options.batch_sizes:
            batch = rng.standard_normal((batch_size, *entry.input_shape), dtype=np.float32)
            runners: dict[str, Runner] = {"onnxruntime": functools.partial(engine.run, batch)}
            if torch_runner is not None:
                runners["torch"] = torch_runner(batch)
            pipeline = None
            if preprocessor is not None:
                batches = cycle_batches(list(options.images), batch_size)
                pipeline = _Pipeline(preprocessor, engine.run, batches)
                runners["pipeline"] = pipeline
            samples, first = time_interleaved(runners, options.budget)
            row = _row_base(entry, batch_size)
            row["providers"] = providers
            row["io_binding"] = engine.io_binding
            _throughput(row, "onnxruntime", summarize(samples["onnxruntime"]))
            if "torch" in samples:
                _throughput(row, "torch", summarize(samples["torch"]))
                row["torch"]["device"] = device
                row["speedup"] = row["torch"]["p50_ms"] / row["onnxruntime"]["p50_ms"]
                row["max_abs_logit_diff"] = _max_abs_diff(first["onnxruntime"], first["torch"])
            if pipeline is not None:
                warm = options.budget.warmup
                _throughput(row, "with_preprocessing", summarize(samples["pipeline"]))
                row["with_preprocessing"]["preprocess"] = summarize(pipeline.preprocess_s[warm:])
            on_row(row)
    finally:
        if preprocessor is not None:
            preprocessor.close()


def speedup_targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's ORT-vs-eager targets per ImageNet row: measured, judged, never asserted."""
    checks = []
    for row in rows:
        target = SPEEDUP_TARGETS.get(row["batch_size"])
        if target is None or row.get("family") != "imagenet" or "speedup" not in row:
            continue
        checks.append(
            {
                "model": row["model"],
                "batch_size": row["batch_size"],
                "speedup": round(row["speedup"], 3),
                "target": target,
                "met": row["speedup"] >= target,
            }
        )
    return checks


def run_engine(
    repository: Path,
    options: EngineOptions,
    *,
    overrides: dict[str, Any],
    models: list[str] | None = None,
) -> dict[str, Any]:
    """The `engine` section of results.json for the models of `repository`."""
    config, settings = service_config(repository, overrides)
    entries = select_models(scan_repository(repository), models)
    threads = session_options(config).intra_op_num_threads
    torch_threads = None
    if options.compare_torch:
        from .reference import torch_threads as set_torch_threads

        torch_threads = set_torch_threads(threads)
    decode_workers = settings.decode_workers or threads
    rows: list[dict[str, Any]] = []
    total = len(entries) * len(options.batch_sizes)
    with tqdm(total=total, desc="engine", unit="row", file=sys.stderr, disable=None) as progress:
        for entry in entries:
            progress.set_postfix_str(entry.name)

            def done(row: dict[str, Any]) -> None:
                rows.append(row)
                progress.update()

            bench_entry(entry, config, options, decode_workers=decode_workers, on_row=done)
    return {
        "repository": str(repository),
        "engine_config": {
            **dataclasses.asdict(config),
            "intra_op_threads_resolved": threads,
            "source": "service Settings (defaults and RESNET_SERVE_* variables) + bench flags",
        },
        "torch": (
            {"threads": torch_threads, "interleaved_with_onnxruntime": True}
            if options.compare_torch
            else None
        ),
        "preprocessing": (
            {"images": len(options.images), "decode_workers": decode_workers}
            if options.images
            else None
        ),
        "budget": dataclasses.asdict(options.budget),
        "batch_sizes": list(options.batch_sizes),
        "timing": "host to host: input in, both outputs (logits, embedding) back; warm-up excluded",
        "rows": rows,
        "speedup_targets": speedup_targets(rows),
    }
