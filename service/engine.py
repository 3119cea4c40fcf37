"""The one module that imports onnxruntime: session options, provider choice, inference.

The exporter's parity gate builds its sessions here too, so that what it proves is what the
service runs (same graph optimizations, same threads, same provider order).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

log = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


class EngineError(RuntimeError):
    """A session could not be created as configured (missing provider, unreadable graph)."""


@dataclass(frozen=True)
class EngineConfig:
    """How sessions are built. `providers="auto"` means CUDA first when present, then CPU."""

    providers: tuple[str, ...] | str = "auto"
    require_cuda: bool = False
    intra_op_threads: int = 0  # 0: one per available core
    inter_op_threads: int = 1
    allow_spinning: bool = True
    graph_optimization: str = "all"  # disable | basic | extended | all
    cudnn_conv_algo_search: str = "EXHAUSTIVE"  # EXHAUSTIVE | HEURISTIC | DEFAULT


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
            result.append({"cudnn_conv_algo_search": config.cudnn_conv_algo_search})
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


def run_session(
    session: ort.InferenceSession, input_name: str, output_names: list[str], batch: np.ndarray
) -> list[np.ndarray]:
    return session.run(output_names, {input_name: batch})
