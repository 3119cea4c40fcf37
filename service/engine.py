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


class EngineError(RuntimeError):
    """A session could not be created as configured (missing provider, unreadable graph)."""


class Engine(Protocol):
    """What serving and the exporter's gates need of an engine (`OrtEngine`, `OpenVINOEngine`)."""

    provider: str
    providers: list[str]
    io_binding: bool

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

    @classmethod
    def from_settings(cls, settings: Settings) -> Self:
        """How the service builds sessions (the benchmark builds them the same way)."""
        return cls(
            providers=settings.provider_list,
            require_cuda=settings.require_cuda,
            intra_op_threads=settings.intra_op_threads,
            allow_spinning=settings.allow_spinning,
            cudnn_conv_algo_search=settings.cudnn_conv_algo_search,
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


def provider_options(providers: list[str], config: EngineConfig) -> list[dict[str, str]]:
    result: list[dict[str, str]] = []
    for provider in providers:
        if provider == CUDA:
            result.append(
                {
                    "device_id": str(config.cuda_device_id),
                    "cudnn_conv_algo_search": config.cudnn_conv_algo_search,
                }
            )
        else:
            result.append({})
    return result


def create_session(model_path: str | Path, config: EngineConfig) -> ort.InferenceSession:
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
            provider_options=provider_options(providers, config),
        )
    except Exception as exc:
        raise EngineError(f"cannot load {model_path}: {exc}") from exc
    in_use = session.get_providers()
    if config.require_cuda and CUDA not in in_use:
        raise EngineError(
            f"CUDA is required but the session for {model_path} fell back to {in_use}"
        )
    return session


_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


class OrtEngine:
    """One onnxruntime session for one graph, checked against the metadata it is served with.

    On CUDA, inputs and outputs go through IO binding: the batch is copied to the device once and
    outputs are allocated there by onnxruntime, instead of the implicit copies and host-side
    allocations of `session.run`.
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
        self.session = create_session(model_path, config)
        self.providers: list[str] = self.session.get_providers()
        self.provider = self.providers[0]
        self.input_name, self.output_names = input_name, list(output_names)
        self.io_binding = self.provider == CUDA if io_binding is None else io_binding
        self._device = ("cuda", config.cuda_device_id) if self.provider == CUDA else ("cpu", 0)
        self.input_dtype = self._check_io(model_path, input_shape)

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
            binding = self.session.io_binding()
            device, device_id = self._device
            value = ort.OrtValue.ortvalue_from_numpy(batch, device, device_id)
            binding.bind_ortvalue_input(self.input_name, value)
            for name in self.output_names:
                binding.bind_output(name, device, device_id)
            self.session.run_with_iobinding(binding)
            outputs = binding.copy_outputs_to_cpu()
        else:
            outputs = self.session.run(self.output_names, {self.input_name: batch})
        return [np.asarray(output, dtype=np.float32) for output in outputs]


def warm(
    engine: Engine,
    batch_sizes: Iterable[int],
    input_shape: tuple[int, ...],
    *,
    stop: threading.Event | None = None,
) -> list[int]:
    """Run every batch size once, so that no request pays for a first run (cuDNN's algorithm
    search, memory arena growth); the sizes warmed. Once `stop` is set, no further size starts
    (a SIGTERM during a long CUDA warm-up waits for one run, not for all of them)."""
    warmed = []
    for size in batch_sizes:
        if stop is not None and stop.is_set():
            break
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
    (bf16 on the CPU). Both offer `run`, `provider`, `providers` and `io_binding`."""
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
