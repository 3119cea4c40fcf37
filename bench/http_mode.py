"""`bench http` orchestration: pick the model, warm up, run the levels, compare with the engine."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import uvloop
from prometheus_client.parser import text_string_to_metric_families

from tests.support.grpc_client import grpc_payloads
from tests.support.launcher import Service
from tests.support.load import (
    LoadSpec,
    build_payloads,
    closed_loop,
    image_groups,
    open_loop,
    warm_up,
)

from .cpu import (
    InferenceJob,
    batch_sizes_for,
    inference_cost,
    inference_ms_per_image,
    process_cpu_s,
)
from .machine import pinned
from .report import load_results

T = TypeVar("T")

# What GET /models tells about the served model that the results should keep.
MODEL_INFO = (
    "version", "depth", "params", "macs", "model_sha256", "provider", "max_batch_size",
    "max_delay_ms",
)  # fmt: skip


@dataclass(frozen=True)
class HttpOptions:
    url: str | None
    model: str | None
    endpoint: str  # classify | embed
    images: tuple[tuple[str, bytes], ...]
    images_per_request: int
    concurrency: tuple[int, ...]
    rates: tuple[float, ...]
    requests: int
    duration_s: float
    timeout_s: float
    warmup_requests: int
    max_connections: int
    raw_body: bool
    client: str  # wire | httpx
    start_service: Path | None  # a repository: start the service on it for the run
    service_ready_timeout_s: float
    protocol: str = "http"  # http | grpc (the Open Inference Protocol, bench/grpc_client.py)
    grpc_url: str | None = None  # host:port of a running service's gRPC port
    # With --start-service: the cores the service runs on and those the load generator keeps
    # (None: both share every core), so that the client cannot starve the service's decoding.
    service_cpus: tuple[int, ...] | None = None
    client_cpus: tuple[int, ...] | None = None
    # The tax: extra flags for a service started here, the process whose CPU is sampled per
    # level (given, or the one started here), the repository its model is read from for the
    # inference CPU (given, or the one started here), and whether to measure that at all.
    service_args: tuple[str, ...] = ()
    service_pid: int | None = None
    repository: Path | None = None
    measure_inference: bool = True


@dataclass(frozen=True)
class Running:
    """What `target` yields: the base URL, the gRPC host:port and the server's process id."""

    url: str
    grpc: str | None
    pid: int | None


@contextlib.contextmanager
def target(options: HttpOptions, out: Path) -> Iterator[Running]:
    """The base URL, gRPC host:port and process to load: the given ones, or a service started
    here for the run (configured by the RESNET_SERVE_* variables of this process and
    `service_args`, access log off)."""
    if options.start_service is None:
        assert options.url is not None  # the CLI requires one of the two
        yield Running(options.url.rstrip("/"), options.grpc_url, options.service_pid)
        return
    out.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k.startswith("RESNET_SERVE_")}
    with pinned(options.service_cpus):  # the service process inherits these cores
        service = Service(
            options.start_service.resolve(), out / "service.log", *options.service_args, env=env
        )
    with service, pinned(options.client_cpus):
        service.wait_ready(options.service_ready_timeout_s)
        yield Running(service.url, f"{service.host}:{service.grpc_port}", service.process.pid)


