"""`bench gpu` (`make gpu-check`): everything a GPU host has to prove, in one run of <10 minutes.

1. `cuda`: onnxruntime offers CUDA (else: exit at once, one line), and a real session's
   provider is CUDA with IO binding, its answers matching the CPU provider's.
2. `export`: ImageNet ResNet-18..152 exported with `--max-batch-size 128` (the exporter's parity
   gate then runs onnxruntime on the GPU against PyTorch; the device is in metadata
   `parity.device`), and each again at fp16 through the precision gate on the GPU.
3. `engine`: latency per depth at batch 1/8/32/128, fp32 and fp16, through the service's engine;
   PyTorch eager on the same GPU interleaved with the fp32 rows when this torch build has CUDA.
4. `http`: ResNet-50 fp32 over HTTP at concurrency 64 and 256; the service and the load
   generator on disjoint cores (`--client-cores`, default 2 of a 16-core host).
5. Variants that only a GPU can judge, each off by default in the service: `cuda-graph`
   (ResNet-50 engine rows with one CUDA graph per batch size), `tensorrt` (ResNet-50 engine rows
   on the TensorRT provider, engine cache under the repository) and `http-nvimgcodec`
   (ResNet-50 over HTTP at c=256 with JPEGs decoded on the GPU). A variant whose provider or
   package is missing is recorded as skipped with the reason; it does not fail the run.

Steps 1-4 failing fail the run (exit 1); every step that ran is in results.json/results.md.
The step functions take their provider from their arguments, so that CI runs them on CPU
stand-ins (tests/test_gpu_path.py); `run_gpu_check` itself refuses a host without CUDA.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
IMAGENET = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
BATCH_SIZES = (1, 8, 32, 128)
HTTP_MODEL = "resnet50"


class NoGpuError(RuntimeError):
    """This host cannot run the GPU check at all."""


@dataclass(frozen=True)
class GpuCheckOptions:
    out: Path
    images: Path  # real photos: fp16 gate and HTTP load
    weights_dir: Path
    archs: tuple[str, ...] = IMAGENET
    batch_sizes: tuple[int, ...] = BATCH_SIZES
    concurrency: tuple[int, ...] = (64, 256)
    client_cores: int = 2
    http_max_batch_size: int = 64
    http_model: str = HTTP_MODEL
    http_requests: int | None = None  # per level; default max(2000, 8 x concurrency)
    budget_s: float = 570.0  # the whole run, 10 minutes with room to write results
    seed: int = 0
    # Where parity and gates must have run; CI runs these steps on CPU stand-ins with (CPU,).
    devices: tuple[str, ...] = (CUDA, TENSORRT)


def require_cuda() -> list[str]:
    """onnxruntime's providers, or NoGpuError (in well under a second: nothing else loads)."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if CUDA not in available:
        raise NoGpuError(
            f"no CUDA GPU here: onnxruntime {ort.__version__} offers {available}; make "
            "gpu-check needs an NVIDIA GPU and onnxruntime-gpu (pip install -e '.[gpu,export,"
            "bench]', without the CPU onnxruntime)"
        )
    from runtime.engines.providers import cuda_devices

    devices, reason = cuda_devices()
    if not devices:
        raise NoGpuError(f"no CUDA GPU here: {reason}")
    return available


class Steps:
    """Runs the steps in order within one time budget and records each one's outcome."""

    def __init__(self, budget_s: float) -> None:
        self.deadline = time.monotonic() + budget_s
        self.records: dict[str, dict[str, Any]] = {}

    def left_s(self) -> float:
        return self.deadline - time.monotonic()

    def run(
        self, name: str, step: Callable[[], dict[str, Any]], *, required: bool, min_s: float = 20
    ) -> dict[str, Any] | None:
        if self.left_s() < min_s:
            self.records[name] = {
                "status": "failed" if required else "skipped",
                "reason": f"time budget spent ({self.left_s():.0f} s left, needs ~{min_s:.0f})",
            }
            return None
        started = time.monotonic()
        try:
            result = step()
        except SkippedError as exc:
            self.records[name] = {"status": "skipped", "reason": str(exc)}
            return None
        except Exception as exc:
            text = str(exc).strip()
            self.records[name] = {
                "status": "failed",
                "reason": f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}",
                "traceback": traceback.format_exc(limit=8),
                "seconds": round(time.monotonic() - started, 1),
            }
            return None
        self.records[name] = {"status": "ok", "seconds": round(time.monotonic() - started, 1)}
        return result

    def failed(self, required: tuple[str, ...]) -> list[str]:
        return [n for n in required if self.records.get(n, {}).get("status") != "ok"]


