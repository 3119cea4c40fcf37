"""Helpers for the service tests: tiny hand-made ONNX repositories, exported repositories, the
command lines as a user runs them, in-process apps, and a batcher driven directly."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from fastapi.testclient import TestClient

from service.core.batcher import Batcher, OutputArrays
from service.core.metrics import Metrics
from tests.support.launcher import poll_until

from .graphs import tiny_graph, write_entry

ROOT = Path(__file__).resolve().parents[2]  # the checkout: where `python -m ...` runs


def multipart(blobs: Sequence[bytes], content_type: str = "image/png") -> list[Any]:
    return [("file", (f"{i}.png", blob, content_type)) for i, blob in enumerate(blobs)]


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
    graph = tiny_graph(crop, num_classes, dynamic=dynamic)
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


def run_module(module: str, *args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    """`python -m MODULE ARGS` from the project root, as a user runs it; output captured."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


def export(arch: str, weights: str, repo: Path, *extra: str) -> None:
    """`python -m export ARCH --weights W --out REPO`; raises with its output if it fails."""
    result = run_module(
        "export", arch, "--weights", weights, "--out", str(repo), *extra, timeout_s=600
    )
    if result.returncode != 0:
        raise RuntimeError(f"export {arch} failed: {result.stderr or result.stdout}")


def service_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """`python -m service ARGS` expected to exit on its own (bad settings or repository)."""
    return run_module("service", *args)


def make_batcher(infer: Callable[[np.ndarray], Any], **options: Any) -> Batcher:
    """A Batcher for model "m" with small limits; `options` override them."""
    values: dict[str, Any] = {
        "max_batch_size": 4,
        "max_delay_ms": 20,
        "max_queue_images": 16,
        "retry_after_s": 3,
        "metrics": Metrics(),
    }
    values.update(options)
    return Batcher("m", infer, **values)


async def submit(batcher: Batcher, images: np.ndarray) -> OutputArrays:
    """Admission and run in one call, for inputs that are ready."""
    async with batcher.admit(len(images)) as ticket:
        return await ticket.run(images)


def wait_ready(client: TestClient, deadline_s: float = 30.0, path: str = "/readyz") -> None:
    """Until the in-process app's `path` answers 200, at most `deadline_s`."""
    poll_until(lambda: client.get(path).status_code == 200, deadline_s, f"{path} 200")
