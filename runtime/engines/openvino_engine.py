"""The second engine: OpenVINO on the CPU, for bf16 on AMX / AVX512-BF16 units and for int8
graphs quantized by NNCF (VNNI and AMX int8 kernels; plain AVX2 elsewhere).

Chosen over onnxruntime's OpenVINO execution provider for packaging (the EP was not measured):
it ships as `onnxruntime-openvino`, a third build of the `onnxruntime` module that cannot be
installed beside the CPU or GPU one, and lags OpenVINO releases; the OpenVINO runtime installs
beside either build and reads the same ONNX graph. Which engine and precision is fastest depends
on the CPU (bf16 on AMX, int8 on VNNI and even on plain AVX2): `--precision auto` measures it on
the serving host (README "The fastest gated precision per depth").

An `Engine` (runtime.engines.base), as `OrtEngine` is; it binds no buffers and captures no CUDA
graphs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from contract.cpu import usable_cores

from .base import EngineError

# Our precision names -> OpenVINO's INFERENCE_PRECISION_HINT, and the capability it needs. An
# int8 graph carries its own quantize/dequantize nodes; what is not quantized runs in f32, set
# explicitly because OpenVINO's default on a BF16-capable CPU is bf16 (which the gate would not
# have judged).
INFERENCE_PRECISION = {"bf16": ("bf16", "BF16"), "fp32": ("f32", "FP32"), "int8": ("f32", "INT8")}


class OpenVINOEngine:
    def __init__(
        self,
        model_path: str | Path,
        *,
        precision: str,
        threads: int,
        input_name: str,
        output_names: list[str],
        input_shape: tuple[int, ...],
    ) -> None:
        try:
            import openvino as ov
        except ImportError:
            raise EngineError(
                f"{model_path} is served with OpenVINO ({precision}), which is not installed: "
                "pip install 'resnet-serve[openvino]'"
            ) from None
        if precision not in INFERENCE_PRECISION:
            raise EngineError(f"OpenVINO engine: unknown precision {precision!r}")
        hint, capability = INFERENCE_PRECISION[precision]
        core = ov.Core()
        capabilities = core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
        if capability not in capabilities:
            # OpenVINO would quietly run fp32 instead: refuse, as for a CUDA fallback.
            raise EngineError(
                f"{model_path} asks for {precision}, but this CPU has no {capability} support "
                f"(OpenVINO reports {list(capabilities)}); serve the fp32 version instead"
            )
        try:
            model = core.read_model(str(model_path))
            self.compiled = core.compile_model(
                model,
                "CPU",
                {
                    "INFERENCE_PRECISION_HINT": hint,
                    "PERFORMANCE_HINT": "LATENCY",
                    "INFERENCE_NUM_THREADS": threads or usable_cores(),
                    "NUM_STREAMS": 1,
                },
            )
        except Exception as exc:
            raise EngineError(f"OpenVINO cannot compile {model_path}: {exc}") from exc
        names = {o.get_any_name(): o for o in self.compiled.outputs}
        missing = [n for n in output_names if n not in names]
        if missing:
            raise EngineError(f"{model_path}: outputs {missing} not in the graph {sorted(names)}")
        inputs = [i.get_any_name() for i in self.compiled.inputs]
        if inputs != [input_name]:
            raise EngineError(
                f"{model_path}: expected the single input {input_name!r}, got {inputs}"
            )
        self._outputs = [names[n] for n in output_names]
        self._request = self.compiled.create_infer_request()
        self.input_name, self.output_names = input_name, list(output_names)
        self.kernel_precisions = _kernel_precisions(self.compiled)
        self.provider = f"OpenVINO CPU ({precision})"
        self.providers = [self.provider]
        self.io_binding = False
        self.bound_batch_sizes: list[int] = []
        self.cuda_graph = False
        self.warm_runs = 1

    def run(self, batch: np.ndarray) -> list[np.ndarray]:
        """Outputs as float32, in `output_names` order. One request at a time (the batcher
        runs one batch per model at a time)."""
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        results = self._request.infer({self.input_name: batch})
        return [np.array(results[output], dtype=np.float32) for output in self._outputs]


# The layers that carry a ResNet's arithmetic, in OpenVINO's compiled (runtime) graph.
_COMPUTE_LAYERS = ("Convolution", "FullyConnected", "MatMul")


def _kernel_precisions(compiled: object) -> dict[str, int]:
    """How many convolution / fully connected layers run in each precision, as compiled for this
    CPU (e.g. {"u8": 54} for a quantized ResNet-50, {"bf16": 54} under a bf16 hint): what the
    engine really runs, which the precision asked for does not prove."""
    counts: dict[str, int] = {}
    for op in compiled.get_runtime_model().get_ordered_ops():  # type: ignore[attr-defined]
        info = op.get_rt_info()
        if "layerType" not in info or "runtimePrecision" not in info:
            continue
        if info["layerType"].astype(str) in _COMPUTE_LAYERS:
            precision = info["runtimePrecision"].astype(str)
            counts[precision] = counts.get(precision, 0) + 1
    return dict(sorted(counts.items()))