class SkippedError(RuntimeError):
    """A variant this host cannot run (its provider or package is missing)."""


@contextlib.contextmanager
def service_env(values: dict[str, str]) -> Iterator[None]:
    """RESNET_SERVE_* for the services `bench http` starts (and the engine's Settings)."""
    saved = {k: v for k, v in os.environ.items() if k.startswith("RESNET_SERVE_")}
    for key in saved:
        del os.environ[key]
    os.environ.update(values)
    try:
        yield
    finally:
        for key in [k for k in os.environ if k.startswith("RESNET_SERVE_")]:
            del os.environ[key]
        os.environ.update(saved)


def prove_cuda_session(workdir: Path) -> dict[str, Any]:
    """Before anything is exported: a small convolution graph opened with require_cuda (a CPU
    fallback raises) really runs on CUDA, through IO binding, and agrees with the CPU."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from runtime.engines import CPU, EngineConfig
    from runtime.engines.onnxruntime_engine import OrtEngine

    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3), dtype=np.float32), "w")
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["images", "w"], ["conv"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["conv"], ["relu"]),
            helper.make_node("GlobalAveragePool", ["relu"], ["pooled"]),
            helper.make_node("Flatten", ["pooled"], ["embedding"], axis=1),
            helper.make_node("Softmax", ["embedding"], ["logits"], axis=1),
        ],
        "cuda-proof",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 3, 16, 16])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 8]),
            helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", 8]),
        ],
        initializer=[weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "cuda-proof.onnx"
    onnx.save(model, str(path))
    io = {
        "input_name": "images",
        "output_names": ["logits", "embedding"],
        "input_shape": (3, 16, 16),
    }
    gpu = OrtEngine(path, EngineConfig(providers=(CUDA, CPU), require_cuda=True), **io)
    cpu = OrtEngine(path, EngineConfig(providers=(CPU,)), **io)
    if gpu.provider != CUDA or not gpu.io_binding:
        raise RuntimeError(f"the session runs on {gpu.provider}, io binding {gpu.io_binding}")
    batch = rng.standard_normal((4, 3, 16, 16), dtype=np.float32)
    diff = max(
        float(np.max(np.abs(a - b))) for a, b in zip(gpu.run(batch), cpu.run(batch), strict=True)
    )
    if diff > 1e-3:
        raise RuntimeError(f"CUDA and CPU disagree by {diff:.3g} on a small convolution")
    return {"providers": gpu.providers, "io_binding": True, "max_abs_diff_vs_cpu": diff}


def prove_cuda(repo: Path, model: str) -> dict[str, Any]:
    """A real session on CUDA (require_cuda: a CPU fallback raises), with IO binding, whose
    outputs match the CPU provider's on the same batch."""
    import numpy as np

    from contract.repository import scan_repository
    from runtime.engines import EngineConfig, open_entry

    entry = scan_repository(repo)[model]
    gpu = open_entry(
        entry, EngineConfig(providers=(CUDA, "CPUExecutionProvider"), require_cuda=True)
    )
    if gpu.provider != CUDA or not gpu.io_binding:
        raise RuntimeError(f"{model}: session on {gpu.provider}, io binding {gpu.io_binding}")
    cpu = open_entry(entry, EngineConfig(providers=("CPUExecutionProvider",)))
    batch = np.random.default_rng(0).standard_normal((8, *entry.input_shape), dtype=np.float32)
    on_gpu, on_cpu = gpu.run(batch), cpu.run(batch)
    diff = [float(np.max(np.abs(a - b))) for a, b in zip(on_gpu, on_cpu, strict=True)]
    agree = float(np.mean(on_gpu[0].argmax(1) == on_cpu[0].argmax(1)))
    return {
        "model": model,
        "providers": gpu.providers,
        "io_binding": gpu.io_binding,
        "max_abs_diff_vs_cpu": {"logits": diff[0], "embedding": diff[1]},
        "top1_agreement_vs_cpu": agree,
    }


