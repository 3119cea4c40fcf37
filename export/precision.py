"""Reduced precision with an accuracy gate.

- bf16: the fp32 graph, compiled by OpenVINO with a bf16 inference precision (AMX units).
- int8: static QDQ quantization by onnxruntime, calibrated on real images; served by onnxruntime.
- int8 through OpenVINO: NNCF post-training quantization of the ONNX graph (QDQ nodes, calibrated
  on the same images), served by OpenVINO, which runs it on VNNI or AMX int8 units where the CPU
  has them; a candidate of `--precision auto` only.
- fp16: the graph's weights and arithmetic converted to float16, its input and outputs kept
  float32 (so clients and the service see no difference); made for CUDA, served by onnxruntime.
  The gate runs where the export runs: on a host without CUDA that is the CPU provider, which
  computes many fp16 operators in float32 behind inserted casts, so such a gate says little
  about CUDA's fp16 kernels; the device is recorded (`precision_gate.device`).

A precision is accepted only if, against the fp32 graph run by onnxruntime:
- top-1 accuracy on a labeled set whose classes are the model's drops by at most 0.3 points, and
- top-1 agreement on real photos is at least 95%.
The gate runs the very engines the service will run, and its figures go into metadata.json.

`--precision auto` tries every candidate this host can run (`CANDIDATES`), gates each, measures
each at the batch sizes the service will form, and keeps the fastest that passed (`choose`); fp32
is the reference and always passes, so there is always a choice.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import math
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, get_args

import numpy as np

from contract.preprocessing import Preprocessing
from contract.repository import EngineName, Precision
from runtime.engines import Engine, EngineConfig, create_engine
from runtime.engines.providers import cuda_devices

from .calibration import load_calibration
from .onnx_export import INPUT_NAME, OUTPUT_NAMES

PRECISIONS: tuple[Precision, ...] = get_args(Precision)  # what an export can be made at
ENGINE_OF_PRECISION: dict[str, EngineName] = {
    "fp32": "onnxruntime",
    "bf16": "openvino",
    "int8": "onnxruntime",
    "fp16": "onnxruntime",
}


@dataclass(frozen=True)
class Candidate:
    """A precision and the engine that serves it."""

    precision: Precision
    engine: EngineName

    @classmethod
    def of(cls, precision: str) -> Candidate:
        """The engine an explicit `--precision` is served by."""
        return cls(precision, ENGINE_OF_PRECISION[precision])  # type: ignore[arg-type]

    @property
    def key(self) -> str:
        return f"{self.precision}-{self.engine}"


# What `--precision auto` tries, in this order (the order breaks exact ties in speed).
CANDIDATES = (
    Candidate("fp32", "onnxruntime"),
    Candidate("bf16", "openvino"),
    Candidate("int8", "onnxruntime"),
    Candidate("int8", "openvino"),
    Candidate("fp16", "onnxruntime"),
)


class PrecisionError(RuntimeError):
    pass


@dataclass(frozen=True)
class GateThresholds:
    max_top1_drop_points: float = 0.3
    min_agreement: float = 0.95


@dataclass
class GateData:
    agreement_images: np.ndarray  # preprocessed float32 NCHW
    agreement_source: str
    labeled_images: np.ndarray | None = None
    labeled_labels: np.ndarray | None = None
    labeled_classes: list[str] | None = None
    labeled_source: str = ""


def load_gate_data(
    prep: Preprocessing, images_dir: Path, labeled_npz: Path | None, limit: int = 2000
) -> GateData:
    data = GateData(load_calibration(images_dir, prep, limit), str(images_dir))
    if labeled_npz is not None:
        with np.load(labeled_npz) as npz:
            if "labels" not in npz or "class_names" not in npz:
                raise PrecisionError(f"{labeled_npz} needs `labels` and `class_names` arrays")
            data.labeled_labels = npz["labels"][:limit]
            data.labeled_classes = [str(c) for c in npz["class_names"]]
        data.labeled_images = load_calibration(labeled_npz, prep, limit)
        data.labeled_source = str(labeled_npz)
    return data


def quantize_int8(fp32_graph: Path, out: Path, calibration: np.ndarray) -> None:
    """Static QDQ quantization: per-channel int8 weights, uint8 activations, ranges calibrated
    on `calibration` (real preprocessed images)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches = iter(calibration[i : i + 8] for i in range(0, len(calibration), 8))

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self._batches, None)
            return None if batch is None else {INPUT_NAME: np.ascontiguousarray(batch)}

    with tempfile.TemporaryDirectory(prefix="resnet-int8-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32_graph), str(prepared))
        quantize_static(
            str(prepared),
            str(out),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )


def quantize_int8_nncf(fp32_graph: Path, out: Path, calibration: np.ndarray) -> None:
    """NNCF post-training quantization (its default preset: symmetric int8 weights and
    activations, fast bias correction) of the ONNX graph, calibrated on every image given."""
    import nncf
    import onnx

    nncf.set_log_level(logging.ERROR)
    dataset = nncf.Dataset(
        [calibration[i : i + 1] for i in range(len(calibration))],
        lambda image: {INPUT_NAME: np.ascontiguousarray(image)},
    )
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        # NNCF draws progress bars (rich) on the console; the export prints its own summary.
        model = nncf.quantize(onnx.load(str(fp32_graph)), dataset, subset_size=len(calibration))
    onnx.save(model, str(out))


def convert_fp16(fp32_graph: Path, out: Path) -> None:
    """float16 weights and arithmetic, float32 input and outputs (Cast nodes at the edges):
    onnxruntime's own converter (onnxruntime.transformers.float16), which ships with it."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(fp32_graph)), keep_io_types=True)
    onnx.save(model, str(out))


def open_engine(
    graph: Path, precision: str, input_shape: tuple[int, ...], engine: str | None = None
) -> Engine:
    return create_engine(
        graph,
        EngineConfig(),
        engine=engine or ENGINE_OF_PRECISION[precision],
        precision=precision,
        input_name=INPUT_NAME,
        output_names=list(OUTPUT_NAMES),
        input_shape=input_shape,
    )


def _logits(engine: Engine, images: np.ndarray, batch: int) -> np.ndarray:
    return np.concatenate(
        [engine.run(images[i : i + batch])[0] for i in range(0, len(images), batch)]
    )


def run_gate(
    fp32: Engine,
    reduced: Engine,
    precision: str,
    labels: list[str],
    data: GateData,
    thresholds: GateThresholds,
    batch: int,
    engine: str | None = None,
) -> dict[str, Any]:
    """Measure, then judge; the returned dict is the metadata's `precision_gate`."""
    a32 = _logits(fp32, data.agreement_images, batch)
    ared = _logits(reduced, data.agreement_images, batch)
    agreement = float(np.mean(a32.argmax(1) == ared.argmax(1)))
    report: dict[str, Any] = {
        "precision": precision,
        "engine": engine or ENGINE_OF_PRECISION[precision],
        "thresholds": asdict(thresholds),
        "agreement": {
            "source": data.agreement_source,
            "images": len(a32),
            "top1_agreement": agreement,
            "max_abs_logit_diff": float(np.abs(a32 - ared).max()),
        },
    }
    passed = agreement >= thresholds.min_agreement
    if data.labeled_images is not None and data.labeled_classes == labels:
        l32 = _logits(fp32, data.labeled_images, batch)
        lred = _logits(reduced, data.labeled_images, batch)
        top1_fp32 = float(np.mean(l32.argmax(1) == data.labeled_labels))
        top1_reduced = float(np.mean(lred.argmax(1) == data.labeled_labels))
        drop = 100.0 * (top1_fp32 - top1_reduced)
        report["labeled"] = {
            "source": data.labeled_source,
            "images": len(l32),
            "top1_fp32": top1_fp32,
            "top1_reduced": top1_reduced,
            "drop_points": drop,
            "top1_agreement": float(np.mean(l32.argmax(1) == lred.argmax(1))),
        }
        passed = passed and drop <= thresholds.max_top1_drop_points
    elif data.labeled_images is not None:
        report["labeled"] = {
            "source": data.labeled_source,
            "applicable": False,
            "reason": "the labeled set's classes are not the model's",
        }
    report["passed"] = bool(passed)
    return report


def unavailable(candidate: Candidate, *, calibration: bool) -> str | None:
    """Why this host cannot run `candidate`, or None when it can."""
    if candidate.engine == "openvino" and importlib.util.find_spec("openvino") is None:
        return "OpenVINO is not installed (pip install 'resnet-serve[openvino]')"
    if candidate.precision == "int8" and not calibration:
        return "int8 needs calibration images (--calibration-images)"
    if candidate.key == "int8-openvino" and importlib.util.find_spec("nncf") is None:
        return "NNCF is not installed (pip install 'resnet-serve[export]')"
    if candidate.precision == "bf16":
        import openvino as ov

        capabilities = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
        if "BF16" not in capabilities:
            return f"this CPU has no bf16 units (OpenVINO reports {list(capabilities)})"
    if candidate.precision == "fp16":
        import onnxruntime

        if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
            return "fp16 is for CUDA: this onnxruntime has no CUDA provider"
        devices, why = cuda_devices()
        if devices < 1:
            return f"fp16 is for CUDA: no CUDA device ({why})"
    return None


def reduced_graph(candidate: Candidate, fp32_graph: Path, tmp: Path, calibration: Any) -> Path:
    """The graph `candidate` serves, written into `tmp` (the fp32 graph itself for fp32/bf16)."""
    out = tmp / f"model.{candidate.key}.onnx"
    if candidate.key == "int8-onnxruntime":
        quantize_int8(fp32_graph, out, calibration)
    elif candidate.key == "int8-openvino":
        quantize_int8_nncf(fp32_graph, out, calibration)
    elif candidate.precision == "fp16":
        convert_fp16(fp32_graph, out)
    else:
        return fp32_graph
    return out


def measure_batch_sizes(max_batch_size: int) -> list[int]:
    """One image, a batch the service forms under moderate load, and its largest batch."""
    return sorted({1, min(8, max_batch_size), max_batch_size})


def images_per_second(
    engines: dict[str, Engine],
    images: np.ndarray,
    batch_sizes: Sequence[int],
    *,
    min_seconds: float = 1.0,
    min_runs: int = 3,
) -> dict[str, dict[str, float]]:
    """Median images/s of each engine at each batch size, on batches cut from real `images`
    (repeated as needed). The engines take turns run by run (after one warm-up run each), so a
    change in the machine's load falls on all of them alike rather than on whichever ran then;
    each runs >= min_runs times and >= min_seconds per batch size."""
    result: dict[str, dict[str, float]] = {key: {} for key in engines}
    for size in batch_sizes:
        batch = np.ascontiguousarray(np.resize(images, (size, *images.shape[1:])))
        times: dict[str, list[float]] = {key: [] for key in engines}
        for engine in engines.values():
            engine.run(batch)
        spent = 0.0
        while min(map(len, times.values())) < min_runs or spent < min_seconds * len(engines):
            for key, engine in engines.items():
                began = time.perf_counter()
                engine.run(batch)
                elapsed = time.perf_counter() - began
                times[key].append(elapsed)
                spent += elapsed
        for key, runs in times.items():
            result[key][str(size)] = round(size / float(np.median(runs)), 2)
    return result


def score(images_per_s: dict[str, float]) -> float:
    """One figure per candidate: the geometric mean of its images/s over the batch sizes."""
    values = list(images_per_s.values())
    return round(math.exp(sum(math.log(v) for v in values) / len(values)), 2)


def choose(candidates: Sequence[dict[str, Any]]) -> int:
    """The index of the fastest candidate that passed its gate (`status` "passed" and a
    `score`); never one that failed, errored or could not run. fp32 always passes, so an
    `auto` export always has a choice; raises if none passed."""
    passed = [i for i, c in enumerate(candidates) if c["status"] == "passed" and c.get("score")]
    if not passed:
        raise PrecisionError("no candidate precision passed its gate")
    return max(passed, key=lambda i: (candidates[i]["score"], -i))
