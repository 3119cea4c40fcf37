"""A nearly free model, served like any export: what `bench http` measures on it is the front
end's capacity, not the model's (Triton's identity model plays that role for perf_analyzer).

The graph is CIFAR-sized (images [N, 3, 32, 32], the CIFAR preprocessing) and does almost
nothing: GlobalAveragePool -> `embedding` [N, 3] -> Gemm -> `logits` [N, 10], with seeded random
weights (so `"trained": false`) and the CIFAR-10 class names as labels. Before it is written,
onnxruntime (the service's engine and session settings) is compared with a float64 numpy
reference at batch 1, 7 and the largest batch, with the exporter's rule (|ort - ref| <= atol +
rtol * max|ref|, atol = rtol = 1e-4, and the same top-1); the report goes into metadata.json's
`parity`, and the version is written through `contract.repository.write_version`, so
`python -m service` serves it unchanged.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from contract.preprocessing import CIFAR
from contract.repository import (
    ModelMetadata,
    OutputSpecs,
    TensorSpec,
    Weights,
    read_metadata,
    version_numbers,
    write_version,
)

NAME = "free_cifar"
CLASSES = 10
DIM = 3
OPSET = 17
ATOL = RTOL = 1e-4


def weights(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The linear layer: weight [classes, 3] and bias [classes], seeded."""
    rng = np.random.default_rng(seed)
    weight = rng.normal(size=(CLASSES, DIM)).astype(np.float32)
    return weight, rng.normal(size=(CLASSES,)).astype(np.float32)


def graph(weight: np.ndarray, bias: np.ndarray, crop: int = CIFAR.crop) -> bytes:
    """GlobalAveragePool -> Flatten (`embedding`) -> Gemm (`logits`), dynamic batch."""
    nodes = [
        helper.make_node("GlobalAveragePool", ["images"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["embedding"], axis=1),
        helper.make_node("Gemm", ["embedding", "fc_w", "fc_b"], ["logits"], transB=1),
    ]
    body = helper.make_graph(
        nodes,
        NAME,
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 3, crop, crop])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", CLASSES]),
            helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", DIM]),
        ],
        initializer=[
            numpy_helper.from_array(weight, "fc_w"),
            numpy_helper.from_array(bias, "fc_b"),
        ],
    )
    model = helper.make_model(body, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model.SerializeToString()


def reference(batch: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> tuple[np.ndarray, ...]:
    """(logits, embedding) in float64 numpy: the graph written independently of onnxruntime."""
    embedding = batch.astype(np.float64).mean(axis=(2, 3))
    return embedding @ weight.astype(np.float64).T + bias.astype(np.float64), embedding


def _diff(ours: np.ndarray, ref: np.ndarray) -> dict[str, Any]:
    scale = float(np.max(np.abs(ref)))
    max_abs = float(np.max(np.abs(ours.astype(np.float64) - ref)))
    tolerance = ATOL + RTOL * scale
    return {
        "max_abs": max_abs,
        "scale": scale,
        "tolerance": tolerance,
        "passed": max_abs <= tolerance,
    }


def parity(
    model_file: Path, weight: np.ndarray, bias: np.ndarray, max_batch: int
) -> dict[str, Any]:
    """onnxruntime through the service's engine against `reference`, on seeded inputs."""
    from runtime.engines import create_engine
    from service.core.settings import Settings

    config = Settings(model_repository=model_file.parent).engine_config()
    engine = create_engine(
        model_file,
        config,
        input_name="images",
        output_names=["logits", "embedding"],
        input_shape=(3, CIFAR.crop, CIFAR.crop),
    )
    rng = np.random.default_rng(1)
    results = []
    for size in sorted({1, 7, max_batch}):
        batch = rng.standard_normal((size, 3, CIFAR.crop, CIFAR.crop), dtype=np.float32)
        logits, embedding = engine.run(batch)
        ref_logits, ref_embedding = reference(batch, weight, bias)
        top1 = float(np.mean(np.argmax(logits, 1) == np.argmax(ref_logits, 1)))
        case = {
            "inputs": "random:1",
            "batch_size": size,
            "logits": _diff(logits, ref_logits),
            "embedding": _diff(embedding, ref_embedding),
            "top1_agreement": top1,
        }
        case["passed"] = case["logits"]["passed"] and case["embedding"]["passed"] and top1 == 1.0
        results.append(case)
    return {
        "passed": all(c["passed"] for c in results),
        "reference": "numpy float64: mean over H and W, then x @ W.T + b",
        "engine": "onnxruntime with the service's session settings",
        "batch_sizes": [c["batch_size"] for c in results],
        "tolerances": {"atol": ATOL, "rtol": RTOL},
        "results": results,
    }


def write_free_model(
    repo: Path, *, name: str = NAME, max_batch_size: int = 32, seed: int = 0
) -> tuple[Path, bool]:
    """(the version directory, whether it was written now): the highest version is reused when
    it holds the same graph; otherwise the next version is written, after a passed parity."""
    from models.registry import CIFAR10_CLASSES

    weight, bias = weights(seed)
    model = graph(weight, bias)
    digest = hashlib.sha256(model).hexdigest()
    existing = version_numbers(repo / name)
    if existing:
        last = repo / name / str(existing[-1])
        if read_metadata(last).model_sha256 == digest:
            return last, False
    with tempfile.TemporaryDirectory(prefix="bench-free-model-") as tmp:
        model_file = Path(tmp) / "model.onnx"
        model_file.write_bytes(model)
        report = parity(model_file, weight, bias, max_batch_size)
        if not report["passed"]:
            raise RuntimeError(f"the free model's parity failed: {report['results']}")
        metadata = ModelMetadata(
            name=name,
            version=(existing[-1] + 1) if existing else 1,
            arch="gap_linear",
            family="cifar",
            created_at=dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            model_sha256=digest,
            input=TensorSpec(name="images", shape=[None, 3, CIFAR.crop, CIFAR.crop]),
            outputs=OutputSpecs(
                logits=TensorSpec(name="logits", shape=[None, CLASSES]),
                embedding=TensorSpec(name="embedding", shape=[None, DIM]),
            ),
            num_classes=CLASSES,
            embedding_dim=DIM,
            labels=list(CIFAR10_CLASSES),
            preprocessing=CIFAR,
            weights=Weights(source=f"random:{seed}", trained=False),
            params=int(weight.size + bias.size),
            macs=3 * CIFAR.crop * CIFAR.crop + CLASSES * DIM,  # the pooling's adds + the Gemm
            max_batch_size=max_batch_size,
            parity=report,
            export={"exporter": "bench.free_model (onnx.helper)", "opset": OPSET},
        )
        return write_version(repo, metadata, model_file), True