def export_all(options: GpuCheckOptions, repo: Path, precision: str) -> dict[str, Any]:
    """Export every arch at `precision` (skipping what is there); the parity and gate facts."""
    from export.exporter import ExportRequest, export_model
    from export.weights import find_checkpoint
    from models.registry import get_spec

    rows = []
    for arch in options.archs:
        checkpoint = find_checkpoint(get_spec(arch), options.weights_dir)
        started = time.monotonic()
        result = export_model(
            ExportRequest(
                arch=arch,
                weights=str(checkpoint) if checkpoint else f"random:{options.seed}",
                out=repo,
                max_batch_size=max(options.batch_sizes),
                skip_if_same_weights=True,
                precision=precision,
                gate_images=options.images if precision != "fp32" else None,
            )
        )
        meta = result.metadata
        parity = meta["parity"]
        gate = meta.get("precision_gate") or {}
        rows.append(
            {
                "model": result.name,
                "skipped_existing": result.skipped,
                "seconds": round(time.monotonic() - started, 1),
                "parity_device": parity.get("device"),
                "parity_passed": parity["passed"],
                "parity_max_abs_logits": max(r["logits"]["max_abs"] for r in parity["results"]),
                "gate_device": gate.get("device"),
                "gate_top1_agreement": gate.get("agreement", {}).get("top1_agreement"),
                "gate_max_abs_logit_diff": gate.get("agreement", {}).get("max_abs_logit_diff"),
            }
        )
        device = gate.get("device") if precision != "fp32" else parity.get("device")
        if device not in options.devices:
            raise RuntimeError(f"{result.name}: the gate ran on {device}, not on {options.devices}")
    return {"precision": precision, "models": rows}


def export_auto(options: GpuCheckOptions, repo: Path) -> dict[str, Any]:
    """`--precision auto` for the HTTP model on this GPU host: which candidate wins here (fp16 on
    CUDA is one), with every candidate's gate and images/s."""
    from export.calibration import load_calibration
    from export.exporter import ExportRequest, export_model
    from models.registry import get_spec

    spec = get_spec(options.http_model)
    result = export_model(
        ExportRequest(
            arch=options.http_model,
            weights=f"random:{options.seed}",
            out=repo,
            max_batch_size=max(options.batch_sizes),
            skip_if_same_weights=True,
            precision="auto",
            calibration_images=load_calibration(options.images, spec.preprocessing, 64),
            gate_images=options.images,
        )
    )
    choice = result.metadata["precision_choice"]
    return {"model": result.name, "chosen": choice["chosen"], "candidates": choice["candidates"]}


def torch_on_cuda() -> bool:
    """Whether this torch build can run the PyTorch eager reference on the same GPU."""
    import torch

    return bool(torch.cuda.is_available())


def engine_rows(
    repo: Path,
    models: list[str],
    batch_sizes: tuple[int, ...],
    overrides: dict[str, Any],
    warmup: int = 2,
    compare_torch: bool = False,
) -> dict[str, Any]:
    from .engine import Budget, EngineOptions, run_engine

    options = EngineOptions(
        batch_sizes=batch_sizes,
        budget=Budget(iterations=50, warmup=warmup, min_iterations=5, max_seconds=2.0),
        compare_torch=compare_torch,
    )
    settings = {"providers": "cuda", "require_cuda": True, "max_batch_size": max(batch_sizes)}
    return run_engine(repo, options, overrides={**settings, **overrides}, models=models)


def http_levels(
    options: GpuCheckOptions,
    repo: Path,
    out: Path,
    concurrency: tuple[int, ...],
    env: dict[str, str],
) -> dict[str, Any]:
    from .http_mode import HttpOptions, run_http, split_cpus
    from .images import load_images

    service_cpus, client_cpus = split_cpus(options.client_cores)
    requests = options.http_requests or max(2000, 8 * max(concurrency))
    base = {
        "RESNET_SERVE_REQUIRE_CUDA": "true",
        "RESNET_SERVE_MAX_BATCH_SIZE": str(options.http_max_batch_size),
        "RESNET_SERVE_MAX_QUEUE_IMAGES": str(max(1024, 4 * max(concurrency))),
        "RESNET_SERVE_DECODE_WORKERS": str(len(service_cpus)),
    }
    http = HttpOptions(
        url=None,
        model=options.http_model,
        endpoint="classify",
        images=tuple(load_images(options.images)),
        images_per_request=1,
        concurrency=concurrency,
        rates=(),
        requests=requests,
        duration_s=30.0,
        timeout_s=60.0,
        warmup_requests=min(requests, 2 * max(concurrency)),
        max_connections=max(concurrency),
        raw_body=False,
        client="wire",
        start_service=repo,
        service_ready_timeout_s=240.0,
        service_cpus=service_cpus,
        client_cpus=client_cpus,
        # The server's CPU per request is still sampled; the inference CPU beside it would open
        # the model again on the GPU at new batch sizes (cuDNN's search), which the 10-minute
        # budget of this check does not leave room for.
        measure_inference=False,
    )
    with service_env({**base, **env}):
        section = run_http(http, out, None)
    section["service_env"] = {**base, **env}
    return section


