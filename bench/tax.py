"""The serving tax as a first-class figure (issue 26): `bench floor`, `bench free-model` and
`bench tax`, which measures, in one run on one machine, the Python floor, CIFAR ResNet-20 alone
and over HTTP and gRPC, and the nearly free model with one and two front-end workers, and
writes the issue's ratios (results.json, results.md).

Every ratio divides figures of this one run: the floor, the engine and the service are measured
one after the other on the same cores, minutes apart, never taken from another run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

OUT = Path("bench-results")
RESNET20 = "cifar_resnet20"

# The targets, each judged on this run's figures (never asserted).
TARGETS = {
    "c1_added_ms": ("HTTP c=1 p50 minus engine batch-1 p50 (ms)", "<=", 1.0),
    "http_vs_engine": ("HTTP c=32 images/s over the engine's best batch", ">=", 0.60),
    "grpc_vs_engine": ("gRPC c=32 images/s over the engine's best batch", ">=", 0.60),
    "outside_vs_floor": (
        "server CPU per request outside inference (HTTP c=32) over the floor's (c=32)",
        "<=",
        3.0,
    ),
    "workers_2_vs_1": ("free model requests/s, --workers 2 over --workers 1 (c=32)", ">=", 1.6),
}


def add_parsers(sub: Any, int_list: Any) -> list[argparse.ArgumentParser]:
    """`floor`, `free-model` and `tax` on bench's sub-parsers; the parsers that take --out."""
    floor = sub.add_parser(
        "floor",
        help="the Python floor: a minimal ASGI app under the service's HTTP server",
        description="Start a minimal ASGI app (reads the multipart body, answers a small JSON) "
        "under the service's own HTTP server configuration (http_config) in its own process on "
        "a free port, and load it as `bench http` loads the service: requests/s, p50/p99 and "
        "the server's CPU per request per concurrency level.",
    )
    floor.add_argument("--images", type=Path, required=True, help="directory of real images")
    floor.add_argument("--concurrency", type=int_list, default=(1, 32), help="default: 1,32")
    floor.add_argument("--requests", type=int, default=3000, help="per level (default: 3000)")
    floor.add_argument("--duration-s", type=float, default=10.0, help="per level (default: 10)")
    floor.add_argument("--warmup-requests", type=int, default=50, help="default: 50")

    free = sub.add_parser(
        "free-model",
        help="write the nearly free model (GAP -> linear, CIFAR-sized) into a repository",
        description="Write a repository version of a CIFAR-sized graph whose inference costs "
        "microseconds (GlobalAveragePool -> linear, 10 CIFAR-10 classes, seeded random weights), "
        "after a parity check of onnxruntime against numpy; the service serves it unchanged. "
        "The highest version is reused when it holds the same graph.",
    )
    free.add_argument("--out", type=Path, required=True, help="the model repository")
    free.add_argument("--name", default="free_cifar", help="default: %(default)s")
    free.add_argument("--max-batch-size", type=int, default=32, help="default: 32")

    tax = sub.add_parser(
        "tax",
        help="the serving tax in one run: floor, ResNet-20 alone/HTTP/gRPC, free model",
        description="In one run on this machine: the Python floor (c=1, c=32); CIFAR ResNet-20 "
        "(the checkpoint in --weights-dir, exported into --cache-repository) alone (batch 1 p50, "
        "best batch) and over HTTP (c=1, c=32) and gRPC (c=32); the nearly free model over HTTP "
        "at c=32 with --workers 1 and 2; "
        "the issue's ratios, in results.json and results.md.",
    )
    tax.add_argument("--images", type=Path, required=True, help="CIFAR-sized real images")
    tax.add_argument("--weights-dir", type=Path, default=Path("weights"), help="default: weights")
    tax.add_argument(
        "--cache-repository",
        type=Path,
        default=OUT / "tax-repo",
        help="where ResNet-20 and the free model are written once (default: %(default)s)",
    )
    tax.add_argument("--requests", type=int, default=3000, help="per level (default: 3000)")
    tax.add_argument("--duration-s", type=float, default=8.0, help="per level (default: 8)")
    tax.add_argument("--concurrency", type=int, default=32, help="the high level (default: 32)")
    tax.add_argument(
        "--engine-seconds-per-row",
        type=float,
        default=2.0,
        help="ResNet-20 alone: time per batch size at most (default: 2)",
    )
    return [floor, tax]


