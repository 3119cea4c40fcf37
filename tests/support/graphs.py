"""Model repository entries built with onnx.helper, for scenarios that need no torch: a cheap
graph, a graph of tunable cost (to put a service over capacity on purpose), and a graph that
loads and warms up fine but raises inside onnxruntime for some inputs (a real failing batch).

Every graph maps images [N, 3, crop, crop] to `logits` [N, classes] and `embedding` [N, dim],
like an exported ResNet, and is written with a complete metadata.json (docs/repository.md).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from contract.preprocessing import Preprocessing

OPSET = 17
# A normalized pixel above this is "poison" for `poison_graph`: only near-white red channels
# ((1 - 0.485) / 0.229 = 2.25 at 255) get there, and warm-up batches (zeros) never do.
POISON_THRESHOLD = 2.0


def _model(
    nodes: list[onnx.NodeProto],
    crop: int,
    classes: int,
    dim: int,
    initializers: list[onnx.TensorProto],
    batch: int | str = "N",
) -> bytes:
    graph = helper.make_graph(
        nodes,
        "reliability",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [batch, 3, crop, crop])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, classes]),
            helper.make_tensor_value_info("embedding", TensorProto.FLOAT, [batch, dim]),
        ],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _head(source: str, dim: int, classes: int, rng: np.random.Generator, logits: str) -> tuple:
    """GlobalAveragePool -> embedding [N, dim] -> Gemm -> `logits` [N, classes]."""
    weight = rng.normal(size=(classes, dim)).astype(np.float32)
    bias = rng.normal(size=(classes,)).astype(np.float32)
    nodes = [
        helper.make_node("GlobalAveragePool", [source], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["embedding"], axis=1),
        helper.make_node("Gemm", ["embedding", "fc_w", "fc_b"], [logits], transB=1),
    ]
    return nodes, [numpy_helper.from_array(weight, "fc_w"), numpy_helper.from_array(bias, "fc_b")]


def tiny_graph(crop: int, classes: int, *, seed: int = 0, dynamic: bool = True) -> bytes:
    """Channel means -> linear classifier: microseconds per image (batch fixed at 1 unless
    `dynamic`)."""
    nodes, weights = _head("images", 3, classes, np.random.default_rng(seed), "logits")
    return _model(nodes, crop, classes, 3, weights, "N" if dynamic else 1)


def conv_graph(crop: int, classes: int, *, layers: int, channels: int = 64, seed: int = 0) -> bytes:
    """`layers` 3x3 convolutions with ReLU: about layers * channels^2 * 9 * crop^2 MACs per
    image, so that capacity can be set far below what the HTTP layer can feed."""
    rng = np.random.default_rng(seed)
    nodes, weights, source, width = [], [], "images", 3
    for index in range(layers):
        scale = np.sqrt(2.0 / (9 * width))
        kernel = (rng.normal(size=(channels, width, 3, 3)) * scale).astype(np.float32)
        weights.append(numpy_helper.from_array(kernel, f"conv{index}_w"))
        nodes.append(
            helper.make_node(
                "Conv", [source, f"conv{index}_w"], [f"conv{index}"], pads=[1, 1, 1, 1]
            )
        )
        nodes.append(helper.make_node("Relu", [f"conv{index}"], [f"relu{index}"]))
        source, width = f"relu{index}", channels
    head, head_weights = _head(source, width, classes, rng, "logits")
    return _model(nodes + head, crop, classes, width, weights + head_weights)


def poison_graph(crop: int, classes: int, *, seed: int = 0) -> bytes:
    """`tiny_graph` whose logits pass through a Reshape to [-1, classes + 1000 * poisoned],
    poisoned = max(images) > POISON_THRESHOLD: a batch holding a bright pixel makes onnxruntime
    raise (classes * N elements never fill rows of classes + 1000), any other batch works. A
    black image keeps it busy, as `slow_graph` does (so that a test can batch what follows)."""
    nodes, weights = _head("images", 3, classes, np.random.default_rng(seed), "head_logits")
    loop, loop_weights = _slow_loop("head_logits", SLOW_UNIT)
    loop[-1] = helper.make_node("Add", ["head_logits", "nothing"], ["raw_logits"])
    nodes += loop
    weights += loop_weights
    nodes += [
        helper.make_node("ReduceMax", ["images"], ["peak"], keepdims=0),
        helper.make_node("Greater", ["peak", "threshold"], ["poisoned"]),
        helper.make_node("Cast", ["poisoned"], ["poisoned_i"], to=TensorProto.INT64),
        helper.make_node("Mul", ["poisoned_i", "penalty"], ["extra"]),
        helper.make_node("Add", ["extra", "classes"], ["width"]),
        helper.make_node("Unsqueeze", ["width", "axis0"], ["width_1d"]),
        helper.make_node("Concat", ["minus_one", "width_1d"], ["shape"], axis=0),
        helper.make_node("Reshape", ["raw_logits", "shape"], ["logits"]),
    ]
    weights += [
        numpy_helper.from_array(np.array(POISON_THRESHOLD, dtype=np.float32), "threshold"),
        numpy_helper.from_array(np.array(1000, dtype=np.int64), "penalty"),
        numpy_helper.from_array(np.array(classes, dtype=np.int64), "classes"),
        numpy_helper.from_array(np.array([0], dtype=np.int64), "axis0"),
        numpy_helper.from_array(np.array([-1], dtype=np.int64), "minus_one"),
    ]
    return _model(nodes, crop, classes, 3, weights)


# A black image's red channel, normalized with ImageNet's mean and std, is (0 - 0.485) / 0.229 =
# -2.12; a gray or any photo-like one is far above SLOW_BELOW.
SLOW_BELOW = -2.0
SLOW_UNIT = 100_000  # a black image: 12,000 products of 256x256 matrices, ~3 s on 2 AVX2 cores


def _slow_loop(source: str, unit: int) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Nodes that keep the engine busy for a black image: a Loop of
    `unit * (SLOW_BELOW - mean of the red channel)` matrix products (0 for any other image,
    warm-up zeros included), whose result is added to `source` times 0 (logits unchanged)."""
    state = np.ones((256, 256), dtype=np.float32)
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("MatMul", ["state_in", "slow_w"], ["state_out"]),
        ],
        "slow_body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("state_in", TensorProto.FLOAT, [256, 256]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("state_out", TensorProto.FLOAT, [256, 256]),
        ],
    )
    nodes = [
        helper.make_node("Slice", ["images", "c0", "c1", "axis1"], ["red"]),
        helper.make_node("ReduceMean", ["red"], ["red_mean"], keepdims=0),
        helper.make_node("Sub", ["slow_below", "red_mean"], ["below"]),
        helper.make_node("Relu", ["below"], ["below_pos"]),
        helper.make_node("Mul", ["below_pos", "slow_unit"], ["runs_f"]),
        helper.make_node("Cast", ["runs_f"], ["runs"], to=TensorProto.INT64),
        helper.make_node("Loop", ["runs", "true", "slow_state"], ["slow_end"], body=body),
        helper.make_node("ReduceSum", ["slow_end"], ["slow_sum"], keepdims=0),
        helper.make_node("Mul", ["slow_sum", "zero"], ["nothing"]),
        helper.make_node("Add", [source, "nothing"], ["logits"]),
    ]
    weights = [
        numpy_helper.from_array(np.eye(256, dtype=np.float32), "slow_w"),
        numpy_helper.from_array(state, "slow_state"),
        numpy_helper.from_array(np.array(SLOW_BELOW, dtype=np.float32), "slow_below"),
        numpy_helper.from_array(np.array(unit, dtype=np.float32), "slow_unit"),
        numpy_helper.from_array(np.array(True), "true"),
        numpy_helper.from_array(np.array(0.0, dtype=np.float32), "zero"),
        numpy_helper.from_array(np.array([0], dtype=np.int64), "c0"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "c1"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1"),
    ]
    return nodes, weights


def slow_graph(crop: int, classes: int, *, unit: int = SLOW_UNIT, seed: int = 0) -> bytes:
    """`tiny_graph` that keeps the engine busy while it runs a black image (about
    `unit` * 0.12 products of [256, 256] matrices) and takes microseconds for any other: how a
    test holds the engine busy on demand, so that what it sends next waits in the queue,
    without waiting on time itself."""
    nodes, weights = _head("images", 3, classes, np.random.default_rng(seed), "raw_logits")
    loop, loop_weights = _slow_loop("raw_logits", unit)
    return _model(nodes + loop, crop, classes, 3, weights + loop_weights)


def write_slow(
    repo: Path,
    name: str = "slow",
    *,
    crop: int = 16,
    classes: int = 4,
    unit: int = SLOW_UNIT,
    max_batch_size: int = 16,
) -> Path:
    graph = slow_graph(crop, classes, unit=unit)
    return write_entry(
        repo, name, graph, crop=crop, classes=classes, dim=3, max_batch_size=max_batch_size
    )


def write_entry(
    repo: Path,
    name: str,
    graph: bytes,
    *,
    crop: int,
    classes: int,
    dim: int,
    version: int = 1,
    max_batch_size: int = 16,
    **overrides: Any,
) -> Path:
    """REPO/name/version/{model.onnx,metadata.json} for `graph`; `overrides` patch the metadata."""
    directory = repo / name / str(version)
    directory.mkdir(parents=True)
    (directory / "model.onnx").write_bytes(graph)
    metadata: dict[str, Any] = {
        "format_version": 1,
        "name": name,
        "version": version,
        "arch": "synthetic",
        "family": "cifar",
        "model_file": "model.onnx",
        "model_sha256": hashlib.sha256(graph).hexdigest(),
        "precision": "fp32",
        "input": {"name": "images", "shape": [None, 3, crop, crop], "dtype": "float32"},
        "outputs": {
            "logits": {"name": "logits", "shape": [None, classes], "dtype": "float32"},
            "embedding": {"name": "embedding", "shape": [None, dim], "dtype": "float32"},
        },
        "num_classes": classes,
        "embedding_dim": dim,
        "labels": [f"class{i}" for i in range(classes)],
        "preprocessing": Preprocessing(resize_shorter=crop, crop=crop).model_dump(mode="json"),
        "weights": {"source": "random:0", "trained": False},
        "max_batch_size": max_batch_size,
        "parity": {"passed": True},
    }
    metadata.update(overrides)
    (directory / "metadata.json").write_text(json.dumps(metadata), "utf-8")
    return directory


def write_tiny(
    repo: Path, name: str = "tiny", *, crop: int = 16, classes: int = 4, max_batch_size: int = 16
) -> Path:
    graph = tiny_graph(crop, classes)
    return write_entry(
        repo, name, graph, crop=crop, classes=classes, dim=3, max_batch_size=max_batch_size
    )


def write_conv(
    repo: Path, name: str = "conv", *, crop: int = 32, classes: int = 10, layers: int = 4
) -> Path:
    graph = conv_graph(crop, classes, layers=layers)
    return write_entry(repo, name, graph, crop=crop, classes=classes, dim=64)


def write_poison(repo: Path, name: str = "poison", *, crop: int = 16, classes: int = 4) -> Path:
    return write_entry(repo, name, poison_graph(crop, classes), crop=crop, classes=classes, dim=3)
