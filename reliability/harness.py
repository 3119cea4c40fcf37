"""The service under test: `python -m service` in a subprocess on a free 127.0.0.1 port, its
metrics and memory, and the images the scenarios send."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
READY_DEADLINE_S = 60.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Service:
    """One `python -m service` process; its output goes to `log_path`."""

    def __init__(
        self, repo: Path, log_path: Path, *flags: str, env: dict[str, str] | None = None
    ) -> None:
        self.port = free_port()
        self.host = "127.0.0.1"
        self.url = f"http://{self.host}:{self.port}"
        self.log_path = log_path
        # gRPC on a free port of its own too (unless the flags choose), never the default 8001.
        given = [f for f in flags if f.startswith("--grpc-port")]
        self.grpc_port = free_port() if not given else int(given[-1].partition("=")[2] or 0)
        command = [sys.executable, "-m", "service", "--model-repository", str(repo)]
        command += ["--host", self.host, "--port", str(self.port), "--no-access-log"]
        command += [] if given else [f"--grpc-port={self.grpc_port}"]
        command += flags
        # Only the flags and `env` configure it: none of the caller's RESNET_SERVE_* leak in.
        environment = {k: v for k, v in os.environ.items() if not k.startswith("RESNET_SERVE_")}
        environment.update(env or {})
        env = environment
        self._log = log_path.open("wb")
        self.process = subprocess.Popen(
            command, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT, env=env
        )
        self.ps = psutil.Process(self.process.pid)

    def log(self) -> str:
        return self.log_path.read_text("utf-8", "replace")

    def wait_ready(self, deadline_s: float = READY_DEADLINE_S) -> None:
        """Until /readyz answers 200; raises with the log when the process exits first."""
        self._wait("/readyz", lambda r: r.status_code == 200, "ready", deadline_s)

    def wait_listening(self, deadline_s: float = READY_DEADLINE_S) -> None:
        """Until the port answers at all (models may still be loading)."""
        self._wait("/healthz", lambda r: True, "listening", deadline_s)

    def _wait(
        self, path: str, done: Callable[[httpx.Response], bool], what: str, deadline_s: float
    ) -> None:
        deadline = time.monotonic() + deadline_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"service exited ({self.process.returncode}):\n{self.log()}")
            with contextlib.suppress(httpx.TransportError):
                if done(httpx.get(self.url + path, timeout=2.0)):
                    return
            time.sleep(0.02)
        raise TimeoutError(f"service not {what} within {deadline_s} s:\n{self.log()}")

    def rss_mb(self) -> float:
        return self.ps.memory_info().rss / 2**20

    def resources(self) -> dict[str, float]:
        """What a leak would grow: resident memory, threads, open file descriptors."""
        with self.ps.oneshot():
            return {
                "rss_mb": self.ps.memory_info().rss / 2**20,
                "threads": self.ps.num_threads(),
                "fds": self.ps.num_fds(),
            }

    def settled_fds(self, at_most: int | None = None, deadline_s: float = 5.0) -> int:
        """Open files once connections that are closing right now are gone: the lowest count
        seen over 0.3 s, or sooner once it is down to `at_most`, or at `deadline_s`."""
        start, lowest = time.monotonic(), self.ps.num_fds()
        while time.monotonic() - start < deadline_s:
            if at_most is not None and lowest <= at_most:
                break
            if at_most is None and time.monotonic() - start >= 0.3:
                break
            time.sleep(0.05)
            lowest = min(lowest, self.ps.num_fds())
        return lowest

    def metric(self, name: str, **labels: str) -> float:
        """The sum of a metric's samples matching `labels` (0 when none exist yet)."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        total = 0.0
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                wanted = all(sample.labels.get(k) == v for k, v in labels.items())
                if sample.name == name and wanted:
                    total += sample.value
        return total

    def wait_metric(
        self, name: str, done: Callable[[float], bool], deadline_s: float = 30.0, **labels: str
    ) -> float:
        deadline = time.monotonic() + deadline_s
        while True:
            value = self.metric(name, **labels)
            if done(value):
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name}{labels} stuck at {value}:\n{self.log()[-4000:]}")
            time.sleep(0.02)

    def terminate(self, timeout_s: float = 60.0) -> int:
        """SIGTERM, then the exit status; a process that does not stop is killed and raises."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise
        finally:
            self._log.close()

    def __enter__(self) -> Service:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.process.poll() is None:
            self.terminate()
        self._log.close()


def encode_image(image: Image.Image, fmt: str = "PNG", **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def encode(pixels: np.ndarray, fmt: str = "PNG", **options: Any) -> bytes:
    """uint8 HWC pixels as an encoded image."""
    return encode_image(Image.fromarray(pixels), fmt, **options)


def sample_images(count: int, *, size: int = 64, seed: int = 0) -> list[bytes]:
    """`count` distinct JPEG and PNG images of smooth noise, never brighter than 200 (so that
    `graphs.poison_graph` accepts them)."""
    rng = np.random.default_rng(seed)
    images = []
    for index in range(count):
        small = rng.integers(0, 200, size=(8, 8, 3), dtype=np.uint8)
        pixels = np.asarray(Image.fromarray(small).resize((size, size), Image.Resampling.BILINEAR))
        images.append(encode(pixels, "JPEG" if index % 2 else "PNG"))
    return images


def solid(value: int, size: int = 16) -> bytes:
    return encode(np.full((size, size, 3), value, dtype=np.uint8))
