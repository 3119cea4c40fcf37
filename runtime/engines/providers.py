"""Which onnxruntime execution providers a session gets, and their options: CUDA first where it
is really usable (asked of the NVIDIA driver, not of onnxruntime's list), TensorRT when asked,
the CPU otherwise; GPU-only options refused at start-up where they cannot run.
"""

from __future__ import annotations

import ctypes
import logging
from pathlib import Path

import onnxruntime as ort

from .base import CPU, CUDA, TENSORRT, EngineConfig, EngineError

log = logging.getLogger(__name__)


def cuda_devices() -> tuple[int, str]:
    """How many CUDA devices the NVIDIA driver reports, and why there are none when 0.

    Asked of the driver (libcuda) itself: onnxruntime-gpu lists CUDAExecutionProvider as
    available whether or not a device or driver is there, and only falls back to the CPU,
    noisily, when a session is created.
    """
    try:
        driver = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0, (
            "the NVIDIA driver (libcuda.so.1) is not there; in a container, run it with GPU "
            "access (docker run --gpus all, or compose's GPU reservation, with the NVIDIA "
            "Container Toolkit)"
        )
    status = driver.cuInit(0)
    if status != 0:
        return 0, f"the NVIDIA driver failed to initialize (cuInit error {status})"
    count = ctypes.c_int(0)
    status = driver.cuDeviceGetCount(ctypes.byref(count))
    if status != 0 or count.value < 1:
        return 0, "the NVIDIA driver reports no CUDA device"
    return count.value, ""


def resolve_providers(config: EngineConfig) -> list[str]:
    """The provider list to hand onnxruntime, validated against what this build offers."""
    available = ort.get_available_providers()
    check_gpu_options(config, available)
    if config.tensorrt:
        return [TENSORRT, CUDA, CPU]
    if config.providers == "auto":
        wanted = [CUDA, CPU] if CUDA in available else [CPU]
    else:
        wanted = list(config.providers)
        unknown = [p for p in wanted if p not in available]
        if unknown:
            raise EngineError(
                f"execution providers {unknown} are not available in this onnxruntime build "
                f"(available: {available})"
            )
    if config.require_cuda and CUDA not in wanted:
        raise EngineError(
            "CUDA is required (require_cuda) but CUDAExecutionProvider is not available: "
            f"onnxruntime {ort.__version__} offers {available}. Install onnxruntime-gpu "
            "and check the NVIDIA driver, or drop the requirement to serve on CPU."
        )
    if CUDA in wanted:
        devices, reason = cuda_devices()
        if not devices:
            if config.require_cuda:
                raise EngineError(
                    f"CUDA is required (require_cuda) but no CUDA device is usable: {reason}; "
                    "or drop the requirement (RESNET_SERVE_REQUIRE_CUDA=false) to serve on CPU"
                )
            wanted = [p for p in wanted if p != CUDA]
            if not wanted:
                raise EngineError(f"only CUDA is configured but no CUDA device is usable: {reason}")
            log.warning("no CUDA device is usable (%s): serving with %s", reason, wanted)
    return wanted


def check_gpu_options(config: EngineConfig, available: list[str]) -> None:
    """Refuse, before anything loads, GPU-only options this onnxruntime build cannot honour."""
    build = f"onnxruntime {ort.__version__} offers {available}"
    if config.cuda_graph and CUDA not in available:
        raise EngineError(
            f"cuda_graph needs the CUDA execution provider, and {build}: install "
            "onnxruntime-gpu on a host with an NVIDIA GPU, or drop cuda_graph"
        )
    if config.tensorrt:
        missing = [p for p in (TENSORRT, CUDA) if p not in available]
        if missing:
            raise EngineError(
                f"tensorrt needs {missing}, and {build}: install onnxruntime-gpu and TensorRT's "
                "libraries (pip install 'resnet-serve[gpu,gpu-options]', README \"GPU\"), "
                "or drop tensorrt"
            )
        if config.providers != "auto" and list(config.providers)[:1] not in ([TENSORRT], [CUDA]):
            raise EngineError(
                f"tensorrt puts TensorRT, CUDA, CPU first; providers={list(config.providers)} "
                "asks for another order: leave providers at auto"
            )
    for option in ("cuda_graph", "tensorrt"):
        if getattr(config, option):
            devices, reason = cuda_devices()
            if not devices:
                raise EngineError(f"{option} needs a usable CUDA device: {reason}")


def provider_options(
    providers: list[str],
    config: EngineConfig,
    *,
    model_path: str | Path | None = None,
    input_name: str | None = None,
    input_shape: tuple[int, ...] | None = None,
) -> list[dict[str, str]]:
    result: list[dict[str, str]] = []
    for provider in providers:
        if provider == CUDA:
            options = {
                "device_id": str(config.cuda_device_id),
                "cudnn_conv_algo_search": config.cudnn_conv_algo_search,
                "use_tf32": "1" if config.cuda_tf32 else "0",
            }
            if config.cuda_graph:
                options["enable_cuda_graph"] = "1"
            result.append(options)
        elif provider == TENSORRT:
            result.append(tensorrt_options(config, model_path, input_name, input_shape))
        else:
            result.append({})
    return result


def tensorrt_cache_dir(config: EngineConfig, model_path: str | Path) -> Path:
    """Where TensorRT keeps the engines it builds for REPO/<name>/<version>/model.onnx: under
    the repository, in a hidden directory the repository scan skips, one per model version."""
    path = Path(model_path).resolve()
    version_dir = path.parent
    root = Path(config.tensorrt_cache_dir) if config.tensorrt_cache_dir else None
    if root is None:
        root = version_dir.parent.parent / ".tensorrt-cache"
    return root / version_dir.parent.name / version_dir.name


def tensorrt_options(
    config: EngineConfig,
    model_path: str | Path | None,
    input_name: str | None,
    input_shape: tuple[int, ...] | None,
) -> dict[str, str]:
    """TensorRT: engines cached on disk, one optimization profile from batch 1 to the largest
    batch (without it, every new batch size would rebuild the engine). The graph's precision is
    kept: no fp16 kernels for an fp32 export (its parity was proven at fp32); an fp16 export's
    float16 tensors run in fp16 as typed."""
    options = {
        "device_id": str(config.cuda_device_id),
        "trt_fp16_enable": "0",
        "trt_engine_cache_enable": "1",
        "trt_timing_cache_enable": "1",
    }
    if model_path is not None:
        cache = tensorrt_cache_dir(config, model_path)
        cache.mkdir(parents=True, exist_ok=True)
        options["trt_engine_cache_path"] = str(cache)
        options["trt_timing_cache_path"] = str(cache)
    if input_name is not None and input_shape is not None:
        dims = "x".join(str(d) for d in input_shape)
        options["trt_profile_min_shapes"] = f"{input_name}:1x{dims}"
        options["trt_profile_opt_shapes"] = f"{input_name}:{config.max_batch_size}x{dims}"
        options["trt_profile_max_shapes"] = f"{input_name}:{config.max_batch_size}x{dims}"
    return options
