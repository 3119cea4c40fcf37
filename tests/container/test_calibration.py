"""The stack with representative images in its calibration directory: the export job runs
`--precision auto` for the model they suit, on the serving host, and the served model is the
fastest precision that passed the gate, checked from the host through 127.0.0.1.

The calibration directory holds the 2000 labeled CIFAR-10 test images the other container
tests classify (shared/data/cifar10-test/cifar10_test_2000.npz), as a user's ./calibration would.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from ..conftest import CIFAR_TEST, require
from .test_stack import MODEL, READY_DEADLINE_S, Stack, classify, free_port, phase, png

pytestmark = pytest.mark.container

PROJECT = "resnet-serve-ci-calibrated"
PYTORCH_CORRECT = 1813  # fp32, as PyTorch counts it (shared/data/README.md)
GATE_POINTS = 0.3  # the most top-1 a reduced precision may lose, in points


@pytest.fixture(scope="module")
def calibrated() -> Iterator[tuple[Stack, float]]:
    state = os.environ.get("STATE_DIR")
    assert state, "run through `make test-docker` (tests/container/run.sh sets STATE_DIR)"
    directory = os.path.join(state, "calibration-cifar")
    shutil.rmtree(directory, ignore_errors=True)
    os.makedirs(directory)
    os.chmod(directory, 0o755)  # the export job runs as uid 10001
    target = os.path.join(directory, CIFAR_TEST.name)
    shutil.copyfile(require(CIFAR_TEST), target)
    os.chmod(target, 0o644)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RESNET_SERVE_", "EXPORT_"))}
    port, grpc_port = free_port(), free_port()
    env.update(
        COMPOSE_PROJECT_NAME=PROJECT,
        API_BIND="127.0.0.1",
        API_PORTS=str(port),
        API_GRPC_PORTS=str(grpc_port),
        EXPORT_ARCHS=MODEL,
        EXPORT_PRETRAINED="never",
        CALIBRATION_DIR=directory,
        RESNET_SERVE_MAX_QUEUE_IMAGES="4096",
    )
    stack = Stack(port, grpc_port, env, project=PROJECT)
    stack.compose("down", "-v", "--remove-orphans")
    start = time.monotonic()
    stack.compose("up", "-d", "--wait", "--no-build", timeout_s=READY_DEADLINE_S)
    seconds = time.monotonic() - start
    phase("`up -d --wait` with calibration images (export --precision auto, api healthy)", seconds)
    try:
        yield stack, seconds
    finally:
        stack.compose("down", "-v", "--remove-orphans")
        shutil.rmtree(directory, ignore_errors=True)


def test_the_export_job_says_it_runs_auto_on_the_calibration_images(
    calibrated: tuple[Stack, float],
) -> None:
    stack, _ = calibrated
    logs = stack.compose("logs", "--no-color", "export").stdout
    assert f"{MODEL}: --precision auto on 2000 images of calibration/{CIFAR_TEST.name}" in logs
    assert "accuracy on the labeled" in logs
    print(f"\n[container] export job with calibration images:\n{logs}", flush=True)


def test_the_served_model_records_its_choice_and_it_is_the_fastest_that_passed(
    calibrated: tuple[Stack, float],
) -> None:
    stack, _ = calibrated
    model = httpx.get(f"{stack.url}/models/{MODEL}", timeout=10).json()
    metadata = model["metadata"]
    choice = metadata["precision_choice"]
    assert choice is not None and choice["mode"] == "auto"
    assert choice["chosen"] == f"{metadata['precision']}-{metadata['engine']}"
    passed = [c for c in choice["candidates"] if c["status"] in ("passed", "chosen")]
    fastest = max(passed, key=lambda c: c["score"])
    assert choice["chosen"] == f"{fastest['precision']}-{fastest['engine']}"
    (chosen,) = [c for c in choice["candidates"] if c["status"] == "chosen"]
    assert chosen is fastest
    if metadata["precision"] != "fp32":  # a reduced precision was gated on the labeled set
        labeled = metadata["precision_gate"]["labeled"]
        assert labeled["images"] == 2000 and labeled["drop_points"] <= GATE_POINTS
    summary = {f"{c['precision']}-{c['engine']}": c["status"] for c in choice["candidates"]}
    print(f"\n[container] precision auto chose {choice['chosen']}: {summary}", flush=True)


def test_accuracy_through_the_container_stays_within_the_gate(
    calibrated: tuple[Stack, float],
) -> None:
    stack, _ = calibrated
    with np.load(require(CIFAR_TEST)) as data:
        images, labels = data["images"], data["labels"]
    blobs = [png(image) for image in images]
    chunks = [list(range(i, i + 25)) for i in range(0, len(blobs), 25)]
    predicted = np.full(len(blobs), -1)

    def run(chunk: list[int]) -> None:
        with httpx.Client(timeout=120) as client:
            predictions = classify(client, stack.url, [blobs[i] for i in chunk])
        for i, top in zip(chunk, predictions, strict=True):
            predicted[i] = top[0]["index"]

    with ThreadPoolExecutor(8) as pool:
        for future in [pool.submit(run, chunk) for chunk in chunks]:
            future.result()
    correct = int((predicted == labels).sum())
    precision = httpx.get(f"{stack.url}/models/{MODEL}", timeout=10).json()["metadata"]
    print(
        f"\naccuracy through the container ({precision['precision']}-{precision['engine']}, "
        f"precision auto): {correct}/{len(labels)}",
        flush=True,
    )
    floor = PYTORCH_CORRECT - int(GATE_POINTS / 100 * len(labels))  # 1807
    assert correct >= floor


def test_down_v_leaves_nothing_of_the_calibrated_stack(calibrated: tuple[Stack, float]) -> None:
    stack, _ = calibrated
    stack.compose("down", "-v", "--remove-orphans")
    assert stack.leftovers() == {"container": [], "volume": [], "network": []}
