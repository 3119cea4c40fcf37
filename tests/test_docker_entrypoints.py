"""The containers' flow without Docker: the same entrypoint scripts the images run, end to end.

export-entrypoint.sh writes the real CIFAR ResNet-20 checkpoint into a fresh repository (a
subset of the paper preset, which takes minutes on 2 cores), serve-entrypoint.sh serves it on a
free local port, the image's health probe judges readiness, one real image is classified, and
SIGTERM ends the service cleanly.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.launcher import free_port, poll_until

from .conftest import CIFAR_CHECKPOINT_FILES, CIFAR_CHECKPOINTS, ROOT, SHARED_DATA, require

DOCKER = ROOT / "docker"
SAMPLE = SHARED_DATA / "cifar10-test" / "samples" / "cat_domestic_cat_s_000907.png"
READY_DEADLINE_S = 60.0


def environment(**variables: str) -> dict[str, str]:
    """This process's environment without any container configuration, plus `variables`.

    PYTHON points the scripts at this interpreter (the images use their own `python`)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RESNET_SERVE_", "EXPORT_"))}
    env.update(PYTHON=sys.executable, **variables)
    return env


def export_entrypoint(
    repo: Path, weights_dir: Path, **variables: str
) -> subprocess.CompletedProcess[str]:
    env = environment(
        RESNET_SERVE_MODEL_REPOSITORY=str(repo), EXPORT_WEIGHTS_DIR=str(weights_dir), **variables
    )
    return subprocess.run(
        [str(DOCKER / "export-entrypoint.sh")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def healthcheck(env: dict[str, str]) -> int:
    command = [sys.executable, str(DOCKER / "healthcheck.py"), "/readyz"]
    return subprocess.run(command, env=env, capture_output=True, timeout=30).returncode


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ./weights stand-in holding the published checkpoint under its published name."""
    name = CIFAR_CHECKPOINT_FILES[20][0]
    checkpoint = require(CIFAR_CHECKPOINTS / name)
    directory = tmp_path_factory.mktemp("weights")
    (directory / name).write_bytes(checkpoint.read_bytes())
    return directory


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, weights_dir: Path) -> Path:
    repo = tmp_path_factory.mktemp("volume") / "models"
    result = export_entrypoint(repo, weights_dir, EXPORT_ARCHS="cifar_resnet20")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"cifar_resnet20: checkpoint {weights_dir}" in result.stdout
    return repo


def test_export_entrypoint_uses_the_mounted_checkpoint(exported: Path, weights_dir: Path) -> None:
    (version,) = (p for p in (exported / "cifar_resnet20").iterdir() if p.name.isdigit())
    metadata = json.loads((version / "metadata.json").read_text("utf-8"))
    checkpoint = weights_dir / CIFAR_CHECKPOINT_FILES[20][0]
    assert metadata["weights"]["trained"] is True
    assert metadata["weights"]["sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert metadata["parity"]["passed"] is True


def test_export_entrypoint_skips_what_is_already_there(exported: Path, weights_dir: Path) -> None:
    before = sorted(p.name for p in (exported / "cifar_resnet20").iterdir())
    result = export_entrypoint(exported, weights_dir, EXPORT_ARCHS="cifar_resnet20")
    assert result.returncode == 0, result.stderr
    assert "already present with the same weights, skipped" in result.stdout
    assert sorted(p.name for p in (exported / "cifar_resnet20").iterdir()) == before


@pytest.mark.parametrize("variable", ["EXPORT_PRESET", "EXPORT_PRETRAINED"])
def test_export_entrypoint_hands_its_variables_to_the_exporter(
    tmp_path: Path, variable: str
) -> None:
    result = export_entrypoint(tmp_path / "repo", tmp_path, **{variable: "no-such-value"})
    assert result.returncode == 2
    flag = variable.removeprefix("EXPORT_").lower()
    assert f"--{flag}: invalid choice: 'no-such-value'" in result.stderr


def test_export_entrypoint_needs_a_repository(tmp_path: Path) -> None:
    result = subprocess.run(
        [str(DOCKER / "export-entrypoint.sh")],
        env=environment(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "RESNET_SERVE_MODEL_REPOSITORY" in result.stderr


@pytest.fixture
def service(exported: Path, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], dict]]:

    env = environment(
        RESNET_SERVE_MODEL_REPOSITORY=str(exported),
        RESNET_SERVE_HOST="127.0.0.1",
        RESNET_SERVE_PORT=str(free_port()),
        RESNET_SERVE_INTRA_OP_THREADS="1",
    )
    log = (tmp_path / "service.log").open("wb")
    process = subprocess.Popen(
        [str(DOCKER / "serve-entrypoint.sh")],
        cwd=tmp_path,  # the script finds the code itself, as it does in the image
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        yield process, env
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        log.close()


def test_serve_entrypoint_serves_the_export_and_stops_cleanly(
    service: tuple[subprocess.Popen[bytes], dict[str, str]], tmp_path: Path
) -> None:
    process, env = service
    url = f"http://127.0.0.1:{env['RESNET_SERVE_PORT']}"

    def healthy() -> bool:
        log = (tmp_path / "service.log").read_text("utf-8", "replace")
        assert process.poll() is None, f"service exited ({process.returncode}):\n{log}"
        return healthcheck(env) == 0

    poll_until(healthy, READY_DEADLINE_S, "healthy (the image's probe)", every_s=0.2)

    image = require(SAMPLE).read_bytes()
    response = httpx.post(
        f"{url}/classify",
        params={"top_k": 3},
        files=[("file", (SAMPLE.name, image, "image/png"))],
        timeout=30,
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "cifar_resnet20"
    assert body["predictions"][0][0]["label"] == "cat"

    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0
    assert healthcheck(env) == 1
