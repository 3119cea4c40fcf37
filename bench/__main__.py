"""`python -m bench engine|http|floor|free-model|tax|precision|decode|gpu`: exceptions become exit
codes here only.

0 when the results were written; 1 with a one-line reason otherwise; 2 for usage errors.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

DEFAULT_OUT = Path("bench-results")


def int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def float_list(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {text!r}")
    return values


def name_list(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Latency per depth: onnxruntime in process (engine) and the service (http).",
    )
    sub = parser.add_subparsers(dest="mode", required=True)

    engine = sub.add_parser(
        "engine",
        help="onnxruntime latency per model and batch size",
        description="onnxruntime latency per model and batch size, with the service's session "
        "settings. Without --repository, the paper preset (ImageNet 18-152, CIFAR 20-110) is "
        "exported once into --cache-repository and measured.",
    )
    source = engine.add_mutually_exclusive_group()
    source.add_argument("--repository", type=Path, help="model repository to measure")
    source.add_argument("--preset", choices=["paper"], help="export and measure a preset (default)")
    engine.add_argument(
        "--cache-repository",
        type=Path,
        default=DEFAULT_OUT / "repo",
        help="where the preset is exported; existing versions are reused (default: %(default)s)",
    )
    engine.add_argument(
        "--weights-dir",
        type=Path,
        default=Path("weights"),
        help="checkpoints for the preset; random:SEED weights otherwise (default: %(default)s)",
    )
    engine.add_argument("--seed", type=int, default=0, help="random weights and inputs seed")
    engine.add_argument(
        "--models", type=name_list, help="comma-separated model names (default: all)"
    )
    engine.add_argument("--batch-sizes", type=int_list, default=(1, 8, 32), help="default: 1,8,32")
    engine.add_argument(
        "--iterations", type=int, default=20, help="timed runs per row at most (default: 20)"
    )
    engine.add_argument(
        "--min-iterations", type=int, default=3, help="timed runs per row at least (default: 3)"
    )
    engine.add_argument("--warmup", type=int, default=1, help="untimed runs per row (default: 1)")
    engine.add_argument(
        "--max-seconds-per-row",
        type=float,
        default=3.0,
        help="stop timing a row after this long, once --min-iterations ran (default: 3)",
    )
    engine.add_argument(
        "--compare-torch",
        action="store_true",
        help="also time PyTorch eager on the same weights and device, interleaved",
    )
    engine.add_argument(
        "--with-preprocessing",
        action="store_true",
        help="also time decoding + preprocessing (the service's code) + inference of --images",
    )
    engine.add_argument("--images", type=Path, help="directory of images for --with-preprocessing")
    engine.add_argument(
        "--providers", help="override the service's providers setting (auto, cpu, cuda, ...)"
    )
    engine.add_argument(
        "--intra-op-threads", type=int, help="override the service's threads per session"
    )
    engine.add_argument(
        "--allow-spinning",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="override the service's thread-spinning setting",
    )

    http = sub.add_parser(
        "http",
        help="load a running service over HTTP",
        description="Closed-loop load (--concurrency) and open-loop load at fixed arrival rates "
        "(--rate) against the service; every level is bounded by --requests and --duration-s. "
        "Each level also records the load generator's own CPU time and, from the service's "
        "/metrics, the mean batch and inference time per image. A service started with "
        "--start-service takes the RESNET_SERVE_* variables of this environment.",
    )
    http.add_argument("--url", help="base URL of a running service, e.g. http://127.0.0.1:8000")
    http.add_argument(
        "--start-service",
        action="store_true",
        help="start `python -m service` on --repository on a free local port, stop it after",
    )
    http.add_argument(
        "--repository",
        type=Path,
        help="model repository for --start-service; with --url, where the served model is read "
        "from to measure its inference CPU (the tax columns)",
    )
    http.add_argument(
        "--service-pid",
        type=int,
        help="with --url: the server's process id, whose CPU (and its children's) is sampled per "
        "level for the tax columns (a service started here is sampled anyway)",
    )
    http.add_argument(
        "--service-args",
        type=shlex.split,
        default=[],
        help="--start-service: extra flags for `python -m service`, one quoted string, e.g. "
        "--service-args='--workers 2'",
    )
    http.add_argument("--model", help="model name (default: the service's only model)")
    http.add_argument("--endpoint", choices=["classify", "embed"], default="classify")
    http.add_argument("--images", type=Path, required=True, help="directory of real images")
    http.add_argument("--images-per-request", type=int, default=1, help="default: 1")
    http.add_argument(
        "--concurrency",
        type=int_list,
        help="closed-loop levels (default: 1,8,32 unless only --rate is given)",
    )
    http.add_argument("--rate", type=float_list, help="open-loop arrival rates, requests/s")
    http.add_argument("--requests", type=int, default=200, help="requests per level (default: 200)")
    http.add_argument(
        "--duration-s", type=float, default=60.0, help="time limit per level (default: 60)"
    )
    http.add_argument(
        "--timeout-s", type=float, default=60.0, help="total time limit per request (default: 60)"
    )
    http.add_argument(
        "--warmup-requests", type=int, default=8, help="untimed requests first (default: 8)"
    )
    http.add_argument(
        "--max-connections", type=int, default=256, help="open loop: connections (default: 256)"
    )
    http.add_argument(
        "--raw-body", action="store_true", help="send raw image bodies, not multipart"
    )
    http.add_argument(
        "--client",
        choices=("wire", "httpx"),
        default="wire",
        help="load generator: wire, a lean keep-alive HTTP/1.1 client that leaves the cores to "
        "the service (default), or httpx",
    )
    http.add_argument(
        "--protocol",
        choices=("http", "grpc"),
        default="http",
        help="http: POST /classify or /embed (default); grpc: the Open Inference Protocol's "
        "ModelInfer with the same images as image_bytes (classification top 5 for classify)",
    )
    http.add_argument(
        "--grpc-url", help="--protocol grpc without --start-service: host:port, e.g. 127.0.0.1:8001"
    )
    http.add_argument(
        "--service-ready-timeout-s",
        type=float,
        default=300.0,
        help="--start-service: wait this long for /readyz (default: 300)",
    )
    http.add_argument(
        "--client-cores",
        type=int,
        default=0,
        help="--start-service: pin the load generator to this many cores and the service to "
        "the others, so that the client cannot take the service's decoding cores (default: 0, "
        "both share every core)",
    )
    http.add_argument(
        "--engine-results",
        type=Path,
        help="results.json with engine rows --with-preprocessing, for the HTTP/engine ratio "
        "(default: the one in --out)",
    )

    precision = sub.add_parser(
        "precision",
        help="--precision auto per depth: fp32 beside the chosen precision",
        description="Export each architecture with --precision auto (reusing versions already "
        "there) and tabulate, per depth, fp32 beside the chosen precision and every candidate's "
        "images/s and gate, as the exporter measured them through the service's engines.",
    )
    precision.add_argument(
        "--archs",
        type=name_list,
        help="comma-separated architectures (default: the paper preset, ImageNet 18-152 and "
        "CIFAR 20-110)",
    )
    precision.add_argument(
        "--repository",
        type=Path,
        default=DEFAULT_OUT / "auto-repo",
        help="where the auto exports go (default: %(default)s)",
    )
    precision.add_argument("--weights-dir", type=Path, default=Path("weights"))
    precision.add_argument(
        "--images",
        type=Path,
        required=True,
        help="real photos: gate and calibration of the ImageNet models",
    )
    precision.add_argument(
        "--cifar-labeled",
        type=Path,
        required=True,
        help="labeled CIFAR-10 .npz: gate and calibration of the CIFAR models",
    )
    precision.add_argument("--out", type=Path, default=DEFAULT_OUT / "precision")

    decode = sub.add_parser(
        "decode",
        help="decode + resize + normalize per photo on one core: Pillow against alternatives",
        description="Time the service's image path (Pillow) against simplejpeg (libjpeg-turbo, "
        "with and without DCT scaling) and a crop-box resize, per photo of one size, pinned to "
        "one core; each alternative's model input is compared with the service's.",
    )
    decode.add_argument("--images", type=Path, required=True, help="a directory of photos")
    decode.add_argument(
        "--size",
        default="500x375",
        help="photos of these WIDTHxHEIGHT sizes (+-1), comma-separated (default: %(default)s)",
    )
    decode.add_argument(
        "--arch", default="resnet50", help="whose preprocessing (default: %(default)s)"
    )
    decode.add_argument("--runs", type=int, default=50, help="timed runs per photo")
    decode.add_argument(
        "--cifar-accuracy",
        action="store_true",
        help="also score the trained CIFAR ResNet-20 on the labeled CIFAR-10 images upscaled to "
        "JPEGs (64-256 pixels), decoded in full and with --jpeg-dct-scaling",
    )
    decode.add_argument(
        "--cifar-labeled",
        type=Path,
        help="labeled CIFAR-10 .npz (needed with --cifar-accuracy)",
    )
    decode.add_argument(
        "--cifar-checkpoint", type=Path, default=Path("weights/resnet20-12fca82f.th")
    )
    decode.add_argument("--out", type=Path, default=DEFAULT_OUT / "decode")

    gpu = sub.add_parser(
        "gpu",
        help="everything a GPU host must prove, in one run (make gpu-check)",
        description="On a host with an NVIDIA GPU and onnxruntime-gpu, within 10 minutes: prove "
        "the sessions run on CUDA, export ImageNet ResNet-18..152 at fp32 and fp16 (parity and "
        "the fp16 gate on the GPU), engine latency at batch 1/8/32/128, ResNet-50 over HTTP at "
        "concurrency 64 and 256, and the CUDA-graph, TensorRT and nvImageCodec variants. "
        "Without CUDA it exits 1 at once.",
    )
    gpu.add_argument(
        "--images",
        type=Path,
        required=True,
        help="real photos for the fp16 gate and the HTTP load",
    )
    gpu.add_argument(
        "--weights-dir",
        type=Path,
        default=Path("weights"),
        help="checkpoints; random:0 weights otherwise (default: %(default)s)",
    )
    gpu.add_argument(
        "--client-cores",
        type=int,
        default=2,
        help="cores kept for the HTTP load generator; the service gets the rest (default: 2)",
    )
    gpu.add_argument(
        "--budget-s",
        type=float,
        default=570.0,
        help="time for the whole run; steps that would start past it are skipped (default: 570)",
    )

    from .tax import add_parsers

    floor, tax = add_parsers(sub, int_list)
    outs = {gpu: DEFAULT_OUT / "gpu", floor: DEFAULT_OUT / "floor", tax: DEFAULT_OUT / "tax"}
    for mode in (engine, http, gpu, floor, tax):
        mode.add_argument(
            "--out",
            type=Path,
            default=outs.get(mode, DEFAULT_OUT),
            help="output directory (default: %(default)s)",
        )
        mode.add_argument("-v", "--verbose", action="store_true", help="tracebacks on failure")
    return parser


def run_floor(args: argparse.Namespace, command: str) -> dict[str, Any]:
    from .tax import run_floor as floor

    return floor(args, command)


def run_free_model(args: argparse.Namespace) -> int:
    from .tax import run_free_model as free_model

    return free_model(args)


def run_engine_mode(args: argparse.Namespace, command: str) -> dict[str, Any]:
    from .engine import Budget, EngineOptions, run_engine

    if args.with_preprocessing and not args.images:
        raise ValueError("--with-preprocessing needs --images DIR")
    started = time.perf_counter()
    repository = args.repository
    export_s = 0.0
    if repository is None:
        from .preset import ensure_preset

        ensure_preset(
            args.preset or "paper",
            args.cache_repository,
            weights_dir=args.weights_dir,
            seed=args.seed,
            only=args.models,
        )
        repository = args.cache_repository
        export_s = time.perf_counter() - started
    images: tuple[bytes, ...] = ()
    if args.with_preprocessing:
        from .images import load_images

        images = tuple(data for _, data in load_images(args.images))
    overrides = {
        key: value
        for key, value in (
            ("providers", args.providers),
            ("intra_op_threads", args.intra_op_threads),
            ("allow_spinning", args.allow_spinning),
        )
        if value is not None
    }
    options = EngineOptions(
        batch_sizes=args.batch_sizes,
        budget=Budget(
            iterations=args.iterations,
            warmup=args.warmup,
            min_iterations=args.min_iterations,
            max_seconds=args.max_seconds_per_row,
        ),
        compare_torch=args.compare_torch,
        images=images,
        seed=args.seed,
    )
    section = run_engine(repository, options, overrides=overrides, models=args.models)
    section["command"] = command
    section["export_s"] = round(export_s, 1)
    section["runtime_s"] = round(time.perf_counter() - started, 1)
    return section


def run_http_mode(args: argparse.Namespace, command: str) -> dict[str, Any]:
    from .http_mode import HttpOptions, run_http
    from .images import load_images

    if args.start_service and args.repository is None:
        raise ValueError("--start-service needs --repository REPO")
    if not args.start_service and not args.url:
        raise ValueError("give --url of a running service, or --start-service --repository REPO")
    concurrency = args.concurrency or (() if args.rate else (1, 8, 32))
    service_cpus = client_cpus = None
    if args.client_cores:
        from .http_mode import split_cpus

        if not args.start_service:
            raise ValueError("--client-cores needs --start-service")
        service_cpus, client_cpus = split_cpus(args.client_cores)
    started = time.perf_counter()
    options = HttpOptions(
        url=args.url,
        model=args.model,
        endpoint=args.endpoint,
        images=tuple(load_images(args.images)),
        images_per_request=args.images_per_request,
        concurrency=concurrency,
        rates=args.rate or (),
        requests=args.requests,
        duration_s=args.duration_s,
        timeout_s=args.timeout_s,
        warmup_requests=args.warmup_requests,
        max_connections=args.max_connections,
        raw_body=args.raw_body,
        client=args.client,
        start_service=args.repository if args.start_service else None,
        service_ready_timeout_s=args.service_ready_timeout_s,
        protocol=args.protocol,
        grpc_url=args.grpc_url,
        service_cpus=service_cpus,
        client_cpus=client_cpus,
        service_args=tuple(args.service_args),
        service_pid=args.service_pid,
        repository=args.repository,
    )
    section = run_http(options, args.out, args.engine_results)
    section["command"] = command
    section["runtime_s"] = round(time.perf_counter() - started, 1)
    return section


def run_gpu_mode(args: argparse.Namespace, command: str, load_at_start: float | None) -> int:
    """`bench gpu`: 0 when every required step passed, 1 otherwise (results written either way,
    except on a host without CUDA, which is refused before anything runs)."""
    from .gpu import GpuCheckOptions, run_gpu_check, write_results
    from .machine import machine_facts

    started = time.perf_counter()
    options = GpuCheckOptions(
        out=args.out,
        images=args.images,
        weights_dir=args.weights_dir,
        client_cores=args.client_cores,
        budget_s=args.budget_s,
    )
    results, failed = run_gpu_check(options)
    results["command"] = command
    results["runtime_s"] = round(time.perf_counter() - started, 1)
    results["machine"] = {**machine_facts(), "load_average_1m_at_start": load_at_start}
    written = write_results(args.out, results, failed)
    print((args.out / "results.md").read_text("utf-8"))
    print(f"gpu: {results['runtime_s']:.0f} s; wrote {', '.join(str(p) for p in written)}")
    if failed:
        print(f"bench gpu failed: required steps {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def run_precision_mode(args: argparse.Namespace, command: str, load_at_start: float | None) -> int:
    from models.registry import PAPER_SET

    from . import precision
    from .machine import busy_note, machine_facts

    rows = precision.sweep(
        args.archs or list(PAPER_SET),
        args.repository,
        weights_dir=args.weights_dir,
        photos=args.images,
        cifar_labeled=args.cifar_labeled,
    )
    machine = {**machine_facts(), "load_average_1m_at_start": load_at_start}
    path = precision.write(rows, args.out, machine, command)
    from .plots import precision_vs_depth

    png = precision_vs_depth(rows, args.out)
    note = busy_note(machine)
    if note:
        print(f"warning: {note}", file=sys.stderr)
    print(precision.table(rows))
    print(f"\nprecision: wrote {path}, {args.out / precision.RESULTS_MD}, {png}")
    return 0


def run_decode_mode(args: argparse.Namespace, command: str) -> int:
    import json

    from models.registry import get_spec

    from . import decode
    from .machine import machine_facts

    prep = get_spec(args.arch).preprocessing
    section: dict[str, Any] = {"command": command, "machine": machine_facts(), "sizes": {}}
    machine = section["machine"]
    text = (
        f"`{command}`: {args.arch} preprocessing, one core of {machine['cpu_model']} "
        f"({' '.join(machine['cpu_flags'])})\n"
    )
    for size in args.size.split(","):
        width, _, height = size.partition("x")
        result = decode.run_decode(args.images, prep, (int(width), int(height)), args.runs)
        section["sizes"][size] = result
        text += f"\n{len(result['photos'])} JPEG photos of {size}:\n\n{decode.table(result)}\n"
    if args.cifar_accuracy:
        if args.cifar_labeled is None:
            raise ValueError("--cifar-accuracy needs --cifar-labeled (the labeled CIFAR-10 .npz)")
        section["cifar_upscaled"] = decode.upscaled_cifar_accuracy(
            args.cifar_labeled, args.cifar_checkpoint
        )
        text += (
            "\nTrained CIFAR ResNet-20 on the CIFAR-10 test images upscaled to JPEGs "
            f"(quality 90):\n\n{decode.accuracy_table(section['cifar_upscaled'])}\n"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "decode.json").write_text(json.dumps(section, indent=2) + "\n")
    (args.out / decode.RESULTS_MD).write_text(text)
    print(text)
    return 0


def finish(args: argparse.Namespace, section: dict[str, Any], load_at_start: float | None) -> None:
    """Write results.json/.md and the plot, print the table and where everything went."""
    from . import plots, report
    from .machine import busy_note, machine_facts

    machine = {**machine_facts(), "load_average_1m_at_start": load_at_start}
    path = report.save_results(args.out, args.mode, section, machine)
    note = busy_note(machine)
    if note:
        print(f"warning: {note}", file=sys.stderr)
    if args.mode == "engine":
        png = plots.latency_vs_depth(section, args.out)
        print(report.engine_table(section))
    else:
        png = plots.throughput_vs_concurrency(section, args.out) if section["closed"] else None
        levels = (
            ("closed", "concurrency", "concurrency"),
            ("open", "rate_per_s", "offered requests/s"),
        )
        for key, column, label in levels:
            if section[key]:
                print(report.http_table(section[key], column, label))
    written = [str(path), str(args.out / report.RESULTS_MD)] + ([str(png)] if png else [])
    print(f"\n{args.mode}: {section['runtime_s']:.0f} s; wrote {', '.join(written)}")


def run_tax_mode(args: argparse.Namespace, command: str, load_at_start: float | None) -> int:
    from . import report
    from .machine import busy_note, machine_facts
    from .tax import run_tax

    section = run_tax(args, command)
    machine = {**machine_facts(), "load_average_1m_at_start": load_at_start}
    path = report.save_results(args.out, "tax", section, machine)
    note = busy_note(machine)
    if note:
        print(f"warning: {note}", file=sys.stderr)
    print(report.tax_markdown({**section, "machine": machine}))
    print(f"\ntax: {section['runtime_s']:.0f} s; wrote {path}, {args.out / report.RESULTS_MD}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    command = "python -m bench " + shlex.join(argv)
    load_at_start = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    runners: dict[str, Callable[[argparse.Namespace, str], dict[str, Any]]] = {
        "engine": run_engine_mode,
        "http": run_http_mode,
        "floor": run_floor,
    }
    try:
        if args.mode == "gpu":
            return run_gpu_mode(args, command, load_at_start)
        if args.mode == "precision":
            return run_precision_mode(args, command, load_at_start)
        if args.mode == "decode":
            return run_decode_mode(args, command)
        if args.mode == "free-model":
            return run_free_model(args)
        if args.mode == "tax":
            return run_tax_mode(args, command, load_at_start)
        section = runners[args.mode](args, command)
        finish(args, section, load_at_start)
    except KeyboardInterrupt:
        print("bench interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # the CLI boundary: one line, non-zero
        if getattr(args, "verbose", False):
            traceback.print_exc()
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"bench {args.mode} failed: {message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
