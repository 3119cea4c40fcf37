"""Reduced precision behind the accuracy gate: bf16 (OpenVINO) and int8 (onnxruntime QDQ)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from contract.preprocessing import CIFAR
from export.calibration import load_calibration
from export.exporter import ExportError, ExportRequest, export_model
from export.precision import GateThresholds
from runtime.engines import EngineConfig, create_engine

from .conftest import CIFAR_TEST, PHOTOS, require


def _bf16_or_skip() -> None:
    ov = pytest.importorskip("openvino", reason="OpenVINO is not installed (extra `openvino`)")
    if "BF16" not in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        pytest.skip("this CPU has no bf16 support (AMX / AVX512-BF16)")


def _request(tmp_path: Path, checkpoint: Path, precision: str, **kw: object) -> ExportRequest:
    calibration = load_calibration(require(CIFAR_TEST), CIFAR, 128)
    return ExportRequest(
        arch="cifar_resnet20",
        weights=str(checkpoint),
        out=tmp_path,
        max_batch_size=32,
        precision=precision,
        calibration_images=calibration,
        gate_images=require(PHOTOS),
        gate_labeled=require(CIFAR_TEST),
        **kw,  # type: ignore[arg-type]
    )


def _served_accuracy(version_dir: Path, images: np.ndarray, labels: np.ndarray) -> int:
    meta = json.loads((version_dir / "metadata.json").read_text())
    engine = create_engine(
        version_dir / "model.onnx",
        EngineConfig(),
        engine=meta["engine"],
        precision=meta["precision"],
        input_name="images",
        output_names=["logits", "embedding"],
        input_shape=(3, 32, 32),
    )
    logits = np.concatenate([engine.run(images[i : i + 32])[0] for i in range(0, len(images), 32)])
    return int((logits.argmax(1) == labels).sum())


def test_bf16_passes_the_gate_and_keeps_accuracy(
    tmp_path: Path, resnet20_checkpoint: Path, cifar_test_set: tuple[np.ndarray, np.ndarray]
) -> None:
    _bf16_or_skip()
    result = export_model(_request(tmp_path, resnet20_checkpoint, "bf16"))
    meta = result.metadata
    assert result.name == "cifar_resnet20_bf16"
    assert (meta["precision"], meta["engine"]) == ("bf16", "openvino")
    gate = meta["precision_gate"]
    assert gate["passed"] is True
    assert gate["labeled"]["images"] == 2000
    assert gate["labeled"]["top1_fp32"] == 0.9065
    assert gate["labeled"]["drop_points"] <= 0.3
    assert gate["agreement"]["images"] == 21
    assert gate["agreement"]["top1_agreement"] >= 0.95
    images = load_calibration(CIFAR_TEST, CIFAR, 2000)
    correct = _served_accuracy(result.path, images, cifar_test_set[1])
    assert correct == round(gate["labeled"]["top1_reduced"] * 2000)
    assert abs(correct - 1813) <= 6  # 0.3 points of 2000


def test_int8_is_quantized_and_judged(
    tmp_path: Path, resnet20_checkpoint: Path, cifar_test_set: tuple[np.ndarray, np.ndarray]
) -> None:
    lenient = GateThresholds(max_top1_drop_points=100.0, min_agreement=0.0)
    result = export_model(_request(tmp_path, resnet20_checkpoint, "int8", gate_thresholds=lenient))
    meta = result.metadata
    assert (meta["precision"], meta["engine"]) == ("int8", "onnxruntime")
    ops = {node.op_type for node in onnx.load(str(result.path / "model.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    gate = meta["precision_gate"]
    images = load_calibration(CIFAR_TEST, CIFAR, 2000)
    correct = _served_accuracy(result.path, images, cifar_test_set[1])
    assert correct == round(gate["labeled"]["top1_reduced"] * 2000)
    assert correct > 1700, "calibrated int8 keeps most of the accuracy"


def test_a_failed_gate_writes_nothing(tmp_path: Path, resnet20_checkpoint: Path) -> None:
    impossible = GateThresholds(min_agreement=1.01)
    with pytest.raises(ExportError, match="int8 gate failed: agreement"):
        export_model(_request(tmp_path, resnet20_checkpoint, "int8", gate_thresholds=impossible))
    assert not any(tmp_path.iterdir())


def test_reduced_precision_needs_gate_data(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="bf16 needs gate images"):
        export_model(
            ExportRequest(arch="cifar_resnet20", weights="random", out=tmp_path, precision="bf16")
        )
    with pytest.raises(ExportError, match="unknown precision 'fp8'"):
        export_model(
            ExportRequest(arch="cifar_resnet20", weights="random", out=tmp_path, precision="fp8")
        )
