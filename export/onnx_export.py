"""Trace an eval-mode ResNet to one self-contained ONNX graph with a dynamic batch axis.

Exporter: torch.onnx's dynamo exporter (torch.export), the maintained path in torch 2.13; the
TorchScript exporter is deprecated there. Opset 18 is the one it emits natively (no version
conversion pass) and every onnxruntime since 1.14 implements it. The graph has input `images`
[N, 3, H, W] and outputs `logits` [N, classes] and `embedding` [N, D] (the GAP vector).
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import onnx
import torch

from models.resnet import ResNet, WithEmbedding

OPSET = 18
EXPORTER = "torch.onnx dynamo (torch.export)"
INPUT_NAME = "images"
OUTPUT_NAMES = ("logits", "embedding")
# Largest batch the graph declares; the service never batches past what parity verified.
MAX_DYNAMIC_BATCH = 4096


class OnnxExportError(RuntimeError):
    pass


def export_onnx(model: ResNet, input_size: tuple[int, int, int], path: Path) -> None:
    """Write the graph for `model` (put into eval mode here) to `path` and check it fully."""
    model.eval()
    wrapped = WithEmbedding(model).eval()
    # Trace with batch 2: a batch of 1 invites specialization of the batch axis.
    example = torch.zeros(2, *input_size)
    batch = torch.export.Dim("batch", min=1, max=MAX_DYNAMIC_BATCH)
    try:
        with _quiet():
            program = torch.onnx.export(
                wrapped,
                (example,),
                dynamo=True,
                input_names=[INPUT_NAME],
                output_names=list(OUTPUT_NAMES),
                dynamic_shapes=({0: batch},),
                opset_version=OPSET,
                optimize=True,
                verbose=False,
            )
            program.save(str(path), external_data=False)
    except Exception as exc:
        raise OnnxExportError(f"ONNX export failed: {_first_line(exc)}") from exc
    check_graph(path, input_size)


def check_graph(path: Path, input_size: tuple[int, int, int]) -> None:
    """onnx.checker's full check, plus the contract: names, a dynamic batch, no external data."""
    model = onnx.load(str(path), load_external_data=False)
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:
        raise OnnxExportError(f"onnx.checker rejected the graph: {_first_line(exc)}") from exc
    graph = model.graph
    inputs = [i for i in graph.input if i.name not in {t.name for t in graph.initializer}]
    if [i.name for i in inputs] != [INPUT_NAME]:
        raise OnnxExportError(f"graph inputs are {[i.name for i in inputs]}, expected images")
    if [o.name for o in graph.output] != list(OUTPUT_NAMES):
        raise OnnxExportError(f"graph outputs are {[o.name for o in graph.output]}")
    dims = inputs[0].type.tensor_type.shape.dim
    if dims[0].dim_param == "" or [d.dim_value for d in dims[1:]] != list(input_size):
        raise OnnxExportError("the input must be [batch, C, H, W] with a symbolic batch axis")
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in graph.initializer):
        raise OnnxExportError("the graph references external data; it must be self-contained")


@contextlib.contextmanager
def _quiet():  # type: ignore[no-untyped-def]
    """The dynamo exporter prints progress and warnings about torchvision ops we never use."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stdout(io.StringIO()),
        ):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