def run_floor(args: argparse.Namespace, command: str) -> dict[str, Any]:
    """`bench floor`: the `floor` section of results.json."""
    from .images import load_images

    started = time.perf_counter()
    section = measure_floor(
        args.out,
        tuple(load_images(args.images)),
        concurrency=args.concurrency,
        requests=args.requests,
        duration_s=args.duration_s,
        warmup=args.warmup_requests,
    )
    section["command"] = command
    section["runtime_s"] = round(time.perf_counter() - started, 1)
    return section


def measure_floor(
    out: Path,
    images: tuple[tuple[str, bytes], ...],
    *,
    concurrency: tuple[int, ...],
    requests: int,
    duration_s: float,
    warmup: int,
) -> dict[str, Any]:
    from .floor import FloorServer
    from .http_mode import run_http

    with FloorServer(out / "floor.log") as floor:
        floor.wait_ready()
        options = _http_options(
            images,
            concurrency=concurrency,
            requests=requests,
            duration_s=duration_s,
            warmup=warmup,
            url=floor.url,
            service_pid=floor.pid,
        )
        section = run_http(options, out, None)
    section["url"] = f"bench.floor on 127.0.0.1 (its own process), log {out / 'floor.log'}"
    section["server"] = server_description()
    return section


def server_description() -> str:
    """What `http_config` builds today: the server and its HTTP protocol class."""
    import tempfile

    from service.core.settings import Settings
    from service.protocols.http_server import http_config

    from .floor import app

    with tempfile.TemporaryDirectory() as empty:
        config = http_config(app, Settings(model_repository=Path(empty), access_log=False))
    protocol = getattr(config, "http", "?")
    names = [c.__name__ for c in getattr(protocol, "__mro__", ())[:2]] or [str(protocol)]
    return f"{type(config).__module__}.{type(config).__name__}, http={' < '.join(names)}"


def _http_options(images: tuple[tuple[str, bytes], ...], **given: Any) -> Any:
    from .http_mode import HttpOptions

    requests, warmup = given.pop("requests"), given.pop("warmup")
    values: dict[str, Any] = {
        "url": None,
        "model": None,
        "endpoint": "classify",
        "images": images,
        "images_per_request": 1,
        "rates": (),
        "requests": requests,
        "timeout_s": 60.0,
        "warmup_requests": warmup,
        "max_connections": 256,
        "raw_body": False,
        "client": "wire",
        "start_service": None,
        "service_ready_timeout_s": 300.0,
    }
    values.update(given)
    return HttpOptions(**values)


def run_free_model(args: argparse.Namespace) -> int:
    from .free_model import write_free_model

    path, written = write_free_model(args.out, name=args.name, max_batch_size=args.max_batch_size)
    print(f"free-model: {'wrote' if written else 'already present, the same graph:'} {path}")
    return 0


def _level(section: dict[str, Any], concurrency: int) -> dict[str, Any]:
    return next(lv for lv in section["closed"] if lv["concurrency"] == concurrency)