def single_model_repository(repo: Path, dest: Path, model: str) -> Path:
    """`dest` holding only `model` from `repo`, so that the service loads and warms it alone."""
    shutil.copytree(repo / model, dest / model, dirs_exist_ok=True)
    return dest


def variant_cuda_graph(options: GpuCheckOptions, repo: Path) -> dict[str, Any]:
    return engine_rows(
        repo, [options.http_model], options.batch_sizes, {"cuda_graph": True}, warmup=3
    )


def variant_tensorrt(options: GpuCheckOptions, repo: Path) -> dict[str, Any]:
    import onnxruntime as ort

    if TENSORRT not in ort.get_available_providers():
        raise SkippedError(f"onnxruntime {ort.__version__} has no {TENSORRT}")
    return engine_rows(
        repo, [options.http_model], options.batch_sizes, {"tensorrt": True}, warmup=2
    )


def variant_nvimgcodec(options: GpuCheckOptions, repo: Path, out: Path) -> dict[str, Any]:
    import importlib.util

    try:
        found = importlib.util.find_spec("nvidia.nvimgcodec") is not None
    except ModuleNotFoundError:
        found = False
    if not found:
        raise SkippedError(
            "nvImageCodec is not installed (pip install 'resnet-serve[gpu-options]')"
        )
    env = {"RESNET_SERVE_JPEG_DECODER": "nvimgcodec"}
    return http_levels(options, repo, out, (max(options.concurrency),), env)


def run_gpu_check(options: GpuCheckOptions) -> tuple[dict[str, Any], list[str]]:
    """The `gpu` results and the required steps that failed."""
    available = require_cuda()
    if not options.images.is_dir():
        raise NoGpuError(f"--images {options.images} is not a directory of photos")
    out = options.out
    repo = out / "repo"  # fp32 and fp16 of every depth
    http_repo = out / "http-repo"  # ResNet-50 fp32 alone, so the service warms only it
    steps = Steps(options.budget_s)
    results: dict[str, Any] = {"onnxruntime_providers": available, "steps": steps.records}
    results["cuda"] = steps.run("cuda", lambda: prove_cuda_session(out), required=True)
    if results["cuda"] is not None:
        results["export_fp32"] = steps.run(
            "export_fp32", lambda: export_all(options, repo, "fp32"), required=True, min_s=60
        )
    if results.get("export_fp32") is not None:
        results["resnet50_vs_cpu"] = steps.run(
            "resnet50_vs_cpu", lambda: prove_cuda(repo, options.http_model), required=True
        )
        results["export_fp16"] = steps.run(
            "export_fp16", lambda: export_all(options, repo, "fp16"), required=True, min_s=60
        )
        # PyTorch eager on the same GPU, interleaved, when this torch build has CUDA (the fp32
        # rows only: the reference is the fp32 model).
        torch_cuda = torch_on_cuda()
        results["torch_reference"] = "cuda" if torch_cuda else "none: this torch has no CUDA"
        results["engine"] = steps.run(
            "engine",
            lambda: engine_rows(
                repo, list(options.archs), options.batch_sizes, {}, compare_torch=torch_cuda
            ),
            required=True,
            min_s=60,
        )
        if results.get("export_fp16"):
            fp16 = [f"{a}_fp16" for a in options.archs]
            results["engine_fp16"] = steps.run(
                "engine_fp16",
                lambda: engine_rows(repo, fp16, options.batch_sizes, {}),
                required=True,
                min_s=40,
            )
        single_model_repository(repo, http_repo, options.http_model)
        results["http"] = steps.run(
            "http",
            lambda: http_levels(options, http_repo, out / "http", options.concurrency, {}),
            required=True,
            min_s=90,
        )
        results["cuda_graph"] = steps.run(
            "cuda_graph", lambda: variant_cuda_graph(options, repo), required=False, min_s=40
        )
        results["http_nvimgcodec"] = steps.run(
            "http_nvimgcodec",
            lambda: variant_nvimgcodec(options, http_repo, out / "http-nvimgcodec"),
            required=False,
            min_s=90,
        )
        results["export_auto"] = steps.run(
            "export_auto", lambda: export_auto(options, repo), required=False, min_s=120
        )
        # Last: building TensorRT engines can take minutes; a cache from an earlier run helps.
        results["tensorrt"] = steps.run(
            "tensorrt", lambda: variant_tensorrt(options, repo), required=False, min_s=120
        )
    failed = steps.failed(
        ("cuda", "export_fp32", "resnet50_vs_cpu", "export_fp16", "engine", "engine_fp16", "http")
    )
    return results, failed


