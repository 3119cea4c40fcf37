"""Engines behind one protocol (`Engine`): onnxruntime (`OrtEngine`: fp32 and int8, CPU, CUDA,
TensorRT) and OpenVINO (`OpenVINOEngine`: bf16 and NNCF's int8 on the CPU). `open_entry` builds
the engine a repository entry's metadata asks for; `warm` runs each batch size once before
traffic. Only this package imports onnxruntime and OpenVINO for serving; the exporter builds
its gates' engines here too.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from pathlib import Path
from typing import get_args

import numpy as np

from contract.repository import EngineName, ModelEntry

from .base import (
    CPU,
    CUDA,
    GPU_PROVIDERS,
    IO_BINDING_MODES,
    TENSORRT,
    Engine,
    EngineConfig,
    EngineError,
    wants_io_binding,
)

__all__ = [
    "CPU",
    "CUDA",
    "GPU_PROVIDERS",
    "IO_BINDING_MODES",
    "TENSORRT",
    "Engine",
    "EngineConfig",
    "EngineError",
    "create_engine",
    "open_entry",
    "resolve_providers",
    "wants_io_binding",
    "warm",
]


def resolve_providers(config: EngineConfig) -> list[str]:
    """The onnxruntime providers sessions will get (refuses what cannot run here)."""
    from .providers import resolve_providers as resolve

    return resolve(config)


def open_entry(entry: ModelEntry, config: EngineConfig) -> Engine:
    """The engine a repository entry's metadata asks for."""
    return create_engine(
        entry.model_file,
        config,
        engine=entry.engine,
        precision=entry.precision,
        input_name=entry.input_name,
        output_names=[entry.logits_name, entry.embedding_name],
        input_shape=entry.input_shape,
    )


def warm(
    engine: Engine,
    batch_sizes: Iterable[int],
    input_shape: tuple[int, ...],
    *,
    stop: threading.Event | None = None,
) -> list[int]:
    """Run every batch size `engine.warm_runs` times, so that no
    request pays for a first run (cuDNN's algorithm search, memory arena growth, a CUDA graph
    capture); the sizes warmed. Once `stop` is set, no further size starts
    (a SIGTERM during a long CUDA warm-up waits for one run, not for all of them)."""
    warmed = []
    runs = engine.warm_runs
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
    (bf16, or int8 from NNCF, on the CPU)."""
    if engine == "onnxruntime":
        from .onnxruntime_engine import OrtEngine

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
