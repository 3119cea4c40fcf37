"""onnxruntime engines: session options, sessions, and `OrtEngine`, the engine most models run
on (fp32 and int8, on the CPU or CUDA or TensorRT).

The exporter's parity gate builds its sessions here too, so that what it proves is what the
service runs (same graph optimizations, same threads, same provider order).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from contract.cpu import usable_cores

from .base import GPU_PROVIDERS, EngineConfig, EngineError, wants_io_binding
from .providers import CUDA, TENSORRT, provider_options, resolve_providers

log = logging.getLogger(__name__)

_OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def session_options(config: EngineConfig) -> ort.SessionOptions:
    options = ort.SessionOptions()
    try:
        options.graph_optimization_level = _OPT_LEVELS[config.graph_optimization]
    except KeyError:
        raise EngineError(
            f"unknown graph optimization {config.graph_optimization!r}; "
            f"choose one of {sorted(_OPT_LEVELS)}"
        ) from None
    options.intra_op_num_threads = config.intra_op_threads or usable_cores()
    options.inter_op_num_threads = config.inter_op_threads
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    spin = "1" if config.allow_spinning else "0"
    options.add_session_config_entry("session.intra_op.allow_spinning", spin)
    options.add_session_config_entry("session.inter_op.allow_spinning", spin)
    options.log_severity_level = 3
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
        self.kernel_precisions: dict[str, int] = {}  # onnxruntime does not report them
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