def split_cpus(client_cores: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(service cores, load generator cores): the last `client_cores` usable cores go to the
    load generator, the rest to the service (at least one each)."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        raise ValueError(f"cannot split {len(cores)} core between service and load generator")
    take = min(max(client_cores, 1), len(cores) - 1)
    return tuple(cores[:-take]), tuple(cores[-take:])


def models_of(url: str) -> dict[str, dict[str, Any]]:
    """{name: description} from GET /models, whichever of the usual shapes it answers in."""
    response = httpx.get(f"{url}/models", timeout=10.0)
    response.raise_for_status()
    data = response.json()
    if isinstance(data, dict) and isinstance(data.get("models"), list | dict):
        data = data["models"]
    if isinstance(data, list):
        return {str(m["name"]): m for m in data if isinstance(m, dict) and "name" in m}
    if isinstance(data, dict):
        return {str(k): v if isinstance(v, dict) else {} for k, v in data.items()}
    raise ValueError(f"GET /models answered an unexpected shape: {type(data).__name__}")


def choose_model(models: dict[str, dict[str, Any]], wanted: str | None) -> str:
    if wanted:
        if models and wanted not in models:
            raise KeyError(f"the service has no model {wanted!r} (it has {sorted(models)})")
        return wanted
    if len(models) != 1:
        raise ValueError(f"the service has {len(models)} models {sorted(models)}; pick --model")
    return next(iter(models))


def vs_engine(
    http: dict[str, Any], engine: dict[str, Any] | None, model: str
) -> dict[str, Any] | None:
    """HTTP images/s at the highest concurrency against the best in-process rate with
    preprocessing for the same model graph (target: 95%), and against the best engine-only rate
    (inference alone, no decoding), when both are known."""
    if not engine or not http.get("closed"):
        return None
    graph = http.get("model_info", {}).get("model_sha256")
    rows = [
        r
        for r in engine.get("rows", [])
        if r.get("model") == model
        and r.get("with_preprocessing", {}).get("images_per_s")
        and (graph is None or r.get("model_sha256") in (None, graph))
    ]
    if not rows:
        return None
    best = max(rows, key=lambda r: r["with_preprocessing"]["images_per_s"])
    level = max(http["closed"], key=lambda lv: lv["concurrency"])
    engine_rate = best["with_preprocessing"]["images_per_s"]
    only = max(rows, key=lambda r: r.get("onnxruntime", {}).get("images_per_s") or 0.0)
    only_rate = only.get("onnxruntime", {}).get("images_per_s")
    return {
        "concurrency": level["concurrency"],
        "http_images_per_s": level["images_per_s"],
        "engine_images_per_s": engine_rate,
        "engine_batch_size": best["batch_size"],
        "ratio": level["images_per_s"] / engine_rate,
        "target": 0.95,
        "engine_only_images_per_s": only_rate,
        "engine_only_batch_size": only["batch_size"],
        "ratio_engine_only": level["images_per_s"] / only_rate if only_rate else None,
    }


# Counters of our service's /metrics, per model: inference time, batches, images in batches.
COUNTERS = {
    "inference_s": "resnet_serve_inference_duration_seconds_sum",
    "batches": "resnet_serve_inference_duration_seconds_count",
    "images": "resnet_serve_batch_size_images_sum",
}


def service_counters(url: str, model: str) -> dict[str, float] | None:
    """COUNTERS for `model` now; None when the target does not expose them (not our service)."""
    try:
        text = httpx.get(f"{url}/metrics", timeout=10.0).text
        families = list(text_string_to_metric_families(text))
    except (httpx.HTTPError, ValueError):
        return None
    values = {
        sample.name: sample.value
        for family in families
        for sample in family.samples
        if sample.labels.get("model") == model
    }
    if not all(name in values for name in COUNTERS.values()):
        return None
    return {key: values[name] for key, name in COUNTERS.items()}


def run_on_uvloop(work: Coroutine[Any, Any, T]) -> T:
    """`work` on uvloop, as the service runs: the load generator shares the machine with the
    service, so the less CPU it takes per request the more is left to what is measured."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(work)


def measured(
    url: str,
    model: str,
    level: Callable[[], Coroutine[Any, Any, dict[str, Any]]],
    pid: int | None = None,
) -> dict[str, Any]:
    """One load level, plus the load generator's own CPU time (it shares the machine with the
    service), the server's CPU time (process `pid` and its children, all threads) and, from the
    service's /metrics, its batches during the level. /metrics is read outside the CPU window."""
    before = service_counters(url, model)
    server_cpu = process_cpu_s(pid) if pid else None
    cpu = time.process_time()
    result = run_on_uvloop(level())
    result["client_cpu_s"] = time.process_time() - cpu
    if pid and server_cpu is not None:
        spent = process_cpu_s(pid) - server_cpu
        result["server_cpu_s"] = spent
        result["server_cpu_ms_per_request"] = (
            1000 * spent / result["requests"] if result["requests"] else None
        )
    after = service_counters(url, model)
    if before is not None and after is not None:
        delta = {key: after[key] - before[key] for key in COUNTERS}
        images = delta["images"]
        result["service"] = {
            "batches": delta["batches"],
            "images": images,
            "mean_batch": images / delta["batches"] if delta["batches"] else None,
            "inference_ms_per_image": 1000 * delta["inference_s"] / images if images else None,
        }
    return result


