"""What every engine is and how engines are configured, free of any engine library: the `Engine`
protocol (onnxruntime's `OrtEngine`, `OpenVINOEngine`), `EngineConfig` (plain data: the service's
settings and the exporter's gates build engines from it), `EngineError`, and the execution
provider names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol, get_args

import numpy as np

# onnxruntime's provider names, spelled here so that configuration needs no onnxruntime import.
CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
# Providers whose sessions keep tensors on the GPU: IO binding and per-size warm-up pay there.
GPU_PROVIDERS = (TENSORRT, CUDA)
IoBinding = Literal["auto", "on", "off"]
IO_BINDING_MODES: tuple[str, ...] = get_args(IoBinding)
CudnnSearch = Literal["EXHAUSTIVE", "HEURISTIC", "DEFAULT"]


class EngineError(RuntimeError):
    """An engine could not be created as configured (missing provider, unreadable graph)."""


class Engine(Protocol):
    """What serving and the exporter's gates need of an engine (`OrtEngine`, `OpenVINOEngine`).

    Every member is declared; an engine without a notion answers its neutral value (OpenVINO:
    no bound buffers, no CUDA graph, one warm-up run).
    """

    provider: str  # the provider (or device) the graph really runs on
    providers: list[str]  # in priority order
    io_binding: bool  # inputs and outputs bound to device buffers once per batch size

    @property
    def bound_batch_sizes(self) -> list[int]:
        """The batch sizes whose device buffers exist, ascending ([] without IO binding)."""
        ...

    @property
    def cuda_graph(self) -> bool:
        """Whether each batch size replays a captured CUDA graph."""
        ...

    @property
    def warm_runs(self) -> int:
        """Runs per batch size at warm-up (a CUDA graph is captured after a few)."""
        ...

    @property
    def kernel_precisions(self) -> dict[str, int]:
        """Compute layers per precision as compiled for this machine ({} when not known)."""
        ...

    def run(self, batch: np.ndarray) -> list[np.ndarray]:
        """Outputs (float32, in the metadata's output order) for a float32 batch [N, C, H, W]."""
        ...


@dataclass(frozen=True)
class EngineConfig:
    """How engines are built. The defaults here are the service's defaults (its `Settings` take
    them from this class) and what the exporter's gates run with.

    `providers="auto"` means CUDA first when this onnxruntime build has it, then CPU."""

    providers: tuple[str, ...] | str = "auto"
    require_cuda: bool = False
    intra_op_threads: int = 0  # 0: one per usable core
    inter_op_threads: int = 1
    allow_spinning: bool = False
    graph_optimization: str = "all"  # disable | basic | extended | all
    cudnn_conv_algo_search: CudnnSearch = "EXHAUSTIVE"
    cuda_device_id: int = 0
    # auto: bound on the GPU only; on: bound wherever the session runs (CPU OrtValues included)
    io_binding: IoBinding = "auto"
    # TF32 rounds fp32 convolutions to a 10-bit mantissa on Ampere and later: off, so that what
    # the export's parity gate proved at fp32 tolerances is what serves.
    cuda_tf32: bool = False
    cuda_graph: bool = False  # one captured CUDA graph per batch size (needs IO binding)
    tensorrt: bool = False  # TensorRT first, then CUDA, then CPU
    tensorrt_cache_dir: str | None = None  # default: REPO/.tensorrt-cache/<name>/<version>
    max_batch_size: int = 32  # the largest TensorRT optimization profile

    def __post_init__(self) -> None:
        if self.io_binding not in IO_BINDING_MODES:
            raise EngineError(
                f"io_binding must be one of {IO_BINDING_MODES}, not {self.io_binding!r}"
            )
        if self.cuda_graph and self.io_binding == "off":
            raise EngineError("cuda_graph replays fixed device buffers: it needs io_binding")
        if self.cuda_graph and self.tensorrt:
            raise EngineError("cuda_graph applies to the CUDA provider; drop it with tensorrt")


def wants_io_binding(mode: str, provider: str) -> bool:
    """`io_binding` setting -> whether a session on `provider` runs through IO binding."""
    if mode not in IO_BINDING_MODES:
        raise EngineError(f"io_binding must be one of {IO_BINDING_MODES}, not {mode!r}")
    return mode == "on" or (mode == "auto" and provider in GPU_PROVIDERS)
