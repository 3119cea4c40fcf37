"""Shared test fixtures: the real data in ../shared/data (skipped with a reason when absent)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("RESNET_SERVE_SHARED_DATA", ROOT.parent / "shared" / "data"))
CIFAR_CHECKPOINTS = SHARED_DATA / "cifar10-resnet"
CIFAR_TEST = SHARED_DATA / "cifar10-test" / "cifar10_test_2000.npz"
PHOTOS = SHARED_DATA / "photos"

# Published accuracies on cifar10_test_2000.npz (shared/data/README.md).
CIFAR_CHECKPOINT_FILES = {
    20: ("resnet20-12fca82f.th", 1813),
    32: ("resnet32-d509ac18.th", 1849),
    44: ("resnet44-014dd654.th", 1849),
    56: ("resnet56-4bfd9763.th", 1857),
}


@pytest.fixture(autouse=True)
def _no_default_grpc_port(monkeypatch: pytest.MonkeyPatch) -> None:
    """Apps built in process serve no gRPC unless a test asks (the default, 8001, would clash
    between tests and with anything else on this machine); tests.support.launcher.Service gives
    its process a free port."""
    monkeypatch.setenv("RESNET_SERVE_GRPC_PORT", "0")


def require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real test data not found at {path} (set RESNET_SERVE_SHARED_DATA)")
    return path


@pytest.fixture(scope="session")
def cifar_test_set() -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images [2000, 32, 32, 3], int64 labels [2000])."""
    with np.load(require(CIFAR_TEST)) as data:
        return data["images"], data["labels"]


@pytest.fixture(scope="session")
def resnet20_checkpoint() -> Path:
    return require(CIFAR_CHECKPOINTS / CIFAR_CHECKPOINT_FILES[20][0])


def normalize_cifar(images: np.ndarray) -> np.ndarray:
    """ToTensor + Normalize(ImageNet mean/std), written independently of the service's code."""
    x = images.astype(np.float32).transpose(0, 3, 1, 2) / 255.0
    mean = np.array([0.485, 0.456, 0.406], dtype=np.float32).reshape(1, 3, 1, 1)
    std = np.array([0.229, 0.224, 0.225], dtype=np.float32).reshape(1, 3, 1, 1)
    return (x - mean) / std


# The real ResNet-20 served over HTTP and gRPC, shared by the Open Inference Protocol tests
# (test_oip.py over HTTP, test_grpc.py over gRPC): one service per test module.
SAMPLES = SHARED_DATA / "cifar10-test" / "samples"


@pytest.fixture(scope="module")
def samples() -> list[bytes]:
    """The 20 CIFAR-10 test PNGs (32x32, two per class), as files."""
    return [path.read_bytes() for path in sorted(require(SAMPLES).glob("*.png"))]


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, resnet20_checkpoint: Path, samples: list[bytes]
) -> Iterator[Any]:
    """The exported checkpoint, served (`samples` first: without them, skip before exporting)."""
    from tests.support.launcher import Service

    from .support.service import export

    repo = tmp_path_factory.mktemp("repo")
    export("cifar_resnet20", str(resnet20_checkpoint), repo)
    log = tmp_path_factory.mktemp("logs") / "server.log"
    with Service(repo, log, "--max-delay-ms=5", "--intra-op-threads=1") as service:
        service.wait_ready()
        yield service
        assert service.terminate() == 0, service.log()
    assert "Traceback" not in service.log(), service.log()


@pytest.fixture(scope="module")
def ours(server: Any, samples: list[bytes]) -> dict[str, Any]:
    """/classify (every class, so that all scores are known) and /embed on the samples."""
    import httpx

    from .support.service import multipart

    files = multipart(samples)
    classify = httpx.post(f"{server.url}/classify?top_k=10", files=files, timeout=60)
    embed = httpx.post(f"{server.url}/embed", files=files, timeout=60)
    assert classify.status_code == embed.status_code == 200, classify.text + embed.text
    predictions = classify.json()["predictions"]
    scores = np.zeros((len(samples), 10))
    for row, ranked in zip(scores, predictions, strict=True):
        for p in ranked:
            row[p["index"]] = p["score"]
    return {
        "scores": scores,
        "ranked": [[(p["index"], p["label"]) for p in ranked] for ranked in predictions],
        "embeddings": np.array(embed.json()["embeddings"], dtype=np.float32),
    }