def run_http(options: HttpOptions, out: Path, engine_results: Path | None) -> dict[str, Any]:
    """The `http` section of results.json."""
    with target(options, out) as running:
        url, grpc_target = running.url, running.grpc
        models = models_of(url)
        model = choose_model(models, options.model)
        query = f"model={model}" + ("&top_k=5" if options.endpoint == "classify" else "")
        payloads = build_payloads(
            list(options.images), options.images_per_request, raw=options.raw_body
        )
        if options.protocol == "grpc":
            if grpc_target is None:
                raise ValueError("--protocol grpc needs --grpc-url host:port (or --start-service)")
            groups = image_groups(list(options.images), options.images_per_request)
            payloads = grpc_payloads(groups, model, options.endpoint)
        spec = LoadSpec(
            url=f"{url}/{options.endpoint}?{query}",
            payloads=payloads,
            grpc_target=grpc_target if options.protocol == "grpc" else None,
            requests=options.requests,
            duration_s=options.duration_s,
            timeout_s=options.timeout_s,
            expect_key="predictions" if options.endpoint == "classify" else "embeddings",
            client=options.client,
        )
        peak = max((*options.concurrency, 1))
        warm = run_on_uvloop(warm_up(spec, options.warmup_requests, peak))
        closed = [
            measured(url, model, lambda c=c: closed_loop(spec, c, f"concurrency {c}"), running.pid)
            for c in options.concurrency
        ]
        opened = [
            measured(
                url,
                model,
                lambda r=r: open_loop(spec, r, options.max_connections, f"{r:g} req/s"),
                running.pid,
            )
            for r in options.rates
        ]
    description = models.get(model, {})
    description = {**description.get("metadata", {}), **description}
    section: dict[str, Any] = {
        "url": options.url or f"started by bench on 127.0.0.1, log {out / 'service.log'}",
        "model": model,
        "model_info": {key: description.get(key) for key in MODEL_INFO},
        "endpoint": options.endpoint,
        "images": len(options.images),
        "images_per_request": options.images_per_request,
        "body": "raw image" if options.raw_body else "multipart/form-data",
        "client": options.client,
        "protocol": options.protocol,
        "cpus": (
            {"service": list(options.service_cpus), "client": list(options.client_cpus or ())}
            if options.service_cpus
            else None
        ),
        "requests_per_level": options.requests,
        "duration_s_per_level": options.duration_s,
        "timeout_s": options.timeout_s,
        "warmup_statuses": warm,
        "closed": closed,
        "open": opened,
    }
    engine = load_results(engine_results or out).get("engine")
    section["vs_engine"] = vs_engine(section, engine, model)
    section["tax"] = serving_tax(options, section)
    return section


def serving_tax(options: HttpOptions, section: dict[str, Any]) -> dict[str, Any] | None:
    """Per level, the server's CPU per request outside inference (its CPU per request minus the
    model's inference CPU per request at the mean batch the level formed); and the c=1 latency
    added over the engine (HTTP p50 at c=1 minus the engine's batch-1 p50), the engine being
    measured now, after the load, in a fresh process (`bench.cpu`). None without the server's
    CPU; inference figures absent without the repository or the service's batch counters."""
    levels = section["closed"] + section["open"]
    if not any("server_cpu_ms_per_request" in lv for lv in levels):
        return None
    repository = options.repository or options.start_service
    means = [
        lv["service"]["mean_batch"] for lv in levels if (lv.get("service") or {}).get("mean_batch")
    ]
    cost = None
    if options.measure_inference and repository is not None and means:
        job = InferenceJob(
            repository=repository.resolve(),
            model=section["model"],
            batch_sizes=batch_sizes_for(means, options.images_per_request),
            images=tuple(data for _, data in options.images),
            service_args=options.service_args,
        )
        cost = inference_cost(job)
    for lv in levels:
        served = lv.get("service") or {}
        per_request = lv.get("server_cpu_ms_per_request")
        tax: dict[str, Any] = {"server_cpu_ms_per_request": per_request}
        if cost is not None and served.get("mean_batch") and per_request is not None:
            inference = lv["images_per_request"] * inference_ms_per_image(
                cost, served["mean_batch"]
            )
            tax["inference_cpu_ms_per_request"] = inference
            tax["outside_inference_cpu_ms_per_request"] = per_request - inference
        lv["tax"] = tax
    result: dict[str, Any] = {"engine": cost, "c1_added_ms": None}
    one = next((lv for lv in section["closed"] if lv["concurrency"] == 1), None)
    if cost is not None and one is not None and one["latency"].get("n"):
        engine_p50 = cost["batches"][str(options.images_per_request)]["wall"]["p50_ms"]
        result["engine_batch_p50_ms"] = engine_p50
        result["engine_batch"] = options.images_per_request
        result["c1_added_ms"] = one["latency"]["p50_ms"] - engine_p50
    return result
