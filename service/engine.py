"""The one module that imports onnxruntime: session options, provider choice, inference.

The exporter's parity gate builds its sessions here too, so that what it proves is what the
service runs (same graph optimizations, same threads, same provider order).
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Self, get_args

import numpy as np
import onnxruntime as ort

from .repository import EngineName
from .settings import CPU, CUDA, Settings

log = logging.getLogger(__name__)

__all__ = ["CPU", "CUDA", "Engine", "EngineConfig", "EngineError", "OrtEngine", "create_engine"]

TENSORRT = "TensorrtExecutionProvider"
# Providers whose sessions keep tensors on the GPU: IO binding and per-size warm-up pay there.
GPU_PROVIDERS = (TENSORRT, CUDA)
IO_BINDING_MODES = ("auto", "on", "off")


class EngineError(RuntimeError):
    """A session could not be created as configured (missing provider, unreadable graph)."""


class Engine(Protocol):
    """What serving and the exporter's gates need of an engine (`OrtEngine`, `OpenVINOEngine`)."""

    provider: str
    providers: list[str]
    io_binding: bool
    # Optional, read with getattr (OpenVINO has none of them): the batch sizes with bound
    # buffers, whether a CUDA graph replays, and how many runs warm each size.
    # bound_batch_sizes: list[int]; cuda_graph: bool; warm_runs: int

    def run(self, batch: np.ndarray) -> list[np.ndarray]:
        """Outputs (float32, in the metadata's output order) for a float32 batch [N, C, H, W]."""
        ...


def _default(field: str) -> Any:
    """The service's default for a session setting: one default, in `Settings`."""
    return Settings.model_fields[field].default


@dataclass(frozen=True)
class EngineConfig:
    """How sessions are built. `providers="auto"` means CUDA first when present, then CPU.
    Defaults are the service's (`Settings`); the exporter's gates use them too."""

    providers: tuple[str, ...] | str = "auto"
    require_cuda: bool = _default("require_cuda")
    intra_op_threads: int = _default("intra_op_threads")  # 0: one per available core
    inter_op_threads: int = 1
    allow_spinning: bool = _default("allow_spinning")
    graph_optimization: str = "all"  # disable | basic | extended | all
    cudnn_conv_algo_search: str = _default("cudnn_conv_algo_search")
    cuda_device_id: int = 0
    # auto: bound on the GPU only; on: bound wherever the session runs (CPU OrtValues included)
    io_binding: str = "auto"
    # TF32 rounds fp32 convolutions to a 10-bit mantissa on Ampere and later: off, so that what
    # the export's parity gate proved at fp32 tolerances is what serves.
    cuda_tf32: bool = False
    cuda_graph: bool = False  # one captured CUDA graph per batch size (needs IO binding)
    tensorrt: bool = False  # TensorRT first, then CUDA, then CPU
    tensorrt_cache_dir: str | None = None  # default: REPO/.tensorrt-cache/<name>/<version>
    max_batch_size: int = 32  # the largest TensorRT optimization profile

    @classmethod
    def from_settings(cls, settings: Settings) -> Self:
        """How the service builds sessions (the benchmark builds them the same way)."""
        return cls(
            providers=settings.provider_list,
            require_cuda=settings.require_cuda,
            intra_op_threads=settings.intra_op_threads,
            allow_spinning=settings.allow_spinning,
            cudnn_conv_algo_search=settings.cudnn_conv_algo_search,
            io_binding=settings.io_binding,
            cuda_tf32=settings.cuda_tf32,
            cuda_graph=settings.cuda_graph,
            tensorrt=settings.tensorrt,
            tensorrt_cache_dir=(
                str(settings.tensorrt_cache_dir) if settings.tensorrt_cache_dir else None
            ),
            max_batch_size=settings.max_batch_size,
        )


_OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        return os.cpu_count() or 1


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
    if config.io_binding not in IO_BINDING_MODES:
        raise EngineError(
            f"io_binding must be one of {IO_BINDING_MODES}, not {config.io_binding!r}"
        )
    build = f"onnxruntime {ort.__version__} offers {available}"
    if config.cuda_graph:
        if CUDA not in available:
            raise EngineError(
                f"cuda_graph needs the CUDA execution provider, and {build}: install "
                "onnxruntime-gpu on a host with an NVIDIA GPU, or drop cuda_graph"
            )
        if config.io_binding == "off":
            raise EngineError("cuda_graph replays fixed device buffers: it needs io_binding")
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


def session_options(config: EngineConfig) -> ort.SessionOptions:
    options = ort.SessionOptions()
    try:
        options.graph_optimization_level = _OPT_LEVELS[config.graph_optimization]
    except KeyError:
        raise EngineError(
            f"unknown graph optimization {config.graph_optimization!r}; "
            f"choose one of {sorted(_OPT_LEVELS)}"
        ) from None
    options.intra_op_num_threads = config.intra_op_threads or available_cores()
    options.inter_op_num_threads = config.inter_op_threads
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    spin = "1" if config.allow_spinning else "0"
    options.add_session_config_entry("session.intra_op.allow_spinning", spin)
    options.add_session_config_entry("session.inter_op.allow_spinning", spin)
    options.log_severity_level = 3
    return options


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


def create_session(
    model_path: str | Path,
    config: EngineConfig,
    *,
    input_name: str | None = None,
    input_shape: tuple[int, ...] | None = None,
) -> ort.InferenceSession:
    """A session for `model_path`; fails loudly when a required provider did not take the graph."""
    providers = resolve_providers(config)
    if CUDA in providers and hasattr(ort, "preload_dlls"):
        try:
            ort.preload_dlls()
        except Exception as exc:
            log.warning("onnxruntime.preload_dlls failed: %s", exc)
    try:
        session = ort.InferenceSession(
            str(model_path),
            sess_options=session_options(config),
            providers=providers,
            provider_options=provider_options(
                providers,
                config,
                model_path=model_path,
                input_name=input_name,
                input_shape=input_shape,
            ),
        )
    except Exception as exc:
        raise EngineError(f"cannot load {model_path}: {exc}") from exc
    in_use = session.get_providers()
    if config.require_cuda and CUDA not in in_use:
        raise EngineError(
            f"CUDA is required but the session for {model_path} fell back to {in_use}"
        )
    if config.tensorrt and in_use[0] != TENSORRT:
        raise EngineError(
            f"tensorrt is set but the session for {model_path} runs on {in_use}: onnxruntime "
            "could not load TensorRT (its libraries missing or of another version)"
        )
    return session


_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def wants_io_binding(mode: str, provider: str) -> bool:
    """`io_binding` setting -> whether a session on `provider` runs through IO binding."""
    if mode not in IO_BINDING_MODES:
        raise EngineError(f"io_binding must be one of {IO_BINDING_MODES}, not {mode!r}")
    return mode == "on" or (mode == "auto" and provider in GPU_PROVIDERS)


@dataclass(frozen=True)
class BoundBatch:
    """One batch size's buffers on the session's device: the input and every output allocated
    once and bound once; each batch of that size is copied into `input` and run in place."""

    size: int
    binding: ort.IOBinding
    input: ort.OrtValue
    outputs: tuple[ort.OrtValue, ...]
    run_options: ort.RunOptions