def _engine_md(section: dict[str, Any] | None) -> list[str]:
    from .report import engine_table

    return [engine_table(section), ""] if section else ["(not run)", ""]


def _http_md(section: dict[str, Any] | None) -> list[str]:
    from .report import http_table

    if not section:
        return ["(not run)", ""]
    cpus = section.get("cpus") or {}
    return [
        f"Service on cores {cpus.get('service')}, load generator ({section.get('client')}) on "
        f"cores {cpus.get('client')}; service settings {section.get('service_env')}.",
        "",
        http_table(section["closed"], "concurrency", "concurrency"),
        "",
    ]


def render_markdown(results: dict[str, Any], failed: list[str]) -> str:
    from .report import machine_line

    lines = ["# make gpu-check", ""]
    lines += [f"Machine: {machine_line(results['machine'])}.", ""]
    lines += [f"Command: `{results.get('command', '')}`", ""]
    verdict = "all required steps passed" if not failed else f"FAILED: {', '.join(failed)}"
    lines += [
        f"Verdict: {verdict}.",
        "",
        "| step | status | seconds | reason |",
        "|---|---|---|---|",
    ]
    for name, record in results["steps"].items():
        lines.append(
            f"| {name} | {record['status']} | {record.get('seconds', '-')} | "
            f"{record.get('reason', '')} |"
        )
    lines += [""]
    cuda = results.get("cuda")
    if cuda:
        lines += [
            f"CUDA proof: session providers {cuda['providers']}, IO binding on, "
            f"max |CUDA - CPU| {cuda['max_abs_diff_vs_cpu']:.2e}.",
            "",
        ]
    for key in ("export_fp32", "export_fp16"):
        section = results.get(key)
        if not section:
            continue
        lines += [f"## Export {section['precision']} (parity and gate devices)", ""]
        lines += [
            "| model | parity device | parity max abs logits | gate device | gate top-1 "
            "agreement | seconds |",
            "|---|---|---|---|---|---|",
        ]
        for row in section["models"]:
            agreement = row["gate_top1_agreement"]
            lines.append(
                f"| {row['model']} | {row['parity_device']} | {row['parity_max_abs_logits']:.2e} | "
                f"{row['gate_device'] or '-'} | "
                f"{'-' if agreement is None else f'{agreement:.2%}'} | {row['seconds']} |"
            )
        lines += [""]
    lines += ["## Engine latency per depth, fp32", ""]
    lines += [f"PyTorch eager reference: {results.get('torch_reference', '-')}.", ""]
    lines += _engine_md(results.get("engine"))
    lines += ["## Engine latency per depth, fp16", "", *_engine_md(results.get("engine_fp16"))]
    lines += ["## ResNet-50 over HTTP", "", *_http_md(results.get("http"))]
    lines += ["## Variant: CUDA graphs (ResNet-50)", "", *_engine_md(results.get("cuda_graph"))]
    lines += ["## Variant: TensorRT (ResNet-50)", "", *_engine_md(results.get("tensorrt"))]
    lines += ["## Variant: nvImageCodec JPEG decoding over HTTP", ""]
    lines += _http_md(results.get("http_nvimgcodec"))
    auto = results.get("export_auto")
    lines += ["## --precision auto (ResNet-50) on this host", ""]
    if auto:
        lines += [f"Chosen: {auto['chosen']}.", "", "| candidate | status | images/s | reason |"]
        lines += ["|---|---|---|---|"]
        for c in auto["candidates"]:
            speed = " / ".join(f"{v:.1f}" for v in (c.get("images_per_s") or {}).values()) or "-"
            lines.append(
                f"| {c['precision']}-{c['engine']} | {c['status']} | {speed} | "
                f"{c.get('reason') or ''} |"
            )
    else:
        lines += ["Not run."]
    return "\n".join(lines)


def write_results(out: Path, results: dict[str, Any], failed: list[str]) -> list[Path]:
    """results.json and results.md in `out` (written atomically, like `bench`'s)."""
    import json

    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in (
        ("results.json", json.dumps({"gpu": results, "failed": failed}, indent=2) + "\n"),
        ("results.md", render_markdown(results, failed) + "\n"),
    ):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text, "utf-8")
        os.replace(tmp, out / name)
        written.append(out / name)
    return written
