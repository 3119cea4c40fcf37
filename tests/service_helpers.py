"""Helpers for the service tests: tiny hand-made ONNX repositories, exported repositories, and a
real `python -m service` process on a free local port."""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from reliability.graphs import write_entry

from .conftest import ROOT


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def image_bytes(image: Image.Image, fmt: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def decompression_bomb_png(side: int = 20_000) -> bytes:
    """A valid PNG of side x side 1-bit pixels (all zero): a few tens of kB that decode to
    side^2 pixels, 400 million (1.2 GB as RGB) by default."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    compressor = zlib.compressobj(9)
    row = b"\x00" * (1 + (side + 7) // 8)
    idat = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )


def multipart(blobs: Sequence[bytes], content_type: str = "image/png") -> list[Any]:
    return [("file", (f"{i}.png", blob, content_type)) for i, blob in enumerate(blobs)]


def tiny_graph(num_classes: int, crop: int, *, dynamic: bool = True, seed: int = 0) -> bytes:
    """images [N,3,crop,crop] -> embedding = channel means [N,3], logits = Gemm [N,classes]."""
    rng = np.random.default_rng(seed)
    weight = rng.normal(size=(num_classes, 3)).astype(np.float32)
    bias = rng.normal(size=(num_classes,)).astype(np.float32)
    batch: int | str = "N" if dynamic else 1
    graph = helper.make_graph(
        [
            helper.make_node("GlobalAveragePool", ["images"], ["pooled"]),
            helper.make_node("Flatten", ["pooled"], ["embedding"], axis=1),
            helper.make_node("Gemm", ["embedding", "weight", "bias"], ["logits"], transB=1),
        ],
        "tiny",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [batch, 3, crop, crop])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, num_classes]),
            helper.make_tensor_value_info("embedding", TensorProto.FLOAT, [batch, 3]),
        ],
        initializer=[
            numpy_helper.from_array(weight, "weight"),
            numpy_helper.from_array(bias, "bias"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model.SerializeToString()


def write_tiny_model(
    repo: Path,
    name: str = "tiny",
    version: int = 1,
    *,
    num_classes: int = 4,
    crop: int = 8,
    max_batch_size: int = 16,
    dynamic: bool = True,
    **overrides: Any,
) -> Path:
    """A complete repository version (docs/repository.md) around `tiny_graph`."""
    graph = tiny_graph(num_classes, crop, dynamic=dynamic)
    return write_entry(
        repo,
        name,
        graph,
        crop=crop,
        classes=num_classes,
        dim=3,
        version=version,
        max_batch_size=max_batch_size,
        **{"arch": "tiny", **overrides},
    )


def export(arch: str, weights: str, repo: Path, *extra: str) -> None:
    """`python -m export`, as a user runs it."""
    result = subprocess.run(
        [sys.executable, "-m", "export", arch, "--weights", weights, "--out", str(repo), *extra],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if result.returncode != 0:
        raise RuntimeError(f"export {arch} failed: {result.stderr or result.stdout}")