class OrtEngine:
    """One onnxruntime session for one graph, checked against the metadata it is served with.

    With IO binding (on GPU providers by default, anywhere with `io_binding="on"`), every batch
    size gets its input and output buffers on the device once, bound once, and reused by every
    later batch of that size: a batch costs one copy in and one copy of the outputs back,
    instead of the allocations and implicit copies of `session.run`. Fixed buffer addresses
    are also what a captured CUDA graph replays (`cuda_graph`, one graph per batch size).
    """

    def __init__(
        self,
        model_path: str | Path,
        config: EngineConfig,
        *,
        input_name: str,
        output_names: list[str],
        input_shape: tuple[int, ...],
        io_binding: bool | None = None,
    ) -> None:
        self.session = create_session(
            model_path, config, input_name=input_name, input_shape=input_shape
        )
        self.providers: list[str] = self.session.get_providers()
        self.provider = self.providers[0]
        self.input_name, self.output_names = input_name, list(output_names)
        mode = config.io_binding if io_binding is None else ("on" if io_binding else "off")
        self.io_binding = wants_io_binding(mode, self.provider)
        on_gpu = self.provider in GPU_PROVIDERS
        self._device = ("cuda", config.cuda_device_id) if on_gpu else ("cpu", 0)
        self.cuda_graph = config.cuda_graph and on_gpu and self.io_binding
        self.input_shape = tuple(input_shape)
        self.input_dtype = self._check_io(model_path, input_shape)
        outputs = {o.name: o for o in self.session.get_outputs()}
        self._output_dtypes = [_NUMPY_TYPES.get(outputs[n].type, np.float32) for n in output_names]
        self._bound: dict[int, BoundBatch] = {}
        self._lock = threading.Lock()  # one batch at a time through the shared buffers

    def _check_io(self, model_path: str | Path, input_shape: tuple[int, ...]) -> type[np.generic]:
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = {o.name for o in self.session.get_outputs()}
        graph_input = inputs.get(self.input_name)
        if graph_input is None or len(inputs) != 1:
            raise EngineError(
                f"{model_path}: expected the single input {self.input_name!r}, "
                f"the graph has {sorted(inputs)}"
            )
        missing = [name for name in self.output_names if name not in outputs]
        if missing:
            raise EngineError(f"{model_path}: outputs {missing} not in the graph {sorted(outputs)}")
        batch, *dims = graph_input.shape
        if isinstance(batch, int):
            raise EngineError(f"{model_path}: the batch dimension is fixed at {batch}, not dynamic")
        if len(dims) != len(input_shape) or any(
            isinstance(d, int) and d != want for d, want in zip(dims, input_shape, strict=True)
        ):
            raise EngineError(
                f"{model_path}: input shape {graph_input.shape} does not fit [N, *{input_shape}]"
            )
        if graph_input.type not in _NUMPY_TYPES:
            raise EngineError(f"{model_path}: unsupported input type {graph_input.type}")
        return _NUMPY_TYPES[graph_input.type]

    def run(self, batch: np.ndarray) -> list[np.ndarray]:
        """Outputs (as float32, in `output_names` order) for a float32 batch [N, C, H, W]."""
        batch = np.ascontiguousarray(batch, dtype=self.input_dtype)
        if self.io_binding:
            return self._run_bound(batch)
        outputs = self.session.run(self.output_names, {self.input_name: batch})
        return [np.asarray(output, dtype=np.float32) for output in outputs]

    @property
    def bound_batch_sizes(self) -> list[int]:
        """The batch sizes whose device buffers exist (warmed or seen), ascending."""
        return sorted(self._bound)

    def bound_batch(self, size: int) -> BoundBatch:
        """The buffers of batch size `size`, allocated and bound on first use."""
        bound = self._bound.get(size)
        if bound is not None:
            return bound
        device, device_id = self._device
        shape = (size, *self.input_shape)
        value = ort.OrtValue.ortvalue_from_shape_and_type(
            shape, self.input_dtype, device, device_id
        )
        outputs = tuple(
            ort.OrtValue.ortvalue_from_shape_and_type(out_shape, dtype, device, device_id)
            for out_shape, dtype in zip(self._output_shapes(size), self._output_dtypes, strict=True)
        )
        binding = self.session.io_binding()
        binding.bind_ortvalue_input(self.input_name, value)
        for name, output in zip(self.output_names, outputs, strict=True):
            binding.bind_ortvalue_output(name, output)
        run_options = ort.RunOptions()
        if self.cuda_graph:
            # onnxruntime captures one graph per id on its first runs, then replays it.
            run_options.add_run_config_entry("gpu_graph_id", str(size))
        bound = BoundBatch(size, binding, value, outputs, run_options)
        self._bound[size] = bound
        return bound

    def _output_shapes(self, size: int) -> list[tuple[int, ...]]:
        """Each output's shape at batch `size`: from the graph when only the batch is dynamic,
        else from one plain run (at first use of the size, never captured as a CUDA graph)."""
        declared = {o.name: o.shape for o in self.session.get_outputs()}
        rows = [declared[name][1:] for name in self.output_names]
        if all(isinstance(d, int) for row in rows for d in row):
            return [(size, *row) for row in rows]
        options = ort.RunOptions()
        options.add_run_config_entry("gpu_graph_id", "-1")
        zeros = np.zeros((size, *self.input_shape), dtype=self.input_dtype)
        probe = self.session.run(self.output_names, {self.input_name: zeros}, options)
        return [tuple(out.shape) for out in probe]

    @property
    def warm_runs(self) -> int:
        """Runs per batch size at warm-up: onnxruntime captures a CUDA graph only after a few
        ordinary runs of it, and the capture must not land on a request."""
        return 3 if self.cuda_graph else 1

    def _run_bound(self, batch: np.ndarray) -> list[np.ndarray]:
        with self._lock:
            bound = self.bound_batch(len(batch))
            bound.input.update_inplace(batch)
            self.session.run_with_iobinding(bound.binding, bound.run_options)
            # Copies: the buffers are overwritten by the next batch of this size.
            return [np.array(out.numpy(), dtype=np.float32) for out in bound.outputs]