def _row(name: str, section: dict[str, Any], concurrency: int) -> dict[str, Any]:
    """One measured row of the table from a `bench http` section."""
    level = _level(section, concurrency)
    tax = level.get("tax") or {}
    return {
        "workload": name,
        "concurrency": concurrency,
        "requests_per_s": level["requests_per_s"],
        "images_per_s": level["images_per_s"],
        "p50_ms": level["latency"].get("p50_ms"),
        "p99_ms": level["latency"].get("p99_ms"),
        "errors": level["errors"],
        "mean_batch": (level.get("service") or {}).get("mean_batch"),
        "server_cpu_ms_per_request": tax.get("server_cpu_ms_per_request"),
        "outside_inference_ms_per_request": tax.get("outside_inference_cpu_ms_per_request"),
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def judge(figures: dict[str, float | None]) -> list[dict[str, Any]]:
    checks = []
    for key, (what, op, target) in TARGETS.items():
        value = figures.get(key)
        met = None if value is None else (value <= target if op == "<=" else value >= target)
        checks.append({"key": key, "what": what, "value": value, "target": f"{op} {target:g}"})
        checks[-1]["met"] = met
    return checks


def run_tax(args: argparse.Namespace, command: str) -> dict[str, Any]:
    """`bench tax`: the `tax` section of results.json."""
    from .engine import Budget, EngineOptions, run_engine
    from .free_model import write_free_model
    from .http_mode import run_http
    from .images import load_images
    from .preset import ensure_preset

    started = time.perf_counter()
    out: Path = args.out
    high = args.concurrency
    images = tuple(load_images(args.images))
    if not images:
        raise ValueError(f"no images in {args.images}")
    cache: Path = args.cache_repository
    ensure_preset("paper", cache / "resnet20", weights_dir=args.weights_dir, only=[RESNET20])
    free_repo = cache / "free"
    free_path, _ = write_free_model(free_repo)
    load = {"requests": args.requests, "duration_s": args.duration_s, "warmup": 2 * high}

    def step(name: str) -> None:
        print(f"tax: {name} ({time.perf_counter() - started:.0f} s)", file=sys.stderr)

    step("the Python floor")
    floor = measure_floor(out / "floor", images, concurrency=(1, high), **load)
    step("CIFAR ResNet-20 in process")
    engine = run_engine(
        cache / "resnet20",
        EngineOptions(
            batch_sizes=tuple(sorted({1, 8, 16, high})),
            budget=Budget(
                iterations=1000, warmup=3, min_iterations=5, max_seconds=args.engine_seconds_per_row
            ),
        ),
        overrides={},
        models=[RESNET20],
    )
    step("CIFAR ResNet-20 over HTTP")
    resnet = cache / "resnet20"
    http = run_http(
        _http_options(images, concurrency=(1, high), start_service=resnet, **load),
        out / "http",
        None,
    )
    step("CIFAR ResNet-20 over gRPC")
    grpc = run_http(
        _http_options(images, concurrency=(high,), start_service=resnet, protocol="grpc", **load),
        out / "grpc",
        None,
    )
    step("the free model over HTTP")
    free = {
        "default": run_http(
            _http_options(images, concurrency=(1, high), start_service=free_repo, **load),
            out / "free",
            None,
        )
    }
    for workers in (1, 2):
        step(f"the free model, --workers {workers}")
        free[f"workers_{workers}"] = run_http(
            _http_options(
                images,
                concurrency=(high,),
                start_service=free_repo,
                service_args=("--workers", str(workers)),
                **load,
            ),
            out / f"free-workers-{workers}",
            None,
        )

    rows_by_batch = {r["batch_size"]: r["onnxruntime"] for r in engine["rows"]}
    best_batch = max(rows_by_batch, key=lambda b: rows_by_batch[b]["images_per_s"])
    engine_figures = {
        "batch1_p50_ms": rows_by_batch[1]["p50_ms"],
        "best_batch": best_batch,
        "best_images_per_s": rows_by_batch[best_batch]["images_per_s"],
    }
    rows = [
        _row("floor (minimal ASGI app)", floor, 1),
        _row("floor (minimal ASGI app)", floor, high),
        _row("CIFAR ResNet-20, HTTP", http, 1),
        _row("CIFAR ResNet-20, HTTP", http, high),
        _row("CIFAR ResNet-20, gRPC", grpc, high),
        _row("free model, HTTP", free["default"], 1),
        _row("free model, HTTP", free["default"], high),
    ]
    rows += [_row(f"free model, HTTP, --workers {w}", free[f"workers_{w}"], high) for w in (1, 2)]
    floor_cpu = _level(floor, high).get("server_cpu_ms_per_request")
    outside = (_level(http, high).get("tax") or {}).get("outside_inference_cpu_ms_per_request")
    figures = {
        "c1_added_ms": _level(http, 1)["latency"]["p50_ms"] - engine_figures["batch1_p50_ms"],
        "http_vs_engine": _level(http, high)["images_per_s"] / engine_figures["best_images_per_s"],
        "grpc_vs_engine": _level(grpc, high)["images_per_s"] / engine_figures["best_images_per_s"],
        "outside_vs_floor": _ratio(outside, floor_cpu),
        "workers_2_vs_1": _ratio(
            _level(free["workers_2"], high)["requests_per_s"],
            _level(free["workers_1"], high)["requests_per_s"],
        ),
    }
    return {
        "command": command,
        "runtime_s": round(time.perf_counter() - started, 1),
        "images": len(images),
        "concurrency": high,
        "engine": engine_figures,
        "rows": rows,
        "figures": figures,
        "targets": judge(figures),
        "free_model": str(free_path),
        "sections": {
            "floor": floor,
            "engine": engine,
            "http": http,
            "grpc": grpc,
            **{f"free_{key}": value for key, value in free.items()},
        },
    }
