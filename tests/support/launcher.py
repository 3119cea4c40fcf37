"""The service as the tests and bench start it: `python -m service` in a subprocess on a free
127.0.0.1 port, its metrics and resources, and `poll_until`, the polling loop every wait of the
tests, the reliability suite and bench goes through."""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import httpx
import psutil
from prometheus_client.parser import text_string_to_metric_families

READY_DEADLINE_S = 60.0
WORKERS_VARIABLE = "TEST_WORKERS"
T = TypeVar("T")


def poll_until(check: Callable[[], T], deadline_s: float, what: str, *, every_s: float = 0.02) -> T:
    """`check()`'s first truthy value, asked every `every_s` for at most `deadline_s` (then
    TimeoutError naming `what`); a transport error (nothing listening yet) counts as "not yet"."""
    deadline = time.monotonic() + deadline_s
    while True:
        with contextlib.suppress(httpx.TransportError, ConnectionError, TimeoutError):
            value = check()
            if value:
                return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"not {what} within {deadline_s} s")
        time.sleep(every_s)


def _alive(read: Callable[[], T], default: T) -> T:
    """`read()` of a process that may have exited meanwhile (then `default`)."""
    try:
        return read()
    except psutil.NoSuchProcess:
        return default


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def metric_value(text: str, name: str, **labels: str) -> float:
    """The sum of a metric's samples matching `labels` in Prometheus text (0 when none)."""
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    )


class Service:
    """One `python -m service` process started from `cwd`; its output goes to `log_path`."""

    def __init__(
        self,
        repo: Path,
        log_path: Path,
        *flags: str,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
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
        # TEST_WORKERS=N runs every service started here with N front-end workers (make
        # reliability WORKERS=N), unless the flags choose.
        workers = os.environ.get(WORKERS_VARIABLE)
        if workers and not any(f.startswith("--workers") for f in flags):
            command.append(f"--workers={workers}")
        command += flags
        # Only the flags and `env` configure it: none of the caller's RESNET_SERVE_* leak in.
        environment = {k: v for k, v in os.environ.items() if not k.startswith("RESNET_SERVE_")}
        environment.update(env or {})
        self._log = log_path.open("wb")
        self.process = subprocess.Popen(
            command, cwd=cwd, stdout=self._log, stderr=subprocess.STDOUT, env=environment
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
        def check() -> bool:
            if self.process.poll() is not None:
                raise RuntimeError(f"service exited ({self.process.returncode}):\n{self.log()}")
            return done(httpx.get(self.url + path, timeout=2.0))

        try:
            poll_until(check, deadline_s, what)
        except TimeoutError as exc:
            raise TimeoutError(f"service {exc}:\n{self.log()}") from None

    def processes(self) -> list[psutil.Process]:
        """The service's processes: this one, and its front-end workers with --workers N."""
        try:
            return [self.ps, *self.ps.children()]
        except psutil.NoSuchProcess:
            return [self.ps]

    def workers(self) -> list[int]:
        """The pids of the front-end workers (none with one process)."""
        return [p.pid for p in self.processes()[1:]]

    def rss_mb(self) -> float:
        return sum(_alive(lambda p=p: p.memory_info().rss, 0) for p in self.processes()) / 2**20

    def resources(self) -> dict[str, float]:
        """What a leak would grow, over all the service's processes: resident memory, threads,
        open file descriptors."""
        totals = {"rss_mb": 0.0, "threads": 0.0, "fds": 0.0}
        for process in self.processes():
            with process.oneshot():
                totals["rss_mb"] += _alive(lambda p=process: p.memory_info().rss, 0) / 2**20
                totals["threads"] += _alive(process.num_threads, 0)
                totals["fds"] += _alive(process.num_fds, 0)
        return totals

    def wait_workers(self, count: int, deadline_s: float = READY_DEADLINE_S) -> list[int]:
        """Until `count` workers run and each answers on its own; their pids."""
        workers = poll_until(
            lambda: len(self.workers()) == count and self.workers(), deadline_s, f"{count} workers"
        )
        for pid in workers:
            poll_until(
                lambda pid=pid: self.connect_to_worker(pid, timeout_s=2).close() or True,
                deadline_s,
                f"worker {pid} serving",
            )
        return workers

    def on_each_worker(self, call: Callable[[], object]) -> None:
        """`call()` once per front-end worker, the others stopped (SIGSTOP) meanwhile, so that
        the new connections it opens go to that worker; just once with one process."""
        workers = self.workers()
        for pid in workers or [None]:
            others = [w for w in workers if w != pid]
            for other in others:
                os.kill(other, signal.SIGSTOP)
            try:
                call()
            finally:
                for other in others:
                    os.kill(other, signal.SIGCONT)

    def connect_to_worker(self, pid: int, timeout_s: float = 60.0) -> http.client.HTTPConnection:
        """A keep-alive connection that worker `pid` accepted: the other workers are stopped
        (SIGSTOP) while it connects and answers one /healthz, then resumed."""
        others = [w for w in self.workers() if w != pid]
        for other in others:
            os.kill(other, signal.SIGSTOP)
        try:
            connection = http.client.HTTPConnection(self.host, self.port, timeout=timeout_s)
            connection.request("GET", "/healthz")
            answer = connection.getresponse()
            answer.read()
            if answer.status != 200:
                raise RuntimeError(f"/healthz on worker {pid}: {answer.status}")
        finally:
            for other in others:
                os.kill(other, signal.SIGCONT)
        return connection

    def num_fds(self) -> int:
        return int(sum(_alive(p.num_fds, 0) for p in self.processes()))

    def settled_fds(self, at_most: int | None = None, deadline_s: float = 5.0) -> int:
        """Open files once connections that are closing right now are gone: the lowest count
        seen over 0.3 s, or sooner once it is down to `at_most`, or at `deadline_s`."""
        start, lowest = time.monotonic(), self.num_fds()
        while time.monotonic() - start < deadline_s:
            if at_most is not None and lowest <= at_most:
                break
            if at_most is None and time.monotonic() - start >= 0.3:
                break
            time.sleep(0.05)
            lowest = min(lowest, self.num_fds())
        return lowest

    def metric(self, name: str, **labels: str) -> float:
        """The sum of a metric's samples matching `labels` (0 when none exist yet)."""
        return metric_value(httpx.get(f"{self.url}/metrics", timeout=10).text, name, **labels)

    def wait_metric(
        self, name: str, done: Callable[[float], bool], deadline_s: float = 30.0, **labels: str
    ) -> float:
        values: list[float] = []

        def check() -> bool:
            values.append(self.metric(name, **labels))
            return done(values[-1])

        try:
            poll_until(check, deadline_s, f"{name}{labels}")
        except TimeoutError:
            stuck = values[-1] if values else None
            raise TimeoutError(f"{name}{labels} stuck at {stuck}:\n{self.log()[-4000:]}") from None
        return values[-1]

    def wait_idle(self, model: str, deadline_s: float = 60.0) -> float:
        """Seconds until no image waits and no request is in flight for `model`."""
        start = time.monotonic()
        for gauge in ("resnet_serve_queue_depth_images", "resnet_serve_requests_in_flight"):
            self.wait_metric(gauge, lambda v: v == 0, deadline_s, model=model)
        return time.monotonic() - start

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