def warm(
    engine: Engine,
    batch_sizes: Iterable[int],
    input_shape: tuple[int, ...],
    *,
    stop: threading.Event | None = None,
) -> list[int]:
    """Run every batch size (`engine.warm_runs` times, once when it has none), so that no
    request pays for a first run (cuDNN's algorithm search, memory arena growth, a CUDA graph
    capture); the sizes warmed. Once `stop` is set, no further size starts
    (a SIGTERM during a long CUDA warm-up waits for one run, not for all of them)."""
    warmed = []
    runs = getattr(engine, "warm_runs", 1)
    for size in batch_sizes:
        if stop is not None and stop.is_set():
            break
        for _ in range(runs):
            engine.run(np.zeros((size, *input_shape), dtype=np.float32))
        warmed.append(size)
    return warmed


def create_engine(
    model_path: str | Path,
    config: EngineConfig,
    *,
    engine: str = "onnxruntime",
    precision: str = "fp32",
    input_name: str,
    output_names: list[str],
    input_shape: tuple[int, ...],
) -> Engine:
    """The engine a model's metadata asks for: onnxruntime (fp32, int8; CPU or CUDA) or OpenVINO
    (bf16, or int8 from NNCF, on the CPU). Both offer `run`, `provider`, `providers` and
    `io_binding`."""
    if engine == "onnxruntime":
        return OrtEngine(
            model_path,
            config,
            input_name=input_name,
            output_names=output_names,
            input_shape=input_shape,
        )
    if engine == "openvino":
        if config.require_cuda:
            raise EngineError(f"CUDA is required but {model_path} is served by OpenVINO on the CPU")
        from .openvino_engine import OpenVINOEngine

        return OpenVINOEngine(
            model_path,
            precision=precision,
            threads=config.intra_op_threads,
            input_name=input_name,
            output_names=output_names,
            input_shape=input_shape,
        )
    raise EngineError(
        f"{model_path}: unknown engine {engine!r}; choose one of {get_args(EngineName)}"
    )
