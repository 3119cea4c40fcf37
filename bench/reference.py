"""PyTorch eager on the weights an ONNX graph was exported from: the side-by-side reference.

Imported only for `--compare-torch`; nothing else in `bench` needs torch at run time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from contract.repository import ModelMetadata
from export.exporter import resolve_spec
from export.weights import load_model
from models.resnet import WithEmbedding


class WeightsMismatchError(RuntimeError):
    """The weights rebuilt for PyTorch are not the ones the graph was exported from."""


def torch_threads(threads: int) -> int:
    """Give PyTorch the same intra-op thread count as onnxruntime, for a fair comparison."""
    torch.set_num_threads(threads)
    return torch.get_num_threads()


def build_reference(metadata: ModelMetadata, device: str) -> torch.nn.Module:
    """The eval-mode (logits, embedding) module for a repository entry, checked by weights hash."""
    spec = resolve_spec(metadata.arch, metadata.num_classes)
    weights = metadata.weights
    model, info = load_model(spec, weights.source)
    if info.sha256 != weights.sha256:
        raise WeightsMismatchError(
            f"{metadata.name}: weights {weights.source!r} hash to {info.sha256[:12]}, the "
            f"export recorded {str(weights.sha256)[:12]}; cannot compare like with like"
        )
    return WithEmbedding(model).eval().to(device)


def torch_runner(module: torch.nn.Module, batch: np.ndarray, device: str) -> Callable[[], Any]:
    """One timed call: host batch in, both outputs back on the host (as onnxruntime does)."""
    host = torch.from_numpy(batch)

    def run() -> list[np.ndarray]:
        with torch.inference_mode():
            logits, embedding = module(host.to(device))
            return [logits.cpu().numpy(), embedding.cpu().numpy()]

    return run


def torch_device(ort_providers: list[str]) -> str:
    """cuda when onnxruntime runs on CUDA (same device for both), else cpu."""
    if ort_providers and ort_providers[0] == "CUDAExecutionProvider":
        if not torch.cuda.is_available():
            raise RuntimeError("onnxruntime runs on CUDA but this torch build has no CUDA")
        return "cuda"
    return "cpu"
