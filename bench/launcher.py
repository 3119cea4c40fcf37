"""Start `python -m service` on a free local port for a benchmark, and stop it afterwards."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import httpx

PROJECT_ROOT = Path(__file__).resolve().parents[1]


class ServiceStartError(RuntimeError):
    """The service exited or did not become ready in time; the message ends with its log."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text("utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class ServiceProcess:
    """`with ServiceProcess(repo, log) as url:` - the service's base URL once /readyz is 200."""

    def __init__(
        self,
        repository: Path,
        log_path: Path,
        *,
        ready_timeout_s: float = 180.0,
        env: dict[str, str] | None = None,
    ) -> None:
        self.repository = repository.resolve()
        self.log_path = log_path
        self.ready_timeout_s = ready_timeout_s
        self.env = {**os.environ, **(env or {})}
        self.process: subprocess.Popen[bytes] | None = None
        self.log: IO[Any] | None = None

    def __enter__(self) -> str:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log = self.log_path.open("wb")
        command = [sys.executable, "-m", "service", "--model-repository", str(self.repository)]
        command += ["--host", "127.0.0.1", "--port", str(port)]
        self.process = subprocess.Popen(
            command, cwd=PROJECT_ROOT, env=self.env, stdout=self.log, stderr=subprocess.STDOUT
        )
        try:
            self._wait_ready(self.process, url)
        except BaseException:
            self.stop()
            raise
        return url

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _wait_ready(self, process: subprocess.Popen[bytes], url: str) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        with httpx.Client(timeout=2.0) as client:
            while time.monotonic() < deadline:
                if process.poll() is not None:
                    raise ServiceStartError(
                        f"the service exited with {process.returncode} before it was ready; "
                        f"log {self.log_path}:\n{_tail(self.log_path)}"
                    )
                try:
                    if client.get(f"{url}/readyz").status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                time.sleep(0.2)
        raise ServiceStartError(
            f"the service was not ready within {self.ready_timeout_s:.0f} s; "
            f"log {self.log_path}:\n{_tail(self.log_path)}"
        )

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM (graceful drain), then SIGKILL after `grace_s`."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        if self.log is not None:
            self.log.close()
            self.log = None
